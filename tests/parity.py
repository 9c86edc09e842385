"""The parity criterion shared by the kernel tests ("how close is close").

A fast path's error against the float64 truth must be at most twice the error of PyTorch's own
eager op in the same precision, plus a floor per dtype. Errors are max-abs differences.
"""
import torch

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_parity(name: str, actual: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (NaN/inf) in the result"
    err, eager_err = max_err(actual, truth), max_err(eager, truth)
    bound = 2 * eager_err + FLOOR[dtype]
    assert err <= bound, f"{name}: error {err:.3e} > 2 x eager error {eager_err:.3e} + floor {FLOOR[dtype]:.0e}"


def leaves_as(leaves, dtype):
    """Fresh leaves (q, k, v, temperature) in ``dtype``; the temperature stays fp32 unless float64."""
    q, k, v, t = (x.detach() for x in leaves)
    t = t.double() if dtype == torch.float64 else t
    return [q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_(),
            t.requires_grad_()]


def assert_attention_parity(out, leaves, mask, kwargs, dtype):
    """An attention path's ``out`` (computed from ``leaves`` = q, k, v, temperature) and its
    gradients against the float64 reference with the parity criterion, eager's own error measured
    in ``dtype``. Returns (the path's gradients, the reference's)."""
    from tgr_kernels.reference import temperature_guided_attention_ref

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    l64 = leaves_as(leaves, torch.float64)
    truth = temperature_guided_attention_ref(*l64, mask, upcast=True, **kwargs)
    truth_grads = torch.autograd.grad(truth, l64, grad_out.double())
    le = leaves_as(leaves, dtype)
    eager = temperature_guided_attention_ref(*le, mask, upcast=False, **kwargs)
    eager_grads = torch.autograd.grad(eager, le, grad_out)
    assert_parity("out", out, eager, truth, dtype)
    for name, g, ge, gt in zip(["q", "k", "v", "temperature"], grads, eager_grads, truth_grads, strict=True):
        assert_parity(f"d{name}", g, ge, gt, dtype)
    return grads, truth_grads
