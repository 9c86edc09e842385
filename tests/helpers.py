"""Inputs shared by several test modules; fixtures built on them live in ``conftest.py``.

Test modules import these (``from helpers import ...``) rather than importing one another, so
that each test module can be run, moved or removed on its own.
"""
import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_mask(kind, B, H, S_q, S_k, device=DEVICE):
    """Attention masks of every accepted form; the "dead" kinds contain rows with no visible key."""
    if kind is None:
        return None
    if kind in ("kpm", "kpm_dead", "kpm01"):
        keep = torch.ones(B, S_k, dtype=torch.bool, device=device)
        keep[-1, max(1, S_k - S_k // 3):] = False  # right padding on the last batch row
        if kind == "kpm_dead":
            keep[0] = False  # a sequence with no visible key at all
        return keep.long() if kind == "kpm01" else keep
    if kind == "additive":  # the seed's form: (1 - attention_mask) * -1e4, [B, 1, 1, S_k]
        keep = torch.ones(B, S_k, device=device)
        keep[-1, max(1, S_k - S_k // 3):] = 0
        return ((1.0 - keep) * -1e4)[:, None, None, :]
    if kind == "additive_inf":  # arbitrary additive bias with −inf entries and a fully masked row
        bias = torch.randn(B, 1, S_q, S_k, device=device)
        bias[torch.rand(B, 1, S_q, S_k, device=device) < 0.3] = -math.inf
        bias[0, 0, S_q // 2] = -math.inf
        return bias
    if kind == "bool4d":
        keep = torch.rand(B, 1, S_q, S_k, device=device) > 0.3
        keep[..., 0] = True
        return keep
    raise ValueError(kind)


def make_inputs(B, H, S_q, S_k, D, dtype, same_qkv, T=3, device=DEVICE):
    """Attention inputs as leaves that need gradients: ``(leaves, (q, k, v), temperature)``."""
    if same_qkv:
        assert S_q == S_k
        x = torch.randn(B, H, S_q, D, device=device, dtype=dtype).requires_grad_()
        leaves, qkv = [x], (x, x, x)
    else:
        q = torch.randn(B, H, S_q, D, device=device, dtype=dtype).requires_grad_()
        k = torch.randn(B, H, S_k, D, device=device, dtype=dtype).requires_grad_()
        v = torch.randn(B, H, S_k, D, device=device, dtype=dtype).requires_grad_()
        leaves, qkv = [q, k, v], (q, k, v)
    # Temperatures in [0.01, 0.99] like the TTM's, some of them near the GSoT thresholds.
    temperature = (torch.rand(B, S_q, T, device=device) * 0.98 + 0.01).requires_grad_()
    return leaves, qkv, temperature



def grouped_inputs(B, H_q, H_kv, S_q, S_k, D, dtype, device=DEVICE):
    """q ``[B, H_q, S_q, D]``, k and v with H_kv heads (grouped-query attention when fewer), and
    temperatures ``[B, S_q, 3]`` in [0.01, 0.99]; no gradients."""
    q = torch.randn(B, H_q, S_q, D, device=device, dtype=dtype)
    k = torch.randn(B, H_kv, S_k, D, device=device, dtype=dtype)
    v = torch.randn(B, H_kv, S_k, D, device=device, dtype=dtype)
    temperature = torch.rand(B, S_q, 3, device=device) * 0.98 + 0.01
    return q, k, v, temperature

def rebuild_inputs(leaves, temperature, same_qkv, dtype):
    """Detached copies of :func:`make_inputs`'s inputs in another dtype, as fresh leaves."""
    new = [x.detach().to(dtype).requires_grad_() for x in leaves]
    t = temperature.detach().to(torch.float64 if dtype == torch.float64 else temperature.dtype).requires_grad_()
    qkv = (new[0],) * 3 if same_qkv else tuple(new)
    return new, qkv, t


def opcheck_with_fake_outputs(op, args, **kw):
    """torch.library.opcheck, plus the fake implementation's outputs against the real ones:
    shapes, dtypes and strides (opcheck runs the fake implementation but does not compare them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.library.opcheck(op, args, **kw)
    with FakeTensorMode() as mode:
        fake_out = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    with torch.no_grad():
        real_out = op(*args)
    for i, (fake, real) in enumerate(zip(fake_out, real_out, strict=True)):
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride()), (
            f"output {i}: fake {tuple(fake.shape)} {fake.dtype} {fake.stride()} != "
            f"real {tuple(real.shape)} {real.dtype} {real.stride()}")


def word_level_tokenizer():
    """A fast tokenizer over a dozen words of the ``Q: ... A: ...`` format, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "Q", ":", "A", "Who", "?", "Someone", ".", "Other", "What", "Nothing"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
