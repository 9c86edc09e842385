"""Answer-sentence selection: the log-likelihood scoring and the MAP/MRR metrics."""
import pytest
import torch

from test_data import tokenizer  # noqa: F401  (fixture)
from tgr.data import RankingGroup
from tgr.evaluation import (
    answer_log_likelihoods, average_precision, encode_pair, evaluate_ranking, reciprocal_rank,
)


def test_metrics_on_known_rankings():
    assert average_precision([0, 1, 0, 1]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision([1, 0, 0]) == 1.0 and average_precision([0, 0]) == 0.0
    assert reciprocal_rank([0, 0, 1]) == pytest.approx(1 / 3) and reciprocal_rank([0]) == 0.0


def bigram_model(vocab_size, seed=0):
    """logits at position s depend only on token s: log p(next | prev) = log_softmax(W[prev])."""
    W = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed))
    return W, lambda ids, mask: W[ids]


def test_log_likelihood_is_the_sum_over_answer_tokens_and_batch_invariant(tokenizer):  # noqa: F811
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


def test_an_oracle_ranks_perfectly_and_a_constant_model_worst(tokenizer):  # noqa: F811
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
