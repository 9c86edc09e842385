"""Answer-sentence selection: the log-likelihood scoring, the MAP/MRR metrics and the evaluation of
both heads (the word-level ``tokenizer`` fixture comes from conftest.py)."""
import pytest
import torch

from tgr.data import DataError, RankingGroup
from tgr.evaluation import (
    answer_log_likelihoods,
    average_precision,
    encode_pair,
    evaluate_heads,
    evaluate_ranking,
    reciprocal_rank,
)


def test_metrics_on_known_rankings():
    assert average_precision([0, 1, 0, 1]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision([1, 0, 0]) == 1.0 and average_precision([0, 0]) == 0.0
    assert reciprocal_rank([0, 0, 1]) == pytest.approx(1 / 3) and reciprocal_rank([0]) == 0.0


def bigram_model(vocab_size, seed=0):
    """logits at position s depend only on token s: log p(next | prev) = log_softmax(W[prev])."""
    W = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed))
    return W, lambda ids, mask: W[ids]


def test_log_likelihood_is_the_sum_over_answer_tokens_and_batch_invariant(tokenizer):
    W, fn = bigram_model(len(tokenizer))
    pairs = [("Who?", "Someone."), ("What?", "Nothing."), ("Who?", "Other. Someone.")]
    expected = []
    for q, a in pairs:
        ids, n_prompt = encode_pair(tokenizer, q, a, max_length=64)
        lp = torch.log_softmax(W, -1)
        expected.append(sum(lp[ids[i - 1], ids[i]].item() for i in range(n_prompt, len(ids))))
    for batch_size in (1, 2, 3):
        got = answer_log_likelihoods(fn, tokenizer, pairs, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-5)
    per_token = answer_log_likelihoods(fn, tokenizer, pairs[:1], per_token=True)
    n_answer = len(encode_pair(tokenizer, *pairs[0], 64)[0]) - encode_pair(tokenizer, *pairs[0], 64)[1]
    assert per_token[0] == pytest.approx(expected[0] / n_answer, abs=1e-5)


def test_an_oracle_ranks_perfectly_and_a_constant_model_worst(tokenizer):
    groups = [RankingGroup("1", "Who?", ["Other.", "Someone.", "Other. Other."], [0, 1, 0]),
              RankingGroup("2", "What?", ["Nothing.", "Other."], [1, 0])]
    good = {tokenizer.convert_tokens_to_ids(t) for t in ("Someone", "Nothing")}

    def oracle(ids, mask):  # puts all its mass on the correct answers' first word after "A:"
        logits = torch.zeros(*ids.shape, len(tokenizer))
        logits[..., sorted(good)] = 10.0
        return logits

    result = evaluate_ranking(oracle, tokenizer, groups)
    assert (result.map, result.mrr, result.questions, result.candidates) == (1.0, 1.0, 2, 5)
    worst = evaluate_ranking(lambda ids, mask: torch.zeros(*ids.shape, len(tokenizer)), tokenizer, groups)
    assert worst.mrr == pytest.approx(0.5)  # ties with a shorter-or-equal wrong answer rank last


class _TwoHeads:
    """A stand-in for a TGR model: an oracle TGR head over a base head that scores every token alike."""

    device = torch.device("cpu")

    def __init__(self, vocab_size, good_ids):
        self.vocab_size, self.good_ids, self.evaluated = vocab_size, sorted(good_ids), False

    def eval(self):
        self.evaluated = True
        return self

    def _logits(self, ids, oracle):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        if oracle:
            logits[..., self.good_ids] = 10.0
        return logits

    def __call__(self, ids, mask):
        return type("Out", (), {"logits": self._logits(ids, oracle=True)})

    def base_model(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self._logits(input_ids, oracle=False)})


def test_evaluate_heads_scores_the_tgr_head_beside_the_base_head(tokenizer):
    rows = [
        {"question_id": "1", "question": "Who?", "document_title": "T", "answer": a, "label": y}
        for a, y in (("Other.", 0), ("Someone.", 1), ("Other. Other.", 0))
    ] + [{"question_id": "2", "question": "What?", "document_title": "U", "answer": "Other.", "label": 0}]
    model = _TwoHeads(len(tokenizer), {tokenizer.convert_tokens_to_ids("Someone")})
    results = evaluate_heads(model, tokenizer, rows, batch_size=2)
    assert model.evaluated and set(results) == {"tgr_head", "base_head"}
    assert (results["tgr_head"]["map"], results["tgr_head"]["questions"], results["tgr_head"]["candidates"]) == (
        1.0, 1, 3)  # question 2 has no correct candidate: not ranked
    assert results["base_head"]["mrr"] < 1.0
    with pytest.raises(DataError, match="no question in the data has a correct"):
        evaluate_heads(model, tokenizer, rows[3:])
