"""The parity criterion shared by the kernel tests (DESIGN.md, "how close is close").

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
