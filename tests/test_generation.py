"""Generation from the TGR head: incremental decoding equals recomputing the full forward at every
step (both attention modes, every backend, batched left-padded prompts), logits processors,
sampling that never fails, EOS handling, and ClampLogits."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
)

from tgr import ClampLogits, TGRConfig, TGRLlamaModel, build_tiny_llama  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:
    HAVE_BNB = False

EOS = 2
PAD = 0


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny64gen"), hidden_size=64, num_hidden_layers=2,
                            vocab_size=256, initializer_range=0.1)


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """hidden 288 > 256: one TGR head takes the wide path."""
    return build_tiny_llama(tmp_path_factory.mktemp("wide288gen"), hidden_size=288, num_hidden_layers=1,
                            intermediate_size=288, vocab_size=128, initializer_range=0.1)


def make_model(base, **overrides) -> TGRLlamaModel:
    """GSoT off unless asked for: a pruned last token gives all-zero logits (lm_head(0)), a
    uniform next-token distribution that makes sampling tests meaningless."""
    fields = dict(base_model_name_or_path=base, temperature_heads=4, compute_dtype="float32",
                  load_in_4bit=HAVE_BNB, attention_backend="torch", gsoT_enabled=False)
    fields.update(overrides)
    model = TGRLlamaModel(TGRConfig(**fields)).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # temperatures spread over about 0.3 .. 0.8: GSoT (at 0.4) prunes a few
        proj = model.temperature_mechanisms[0].proj
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.1)
        proj.bias.fill_(0.2)
    return model


def prompts(model, left_pad=(0, 3, 6), S=10, seed=5):
    g = torch.Generator().manual_seed(seed)
    B = len(left_pad)
    ids = torch.randint(4, model.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for row, pad in enumerate(left_pad):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids.to(model.device), mask.to(model.device)


@torch.no_grad()
def greedy_by_recompute(model, ids, mask, n, processors=None):
    """The obvious, slow decoder: the full forward on the whole sequence for every new token."""
    processors = LogitsProcessorList(processors or [])
    for _ in range(n):
        logits = model(ids, attention_mask=mask).logits[:, -1].float()
        next_tokens = processors(ids, logits).argmax(-1)
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return ids


GREEDY_CASES = [  # (base, backend, causal, TGR heads)
    pytest.param("tiny_base", "torch", True, 1, id="torch-causal"),
    pytest.param("tiny_base", "torch", False, 1, id="torch-seed"),
    pytest.param("tiny_base", "torch", True, 4, id="torch-causal-4heads"),
    pytest.param("tiny_base", "reference", True, 1, id="reference-causal"),
    pytest.param("tiny_base", "reference", False, 1, id="reference-seed"),
    pytest.param("tiny_base", "triton", True, 1, id="triton-causal"),
    pytest.param("tiny_base", "triton", False, 4, id="triton-seed-4heads"),
    pytest.param("wide_base", "torch", True, 1, id="wide-torch-causal"),
    pytest.param("wide_base", "triton", False, 1, id="wide-triton-seed"),
]


@pytest.mark.parametrize("base_name, backend, causal, heads", GREEDY_CASES)
def test_incremental_greedy_equals_full_recompute(request, base_name, backend, causal, heads):
    model = make_model(request.getfixturevalue(base_name), attention_backend=backend, causal=causal,
                       num_tgr_heads=heads, gsoT_enabled=True)
    ids, mask = prompts(model)
    n = 6
    expected = greedy_by_recompute(model, ids, mask, n)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], output_scores=True)
    assert torch.equal(out.sequences, expected)
    slow = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[], use_cache=False,
                          output_scores=True)
    assert torch.equal(slow.sequences, expected)
    for fast_logits, slow_logits in zip(out.logits, slow.logits, strict=True):
        assert torch.allclose(fast_logits, slow_logits, atol=1e-4, rtol=1e-4)


def test_each_new_token_is_one_base_step(tiny_base):
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    finally:
        hook.remove()
    assert seen == [(3, 10)] + [(3, 1)] * 4  # the prompt once, then one token per step


def test_samples_from_the_tgr_head_not_the_base(tiny_base):
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[], output_scores=True)
    with torch.no_grad():
        tgr_logits = model(ids, attention_mask=mask).logits[:, -1]
        base_logits = model.base_llama_model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert torch.allclose(out.logits[0], tgr_logits, atol=1e-5)
    assert not torch.allclose(out.logits[0], base_logits, atol=1e-2)


def test_any_padding_side(tiny_base):
    """A right-padded prompt gives the same continuation as the same prompt left-padded."""
    model = make_model(tiny_base, causal=True)
    ids, mask = prompts(model, left_pad=(0, 4))
    right_ids, right_mask = ids.clone(), mask.clone()
    right_ids[1] = torch.cat([ids[1, 4:], ids[1, :4]])
    right_mask[1] = torch.cat([mask[1, 4:], mask[1, :4]])
    left = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    right = model.generate(right_ids, attention_mask=right_mask, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(left[:, 10:], right[:, 10:])
    alone = model.generate(ids[1:, 4:], max_new_tokens=4, eos_token_id=[])  # no padding at all
    assert torch.equal(alone[:, 6:], left[1:, 10:])


@pytest.mark.parametrize("use_cache", [True, False])
def test_right_padded_prompt_is_continued_from_its_last_real_token(tiny_base, use_cache):
    """The first new token of a right-padded row comes from its last real token's logits, not the padding's."""
    model = make_model(tiny_base, causal=True)
    ids, mask = prompts(model, left_pad=(0, 4))
    right_ids, right_mask = ids.clone(), mask.clone()
    right_ids[1] = torch.cat([ids[1, 4:], ids[1, :4]])
    right_mask[1] = torch.cat([mask[1, 4:], mask[1, :4]])
    right = model.generate(right_ids, attention_mask=right_mask, max_new_tokens=3, eos_token_id=[],
                           use_cache=use_cache, output_scores=True)
    alone = model.generate(ids[1:, 4:], max_new_tokens=3, eos_token_id=[], use_cache=use_cache, output_scores=True)
    for step in range(3):
        assert torch.allclose(right.logits[step][1], alone.logits[step][0], atol=1e-5, rtol=1e-5), step
    assert torch.equal(right.sequences[1, 10:], alone.sequences[0, 6:])


# ----------------------------------------------------------------------------------------------
# Logits processors
# ----------------------------------------------------------------------------------------------


def test_hf_logits_processors_are_applied(tiny_base):
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    penalty = [RepetitionPenaltyLogitsProcessor(penalty=1e6)]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], logits_processor=penalty)
    assert torch.equal(out, greedy_by_recompute(model, ids, mask, 6, penalty))
    for row in out:  # an enormous repetition penalty: every new token is new to the sequence
        for i in range(10, 16):
            assert row[i] not in row[:i]

    calls = []

    def recorder(input_ids, scores):
        calls.append(input_ids.clone())
        return scores

    banned = int(model.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[])[0, -1])

    def ban(input_ids, scores):
        scores[:, banned] = -math.inf
        return scores

    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[],
                         logits_processor=LogitsProcessorList([recorder, ban]))
    assert (out[:, 10:] != banned).all()
    assert [c.shape[1] for c in calls] == [10, 11, 12, 13]
    assert all(torch.equal(c, out[:, : c.shape[1]]) for c in calls)  # the sequence so far


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_base):
    model = make_model(tiny_base)
    ids, mask = prompts(model)

    def sample(seed, **kw):
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], do_sample=True,
                              generator=torch.Generator(device=model.device).manual_seed(seed), **kw)

    assert torch.equal(sample(0, temperature=0.7, top_p=0.9), sample(0, temperature=0.7, top_p=0.9))
    assert not torch.equal(sample(0, temperature=5.0), sample(1, temperature=5.0))
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(4, logits_processor=[TopKLogitsWarper(1)]), greedy)


@pytest.mark.parametrize("poison", ["nan", "inf", "mixed"])
@pytest.mark.parametrize("clamp", [False, True])
def test_non_finite_logits_never_break_sampling(tiny_base, poison, clamp):
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    V = model.vocab_size

    def poisoner(input_ids, scores):
        if poison == "nan":
            return torch.full_like(scores, math.nan)
        if poison == "inf":
            scores = scores.clone()
            scores[:, 7] = math.inf
            scores[:, 8] = -math.inf
            return scores
        scores = scores.clone()
        scores[0] = math.nan
        scores[1, ::2] = -math.inf
        scores[2, 5] = math.inf
        return scores

    processors = [poisoner] + ([ClampLogits()] if clamp else [])
    for do_sample in (True, False):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[], do_sample=do_sample,
                             top_p=0.9, logits_processor=processors,
                             generator=torch.Generator(device=model.device).manual_seed(0))
        new = out[:, 10:]
        assert new.shape == (3, 3) and ((new >= 0) & (new < V)).all()
        if poison == "inf":
            assert (new == 7).all()  # +inf (or the clamp's max) wins


def test_clamp_logits():
    scores = torch.tensor([[math.nan, math.inf, -math.inf, 100.0, -100.0, 3.5]])
    out = ClampLogits(min_value=-50, max_value=50)(None, scores)
    assert torch.equal(out, torch.tensor([[-50.0, 50.0, -50.0, 50.0, -50.0, 3.5]]))
    assert torch.isfinite(ClampLogits()(None, scores.half())).all()
    with_hf = LogitsProcessorList([ClampLogits(-1, 1)])(torch.zeros(1, 3, dtype=torch.long), scores)
    assert with_hf.min() == -1 and with_hf.max() == 1
    for bad in (dict(min_value=math.nan), dict(max_value=math.inf), dict(min_value=2, max_value=1)):
        with pytest.raises(ValueError):
            ClampLogits(**bad)


# ----------------------------------------------------------------------------------------------
# EOS and arguments
# ----------------------------------------------------------------------------------------------


def test_eos_pads_finished_rows_and_stops_early(tiny_base):
    model = make_model(tiny_base)
    ids, mask = prompts(model)

    def eos_for_row_0_at_step_1(input_ids, scores):
        if input_ids.shape[1] == 11:
            scores[0] = -math.inf
            scores[0, EOS] = 0.0
        return scores

    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=EOS,
                         logits_processor=[eos_for_row_0_at_step_1])
    assert out.shape == (3, 15)
    assert out[0, 11] == EOS and (out[0, 12:] == PAD).all()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out[1:], expected[1:])  # the other rows go on untouched

    def eos_everywhere(input_ids, scores):
        scores[:] = -math.inf
        scores[:, EOS] = 0.0
        return scores

    # eos_token_id=None takes the base's generation config (EOS = 2 in the tiny checkpoint).
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, logits_processor=[eos_everywhere])
    assert out.shape == (3, 11) and (out[:, -1] == EOS).all()


def test_bad_generation_arguments(tiny_base):
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=0), ids)
    cases = [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_k=-2), "top_k"),
        (dict(attention_mask=mask[:, 1:]), "attention_mask must have the shape"),
        (dict(attention_mask=mask.tolist()), "attention_mask must be a tensor"),
        (dict(attention_mask=torch.zeros_like(mask)), "at least one real token"),
        (dict(eos_token_id="</s>"), "eos_token_id"),
        (dict(logits_processor=[1]), "callable"),
    ]
    for kwargs, words in cases:
        kwargs.setdefault("attention_mask", mask)
        with pytest.raises((ValueError, TypeError), match=words):
            model.generate(ids, **kwargs)
    with pytest.raises(ValueError, match="integer tensor"):
        model.generate(ids.float())


def test_prompts_past_the_base_positions_are_warned_about(tiny_base, caplog):
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    positions = model.config.max_position_embeddings
    with caplog.at_level("WARNING", logger="tgr"):
        model.generate(ids, attention_mask=mask, max_new_tokens=positions - ids.shape[1], eos_token_id=[])
    assert "max_position_embeddings" not in caplog.text
    with caplog.at_level("WARNING", logger="tgr"):
        model.generate(ids, attention_mask=mask, max_new_tokens=positions - ids.shape[1] + 1, eos_token_id=[])
    assert f"go past the base's {positions} positions (max_position_embeddings)" in caplog.text


def test_generate_answers_in_batches_leaves_the_tokenizer_as_given(tiny_base):
    from transformers import AutoTokenizer

    from tgr.pipeline import generate_answers

    model = make_model(tiny_base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    questions = ["Who wrote it?", "When?", "Where was the first one built, and by whom?", "Why?", "How many?"]
    one_batch = generate_answers(model, tokenizer, questions, greedy=True, max_new_tokens=5)
    assert tokenizer.padding_side == "right"
    assert generate_answers(model, tokenizer, questions, greedy=True, max_new_tokens=5, batch_size=2) == one_batch
    tokenizer.pad_token = None  # pads with the EOS then, and is given back without a pad token
    assert generate_answers(model, tokenizer, questions, greedy=True, max_new_tokens=5, batch_size=3) == one_batch
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate_answers(model, tokenizer, questions, batch_size=0)


def test_one_nan_logit_does_not_make_sampling_greedy():
    """NaN counts as probability 0 for that token only: the row's other tokens are still sampled
    (before, one NaN made the row's softmax NaN and sampling fell back to the argmax)."""
    from tgr.generation import _sample

    scores = torch.zeros(1, 8)
    scores[0, 7] = math.nan
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([_sample(scores, g) for _ in range(200)]).flatten()
    assert (drawn != 7).all() and len(drawn.unique()) == 7
    all_nan = torch.full((2, 8), math.nan)
    assert torch.equal(_sample(all_nan, g), torch.zeros(2, dtype=torch.long))  # no finite score: greedy


def test_clamp_logits_bounds_past_the_scores_dtype():
    """Finite bounds that the scores' dtype cannot hold clamp to its extremes, never raise."""
    scores = torch.tensor([[math.nan, math.inf, -math.inf, 3.5]])
    out = ClampLogits(-1e39, 1e39)(None, scores)
    big = torch.finfo(torch.float32).max
    assert torch.equal(out, torch.tensor([[-big, big, -big, 3.5]]))
    half = ClampLogits(-1e5, 1e5)(None, scores.half())
    assert torch.isfinite(half).all() and half[0, 3] == 3.5


def _prompts_ending_at_eos(model, row_that_ends=None):
    """Prompts, and the EOS id(s) that make them end at their first new token (every row, or one)."""
    ids = torch.randint(4, 200, (2, 6), generator=torch.Generator().manual_seed(5))
    first = model.generate(ids, max_new_tokens=1, eos_token_id=[])[:, -1]
    return ids, sorted(set(first.tolist())) if row_that_ends is None else int(first[row_that_ends])


def test_max_new_tokens_is_an_upper_bound_not_an_allocation(tiny_base):
    """The hidden-state cache grows with the tokens made: EOS after one token with max_new_tokens
    = 10^9 asked for 512 GB up front."""
    model = make_model(tiny_base)
    ids, eos = _prompts_ending_at_eos(model)
    assert model.generate(ids, max_new_tokens=10**9, eos_token_id=eos).shape == (2, 7)


def test_the_cache_grows_past_its_first_room_and_matches_the_full_forward(tiny_base, monkeypatch):
    import tgr.generation

    monkeypatch.setattr(tgr.generation, "_INITIAL_ROOM", 2)  # doubles twice in 9 tokens
    model = make_model(tiny_base)
    ids, mask = prompts(model)
    cached = model.generate(ids, mask, max_new_tokens=9, eos_token_id=[])
    assert torch.equal(cached, model.generate(ids, mask, max_new_tokens=9, eos_token_id=[], use_cache=False))


@pytest.mark.parametrize("pad", [-1, 10_000, 1.5])
def test_a_pad_token_id_that_is_no_token_is_a_clear_error_up_front(tiny_base, pad):
    """It fills a finished row and is fed to the model: an IndexError deep in torch's embedding,
    and only once some row finished before the others."""
    model = make_model(tiny_base)
    ids, eos = _prompts_ending_at_eos(model, row_that_ends=0)
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        model.generate(ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)
    model.generation_config.pad_token_id = -1
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        model.generate(ids, max_new_tokens=4, eos_token_id=eos)


def _tokenizer_with_template(base, template):
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if template is not None:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")
                                             if t in template])
    return tok


