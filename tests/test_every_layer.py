"""Every-layer TGR: apply_tgr / remove_tgr on Hugging Face causal LMs, their masks, generation,
bad input, and the TGR model's "layers" mode (save/load, training)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tgr import build_tiny_llama  # noqa: E402
from tgr.layers import (  # noqa: E402
    ATTENTION_NAME,
    MECHANISM_NAME,
    apply_tgr,
    is_tgr_applied,
    remove_tgr,
    tgr_layer_modules,
)

transformers = pytest.importorskip("transformers")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # Grouped-query attention: 4 query heads share 2 key/value heads.
    return build_tiny_llama(tmp_path_factory.mktemp("gqa-llama"), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def _llama(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return Qwen2ForCausalLM(config).eval()


def _perturb(model, scale=2.0, seed=0):
    """Random projection weights: temperatures spread around t_init, some under the threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mechanism in tgr_layer_modules(model).values():
            w = mechanism.proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)


def _patch_fingerprint(model):
    """What apply_tgr changes: the attention implementation, the modules, the hooks."""
    return (model.config._attn_implementation, tuple(model.state_dict()),
            tuple(len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_patched_model_starts_as_the_unpatched_one_and_the_patch_acts(family, llama_dir):
    model = _llama(llama_dir) if family == "llama" else _qwen2()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(4, 190, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        apply_tgr(model)
        assert model.config._attn_implementation == ATTENTION_NAME
        assert sorted(tgr_layer_modules(model)) == [0, 1]
        patched = model(ids).logits
        assert _rel(patched, before) <= 1e-5
        _perturb(model)
        perturbed = model(ids).logits
    assert _rel(perturbed, before) > 1e-2  # the mechanisms really scale the logits


def test_identity_at_start_with_another_initial_temperature(llama_dir):
    model = _llama(llama_dir)
    ids = torch.randint(4, 190, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        apply_tgr(model, initial_temperature=0.8, gsot_threshold=0.7, temperature_heads=3)
        t = tgr_layer_modules(model)[0](torch.randn(1, 5, 64))
        assert torch.equal(t, torch.full_like(t, t[0, 0, 0].item()))
        assert abs(t[0, 0, 0].item() - 0.8) < 1e-6
        assert _rel(model(ids).logits, before) <= 1e-5


def test_only_the_chosen_layers_are_patched(llama_dir):
    model = _llama(llama_dir)
    ids = torch.randint(4, 190, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        apply_tgr(model, layers=[1])
        assert sorted(tgr_layer_modules(model)) == [1]
        assert not hasattr(model.model.layers[0].self_attn, MECHANISM_NAME)
        _perturb(model)
        assert _rel(model(ids).logits, before) > 1e-2


def test_disabled_tgr_layers_run_the_unpatched_model(llama_dir):
    from tgr.layers import tgr_layers_disabled

    model = _llama(llama_dir)
    ids = torch.randint(4, 190, (2, 10), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        before = model(ids).logits
        apply_tgr(model)
        _perturb(model)
        patched = model(ids).logits
        with tgr_layers_disabled(model):
            assert torch.equal(model(ids).logits, before)
        assert torch.equal(model(ids).logits, patched)


def test_remove_tgr_inside_tgr_layers_disabled_restores_the_model(llama_dir):
    """Leaving the block after remove_tgr must not switch the unpatched model to the "tgr" attention."""
    from transformers import AutoModelForCausalLM

    from tgr.layers import tgr_layers_disabled

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(4, 190, (1, 6), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        before = model(ids).logits
    apply_tgr(model)
    with tgr_layers_disabled(model):
        remove_tgr(model)
    assert model.config._attn_implementation == "eager" and not is_tgr_applied(model)
    apply_tgr(model)
    _perturb(model)
    with tgr_layers_disabled(model), torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_remove_tgr_restores_the_model_exactly(llama_dir):
    model = _llama(llama_dir)
    ids = torch.randint(4, 190, (2, 10), generator=torch.Generator().manual_seed(3))
    fingerprint = _patch_fingerprint(model)
    with torch.no_grad():
        before = model(ids).logits
        apply_tgr(model)
        _perturb(model)
        assert not torch.equal(model(ids).logits, before)
        remove_tgr(model)
        after = model(ids).logits
    assert torch.equal(after, before)
    assert _patch_fingerprint(model) == fingerprint
    assert not is_tgr_applied(model)
    assert not any(MECHANISM_NAME in name for name, _ in model.named_modules())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_left_padded_rows_equal_each_row_alone(backend, llama_dir):
    model = _llama(llama_dir)
    apply_tgr(model, backend=backend, gsot_threshold=0.45)
    _perturb(model, scale=1.0)
    g = torch.Generator().manual_seed(4)
    lengths = (7, 4, 1)
    S = max(lengths)
    rows = [torch.randint(4, 190, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, S - len(row):] = row
        mask[i, S - len(row):] = 1
    pruned = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batch[i, S - len(row):], alone, rtol=1e-5, atol=1e-5)
        for mechanism in tgr_layer_modules(model).values():
            pruned += int((mechanism(torch.randn(64, 64)).mean(-1) < 0.45).sum())
    assert pruned > 0  # GSoT is live at these weights


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_4d_masks_as_hugging_face_makes_them(kind, llama_dir):
    model = _llama(llama_dir)
    apply_tgr(model, gsot_threshold=0.45)
    _perturb(model, scale=1.0, seed=14)
    ids = torch.randint(4, 190, (2, 6), generator=torch.Generator().manual_seed(15))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    S = ids.shape[1]
    keep = torch.ones(S, S, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    mask4d = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask4d, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_hf_generate_with_dynamic_cache_equals_full_recompute(padded, llama_dir):
    from transformers import DynamicCache

    model = _llama(llama_dir)
    apply_tgr(model, gsot_threshold=0.45)
    _perturb(model, scale=1.0, seed=5)
    g = torch.Generator().manual_seed(6)
    if padded:
        ids = torch.randint(4, 190, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        ids[1, :3], mask[1, :3] = 0, 0
    else:
        ids = torch.randint(4, 190, (1, 5), generator=g)
        mask = torch.ones_like(ids)
    steps = 6
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             pad_token_id=0, return_dict_in_generate=True)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        assert isinstance(cache, DynamicCache)  # HF's own incremental decoding ran
        seq, m = ids, mask
        for _ in range(steps):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(seq, attention_mask=m, position_ids=positions).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each, the model left unchanged
# ---------------------------------------------------------------------------------------------


def test_a_model_without_the_attention_interface_is_refused(llama_dir):
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_tgr(plain)
    assert not is_tgr_applied(plain)
    model = _llama(llama_dir)
    model._supports_attention_backend = False  # as a model with its own attention code declares
    fingerprint = _patch_fingerprint(model)
    with pytest.raises(TypeError, match="AttentionInterface"):
        apply_tgr(model)
    assert _patch_fingerprint(model) == fingerprint and not is_tgr_applied(model)


def test_a_failure_while_patching_leaves_the_model_as_it_was(llama_dir, monkeypatch):
    model = _llama(llama_dir)
    fingerprint = _patch_fingerprint(model)

    def refuse(*args, **kwargs):
        raise RuntimeError("no attention implementation today")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    with pytest.raises(RuntimeError, match="no attention implementation today"):
        apply_tgr(model)
    monkeypatch.undo()
    assert _patch_fingerprint(model) == fingerprint and not is_tgr_applied(model)
    assert not any(MECHANISM_NAME in name for name, _ in model.named_modules())


def test_query_heads_not_a_multiple_of_kv_heads_is_refused(llama_dir):
    model = _llama(llama_dir)
    model.config.num_key_value_heads = 3  # 4 query heads
    fingerprint = _patch_fingerprint(model)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        apply_tgr(model)
    assert _patch_fingerprint(model) == fingerprint and not is_tgr_applied(model)


@pytest.mark.parametrize("family", ["gpt_oss", "gemma2"])
def test_attention_sinks_and_soft_capping_are_refused_before_anything_changes(family):
    """GPT-OSS's sinks and Gemma2's soft-capping change the softmax; the "tgr" function has neither."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

    sizes = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    if family == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(**sizes, num_local_experts=2, num_experts_per_tok=1))
        match = "attention sinks"
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**sizes))
        match = "soft-caps"
    fingerprint = _patch_fingerprint(model)
    with pytest.raises(ValueError, match=match):
        apply_tgr(model)
    assert _patch_fingerprint(model) == fingerprint and not is_tgr_applied(model)


def test_value_heads_of_another_size_are_refused_before_anything_changes():
    """DeepSeek-V3's latent attention has values narrower than its queries: refused by apply_tgr,
    not at the first forward after patching."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    model = DeepseekV3ForCausalLM(config)
    fingerprint = _patch_fingerprint(model)
    with pytest.raises(ValueError, match="value heads of size 8 and query/key heads of size 16"):
        apply_tgr(model, temperature_heads=4)
    assert _patch_fingerprint(model) == fingerprint and not is_tgr_applied(model)


def test_applying_twice_is_refused_and_removing_an_unpatched_model_too(llama_dir):
    model = _llama(llama_dir)
    fingerprint = _patch_fingerprint(model)
    with pytest.raises(ValueError, match="no TGR layers"):
        remove_tgr(model)
    assert _patch_fingerprint(model) == fingerprint
    apply_tgr(model)
    patched = _patch_fingerprint(model)
    with pytest.raises(ValueError, match="already has TGR layers"):
        apply_tgr(model, layers=[0])
    assert _patch_fingerprint(model) == patched
    remove_tgr(model)
    with pytest.raises(ValueError, match="no TGR layers"):
        remove_tgr(model)
    assert _patch_fingerprint(model) == fingerprint


@pytest.mark.parametrize("kwargs, match", [
    (dict(gsot_threshold=0.6), "gsot_threshold"),
    (dict(initial_temperature=0.995), "clamp range"),
    (dict(initial_temperature=1.0, clamp=(0.0, 1.0)), "initial_temperature"),
    (dict(layers=[0, 2]), "layers"),
    (dict(layers="some"), "layers"),
    (dict(temperature_heads=0), "temperature_heads"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_options_are_refused_before_anything_changes(kwargs, match, llama_dir):
    model = _llama(llama_dir)
    fingerprint = _patch_fingerprint(model)
    with pytest.raises(ValueError, match=match):
        apply_tgr(model, **kwargs)
    assert _patch_fingerprint(model) == fingerprint and not is_tgr_applied(model)


# ---------------------------------------------------------------------------------------------
# The TGR model's "layers" and "both" modes
# ---------------------------------------------------------------------------------------------


def _tgr_model(path, mode, **fields):
    from tgr import TGRConfig, TGRLlamaModel

    config = TGRConfig(base_model_name_or_path=path, load_in_4bit=False, compute_dtype="float32", device="cpu",
                       attention_backend="torch", temperature_heads=4, tgr_mode=mode, **fields)
    return TGRLlamaModel(config)


def test_config_records_the_mode_and_checks_it():
    from tgr import TGRConfig

    config = TGRConfig(tgr_mode="both", tgr_layers=(0, 3))
    assert TGRConfig.from_json_string(config.to_json_string()) == config
    assert config.tgr_layers == [0, 3] and TGRConfig().tgr_mode == "head"
    with pytest.raises(ValueError, match="tgr_mode"):
        TGRConfig(tgr_mode="every")
    with pytest.raises(ValueError, match="tgr_layers"):
        TGRConfig(tgr_layers=[1, 1])
    with pytest.raises(ValueError, match="temperature_conf_threshold"):
        TGRConfig(tgr_mode="layers", temperature_conf_threshold=0.6)
    with pytest.raises(ValueError, match="initial_temperature"):
        TGRConfig(tgr_mode="layers", initial_temperature=0.995)
    TGRConfig(tgr_mode="head", temperature_conf_threshold=0.6)  # the head has no such constraint


def test_layers_mode_gives_the_base_logits_at_start_and_saves_the_layer_weights(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import tgr.model  # noqa: F401  (registers the "tgr" model type)
    from tgr import TGRLlamaModel

    model = _tgr_model(llama_dir, "layers")
    assert len(model.temperature_mechanisms) == 0  # no head
    keys = sorted(model.state_dict())
    assert len(keys) == 4 and all(f".{MECHANISM_NAME}.proj." in k for k in keys)
    ids = torch.randint(4, 190, (2, 9), generator=torch.Generator().manual_seed(7))
    base = _llama(llama_dir)
    with torch.no_grad():
        out = model(ids, labels=ids)
        assert _rel(out.logits, base(ids).logits) <= 1e-5
    assert out.temperatures is None and out.layer_temperatures.shape == (2, 2, 9, 4)
    assert out.layer_gsot_mask.all()
    _perturb(model.hf_base_model, seed=8)
    with torch.no_grad():
        saved_logits = model(ids).logits
    folder = model.save_pretrained(tmp_path / "saved")
    for loaded in (TGRLlamaModel.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)):
        assert loaded.config.tgr_mode == "layers"
        state, own = loaded.state_dict(), model.state_dict()
        assert sorted(state) == sorted(own) and all(torch.equal(state[k], own[k]) for k in own)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, saved_logits)


def test_both_mode_has_the_head_and_the_layers_and_regularizes_them_all(llama_dir):
    model = _tgr_model(llama_dir, "both", tgr_layers=[1], temperature_regularization_weight=1.0)
    keys = sorted(model.state_dict())
    assert any(k.startswith("temperature_mechanisms.0.") for k in keys)
    assert sum(f".{MECHANISM_NAME}." in k for k in keys) == 2
    _perturb(model.hf_base_model, seed=9)
    ids = torch.randint(4, 190, (1, 8), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    real = mask.bool()
    expected = ((out.temperatures[real] - 0.5) ** 2).mean() + ((out.layer_temperatures[0][real] - 0.5) ** 2).mean()
    torch.testing.assert_close(out.temperature_loss, expected)
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_training_in_layers_mode_trains_the_layer_mechanisms(tmp_path):
    from transformers import AutoTokenizer

    from tgr.train import train, training_arguments

    # Larger random weights than the default tiny model's, so that attention (and so the layers'
    # temperatures) matters to the logits. Without GSoT: the hard gate has no gradient.
    path = build_tiny_llama(tmp_path / "base", num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = _tgr_model(path, "layers", gsoT_enabled=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"question": "What is water made of?", "answer": "Water is made of hydrogen and oxygen.", "label": 1},
            {"question": "How many legs does a spider have?", "answer": "A spider has eight legs.", "label": 1}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_arguments(tmp_path / "run", device="cpu", max_steps=8, learning_rate=0.05, logging_steps=1,
                              lr_scheduler_type="constant", per_device_train_batch_size=2, save_strategy="no",
                              disable_tqdm=True)
    _, trainer = train(model, tokenizer, rows, args, resume=False)
    after = model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 8 and logs[-1]["loss"] < 0.95 * logs[0]["loss"]
    assert all("layer_temperature_mean" in log and "layer_gsot_pruned" in log for log in logs)


def test_layers_mode_on_the_4bit_base_trains_and_generates(llama_dir):
    pytest.importorskip("bitsandbytes")
    from tgr import TGRConfig, TGRLlamaModel

    model = TGRLlamaModel(TGRConfig(base_model_name_or_path=llama_dir, device="cpu", tgr_mode="layers",
                                    temperature_heads=4))
    assert model.config.load_in_4bit and getattr(model.hf_base_model, "is_loaded_in_4bit", False)
    _perturb(model.hf_base_model, scale=1.0, seed=12)
    ids = torch.randint(4, 190, (2, 7), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    # Gradients reach every layer's mechanism through the frozen 4-bit layers above it.
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        generated = model.generate(ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=[])
        seq, m = ids, mask
        for _ in range(4):
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            nxt = model(seq, m, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, seq)


def test_cli_flags_choose_the_mode():
    from tgr.cli import _config, parse_training_args
    from tgr.pipeline import tgr_mode_fields

    assert tgr_mode_fields("none", None) == {"tgr_mode": "head"}
    assert tgr_mode_fields("all", None) == {"tgr_mode": "layers", "tgr_layers": "all"}
    assert tgr_mode_fields("0,2", "both") == {"tgr_mode": "both", "tgr_layers": [0, 2]}
    for layers, mode, flag in (("0,x", None, "--tgr-layers"), ("all", "head", "--tgr-layers"),
                               ("none", "layers", "--tgr-mode")):
        with pytest.raises(ValueError, match=flag):
            tgr_mode_fields(layers, mode)
    args, _ = parse_training_args("train", ["--tgr-layers", "1", "--tgr-mode", "both", "--no-4bit"])
    config = _config(args)
    assert config.tgr_mode == "both" and config.tgr_layers == [1]
    args, _ = parse_training_args("train", [])
    assert _config(args).tgr_mode == "head"


def test_evaluation_scores_the_base_head_with_the_layers_off(llama_dir):
    """evaluate_heads' "base_head" is the unpatched base, however the layers were trained."""
    from tgr.evaluation import _base_logits

    model = _tgr_model(llama_dir, "layers")
    _perturb(model.hf_base_model, scale=8.0)
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        patched = model.base_model(input_ids=ids, attention_mask=mask).logits
        scored = _base_logits(model, ids, mask)
        plain = _tgr_model(llama_dir, "head").base_model(input_ids=ids, attention_mask=mask).logits
    assert _rel(patched, plain) > 1e-3  # the trained layers change the base's logits
    assert torch.equal(scored, plain)


@pytest.mark.parametrize("mode", ["layers", "both"])
def test_forward_inside_tgr_layers_disabled_is_the_base(mode, llama_dir):
    from tgr import tgr_layers_disabled

    model = _tgr_model(llama_dir, mode).eval()
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with tgr_layers_disabled(model.hf_base_model):
        out = model(ids, labels=ids)
    assert out.layer_temperatures is None and out.layer_gsot_mask is None and torch.isfinite(out.loss)
    if mode == "layers":  # no head: the base's own logits
        torch.testing.assert_close(out.logits, _llama(llama_dir)(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["layers", "both"])
def test_tgr_layers_disabled_and_base_only_take_the_tgr_model(mode, llama_dir):
    """Given the TGR model itself, the blocks turn off its base's TGR layers (not: 'no TGR layers', nor
    a block that silently leaves them on)."""
    from tgr import tgr_layers_disabled
    from tgr.layers import base_only

    model = _tgr_model(llama_dir, mode).eval()
    _perturb(model.hf_base_model, scale=8.0)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        patched = model(ids).logits
        with tgr_layers_disabled(model.hf_base_model):
            expected = model(ids).logits
        assert not torch.equal(patched, expected)
        for block in (tgr_layers_disabled, base_only):
            with block(model) as inside:
                assert inside is model
                assert torch.equal(model(ids).logits, expected)
            assert torch.equal(model(ids).logits, patched)


def test_a_base_the_layers_refuse_is_left_as_it_came_with_lora(llama_dir):
    """from_base with LoRA and TGR layers on a base apply_tgr refuses: the error comes before LoRA
    (or freezing) changes the caller's base, so fixing the cause and retrying works."""
    from tgr import TGRLlamaModel

    base = _llama(llama_dir)
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.1
    modules = [name for name, _ in base.named_modules()]
    with pytest.raises(ValueError, match="attention_dropout"):
        TGRLlamaModel.from_base(base, tgr_mode="layers", lora_r=4, attention_backend="torch")
    assert [name for name, _ in base.named_modules()] == modules and not hasattr(base, "peft_config")
    assert all(param.requires_grad for param in base.parameters())
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.0
    model = TGRLlamaModel.from_base(base, tgr_mode="layers", lora_r=4, attention_backend="torch")
    assert sorted(tgr_layer_modules(model.hf_base_model)) == [0, 1]


def test_an_edit_of_the_config_gate_reaches_the_layers(llama_dir, tmp_path):
    """gsoT_enabled, the threshold and the gate's mode set on model.config after construction
    act on the layers as on the head, and what is saved is what ran."""
    from tgr import TGRLlamaModel
    from tgr.layers import tgr_layer_settings

    model = _tgr_model(llama_dir, "layers", temperature_conf_threshold=0.4)
    _perturb(model.hf_base_model)
    model.eval()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated = model(ids)
        assert not gated.layer_gsot_mask.all()  # the perturbed temperatures prune some rows
        model.config.gsoT_enabled = False
        open_gate = model(ids)
    assert open_gate.layer_gsot_mask.all()
    assert (open_gate.logits - gated.logits).abs().max() > 1e-3
    assert tgr_layer_settings(model.hf_base_model).gsot_threshold is None
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(TGRLlamaModel.from_pretrained(tmp_path)(ids).logits, open_gate.logits)


def test_reentrant_checkpointing_is_refused_with_tgr_layers(llama_dir):
    model = _tgr_model(llama_dir, "layers")
    with pytest.raises(ValueError, match="use_reentrant=True .* temperature regulariser would get no gradient"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    model.activation_checkpointing_enable({"use_reentrant": False})


def test_a_patched_fp32_model_trains_under_bf16_autocast(llama_dir):
    """Trainer(bf16=True) on an fp32 model runs it under autocast: q and k come out of RoPE in
    fp32 (fp32 cos/sin), v in bf16. The unpatched model's sdpa casts them; so must the "tgr" one."""
    import copy

    from tgr.layers import tgr_layers_disabled

    base = _llama(llama_dir).train()
    model = copy.deepcopy(base)
    apply_tgr(model, backend="torch", temperature_heads=2)
    _perturb(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        with tgr_layers_disabled(model):
            off = model(input_ids=ids, labels=ids).loss
        ref = base(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.allclose(off, ref, atol=1e-2)
    grads = [m.proj.weight.grad for m in tgr_layer_modules(model).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_collect_layer_temperatures_leaves_out_the_checkpointing_recomputation(llama_dir):
    """As its docstring says: a backward run inside the block, whose activation checkpointing
    recomputes every layer's forward, appends nothing (one entry per patched layer per forward)."""
    from tgr.layers import collect_layer_temperatures

    model = apply_tgr(_llama(llama_dir).train(), backend="torch", temperature_heads=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with collect_layer_temperatures(model) as collected:
        loss = model(input_ids=ids, labels=ids).loss
        assert len(collected) == 2
        (loss + sum(t.mean() for t in collected)).backward()
        assert len(collected) == 2
    assert all(m.proj.weight.grad is not None for m in tgr_layer_modules(model).values())


def _grads_of_a_block_crossing_step(llama_dir, attn_implementation, checkpointing, backward_in_block):
    """Gradients of off + 2 on, where `off` is the loss of a forward inside tgr_layers_disabled and
    the backward runs inside the block or after it."""
    from transformers import AutoModelForCausalLM

    from tgr.layers import tgr_layers_disabled

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32,
                                                 attn_implementation=attn_implementation).train()
    apply_tgr(model, backend="torch", temperature_heads=2, gsot_threshold=None)
    _perturb(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    if backward_in_block:
        on = model(input_ids=ids, labels=ids).loss
        with tgr_layers_disabled(model):
            (model(input_ids=ids, labels=ids).loss + 2 * on).backward()
    else:
        with tgr_layers_disabled(model):
            off = model(input_ids=ids, labels=ids).loss
        (off + 2 * model(input_ids=ids, labels=ids).loss).backward()
    assert model.config._attn_implementation == "tgr"
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("backward_in_block", [False, True])
def test_checkpointing_recomputes_a_forward_in_the_mode_it_ran_in(llama_dir, attn_implementation,
                                                                   backward_in_block):
    """A forward made inside tgr_layers_disabled and recomputed after the block (or the other way
    round) is recomputed as it ran: the gradients are those without checkpointing (before, the
    recomputation ran the other attention and torch raised a CheckpointError)."""
    plain = _grads_of_a_block_crossing_step(llama_dir, attn_implementation, False, backward_in_block)
    checkpointed = _grads_of_a_block_crossing_step(llama_dir, attn_implementation, True, backward_in_block)
    assert plain.keys() == checkpointed.keys() and any("temperature_mechanism" in k for k in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_refuses_a_recomputation_whose_mode_it_cannot_tell(llama_dir):
    """Two forwards sharing their rotary embeddings, one inside tgr_layers_disabled: a clear error."""
    from tgr.layers import tgr_layers_disabled

    model = apply_tgr(_llama(llama_dir).train(), backend="torch", temperature_heads=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rotary = model.model.rotary_emb
    shared = rotary(torch.zeros(1, 7, 64), torch.arange(7)[None])
    rotary.forward = lambda *args, **kwargs: shared
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with tgr_layers_disabled(model):
        off = model(input_ids=ids, labels=ids).loss
    on = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="rotary embeddings were passed to two forwards"):
        (off + on).backward()


def test_set_layer_gate_keeps_the_mode_and_width_it_is_not_given(llama_dir):
    from tgr.layers import set_layer_gate, tgr_layer_settings

    model = apply_tgr(_llama(llama_dir), backend="torch", temperature_heads=2, gsot_mode="soft", gsot_width=0.02)
    set_layer_gate(model, gsot_threshold=0.3)
    settings = tgr_layer_settings(model)
    assert (settings.gsot_threshold, settings.gsot_mode, settings.gsot_width) == (0.3, "soft", 0.02)
    set_layer_gate(model, gsot_threshold=None, gsot_mode="hard")
    assert (tgr_layer_settings(model).gsot_mode, tgr_layer_settings(model).gsot_width) == ("hard", 0.02)


@pytest.mark.parametrize("mode", ["layers", "both"])
def test_layer_helpers_look_through_a_tgr_model_to_its_base(mode, llama_dir, tmp_path):
    """is_tgr_applied, tgr_layer_modules and tgr_layer_settings of the TGR model are its base's (they said
    False, {} and None), as tgr_layers_disabled and base_only already took it; remove_tgr removes the
    base's layers in mode "both" (the model becomes the head-only one, and saves and loads as one) and
    refuses mode "layers", which would be left with no TGR, before anything changes."""
    from tgr import TGRLlamaModel
    from tgr.layers import tgr_layer_settings

    model = _tgr_model(llama_dir, mode, tgr_layers=[1]).eval()
    base = model.hf_base_model
    assert is_tgr_applied(model) and is_tgr_applied(base)
    assert tgr_layer_modules(model) == tgr_layer_modules(base) and list(tgr_layer_modules(model)) == [1]
    assert tgr_layer_settings(model) == tgr_layer_settings(base) and tgr_layer_settings(model).layers == (1,)
    with pytest.raises(TypeError, match="from its config"):
        apply_tgr(model)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    if mode == "layers":
        with pytest.raises(ValueError, match="tgr_layers_disabled"):
            remove_tgr(model)
        assert is_tgr_applied(model) and model.config.tgr_mode == "layers"
        return
    with torch.no_grad():
        head_only = model(ids).logits  # a fresh layer is the identity: the head on the base's hidden states
    assert remove_tgr(model) is model
    assert not is_tgr_applied(model) and not is_tgr_applied(base) and tgr_layer_modules(model) == {}
    assert model.config.tgr_mode == "head" and base.config._attn_implementation != ATTENTION_NAME
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, head_only, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    loaded = TGRLlamaModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.tgr_mode == "head" and not is_tgr_applied(loaded)
    with pytest.raises(ValueError, match="no TGR layers"):
        remove_tgr(model)
