"""Shared pieces of the property-based tests (``tests/*_properties.py``): strided inputs drawn
from a seed, leaves and their gradients, and a derandomized run of a strategy."""
import math

import torch

from helpers import DEVICE

HIDDEN_LAYOUTS = ["contiguous", "column slice", "leading transpose"]
WEIGHT_LAYOUTS = ["contiguous", "column slice", "transposed storage"]


def seeded_randn(seed: int):
    """(generator, randn): fp32 normal samples from the CPU generator, moved to the test device."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    return g, randn


def strided_hidden_and_weight(randn, lead, hidden_size, rows, scale, hidden_layout, weight_layout):
    """hidden ``[*lead, H]`` and weight ``[rows, H]`` (entries ~N(0, scale²/H)), fp32, with the
    drawn memory layouts: a column slice of a wider buffer, the leading dims transposed, or the
    weight stored transposed."""
    if hidden_layout == "column slice":
        hidden = randn(*lead, hidden_size + 3)[..., 1:hidden_size + 1]
    elif hidden_layout == "leading transpose" and len(lead) >= 2:
        hidden = randn(lead[1], lead[0], *lead[2:], hidden_size).transpose(0, 1)
    else:
        hidden = randn(*lead, hidden_size)
    weight = randn(rows, hidden_size) * (scale / math.sqrt(hidden_size))
    if weight_layout == "column slice":
        weight = torch.cat([weight, randn(rows, 2)], 1)[:, :hidden_size]
    elif weight_layout == "transposed storage":
        weight = weight.t().contiguous().t()
    return hidden, weight


def leaves(tensors, requires, dtype=None):
    """Fresh leaves (in ``dtype`` when given) that require grad as drawn; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(r)
            for t, r in zip(tensors, requires, strict=True)]


def value_and_grads(fn, tensors, upstream):
    """``fn(*tensors)`` and the gradients of the tensors that require grad (None for the others)."""
    out = fn(*tensors)
    needed = [t for t in tensors if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, needed, upstream.to(out.dtype)) if needed else ())
    return [out.detach()] + [next(grads) if (t is not None and t.requires_grad) else None for t in tensors]


def run_examples(hypothesis, strategy, check, max_examples: int) -> None:
    """``check`` on ``max_examples`` derandomized draws (the same on every run). No shrinking: a
    failing example is printed as drawn (shrinking one took minutes)."""
    @hypothesis.settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                         phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(strategy)
    def run(case):
        check(case)

    run()


def draw_common(draw, st, backend: str) -> dict:
    """The draws every property test shares: the leading shape (one to three dims of 1-9), bias,
    which of (hidden, weight, bias) need gradients, the layouts, and the data's seed."""
    n_dims = draw(st.integers(1, 3))
    return dict(
        backend=backend,
        lead=tuple(draw(st.lists(st.integers(1, 9), min_size=n_dims, max_size=n_dims))),
        bias=draw(st.booleans()),
        requires=tuple(draw(st.lists(st.booleans(), min_size=3, max_size=3))),
        hidden_layout=draw(st.sampled_from(HIDDEN_LAYOUTS)),
        weight_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def one_ulp(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` at the largest magnitude of ``truth``: a rounded result may sit one
    unit in the last place from the truth where eager's happened to round onto it (a bf16 dW of
    magnitude 26 has spacing 0.125, above bf16's floor of 5e-2)."""
    peak = truth.abs().max().item()
    if peak == 0 or not math.isfinite(peak):
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(peak))


def assert_close_to_truth(name, actual, eager, truth, dtype, floor):
    """The library's criterion (error ≤ 2 × eager's + floor), plus one unit in the last place of
    ``dtype`` at the truth's magnitude (see :func:`one_ulp`)."""
    from parity import max_err

    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (NaN/inf) in the result"
    err, eager_err = max_err(actual, truth), max_err(eager, truth)
    bound = 2 * eager_err + floor + one_ulp(truth, dtype)
    assert err <= bound, f"{name}: error {err:.3e} > 2 x eager error {eager_err:.3e} + floor {floor:.0e} + 1 ulp"
