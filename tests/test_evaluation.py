"""Answer-sentence selection: the log-likelihood scoring, the MAP/MRR metrics and the evaluation of
both heads (the word-level ``tokenizer`` fixture comes from conftest.py)."""
import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tgr.data import DataError, RankingGroup, load_wikiqa, ranking_groups
from tgr.evaluation import (
    _base_logits,
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


def test_a_nan_score_ranks_last_whatever_the_order_of_the_rows(caplog):
    """A NaN compares neither above nor below any score: sorted() left it where its row was, so the
    metric depended on the order of the file (a NaN-scored correct answer listed first ranked first)."""
    from tgr.evaluation import _ranking

    nan = float("nan")
    first = _ranking([RankingGroup("1", "Who?", ["a", "b", "c"], [1, 0, 0])], [nan, -1.0, -2.0])
    last = _ranking([RankingGroup("1", "Who?", ["b", "c", "a"], [0, 0, 1])], [-1.0, -2.0, nan])
    assert first.mrr == last.mrr == pytest.approx(1 / 3) and first.map == last.map == pytest.approx(1 / 3)
    assert "1 of 3 candidates scored NaN" in caplog.text


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

    def target_log_probs(self, ids, mask, *, head="tgr"):
        logits = self._logits(ids, oracle=head == "tgr")
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

    def heads_target_log_probs(self, ids, mask, *, scored=None):
        return {head: self.target_log_probs(ids, mask, head=head) for head in ("tgr", "base")}


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


def test_exactly_one_model_function(tokenizer):
    W, fn = bigram_model(len(tokenizer))
    for logits_fn, log_probs_fn in ((None, None), (fn, fn)):
        with pytest.raises(ValueError, match="exactly one of logits_fn and log_probs_fn"):
            answer_log_likelihoods(logits_fn, tokenizer, [("Who?", "Someone.")], log_probs_fn=log_probs_fn)


# ----------------------------------------------------------------------------- a real TGR model
# The tiny Llama's sizes: hidden 48, MLP 96; its vocabulary (the tokenizer's, at most 256) is
# another size, so a tensor whose last dim is V can only be logits.
TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
CHUNK_ROWS = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tgr import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-eval"), **TINY)


def _tiny_tgr_model(path, mode):
    """A TGR model whose temperatures are away from their start, so that the TGR head (or layers)
    and the base score differently."""
    from tgr import TGRConfig, TGRLlamaModel

    config = TGRConfig(base_model_name_or_path=path, load_in_4bit=False, compute_dtype="float32", device="cpu",
                       attention_backend="torch", temperature_heads=4, tgr_mode=mode)
    model = TGRLlamaModel(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 2.0)
    return model.eval()


class _LargestLogitsBlock(TorchDispatchMode):
    """The most rows of any new tensor (not a view, such as the lm_head weight's transpose) whose
    last dim is V that an op produces while active."""

    def __init__(self, n_vocab):
        super().__init__()
        self.n_vocab, self.rows = n_vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.n_vocab and not func.is_view:
                self.rows = max(self.rows, t.numel() // self.n_vocab)
        return out


@pytest.mark.parametrize("mode", ["head", "layers"])
def test_evaluate_heads_never_builds_the_logits_and_ranks_as_through_them(tiny_dir, mode, monkeypatch):
    """tgr eval scores through the fused log-probabilities: the lm_head never runs and no op makes
    more than one chunk of logit rows; MAP and MRR equal those through the full logits."""
    from transformers import AutoTokenizer

    lce = importlib.import_module("tgr_kernels.linear_cross_entropy")
    monkeypatch.setattr(lce, "chunk_rows", lambda n_rows, n_vocab, device, half_gemm: min(CHUNK_ROWS, n_rows))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = _tiny_tgr_model(tiny_dir, mode)
    n_vocab = model.vocab_size
    assert n_vocab not in (TINY["hidden_size"], 2 * TINY["hidden_size"])
    rows = load_wikiqa()[:60]
    groups = ranking_groups(rows)
    kwargs = dict(batch_size=6, device=model.device)
    with torch.no_grad():
        through_logits = {
            "tgr_head": evaluate_ranking(lambda ids, mask: model(ids, mask).logits, tokenizer, groups, **kwargs),
            "base_head": evaluate_ranking(lambda ids, mask: _base_logits(model, ids, mask), tokenizer, groups,
                                          **kwargs),
        }

    lm_head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: lm_head_calls.append(1))
    try:
        with _LargestLogitsBlock(n_vocab) as watch:
            results = evaluate_heads(model, tokenizer, rows, batch_size=6)
    finally:
        hook.remove()
    assert lm_head_calls == []
    assert 0 < watch.rows <= CHUNK_ROWS  # a batch has 6 × (S − 1) > CHUNK_ROWS rows of logits
    assert results == {name: r.as_dict() for name, r in through_logits.items()}
    assert results["tgr_head"]["questions"] >= 5
    # Only the answers' tokens go through the lm_head's GEMMs, for each of the two heads.
    encoded = [encode_pair(tokenizer, g.question, a, 256) for g in groups for a in g.answers]
    with torch.no_grad(), _rows_through_lm_head(model, monkeypatch) as gemm_rows:
        evaluate_heads(model, tokenizer, rows, batch_size=6)
    assert sum(gemm_rows) == 2 * sum(len(ids) - n_prompt for ids, n_prompt in encoded)


def test_evaluate_heads_leaves_a_model_in_training_in_training(tiny_dir):
    """Evaluating in the middle of a training loop scores in eval mode (hard GSoT gate), then gives the
    model back in train mode: left in eval mode, the next steps would train with the hard gate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = _tiny_tgr_model(tiny_dir, "head")
    rows = load_wikiqa()[:8]
    expected = evaluate_heads(model, tokenizer, rows)  # from eval mode: stays in eval mode
    assert not model.training
    model.train()
    assert evaluate_heads(model, tokenizer, rows) == expected  # scored in eval mode all the same
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("mode", ["head", "both", "layers"])
def test_target_log_probs_equal_the_log_softmax_of_the_logits(tiny_dir, mode):
    model = _tiny_tgr_model(tiny_dir, mode)
    ids = torch.randint(3, model.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding
    with torch.no_grad():
        for head, logits in (("tgr", model(ids, mask).logits), ("base", _base_logits(model, ids, mask))):
            expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            got = model.target_log_probs(ids, mask, head=head)
            assert got.shape == (3, 9) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=head)
        tgr, base = model.target_log_probs(ids, mask), model.target_log_probs(ids, mask, head="base")
    assert (tgr - base).abs().max() > 1e-2  # the two heads are different models here
    with pytest.raises(ValueError, match="head must be 'tgr' or 'base'"):
        model.target_log_probs(ids, mask, head="lm")


@pytest.mark.parametrize("through_logits", [False, True], ids=["fused", "logits"])
def test_target_log_probs_of_one_token_sequences_are_empty(tiny_dir, through_logits, monkeypatch):
    """One token predicts nothing: ``[B, S - 1] = [B, 0]`` on both paths, not an error from the fused op."""
    model = _tiny_tgr_model(tiny_dir, "head")
    if through_logits:
        monkeypatch.setattr(model, "_fused_loss_applies", lambda: False)
    ids = torch.randint(3, model.vocab_size, (2, 1))
    with torch.no_grad():
        for head in ("tgr", "base"):
            got = model.target_log_probs(ids, head=head)
            assert got.shape == (2, 0) and got.dtype == torch.float32, head
        both = model.heads_target_log_probs(ids, scored=torch.zeros(2, 0, dtype=torch.bool))
    assert {k: v.shape for k, v in both.items()} == {"tgr": (2, 0), "base": (2, 0)}


@contextlib.contextmanager
def _rows_through_lm_head(model, monkeypatch):
    """Records the rows of hidden states that each lm_head GEMM takes: the fused op's chunks
    (``_chunk_logits``) and the lm_head module's own calls (the logits path)."""
    lce = importlib.import_module("tgr_kernels.linear_cross_entropy")
    rows = []
    chunk_logits = lce._chunk_logits

    def counted(x_c, w, bias, act_dtype):
        rows.append(x_c.shape[0])
        return chunk_logits(x_c, w, bias, act_dtype)

    with monkeypatch.context() as patch:
        patch.setattr(lce, "_chunk_logits", counted)
        hook = model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
        try:
            yield rows
        finally:
            hook.remove()


@pytest.mark.parametrize("through_logits", [False, True], ids=["fused", "logits"])
@pytest.mark.parametrize("mode", ["head", "layers"])
def test_target_log_probs_of_scored_positions_only(tiny_dir, mode, through_logits, monkeypatch):
    """With ``scored``, the scored positions equal the full result, the others are 0, and only
    the scored rows go through the lm_head, on the fused path and on the logits path."""
    model = _tiny_tgr_model(tiny_dir, mode)
    if through_logits:  # as a 4-bit or adapter-wrapped lm_head
        monkeypatch.setattr(model, "_fused_loss_applies", lambda: False)
    ids = torch.randint(3, model.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    scored = torch.zeros(3, 11, dtype=torch.bool)
    scored[0, 5:] = True  # an answer after its prompt
    scored[1, 2:9] = True  # padding after the answer
    scored[2, 7:] = True
    with torch.no_grad():
        for head in ("tgr", "base"):
            full = model.target_log_probs(ids, mask, head=head)
            with _rows_through_lm_head(model, monkeypatch) as rows:
                got = model.target_log_probs(ids, mask, head=head, scored=scored)
            assert got.shape == (3, 11) and got.dtype == torch.float32
            torch.testing.assert_close(got[scored], full[scored], rtol=1e-5, atol=1e-5, msg=head)
            assert (got[~scored] == 0).all()
            assert sum(rows) == int(scored.sum()), (head, rows)
    for bad in (scored.long(), scored[:, :-1], "all"):
        with pytest.raises(ValueError, match="scored must be a bool tensor"):
            model.target_log_probs(ids, mask, scored=bad)


def test_log_probs_fn_with_scored_gets_the_answer_positions(tokenizer):
    """A log_probs_fn that names ``scored`` gets the answer tokens' positions and may leave the
    others out; one without it is called as before; both give the same scores."""
    W, logits_fn = bigram_model(len(tokenizer))

    def full(ids, mask):
        return torch.log_softmax(W[ids[:, :-1]], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    seen = []

    def answers_only(ids, mask, *, scored):
        seen.append(scored.clone())
        return full(ids, mask).masked_fill(~scored, float("nan"))  # what is not scored must not be read

    pairs = [("Who?", "Someone."), ("What?", "Nothing."), ("Who?", "Other. Someone.")]
    expected = answer_log_likelihoods(None, tokenizer, pairs, log_probs_fn=full, batch_size=2)
    got = answer_log_likelihoods(None, tokenizer, pairs, log_probs_fn=answers_only, batch_size=2)
    assert got == pytest.approx(expected) and all(s == s for s in got)
    assert answer_log_likelihoods(None, tokenizer, [], log_probs_fn=answers_only) == []
    order = sorted(range(len(pairs)), key=lambda i: -len(encode_pair(tokenizer, *pairs[i], 256)[0]))
    for batch, scored in zip((order[:2], order[2:]), seen, strict=True):
        for row, i in enumerate(batch):
            ids, n_prompt = encode_pair(tokenizer, *pairs[i], 256)
            assert scored[row].nonzero().flatten().tolist() == list(range(n_prompt - 1, len(ids) - 1))


@pytest.mark.parametrize("mode", ["head", "both", "layers"])
def test_both_heads_in_one_pass_equal_each_head_alone(tiny_dir, mode):
    """heads_target_log_probs gives what target_log_probs gives for each head, with one base run
    when the base has no TGR layers (mode "head") and two when it has them."""
    model = _tiny_tgr_model(tiny_dir, mode)
    ids = torch.randint(3, model.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    scored = torch.rand(3, 9, generator=torch.Generator().manual_seed(0)) < 0.6
    base_runs = []
    hook = model._decoder().register_forward_hook(lambda *args: base_runs.append(1))
    try:
        with torch.no_grad():
            both = model.heads_target_log_probs(ids, mask, scored=scored)
            runs = len(base_runs)
            for head in ("tgr", "base"):
                alone = model.target_log_probs(ids, mask, head=head, scored=scored)
                torch.testing.assert_close(both[head], alone, rtol=0, atol=0, msg=head)
    finally:
        hook.remove()
    assert sorted(both) == ["base", "tgr"]
    assert runs == (1 if mode == "head" else 2)
    assert (both["tgr"] - both["base"]).abs().max() > 1e-2  # two different models


def test_a_long_question_loses_its_start_and_the_whole_answer_is_scored(tokenizer, caplog):
    """A pair over max_length keeps the BOS, the end of the question and every answer token; the
    bigram model sees only the token before each answer token, so the score is the untruncated one."""
    W, fn = bigram_model(len(tokenizer))
    long_question = " ".join(["Who Other"] * 40) + " Who?"
    pairs = [(long_question, "Someone. Other."), (long_question, "Nothing."), ("Who?", "Other.")]
    full = answer_log_likelihoods(fn, tokenizer, pairs, max_length=1000)
    ids, n_prompt = encode_pair(tokenizer, long_question, "Someone. Other.", max_length=24)
    untruncated, n_full = encode_pair(tokenizer, long_question, "Someone. Other.", max_length=1000)
    assert len(ids) == 24 and ids[0] == tokenizer.bos_token_id
    assert ids[n_prompt:] == untruncated[n_full:]  # the whole answer
    assert ids[1:n_prompt] == untruncated[n_full - n_prompt + 1:n_full]  # the end of the question
    with caplog.at_level("WARNING", logger="tgr"):
        cut = answer_log_likelihoods(fn, tokenizer, pairs, max_length=24)
    assert cut == pytest.approx(full, abs=1e-5)
    assert "2 of 3 question-answer pairs are longer than 24 tokens" in caplog.text
    assert "0 of them are answers longer" in caplog.text


def test_an_answer_longer_than_max_length_keeps_its_first_tokens_after_the_bos(tokenizer, caplog):
    W, fn = bigram_model(len(tokenizer))
    answer = " ".join(["Someone Other"] * 20)
    ids, n_prompt = encode_pair(tokenizer, "Who?", answer, max_length=10)
    full, n_full = encode_pair(tokenizer, "Who?", answer, max_length=1000)
    assert (ids[:n_prompt], ids[n_prompt:]) == ([tokenizer.bos_token_id], full[n_full:n_full + 9])
    lp = torch.log_softmax(W, -1)
    expected = sum(lp[ids[i - 1], ids[i]].item() for i in range(1, 10))
    with caplog.at_level("WARNING", logger="tgr"):
        assert answer_log_likelihoods(fn, tokenizer, [("Who?", answer)], max_length=10) == pytest.approx(
            [expected], abs=1e-5)
    assert "1 of them are answers longer than that, of which the first 9 tokens are scored" in caplog.text


def test_pairs_that_fit_are_not_reported(tokenizer, caplog):
    W, fn = bigram_model(len(tokenizer))
    pair = ("Who?", "Someone.")
    exact = len(encode_pair(tokenizer, *pair, 1000)[0])
    with caplog.at_level("WARNING", logger="tgr"):
        answer_log_likelihoods(fn, tokenizer, [pair], max_length=exact)
    assert "longer than" not in caplog.text


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(batch_size=2.0), "batch_size must be a positive integer"),
    (dict(max_length=1), "max_length must be an integer >= 2"),
    (dict(max_length=0), "max_length must be an integer >= 2"),
])
def test_bad_batch_size_or_max_length_is_a_clear_error(tokenizer, kwargs, message):
    _, fn = bigram_model(len(tokenizer))
    with pytest.raises(ValueError, match=message):
        answer_log_likelihoods(fn, tokenizer, [("Who?", "Someone.")], **kwargs)


def test_questions_without_a_correct_candidate_are_left_out_of_the_ranking(tokenizer):
    _, fn = bigram_model(len(tokenizer))
    groups = [RankingGroup("1", "Who?", ["Other.", "Someone."], [0, 1]),
              RankingGroup("2", "What?", ["Nothing.", "Other."], [1, 0])]
    unanswerable = RankingGroup("3", "Who?", ["Other.", "Nothing."], [0, 0])
    alone = evaluate_ranking(fn, tokenizer, groups)
    assert evaluate_ranking(fn, tokenizer, groups[:1] + [unanswerable] + groups[1:]) == alone
    assert alone.questions == 2 and alone.candidates == 4
