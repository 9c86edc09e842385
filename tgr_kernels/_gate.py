"""GSoT gates: which rows of the attention output survive, and how the gate learns.

The attention output of query row i is ``Y_i = g_i · Ô_i`` (``Ô = softmax(S) V``), with the gate
``g_i`` a function of the row's mean temperature t̄_i, the threshold τ and a width ε > 0
(``u_i = (t̄_i − τ) / ε``)::

    mode               forward g                 backward dg/dt̄
    "hard"             1[t̄ >= τ]                 0            (the seed's gate)
    "straight_through" 1[t̄ >= τ]                 σ'(u) / ε    (hard in both passes' values)
    "soft"             σ(u)                      σ'(u) / ε

Why: the seed's hard gate has no gradient, so a token whose temperature falls under τ outputs
zeros for good: nothing tells its temperature to rise again. The straight-through gate keeps the
hard forward (training and inference see the same pruning) and lets the loss pull a pruned
token's temperature back across τ through the surrogate slope; the soft gate is smooth in both
passes (a model in eval mode should use "hard" there: the caller's choice).

The gate's gradient into t̄ is ``dt̄_i += g'(t̄_i) · Σ_h Σ_d dY_hid Ô_hid``. ``Σ_d dY ∘ Ô`` is
``Δ_i = Σ_j P_ij dP_ij`` with ``dP = dY Vᵀ`` taken before gating: the kernels' backward sums it
anyway, so the kernels take the ungated dY and apply g (and g') themselves, in their epilogues.
(The wide path's soft gate is the exception: its dP is a library GEMM, in fp16 for fp16 inputs,
so dY is gated before it, as eager's order, and its row kernel adds ``(1 − g)/ε · Δ``, which is
``g' · Δ̂`` of the ungated Δ̂ = Δ / g.)
A pruned row's Ô is never stored: the backward recomputes what it needs from P.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

GSOT_MODES = ("hard", "straight_through", "soft")
GATE_HARD, GATE_STRAIGHT_THROUGH, GATE_SOFT = range(3)
DEFAULT_GSOT_WIDTH = 0.05
# float32's normal range: the gate and the logits' scale are fp32 numbers in the kernels.
FP32_NORMAL_MIN = torch.finfo(torch.float32).tiny
FP32_MAX = torch.finfo(torch.float32).max


class Gate(NamedTuple):
    """A validated GSoT gate: threshold τ, mode (an index into ``GSOT_MODES``), width ε > 0."""

    threshold: float
    mode: int = GATE_HARD
    width: float = DEFAULT_GSOT_WIDTH

    @property
    def learns(self) -> bool:
        """Whether the gate has a gradient into t̄."""
        return self.mode != GATE_HARD


def is_finite_number(x) -> bool:
    """``math.isfinite`` by comparisons only: under ``torch.compile(dynamic=True)`` a Python float
    argument or global is a SymFloat, which ``math.isfinite`` cannot take (a graph break, an error
    under fullgraph). ``inf − inf`` and NaN compare unequal to 0 (``float`` first: NumPy would
    warn on ``inf − inf``)."""
    x = float(x)
    return x - x == 0


def make_gate(threshold, mode: str = "hard", width=DEFAULT_GSOT_WIDTH) -> Gate | None:
    """The Gate for a user's ``gsot_threshold`` / ``gsot_mode`` / ``gsot_width`` (None: no GSoT).
    The threshold is checked by the caller; mode and width here, with errors naming them."""
    if mode not in GSOT_MODES:
        raise ValueError(f"gsot_mode must be one of {', '.join(map(repr, GSOT_MODES))}, got {mode!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)):  # bools, strings, tensors: a mistake
        raise TypeError(f"gsot_width must be a positive finite number, got {width!r}")
    width = float(width)
    if not (width > 0 and is_finite_number(width)):
        raise ValueError(f"gsot_width must be a positive finite number, got {width!r}")
    if not FP32_NORMAL_MIN <= width <= FP32_MAX:
        # The kernels compute in fp32: a width that rounds to 0 or inf there made dt̄ NaN.
        raise ValueError(f"gsot_width must lie in float32's normal range [{FP32_NORMAL_MIN:.3g}, {FP32_MAX:.3g}] "
                         f"(the gate is computed in float32), got {width!r}")
    if threshold is None:
        return None
    return Gate(float(threshold), GSOT_MODES.index(mode), width)


def kernel_args(gate: Gate | None) -> tuple[float, int, float]:
    """(threshold, mode, width) as the kernels take them; with no gate the kernels' HAS_GATE is
    off and these are placeholders."""
    return (0.0, GATE_HARD, DEFAULT_GSOT_WIDTH) if gate is None else tuple(gate)


def op_args(gate: Gate | None) -> tuple[float | None, int, float]:
    """(threshold or None, mode, width): the gate as the custom ops' schemas take it."""
    return (None, GATE_HARD, DEFAULT_GSOT_WIDTH) if gate is None else tuple(gate)