@pytest.mark.parametrize("template", [None, "$A", "<s> $A </s>"], ids=["auto-bos", "no-auto-bos", "bos-and-eos"])
def test_generate_answers_prompts_as_training_and_evaluation_do(tiny_base, template):
    """BOS + the prompt's tokens, whatever the tokenizer's template adds or leaves out (it gave no
    BOS for a tokenizer that adds none, and a trailing EOS for one that appends it)."""
    from tgr.evaluation import encode_pair
    from tgr.pipeline import generate_answers

    model, tok = make_model(tiny_base), _tokenizer_with_template(tiny_base, template)
    seen = []
    generate = model.generate

    def recording(ids, mask, **kwargs):
        seen.append(ids[0][mask[0].bool()].tolist())
        return generate(ids, mask, **kwargs)

    model.generate = recording
    generate_answers(model, tok, ["Why is the sky blue?"], greedy=True, max_new_tokens=1)
    ids, n_prompt = encode_pair(tok, "Why is the sky blue?", "Air.", 256)
    assert seen[0] == ids[:n_prompt]


def test_generate_answers_and_evaluate_heads_give_every_module_back_in_its_mode(tiny_base):
    """A model in training stays so, and a frozen base kept in eval mode stays in eval mode
    (generate_answers left the model in eval mode; evaluate_heads set every module training)."""
    from tgr.data import load_wikiqa
    from tgr.evaluation import evaluate_heads
    from tgr.pipeline import generate_answers

    model, tok = make_model(tiny_base), _tokenizer_with_template(tiny_base, None)
    for run in (lambda: generate_answers(model, tok, ["Why?"], greedy=True, max_new_tokens=1),
                lambda: evaluate_heads(model, tok, load_wikiqa()[:8])):
        model.train()
        model.base_llama_model.eval()
        run()
        assert model.training and not model.base_llama_model.training
