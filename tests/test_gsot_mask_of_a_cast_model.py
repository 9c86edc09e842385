"""gsot_mask / layer_gsot_mask of a model whose TGR head (or layers) was cast to bf16 report the
pruning the kernels do: GSoT is decided on the fp32 mean temperature against the threshold, so the
mask must not be a comparison made in bf16 (mean and threshold rounded to bf16)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tgr import TGRConfig, TGRLlamaModel, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def base64(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny64_gsot_bf16"), hidden_size=64, num_hidden_layers=2,
                            vocab_size=256)


def _model(base, **fields):
    config = dict(base_model_name_or_path=base, temperature_heads=4, compute_dtype="float32", load_in_4bit=False,
                  attention_backend="torch", causal=False)
    config.update(fields)
    return TGRLlamaModel(TGRConfig(**config)).to(torch.bfloat16)


def _ids(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, model.vocab_size, (2, 9), generator=g)


def _threshold_just_above(t_bar32: torch.Tensor) -> tuple[float, int]:
    """A threshold one fp32 unit above some row's fp32 mean temperature, where rounding both to
    bf16 would put the row on the other side (kept)."""
    for idx in t_bar32.flatten().argsort().tolist():
        m32 = t_bar32.flatten()[idx]
        tau = torch.nextafter(m32, torch.tensor(1.0)).item()
        if m32.to(torch.bfloat16) >= torch.tensor(tau).to(torch.bfloat16):
            return tau, idx
    pytest.skip("no row near a bf16 rounding of the threshold")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_head_gsot_mask_is_the_pruning_of_a_bf16_head(base64, backend):
    model = _model(base64, attention_backend=backend)
    ids = _ids(model)
    with torch.no_grad():
        t = model(ids).temperatures
        assert t.dtype == torch.bfloat16  # the head was cast with the model
        t_bar32 = t.float().mean(-1)
        tau, idx = _threshold_just_above(t_bar32)
        model.config.temperature_conf_threshold = tau
        out = model(ids)
    kept = out.logits.float().abs().sum(-1) != 0  # a pruned row's TGR output is zero, so are its logits
    assert not kept.flatten()[idx]  # the kernels prune the row: its fp32 mean is under τ
    assert torch.equal(out.gsot_mask, kept)
    assert torch.equal(out.gsot_mask, t_bar32 >= tau)


def test_layer_gsot_mask_is_decided_in_fp32(base64):
    model = _model(base64, tgr_mode="layers")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "temperature_mechanism." in name:
                p.add_((torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1)).to(p.dtype))
    ids = _ids(model)
    with torch.no_grad():
        lt = model(ids).layer_temperatures
        assert lt.dtype == torch.bfloat16
        t_bar32 = lt.float().mean(-1)
        below = t_bar32[t_bar32 < 0.5]  # the layers' threshold must stay at most t_init
        tau, idx = _threshold_just_above(below)
        model.config.temperature_conf_threshold = tau
        out = model(ids)
    assert torch.equal(out.layer_gsot_mask, t_bar32 >= tau)


def test_bf16_layers_prune_on_the_fp32_mean_temperature(base64, monkeypatch):
    """A bf16 TGR layer with t_init = 0.3 prunes exactly the rows whose fp32 mean temperature is
    under τ (its layer_gsot_mask): t / t_init is not rounded to bf16 before the gate."""
    import tgr.layers as layers

    model = _model(base64, tgr_mode="layers", tgr_layers=[0], initial_temperature=0.3,
                   temperature_conf_threshold=0.25)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "temperature_mechanism." in name:
                p.add_((torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1)).to(p.dtype))
    ids = torch.randint(4, model.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    seen = []
    real_op = layers.temperature_guided_attention

    def spy(*args, **kwargs):
        out = real_op(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(layers, "temperature_guided_attention", spy)
    with torch.no_grad():
        t_bar32 = model(ids).layer_temperatures[0].float().mean(-1)
        # thresholds at the bf16 rounding boundaries of the rows' t / t_init
        candidates = sorted({v for v in t_bar32.flatten().tolist() if v < 0.3})
        mismatches = 0
        for lo, hi in list(zip(candidates, candidates[1:], strict=False))[:16]:
            tau = (lo + hi) / 2
            model.config.temperature_conf_threshold = tau
            seen.clear()
            out = model(ids)
            pruned = seen[0].float().abs().sum(dim=(1, 3)) == 0  # [B, S]: the layer's zeroed rows
            mismatches += int((pruned == out.layer_gsot_mask[0]).sum())
            assert torch.equal(out.layer_gsot_mask[0], t_bar32 >= tau)
    assert mismatches == 0