def from_op_args(threshold: float | None, mode: int, width: float) -> Gate | None:
    return None if threshold is None else Gate(threshold, mode, width)


# ----------------------------------------------------------------------------- PyTorch
def gate_value(t_bar: torch.Tensor, gate: Gate) -> torch.Tensor:
    """The forward gate g (in t̄'s dtype), with no gradient."""
    t_bar = t_bar.detach()
    if gate.mode == GATE_SOFT:
        return torch.sigmoid((t_bar - gate.threshold) / gate.width)
    return (t_bar >= gate.threshold).to(t_bar.dtype)


def gate_slope(t_bar: torch.Tensor, gate: Gate) -> torch.Tensor:
    """dg/dt̄ as the backward uses it (zeros for the hard gate)."""
    if gate.mode == GATE_HARD:
        return torch.zeros_like(t_bar)
    sig = torch.sigmoid((t_bar.detach() - gate.threshold) / gate.width)
    return sig * (1 - sig) / gate.width


def differentiable_gate(t_bar: torch.Tensor, gate: Gate) -> torch.Tensor:
    """g as a PyTorch expression whose autograd gradient is ``gate_slope`` (twice differentiable
    for the soft and straight-through modes): ``hard + (σ(u) − σ(u).detach())`` for the
    straight-through gate."""
    if gate.mode == GATE_HARD:
        return gate_value(t_bar, gate)
    soft = torch.sigmoid((t_bar - gate.threshold) / gate.width)
    if gate.mode == GATE_SOFT:
        return soft
    return gate_value(t_bar, gate) + (soft - soft.detach())


# ----------------------------------------------------------------------------- Triton
@triton.jit
def gate_rows(t_bar, threshold, mode, width):
    """Per row, the forward gate g and the backward's dg/dt̄ (fp32), for runtime mode/width.
    Divisions are the fast approximate ones (``tl.fdiv``, a few ulp): the IEEE division's slow
    path is a called subroutine whose stack frame the static proof counts as a spill."""
    inv_width = tl.fdiv(1.0, width)
    sig = tl.fdiv(1.0, 1.0 + tl.exp((threshold - t_bar) * inv_width))
    hard = tl.where(t_bar >= threshold, 1.0, 0.0)
    g = tl.where(mode == 2, sig, hard)  # 2: GATE_SOFT
    slope = tl.where(mode == 0, 0.0, sig * (1.0 - sig) * inv_width)  # 0: GATE_HARD
    return g, slope


@triton.jit
def gated_lse(lse, g):
    """``lse − log2 g`` (+inf where g = 0): ``exp2(S − gated_lse)`` is ``g · exp2(S − lse)``. A
    kernel that folds the gate into its row's lse this way holds no register for g in its loop
    over keys (the static proof showed extra live values spilling in the backward kernels)."""
    return tl.where(g > 0.0, lse - tl.log2(tl.where(g > 0.0, g, 1.0)), float("inf"))
