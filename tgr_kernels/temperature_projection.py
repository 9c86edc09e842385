"""Token Temperature Mechanism (TTM): the temperature projection as one fused, differentiable op.

Math (hidden ``h [N, H]`` after flattening the leading dims, weight ``W [T, H]``, bias ``b [T]``)::

    z = h @ W^T + b                  [N, T]   fp32 accumulation
    σ = sigmoid(z)
    t = clamp(σ, t_min, t_max)       the temperatures

Backward, with upstream gradient ``dt [N, T]``::

    dz = dt ∘ σ(1 − σ) ∘ 1[t_min ≤ σ ≤ t_max]      (torch.clamp passes the gradient at equality)
    dh = dz W        [N, H]
    dW = dzᵀ h       [T, H]
    db = Σ_rows dz   [T]

This file holds the op's Triton kernels, its ``torch.autograd.Function``, the optimized PyTorch
path, the public dispatch function :func:`temperature_projection` and the thin module
:class:`TemperatureMechanism`. The op is memory bound: T (temperature heads, 8 in the seed) is
tiny next to H, so every kernel streams ``h`` once and keeps W's ``[T, BLOCK_K]`` tile and the
``[BLOCK_M, T]`` accumulator on chip.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _configs
from ._backend import (
    TRITON_INTERPRET,
    autocast_off,
    cpu_computes_natively,
    new_output,
    resolve_backend,
    triton_dot_precision,
)
from ._validation import check_backend, check_clamp_bounds, check_projection_inputs
from .reference import temperature_projection_ref

__all__ = ["temperature_projection", "TemperatureMechanism"]

# Rows of h per program and columns of H per loop step. Fixed (no autotune: the interpreter
# cannot run more than one config, and this memory-bound op gains little from tuning).
# Tile sizes (BLOCK_M rows of h, BLOCK_K columns of H, BLOCK_T heads), warps and stages of each
# kernel are chosen in _configs.projection_config and compiled for sm_90, sm_80 and sm_86 by
# `python -m tgr_kernels.aot`.
# The whole T lives in one tile; wider projections (not TTM's shape) go to the torch backend.
MAX_TEMPERATURE_HEADS = 128
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, row_mask, col_mask):
    """A [len(rows), len(cols)] tile at ``ptr`` with the given strides, zeros where masked."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _projection_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    sigma_ptr,
    n_rows,
    hidden_size,
    n_heads,
    stride_hidden_row,
    stride_hidden_col,
    stride_weight_head,
    stride_weight_col,
    clamp_min,
    clamp_max,
    HAS_BIAS: tl.constexpr,
    SAVE_SIGMA: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``t = clamp(sigmoid(h @ W^T + b), clamp_min, clamp_max)`` for one block of BLOCK_M rows.

    ``acc[BLOCK_M, BLOCK_T] = Σ_k h[rows, k] W[heads, k]`` over H in BLOCK_K steps, in fp32.

    Args:
        hidden_ptr: h ``[n_rows, hidden_size]``, any strides, fp16/bf16/fp32.
        weight_ptr: W ``[n_heads, hidden_size]``, any strides, fp16/bf16/fp32.
        bias_ptr: b ``[n_heads]`` contiguous (any float dtype), unused unless HAS_BIAS.
        out_ptr: t ``[n_rows, n_heads]`` contiguous, written in its own dtype.
        sigma_ptr: σ ``[n_rows, n_heads]`` contiguous fp32 (pre-clamp, for the backward),
            written only when SAVE_SIGMA.
        n_rows: N, the product of hidden's leading dims.
        hidden_size: H.
        n_heads: T, the number of temperature heads (<= BLOCK_T).
        stride_hidden_row, stride_hidden_col: h's strides in elements.
        stride_weight_head, stride_weight_col: W's strides in elements.
        clamp_min, clamp_max: the clamp bounds (fp32).
        HAS_BIAS: add b.
        SAVE_SIGMA: store σ (some input needs a gradient).
        DOT_IN_FP32: cast both tiles to fp32 before tl.dot (fp32 or mixed-dtype inputs); else
            h and W share a half dtype and the dot runs on it with fp32 accumulation.
        INPUT_PRECISION: tl.dot's ``input_precision`` for fp32 tiles ("ieee" or "tf32").
        BLOCK_M, BLOCK_T, BLOCK_K: tile sizes; BLOCK_T >= n_heads, all >= 16.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    heads = tl.arange(0, BLOCK_T).to(tl.int64)
    row_mask = rows < n_rows
    head_mask = heads < n_heads

    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        cols = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        col_mask = cols < hidden_size
        h = _load_tile(hidden_ptr, rows, cols, stride_hidden_row, stride_hidden_col, row_mask, col_mask)
        w = _load_tile(weight_ptr, heads, cols, stride_weight_head, stride_weight_col, head_mask, col_mask)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        b = tl.load(bias_ptr + heads, mask=head_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    sigma = tl.sigmoid(acc)
    # where() rather than minimum/maximum: NaN must propagate, as in torch.clamp.
    temperature = tl.where(sigma < clamp_min, clamp_min, tl.where(sigma > clamp_max, clamp_max, sigma))

    offsets = rows[:, None] * n_heads + heads[None, :]
    mask = row_mask[:, None] & head_mask[None, :]
    tl.store(out_ptr + offsets, temperature.to(out_ptr.dtype.element_ty), mask=mask)
    if SAVE_SIGMA:
        tl.store(sigma_ptr + offsets, sigma, mask=mask)


@triton.jit
def _projection_backward_rows_kernel(
    grad_out_ptr,
    sigma_ptr,
    weight_ptr,
    grad_logits_ptr,
    grad_hidden_ptr,
    n_rows,
    hidden_size,
    n_heads,
    stride_grad_out_row,
    stride_grad_out_head,
    stride_weight_head,
    stride_weight_col,
    clamp_min,
    clamp_max,
    STORE_GRAD_LOGITS: tl.constexpr,
    HIDDEN_GRAD: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per row block: ``dz = dt ∘ σ(1 − σ) ∘ 1[clamp_min ≤ σ ≤ clamp_max]`` and ``dh = dz W``.

    One program owns BLOCK_M rows of dz and dh, so there are no atomics.

    Args:
        grad_out_ptr: dt ``[n_rows, n_heads]``, any strides (autograd may hand an expanded or
            transposed gradient), any float dtype.
        sigma_ptr: σ ``[n_rows, n_heads]`` contiguous fp32, saved by the forward.
        weight_ptr: W ``[n_heads, hidden_size]``, any strides; read only when HIDDEN_GRAD.
        grad_logits_ptr: dz ``[n_rows, n_heads]`` contiguous fp32, written when
            STORE_GRAD_LOGITS (the weight/bias gradients need it).
        grad_hidden_ptr: dh ``[n_rows, hidden_size]`` contiguous, in hidden's dtype, written when
            HIDDEN_GRAD.
        n_rows, hidden_size, n_heads: N, H, T.
        stride_grad_out_row, stride_grad_out_head: dt's strides in elements.
        stride_weight_head, stride_weight_col: W's strides in elements.
        clamp_min, clamp_max: the clamp bounds (fp32).
        STORE_GRAD_LOGITS: store dz.
        HIDDEN_GRAD: compute and store dh.
        DOT_IN_FP32: run ``dz W`` in fp32; else cast dz to W's half dtype (as eager autograd
            does) and accumulate in fp32.
        INPUT_PRECISION: tl.dot's ``input_precision`` for fp32 tiles.
        BLOCK_M, BLOCK_T, BLOCK_K: tile sizes; BLOCK_T >= n_heads, all >= 16.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    heads = tl.arange(0, BLOCK_T).to(tl.int64)
    row_mask = rows < n_rows
    head_mask = heads < n_heads
    mask = row_mask[:, None] & head_mask[None, :]

    sigma = tl.load(sigma_ptr + rows[:, None] * n_heads + heads[None, :], mask=mask, other=0.0)
    grad_out = _load_tile(grad_out_ptr, rows, heads, stride_grad_out_row, stride_grad_out_head,
                          row_mask, head_mask).to(tl.float32)
    # The gradient is stopped where σ is outside the clamp range. Written as "outside", not as
    # "not inside": a NaN σ (from a NaN hidden state) is neither, so its NaN dz flows on as in
    # eager autograd (0 · NaN) instead of becoming a silent 0.
    clamped = (sigma < clamp_min) | (sigma > clamp_max)
    # Padded rows/heads load σ = 0, dt = 0, so their dz is 0 and they add nothing to the dots.
    grad_logits = tl.where(clamped, 0.0, grad_out * sigma * (1.0 - sigma))
    if STORE_GRAD_LOGITS:
        tl.store(grad_logits_ptr + rows[:, None] * n_heads + heads[None, :], grad_logits, mask=mask)

    if HIDDEN_GRAD:
        if DOT_IN_FP32:
            dz = grad_logits
        else:
            dz = grad_logits.to(weight_ptr.dtype.element_ty)
        for k_start in range(0, hidden_size, BLOCK_K):
            cols = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
            col_mask = cols < hidden_size
            w = _load_tile(weight_ptr, heads, cols, stride_weight_head, stride_weight_col, head_mask, col_mask)
            if DOT_IN_FP32:
                w = w.to(tl.float32)
            grad_hidden = tl.dot(dz, w, input_precision=INPUT_PRECISION)
            tl.store(
                grad_hidden_ptr + rows[:, None] * hidden_size + cols[None, :],
                grad_hidden.to(grad_hidden_ptr.dtype.element_ty),
                mask=row_mask[:, None] & col_mask[None, :],
            )


@triton.jit
def _projection_backward_weight_kernel(
    grad_logits_ptr,
    hidden_ptr,
    partial_grad_weight_ptr,
    n_rows,
    hidden_size,
    n_heads,
    rows_per_split,
    stride_hidden_row,
    stride_hidden_col,
    DOT_IN_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``dW[:, cols] = Σ_rows dz[rows]ᵀ h[rows, cols]`` over one split of the rows.

    Program (c, s) owns the BLOCK_K columns c of dW and the rows
    ``[s · rows_per_split, (s + 1) · rows_per_split)``; it writes its partial sum to
    ``partial[s]``, and the host sums the splits in a fixed order (deterministic, no atomics).
    Splitting the rows keeps the GPU busy when H / BLOCK_K alone gives too few programs.

    Args:
        grad_logits_ptr: dz ``[n_rows, n_heads]`` contiguous fp32.
        hidden_ptr: h ``[n_rows, hidden_size]``, any strides, fp16/bf16/fp32.
        partial_grad_weight_ptr: ``[n_splits, n_heads, hidden_size]`` contiguous fp32.
        n_rows, hidden_size, n_heads: N, H, T.
        rows_per_split: rows per split, a multiple of BLOCK_M.
        stride_hidden_row, stride_hidden_col: h's strides in elements.
        DOT_IN_FP32: run the dot in fp32; else cast dz to h's half dtype, fp32 accumulation.
        INPUT_PRECISION: tl.dot's ``input_precision`` for fp32 tiles.
        BLOCK_M, BLOCK_T, BLOCK_K: tile sizes; BLOCK_T >= n_heads, all >= 16.
    """
    pid_col = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_col.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    heads = tl.arange(0, BLOCK_T).to(tl.int64)
    col_mask = cols < hidden_size
    head_mask = heads < n_heads
    first_row = pid_split.to(tl.int64) * rows_per_split

    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for row_offset in range(0, rows_per_split, BLOCK_M):
        rows = first_row + row_offset + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        dz = _load_tile(grad_logits_ptr, rows, heads, n_heads, 1, row_mask, head_mask)
        h = _load_tile(hidden_ptr, rows, cols, stride_hidden_row, stride_hidden_col, row_mask, col_mask)
        if DOT_IN_FP32:
            h = h.to(tl.float32)
        else:
            dz = dz.to(h.dtype)
        acc = tl.dot(tl.trans(dz), h, acc, input_precision=INPUT_PRECISION)

    partial_ptr = partial_grad_weight_ptr + pid_split.to(tl.int64) * n_heads * hidden_size
    tl.store(
        partial_ptr + heads[:, None] * hidden_size + cols[None, :],
        acc,
        mask=head_mask[:, None] & col_mask[None, :],
    )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _dot_in_fp32(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """The dots run on a half dtype only when h and W share it; fp32 and mixed inputs use fp32."""
    return not (hidden_dtype == weight_dtype and hidden_dtype in _HALF_DTYPES)


def _precision(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> str:
    """tl.dot's input_precision for the dtype the kernels multiply in.

    Half hidden states with fp32 weights (the model's mix) use "tf32x3": a half value is exact in
    tf32, so only W is split (W = big + small, both tf32) and the products keep ~22 bits of W,
    fp32-grade, on tensor cores; "ieee" would run them as scalar FMAs (and spills registers).
    The same holds for fp32 hidden states on a half head ("tf32x3"), and for one half dtype on the
    other, where both operands are exact in tf32 and so are their products ("tf32"): with "ieee"
    those kernels spilled 8-168 B on sm_90 and sm_80 (static proof). Only fp32 on fp32 keeps
    "ieee" when PyTorch does not allow TF32.
    """
    if _dot_in_fp32(hidden_dtype, weight_dtype) and triton_dot_precision(torch.float32) == "ieee":
        halves = (hidden_dtype in _HALF_DTYPES) + (weight_dtype in _HALF_DTYPES)
        if halves:
            return "tf32" if halves == 2 else "tf32x3"
    return triton_dot_precision(torch.float32 if _dot_in_fp32(hidden_dtype, weight_dtype) else hidden_dtype)


def _block_t(n_heads: int) -> int:
    return _configs.projection_block_t(n_heads)


def _launch_forward(hidden2d, weight, bias, clamp_min, clamp_max, save_sigma: bool):
    """Run the forward kernel; returns ``(t [N, T], σ [N, T] fp32 or None)``."""
    n_rows, hidden_size = hidden2d.shape
    n_heads = weight.shape[0]
    out = new_output((n_rows, n_heads), torch.promote_types(hidden2d.dtype, weight.dtype), hidden2d.device)
    sigma = new_output((n_rows, n_heads), torch.float32, hidden2d.device) if save_sigma else out
    bias_arg = bias.contiguous() if bias is not None else out  # never read without HAS_BIAS
    config = _configs.projection_config("fwd", n_heads, hidden2d.dtype, weight.dtype)
    _configs.launch(
        _projection_forward_kernel, (triton.cdiv(n_rows, config["BLOCK_M"]),), (config,),
        hidden2d, weight, bias_arg, out, sigma,
        n_rows, hidden_size, n_heads,
        hidden2d.stride(0), hidden2d.stride(1),
        weight.stride(0), weight.stride(1),
        float(clamp_min), float(clamp_max),
        HAS_BIAS=bias is not None,
        SAVE_SIGMA=save_sigma,
        DOT_IN_FP32=_dot_in_fp32(hidden2d.dtype, weight.dtype),
        INPUT_PRECISION=_precision(hidden2d.dtype, weight.dtype),
    )
    return out, (sigma if save_sigma else None)


def _launch_backward_rows(grad_out, sigma, weight, hidden_dtype, clamp_min, clamp_max,
                          store_grad_logits: bool, hidden_grad: bool):
    """Run the row kernel; returns ``(dz [N, T] fp32 or None, dh [N, H] or None)``."""
    n_rows, n_heads = sigma.shape
    hidden_size = weight.shape[1]
    device = sigma.device
    grad_logits = new_output((n_rows, n_heads), torch.float32, device) if store_grad_logits else sigma
    grad_hidden = new_output((n_rows, hidden_size), hidden_dtype, device) if hidden_grad else sigma
    config = _configs.projection_config("bwd_rows", n_heads, hidden_dtype, weight.dtype)
    _configs.launch(
        _projection_backward_rows_kernel, (triton.cdiv(n_rows, config["BLOCK_M"]),), (config,),
        grad_out, sigma, weight, grad_logits, grad_hidden,
        n_rows, hidden_size, n_heads,
        grad_out.stride(0), grad_out.stride(1),
        weight.stride(0), weight.stride(1),
        float(clamp_min), float(clamp_max),
        STORE_GRAD_LOGITS=store_grad_logits,
        HIDDEN_GRAD=hidden_grad,
        DOT_IN_FP32=_dot_in_fp32(hidden_dtype, weight.dtype),
        INPUT_PRECISION=_precision(hidden_dtype, weight.dtype),
    )
    return (grad_logits if store_grad_logits else None), (grad_hidden if hidden_grad else None)


def _num_row_splits(n_row_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """How many row splits the weight-gradient kernel uses: enough programs to fill the GPU.

    On the interpreter (CPU) more programs only cost time, so one split.
    """
    if device.type != "cuda":
        return 1
    target_programs = 2 * _configs.device_sm_count(device)
    return max(1, min(n_row_blocks, triton.cdiv(target_programs, n_col_blocks)))


def _launch_backward_weight(grad_logits, hidden2d, weight_dtype):
    """Run the weight-gradient kernel; returns dW ``[T, H]`` in fp32."""
    n_rows, n_heads = grad_logits.shape
    hidden_size = hidden2d.shape[1]
    config = _configs.projection_config("bwd_weight", n_heads, hidden2d.dtype, weight_dtype)
    n_row_blocks = triton.cdiv(n_rows, config["BLOCK_M"])
    n_col_blocks = triton.cdiv(hidden_size, config["BLOCK_K"])
    n_splits = _num_row_splits(n_row_blocks, n_col_blocks, hidden2d.device)
    rows_per_split = triton.cdiv(n_row_blocks, n_splits) * config["BLOCK_M"]
    n_splits = triton.cdiv(n_rows, rows_per_split)  # drop splits that would own no rows
    partial = new_output((n_splits, n_heads, hidden_size), torch.float32, hidden2d.device)
    _configs.launch(
        _projection_backward_weight_kernel, (n_col_blocks, n_splits), (config,),
        grad_logits, hidden2d, partial,
        n_rows, hidden_size, n_heads, rows_per_split,
        hidden2d.stride(0), hidden2d.stride(1),
        DOT_IN_FP32=_dot_in_fp32(hidden2d.dtype, weight_dtype),
        INPUT_PRECISION=_precision(hidden2d.dtype, weight_dtype),
    )
    return partial[0] if n_splits == 1 else partial.sum(dim=0)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


# The fused forward and backward are registered as the custom ops
# ``torch.ops.tgr_kernels.temperature_projection_forward`` / ``..._backward`` in ``_ops``, with
# autograd attached there, so that torch.compile sees them as opaque ops.


# --------------------------------------------------------------------------------------------
# PyTorch path and dispatch
# --------------------------------------------------------------------------------------------


def _torch_projection(hidden, weight, bias, clamp_min, clamp_max):
    """Optimized PyTorch TTM: one GEMM, then sigmoid and clamp in fp32 (autograd does the rest).

    Hidden and weight that share a half dtype use the half GEMM (fp32 accumulation) on CUDA and
    on CPUs with native instructions for it; everything else runs the GEMM in fp32 (float64
    stays float64): CPUs without bf16 instructions emulate bf16 GEMMs ~100x slower than fp32.
    """
    out_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    same_half = hidden.dtype == weight.dtype and hidden.dtype in _HALF_DTYPES
    if out_dtype == torch.float64:
        gemm_dtype = torch.float64
    elif same_half and (hidden.is_cuda or cpu_computes_natively(hidden.dtype)):
        gemm_dtype = hidden.dtype
    else:
        gemm_dtype = torch.float32
    act_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    # The bias goes inside the GEMM, before its one rounding, as in eager's F.linear: added after
    # a half GEMM, the product was rounded first, losing |h·Wᵀ|·2⁻⁹ where the bias cancels a
    # large product (a constant outlier dimension of the hidden states and a bias that offsets it).
    b = None if bias is None else bias.to(gemm_dtype)
    logits = F.linear(hidden.to(gemm_dtype), weight.to(gemm_dtype), b).to(act_dtype)
    return torch.clamp(torch.sigmoid(logits), clamp_min, clamp_max).to(out_dtype)


def _triton_unsupported(hidden, weight, bias) -> Exception | None:
    """The error to raise when the Triton kernels cannot take these inputs, or None."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype == torch.float64:
            return TypeError(
                f"backend='triton' has no float64 kernels ({name} is {tensor.dtype}); use backend='torch'"
            )
    if weight.shape[0] > MAX_TEMPERATURE_HEADS:
        return ValueError(
            f"backend='triton' supports at most {MAX_TEMPERATURE_HEADS} temperature heads, but weight "
            f"{list(weight.shape)} has {weight.shape[0]}; use backend='torch'"
        )
    return None


def _triton_projection(hidden, weight, bias, clamp_min, clamp_max):
    from ._ops import temperature_projection_triton  # _ops imports this module's launchers

    out_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if TRITON_INTERPRET and hidden.device.type == "cpu":
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
        # bf16 operands are computed in fp32 there and the result cast back; autograd casts
        # the gradients back to each input's dtype.
        hidden, weight, bias = (None if t is None else (t.float() if t.dtype == torch.bfloat16 else t)
                                for t in (hidden, weight, bias))
    hidden_size = hidden.shape[-1]
    lead_shape = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden_size)  # a view when it can be, a copy otherwise
    out = temperature_projection_triton(hidden2d, weight, bias, clamp_min, clamp_max)
    return out.view(*lead_shape, weight.shape[0]).to(out_dtype)


def temperature_projection(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    clamp_min: float = 0.01,
    clamp_max: float = 0.99,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token temperatures ``clamp(sigmoid(hidden @ weight.T + bias), clamp_min, clamp_max)``.

    Args:
        hidden: ``[..., H]``, any leading dims, any strides; fp16, bf16, fp32 (fp64: torch and
            reference backends only).
        weight: ``[T, H]``, T temperature heads.
        bias: ``[T]`` or None.
        clamp_min, clamp_max: bounds, ``0 <= clamp_min <= clamp_max <= 1``. The gradient
            passes where ``clamp_min <= σ <= clamp_max``, as with ``torch.clamp``.
        backend: ``"triton"`` (fused kernels: CUDA, or CPU tensors under TRITON_INTERPRET=1),
            ``"torch"`` (optimized PyTorch), ``"reference"`` (the eager reference computed in
            the inputs' dtype) or ``"auto"`` (Triton on CUDA, torch elsewhere and for float64
            or more than 128 heads).

    Returns:
        ``[..., T]`` in ``torch.promote_types(hidden.dtype, weight.dtype)``: with the model's
        fp32 head weights and bf16/fp16 hidden states the temperatures come out fp32. The
        matmul always accumulates in fp32, and sigmoid and clamp run in fp32.

    Differentiable in hidden, weight and bias; gradients come back in each input's dtype, and
    only those that are needed are computed (a frozen base costs no ``d hidden`` work).
    """
    check_projection_inputs(hidden, weight, bias, clamp_min, clamp_max)
    chosen = resolve_backend(backend, hidden.device)
    if chosen == "reference":
        return temperature_projection_ref(hidden, weight, bias, clamp_min, clamp_max, upcast=False)
    if chosen == "triton":
        error = _triton_unsupported(hidden, weight, bias)
        if error is not None and backend == "auto":
            chosen = "torch"
        elif error is not None:
            raise error
    # Autocast does not change this op: it computes in its inputs' dtypes (fp32 accumulation,
    # fp32 sigmoid) and returns their promoted dtype, so the temperatures of a bf16-autocast
    # model stay as precise as without autocast.
    with autocast_off(hidden.device.type):
        if chosen == "torch":
            return _torch_projection(hidden, weight, bias, clamp_min, clamp_max)
        return _triton_projection(hidden, weight, bias, clamp_min, clamp_max)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class TemperatureMechanism(nn.Module):
    """Projects hidden states to per-token temperatures in ``[clamp_min, clamp_max]``.

    A drop-in for the seed's module: same ``proj`` (``nn.Linear(hidden_size, temperature_heads)``),
    so its state dict (``proj.weight``, ``proj.bias``) loads unchanged, and the same output, via
    the fused :func:`temperature_projection`.
    """

    def __init__(
        self,
        hidden_size: int,
        temperature_heads: int,
        clamp_min: float = 0.01,
        clamp_max: float = 0.99,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        check_backend(backend)
        check_clamp_bounds(clamp_min, clamp_max)  # here, not at the first forward
        self.hidden_size = hidden_size
        self.temperature_heads = temperature_heads
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max
        self.backend = backend
        self.proj = nn.Linear(hidden_size, temperature_heads)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_size]`` → temperatures ``[..., temperature_heads]``."""
        if type(self.proj) is not nn.Linear:
            # An adapter wraps or replaces proj (peft's LoRA with target_modules="all-linear", say):
            # its forward is the projection, which the fused op, reading proj.weight, would bypass.
            logits = self.proj(hidden_states)
            return torch.sigmoid(logits.float()).clamp(self.clamp_min, self.clamp_max).to(logits.dtype)
        return temperature_projection(
            hidden_states, self.proj.weight, self.proj.bias, self.clamp_min, self.clamp_max,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, temperature_heads={self.temperature_heads}, "
            f"clamp_min={self.clamp_min}, clamp_max={self.clamp_max}, backend={self.backend!r}"
        )
