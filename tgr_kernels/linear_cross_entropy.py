"""Fused linear cross-entropy: the language-model loss and target log-probabilities without ever
holding the ``[tokens × vocab]`` logits.

Math (hidden ``h [N, H]`` after flattening the leading dims, weight ``W [V, H]`` (the lm_head's),
bias ``b [V]``, labels ``y [N]``, ignore index ι)::

    z = h Wᵀ + b                         [N, V]   fp32 accumulation, made and consumed in row chunks
    lse_i = log Σ_v exp(z_iv)
    ℓ_i = lse_i − z_{i, y_i}   if y_i ≠ ι,   else 0                (per-token loss)
    log p(y_i | h_i) = z_{i, y_i} − lse_i = −ℓ_i                     (linear_log_probs)
    "none": ℓ     "sum": Σ_i ℓ_i     "mean": Σ_i ℓ_i / n,   n = #{i : y_i ≠ ι}

``"mean"`` with every label ignored is 0 / 0 = NaN, as in ``F.cross_entropy``; its gradients are
then zeros (no row contributes).

Backward, with upstream gradient g (a scalar for "sum" and "mean", ``[N]`` for "none")::

    G_i = softmax(z_i) − onehot(y_i)    (G_i = 0 for an ignored row)
    dz_i = c_i G_i,   c_i = g ("sum"),  g / n ("mean"),  g_i ("none")
    dh = dz W        [N, H]
    dW = dzᵀ h       [V, H]
    db = Σ_i dz_i    [V]

The cheap design. When some input needs a gradient, the forward computes each row chunk's
gradient while the chunk's logits are hot: ``z_c`` becomes ``s·G_c`` in place (``s = 1/max(n, 1)``
for "mean", 1 otherwise), then ``dh_c = (s G_c) W`` and ``dW += (s G_c)ᵀ h_c``, ``db += Σ s G_c``.
Only those are kept, and the backward multiplies them by g: the whole op costs the GEMMs of
eager (two with a frozen lm_head, three with a trainable one). In fp16, whose range ends near
6e-8, ``s·p`` of a "mean" over many tokens would vanish in the rounding (as it does in eager's
fp16 gradient): there G is rounded unscaled, ``dh_c`` is scaled by s after its GEMM and dW takes s
on the hidden side, ``Gᵀ (s∘h)``. For "none" the upstream is per
token: ``dh_i = g_i (G W)_i`` is still a row scaling of what the forward kept, but dW and db sum
over rows weighted by g_i, so the backward recomputes the logits of each chunk for them (one GEMM
more, and only when the weight or the bias needs a gradient).

Half-precision weights take dW by vocabulary blocks instead (``_weight_grad_by_vocab``): the
row chunks keep each row's lse, then for each block of vocabulary rows ``W_b`` the logits
``h W_bᵀ`` of every token are recomputed (one GEMM), turned into ``s·G`` from the lse, and
``dW_b = (s G_b)ᵀ h`` is one GEMM over all tokens, accumulated in fp32 inside the GEMM and written
once in the weight's dtype: four GEMMs instead of eager's three, and no fp32 [V, H]. Summing
chunk products into an fp32 [V, H] instead costs a GEMM with an inner dimension of a chunk's
rows per chunk, bound by reading and writing [V, H] (measured on the AMD EPYC at V = 32000: 55 ms
a 256-row chunk against 22 ms for its share of one GEMM over all tokens; on an H200 at 8192 ×
128256 × 4096 bf16, 116 ms for the whole op against eager's 36.6 ms), and an fp32 [V, H] buffer
(2 GiB at V = 128256, H = 4096) that is as large as a third of eager's peak.
``weight_grad_accumulation="weight-dtype"`` takes the third way, for speed: each row chunk's
``(s G_c)ᵀ h_c`` is added into dW in the weight's dtype by the GEMM itself (fp32 inside the GEMM,
rounded to bf16/fp16 after each chunk): eager's three GEMMs and no fp32 [V, H], at the price of one
rounding of dW per row chunk instead of one in all (what Liger-Kernel does by default).

Ignored rows (a prompt masked out of the loss, padding) have ℓ_i = 0 and G_i = 0: when they are
at least ``SKIP_IGNORED_MIN_FRACTION`` of the rows, only the kept rows go through the GEMMs
(whose work is proportional to the rows): each chunk gathers its kept rows of h and scatters its dh
rows back into a zero-filled ``[N, H]``, and ℓ is scattered back with zeros. Counting them is one
host synchronisation; the op skips it (and keeps every row) where one cannot happen: while
torch.compile traces, during CUDA graph capture, on meta or fake tensors.

A chunk holds ``MIN_CHUNK_ROWS`` rows, or more while its logits fit ``CHUNK_BYTES_CPU`` /
``CHUNK_BYTES_CUDA`` (see there for the measurements). On CUDA the row work
(online log-sum-exp over vocabulary blocks, the loss, softmax − onehot in place) is one Triton
kernel between cuBLAS GEMMs, reading the GEMM's own half-precision logits (rounded once, as
eager's are) and computing in fp32, and the dW blocks' ``s·G`` is a second, element-wise kernel;
on a CPU it is PyTorch's in-place log-softmax and element-wise ops, in fp32 on blocks of a few
rows of the GEMM's half logits (the block stays in the cache; the chunk stays half). The kernels
have no ``tl.dot`` (the GEMMs are torch's); under the interpreter, whose bf16 stores truncate,
bf16 logits are made fp32. The Triton path is registered as custom ops
(``torch.ops.tgr_kernels.linear_cross_entropy_{forward,backward}``) with fake implementations and
their autograd, so ``torch.compile(fullgraph=True)`` sees one opaque op per direction; the PyTorch
path is an autograd Function that the compiler traces.

Labels outside ``[0, V)`` other than ι follow the value-check switch (``set_value_checks``): a
``ValueError`` naming the label, its position and V before anything runs ("sync", the default
on a CPU); with checks off (the default on CUDA) such a row gets a NaN loss and NaN gradients,
never an out-of-bounds read or a device-side assert.
"""
from __future__ import annotations

import functools

# torch.library.custom_op builds the ops' schemas from their annotations: the typing spelling its
# schema inference documents (as in _ops.py), which every supported torch reads.
from typing import Optional, Tuple  # noqa: UP035

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _configs
from ._backend import (
    TRITON_INTERPRET,
    autocast_dtype,
    autocast_off,
    cpu_computes_natively,
    new_output,
    once_differentiable_strict,
    resolve_backend,
)
from ._ops import _launch_context
from ._validation import (
    _effective_mode,
    _is_compiling,
    _shape,
    check_backend,
    check_float,
    check_same_device,
    check_tensor,
)

__all__ = [
    "linear_cross_entropy",
    "linear_log_probs",
    "LinearCrossEntropy",
    "linear_cross_entropy_ref",
    "linear_log_probs_ref",
]

REDUCTIONS = ("none", "mean", "sum")
# How dW of a half-precision weight is summed over the tokens (see the module docstring).
WEIGHT_GRAD_ACCUMULATIONS = ("fp32", "weight-dtype")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Labels never equal this (it is below any int32 and the most negative int64 is not a token):
# stands for "no ignore index" in the row computations.
_NO_IGNORE = -(2 ** 63)

# Rows per chunk: at least MIN_CHUNK_ROWS, more while the chunk's logits (half or fp32, plus the
# half copy a half GEMM needs of fp32 logits) stay within CHUNK_BYTES_*.
# - Below ~256 rows the CPU's GEMMs lose speed: measured on this project's AMD EPYC (1 thread,
#   loaded machine, N = 1024, H = 1024, V = 128256, frozen lm_head, medians of 3): 16-row chunks
#   14.7 s, 64-row 9.9 s, 256-row 8.7 s, eager 9.3 s. With a trainable lm_head each chunk also
#   adds its Gᵀ h into the fp32 dW, reading and writing all of [V, H] (C / 4 flops a byte): 32-row
#   chunks 18.1 s, 512-row 12.6 s, eager 16.0 s.
# - 256 rows of fp32 logits are 1 KiB × V (125 MiB at V = 128256); eager holds about three
#   [N, V] buffers, so from N = 1024 tokens the chunk stays under a quarter of eager's memory.
#   bf16 logits on the CPU (2 bytes a logit, see _logits_dtype), 1024 × 32000 and 1024 × 128256,
#   frozen and trainable lm_head (quiet machine, medians of 5; time / eager's): 16 MiB and 32 MiB
#   chunks took the same time within the runs' noise (0.76-0.79× and 0.84-0.87× frozen), and 16
#   MiB holds 256 rows at V = 32000 (22 MiB peak, 0.11× eager's; 35 MiB with 32 MiB chunks).
# - The row ops on half logits work in fp32 blocks of ROW_BLOCK_BYTES_CPU that stay in the cache
#   between their passes: 1, 2 and 4 MiB blocks took the same time; 16 MiB ones up to 5% more.
# CUDA: a chunk's GEMM fills the GPU at 256 rows, and 256 MiB is small next to the 2 GiB of bf16
# logits at 8192 × 128256. Each chunk pays the host for a Triton launch (0.07–0.18 ms per launch
# under cProfile on the H200: benchmarks/results/h200-2026-11-30/host-overhead-after.txt) and two
# GEMM calls, and at 2048 × 32000 × 4096 eight 256-row chunks took 2.1× the time of the GEMMs
# alone: a chunk's GEMMs should outlast that, so below CHUNK_MIN_BYTES_CUDA of logits (16 M half
# logits, ~0.1 ms of GEMMs at H = 4096) a chunk may hold up to a quarter of the whole logits
# instead of an eighth.
MIN_CHUNK_ROWS = 256
CHUNK_BYTES_CPU = 16 << 20
CHUNK_BYTES_CUDA = 256 << 20
CHUNK_MIN_BYTES_CUDA = 32 << 20
ROW_BLOCK_BYTES_CPU = 2 << 20
# Rows whose label is ignore_index (a prompt masked out of the loss, padding) are left out of the
# GEMMs once they are at least this fraction of the rows. Gathering the kept rows of hidden and
# scattering d hidden back moves ~5 N·H elements; each ignored row saves 2·V·H flops per GEMM
# (two to four GEMMs). With the CPU's ~0.7 TFLOP/s of bf16 GEMM against ~10 GB/s of copies, and
# the H200's ~1 PFLOP/s against ~4.8 TB/s, that pays from well under 1% ignored at V ≥ 32000;
# 1/32 leaves margin, and the sync that counts them then buys a ≥ 3% saving.
SKIP_IGNORED_MIN_FRACTION = 1 / 32


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _lce_rows_kernel(
    logits_ptr,
    labels_ptr,
    row_scale_ptr,
    loss_ptr,
    lse_ptr,
    n_vocab,
    stride_logits_row,
    stride_row_scale,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row i of a chunk: the loss ``ℓ_i = lse_i − z_{i,y_i}``, ``lse_i``, and, in place,
    ``z_i ← s_i · (softmax(z_i) − onehot(y_i))``.

    Pass 1 streams the row in BLOCK_V blocks with an online log-sum-exp (per-lane running max m
    and sum Σ exp(z − m), merged at the end into the row's max M and L = log Σ_v exp(z_v − M));
    ``ℓ_i = L − (z_{i,y_i} − M)``, and pass 2 (WRITE_GRAD) rewrites each block as
    ``s_i · (exp((z − M) − L) − 1[v = y_i])``. The logits may be fp32 or half (the GEMM's output):
    every operation is in fp32, and the gradient is rounded once, to the logits' dtype, as it is
    stored. An ignored row (y_i = ignore_index) has ℓ_i = 0 and a zero gradient row; a label
    outside [0, V) that is not ignored gives ℓ_i = NaN and a NaN gradient row (its logit is never
    read: no out-of-bounds access).

    Args:
        logits_ptr: z ``[rows, n_vocab]`` fp32/fp16/bf16, row stride ``stride_logits_row``, unit
            column stride; overwritten with the gradient when WRITE_GRAD.
        labels_ptr: y ``[rows]`` contiguous, any integer dtype.
        row_scale_ptr: s ``[rows]`` fp32 with stride ``stride_row_scale`` (0 for one scale for
            every row); read only when WRITE_GRAD.
        loss_ptr: ℓ ``[rows]`` contiguous fp32.
        lse_ptr: lse ``[rows]`` contiguous fp32 (kept for the gradient of dW by vocabulary blocks).
        n_vocab: V.
        ignore_index: ι (an int64).
        WRITE_GRAD: rewrite the logits as the scaled gradient.
        BLOCK_V: vocabulary columns per step.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < n_vocab)
    columns = tl.arange(0, BLOCK_V).to(tl.int64)

    lane_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + columns
        z = tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, z)
        # A lane that has seen only padding keeps max −inf: shift it by 0, not by −inf (NaN).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(z - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    log_sum = tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    tl.store(lse_ptr + row, row_max + log_sum)

    # The loss and the softmax take z − max first (exact near the max) and then log Σ, as
    # PyTorch's log_softmax does: through lse = max + log Σ, whose rounding is |lse|·eps, every
    # probability would carry that absolute error in its exponent (1e-5 relative at |z| ~ 100).
    target = tl.load(row_ptr + tl.where(in_range, label, 0), mask=in_range & ~ignored, other=0.0).to(tl.float32)
    loss = tl.where(ignored, 0.0, tl.where(in_range, log_sum - (target - row_max), float("nan")))
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        scale = tl.load(row_scale_ptr + row * stride_row_scale)
        scale = tl.where(ignored, 0.0, tl.where(in_range, scale, float("nan")))
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + columns
            col_mask = cols < n_vocab
            z = tl.load(row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            grad = tl.exp((z - row_max) - log_sum) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _lce_vocab_block_grad_kernel(
    logits_ptr,
    labels_ptr,
    scale_ptr,
    lse_ptr,
    n_cols,
    stride_logits_row,
    vocab_offset,
    BLOCK_V: tl.constexpr,
):
    """In place on the logits of one block of vocabulary rows ``[v0, v0 + n_cols)`` for every
    token: ``z_iv ← s_i · (exp(z_iv − lse_i) − 1[v0 + v = y_i])``, the block of ``s∘G`` that
    ``dW_b = (s∘G_b)ᵀ h`` needs, from each row's lse of the row pass.

    Args:
        logits_ptr: z ``[rows, n_cols]`` fp32/fp16/bf16, row stride ``stride_logits_row``, unit
            column stride.
        labels_ptr: y ``[rows]`` contiguous integers (any value: only equality with a column is
            tested, so an out-of-range label never indexes memory).
        scale_ptr: s ``[rows]`` contiguous fp32, already 0 for ignored rows and NaN for a label
            outside [0, V).
        lse_ptr: lse ``[rows]`` contiguous fp32.
        n_cols: columns in the block.
        vocab_offset: v0, the vocabulary id of column 0.
        BLOCK_V: columns per program (grid: rows × ⌈n_cols / BLOCK_V⌉).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols < n_cols
    ptrs = logits_ptr + row * stride_logits_row + cols
    label = tl.load(labels_ptr + row).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    lse = tl.load(lse_ptr + row)
    z = tl.load(ptrs, mask=col_mask, other=0.0).to(tl.float32)
    grad = tl.exp(z - lse) - tl.where(cols + vocab_offset == label, 1.0, 0.0)
    tl.store(ptrs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=col_mask)


def rows_config() -> _configs.LaunchConfig:
    """The row kernel's launch configuration: BLOCK_V vocabulary columns per step (one program
    per row; the kernel is memory bound, two streams over the row)."""
    if TRITON_INTERPRET:
        return _configs._config(4, 1, BLOCK_V=128)
    return _configs._config(8, 1, BLOCK_V=2048)


def vocab_block_config() -> _configs.LaunchConfig:
    """The vocabulary-block gradient kernel's configuration: BLOCK_V columns of one row per
    program (element-wise, memory bound)."""
    if TRITON_INTERPRET:
        return _configs._config(4, 1, BLOCK_V=256)
    return _configs._config(4, 1, BLOCK_V=1024)


def _triton_rows(logits, labels, row_scale, ignore_index: int, write_grad: bool,
                 lse_out: torch.Tensor | None = None, loss_out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the row kernel on one chunk; returns the per-row loss (fp32, written into
    ``loss_out`` when given), and each row's log-sum-exp in ``lse_out`` when given (both
    contiguous fp32)."""
    n_rows, n_vocab = logits.shape
    loss = new_output((n_rows,), torch.float32, logits.device) if loss_out is None else loss_out
    lse = new_output((n_rows,), torch.float32, logits.device) if lse_out is None else lse_out
    config = rows_config()
    _configs.launch(
        _lce_rows_kernel, (n_rows,), (config,),
        logits, labels, row_scale, loss, lse,
        n_vocab, logits.stride(0), row_scale.stride(0), int(ignore_index),
        WRITE_GRAD=write_grad,
    )
    return loss


def _triton_vocab_block_grad(logits, labels, scale, lse, vocab_offset: int) -> None:
    """``s∘G`` of one vocabulary block in place, by the Triton kernel."""
    n_rows, n_cols = logits.shape
    _configs.launch(
        _lce_vocab_block_grad_kernel, lambda meta: (n_rows, triton.cdiv(n_cols, meta["BLOCK_V"])),
        (vocab_block_config(),), logits, labels, scale, lse, n_cols, logits.stride(0), int(vocab_offset),
    )


# --------------------------------------------------------------------------------------------
# PyTorch row ops
# --------------------------------------------------------------------------------------------


def _row_blocks(logits: torch.Tensor):
    """``(start, stop)`` of the blocks of rows in which the PyTorch row ops work: on a CPU about
    ROW_BLOCK_BYTES_CPU of fp32 each, so that a block stays in the cache between the passes over
    it; one block on a GPU (each op is a launch) and while torch.compile traces (its fused kernels
    need no blocking, and a loop would be unrolled into the graph)."""
    n_rows, n_vocab = logits.shape
    whole = logits.device.type != "cpu" or torch.compiler.is_compiling()
    step = n_rows if whole else max(1, ROW_BLOCK_BYTES_CPU // (4 * n_vocab))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _act_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the row work is done in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_rows(logits, labels, row_scale, ignore_index: int, write_grad: bool,
                lse_out: torch.Tensor | None = None, loss_out: torch.Tensor | None = None) -> torch.Tensor:
    """The row kernel's work with PyTorch ops, in place on ``logits``; returns the per-row loss
    (fp32, fp64 for fp64 logits; written into ``loss_out`` when given), and each row's log-sum-exp
    in ``lse_out`` when given. The passes go a block of rows at a time (:func:`_row_blocks`); half
    logits (the GEMM's own output) are worked on in fp32 and the gradient is written back rounded
    once, as the Triton kernel does."""
    n_rows, n_vocab = logits.shape
    act_dtype = _act_dtype(logits.dtype)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < n_vocab)
    safe_labels = torch.where(in_range, labels, 0).long().unsqueeze(1)
    if lse_out is not None:
        z_label = logits.gather(1, safe_labels).squeeze(1).to(act_dtype)
    if write_grad:
        scale = torch.where(ignored, 0.0, torch.where(in_range, row_scale.to(act_dtype), float("nan"))).unsqueeze(1)
        minus_onehot = (-in_range.to(act_dtype)).unsqueeze(1)  # −1 at the label's column
    log_p = torch.empty(n_rows, dtype=act_dtype, device=logits.device)  # log p at the label
    for start, stop in _row_blocks(logits):
        block = logits[start:stop]
        work = block if block.dtype == act_dtype else block.to(act_dtype)
        # log_softmax in place (one fused pass of PyTorch's vectorised kernel): z − lse.
        torch.ops.aten._log_softmax.out(work, 1, False, out=work)
        log_p[start:stop] = work.gather(1, safe_labels[start:stop]).squeeze(1)
        if write_grad:
            # s (p − onehot), the product written straight into the logits' dtype (no extra pass)
            work.exp_().scatter_add_(1, safe_labels[start:stop], minus_onehot[start:stop])
            torch.mul(work, scale[start:stop], out=block)
    if lse_out is not None:
        # lse = z − (z − lse) at the label's column (column 0 for other rows): no second pass
        # over the row (a separate logsumexp took longer than the fused log_softmax).
        lse_out.copy_(z_label - log_p)
    loss = torch.where(ignored, 0.0, torch.where(in_range, -log_p, float("nan")))
    return loss if loss_out is None else loss_out.copy_(loss)


def _torch_vocab_block_grad(logits, labels, scale, lse, vocab_offset: int) -> None:
    """``s∘G`` of one vocabulary block in place, with PyTorch ops (as the Triton kernel), a block
    of rows at a time as in :func:`_torch_rows` (half logits in fp32)."""
    act_dtype = _act_dtype(logits.dtype)
    # −s at the label's column where it lies in this block (a scatter of 0 to column 0 elsewhere:
    # no data-dependent shape, which torch.compile could not trace into a graph).
    hit = (labels >= vocab_offset) & (labels < vocab_offset + logits.shape[1])
    columns = torch.where(hit, labels - vocab_offset, 0).long().unsqueeze(1)
    minus_onehot = (-hit.to(act_dtype)).unsqueeze(1)
    lse, scale = lse.unsqueeze(1), scale.unsqueeze(1)
    for start, stop in _row_blocks(logits):
        block = logits[start:stop]
        work = block if block.dtype == act_dtype else block.to(act_dtype)
        work.sub_(lse[start:stop]).exp_().scatter_add_(1, columns[start:stop], minus_onehot[start:stop])
        torch.mul(work, scale[start:stop], out=block)  # s (p − onehot) in the logits' dtype


# --------------------------------------------------------------------------------------------
# The chunked computation
# --------------------------------------------------------------------------------------------


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs here (half inputs, fp32 output)."""
    try:
        a = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Half inputs multiply in their dtype on CUDA and on CPUs with native instructions for it;
    elsewhere in fp32 (CPUs without bf16 instructions emulate bf16 GEMMs ~100x slower)."""
    if dtype in _HALF_DTYPES and not (device.type == "cuda" or cpu_computes_natively(dtype)):
        return torch.float32
    return dtype


def _logits_dtype(x_dtype: torch.dtype, triton_rows: bool, device: torch.device) -> torch.dtype:
    """The dtype of the chunks' logits. Half logits (the GEMM's own output, rounded once as eager's
    are) are read by the Triton row kernels and, on a CPU, by the PyTorch row ops, which compute
    in fp32: a chunk then holds 2 bytes a logit instead of fp32 logits and their half copy for the
    next GEMM (6), and every pass over it moves half the bytes. The PyTorch row ops on CUDA (whose
    GEMM writes fp32 itself), and bf16 under the interpreter (whose bf16 stores truncate instead of
    rounding), take fp32 logits (fp64 for fp64 inputs)."""
    if x_dtype in _HALF_DTYPES:
        if triton_rows and not (TRITON_INTERPRET and x_dtype == torch.bfloat16):
            return x_dtype
        if not triton_rows and device.type == "cpu":
            return x_dtype
    return _act_dtype(x_dtype)


def _chunk_logits(x_c, w, bias, act_dtype):
    """``x_c wᵀ + b`` as a fresh contiguous ``act_dtype`` tensor (x's dtype, fp32 or fp64)."""
    if x_c.dtype == act_dtype:
        if bias is None:
            return torch.mm(x_c, w.t())
        return torch.addmm(bias.to(act_dtype), x_c, w.t())
    if x_c.is_cuda and _cuda_mm_has_out_dtype():
        logits = torch.mm(x_c, w.t(), out_dtype=act_dtype)
        if bias is not None:
            logits += bias.to(act_dtype)
        return logits
    # A half GEMM rounds its output: the bias (x's dtype) goes inside, before that one rounding,
    # as in eager's F.linear (added after, a bias that cancels a large product would not).
    if bias is None:
        return torch.mm(x_c, w.t()).to(act_dtype)
    return torch.addmm(bias, x_c, w.t()).to(act_dtype)


def _weight_grad_by_vocab(x, w, bias, labels, ignore_index: int, row_scale, lse, logits_dtype, block_grad):
    """``dW = (s∘G)ᵀ x`` in x's (half) dtype, one GEMM over every token per block of vocabulary
    rows, with ``G = softmax − onehot`` rebuilt from the logits of the block (``logits_dtype``)
    and each row's ``lse`` by ``block_grad`` (:func:`_torch_vocab_block_grad` or
    :func:`_triton_vocab_block_grad`; rows as in the row pass: 0 when ignored, NaN for a label
    outside [0, V)).

    In fp16 the row scale s goes on the hidden side, ``dW_b = G_bᵀ (s∘x)``: ``s·p`` of a "mean"
    over many tokens would fall below fp16's range in G (see :func:`_chunked`), ``s·x`` does not
    (|x| ~ 1: 1.2e-4 at 8192 tokens), and the product has dW's own magnitude."""
    n_rows, n_vocab = x.shape[0], w.shape[0]
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < n_vocab)
    # Per row: 0 when ignored, NaN for a label outside [0, V) (as in the row pass), else 1.
    valid = torch.where(ignored, 0.0, torch.where(in_range, 1.0, float("nan"))).to(lse.dtype)
    scale = torch.where(ignored, 0.0, row_scale.to(lse.dtype) * valid)
    rows_side = x
    if x.dtype == torch.float16:
        rows_side = (x * scale.unsqueeze(1)).to(x.dtype)  # in fp32, rounded once
        scale = valid
    dw = torch.empty(w.shape, dtype=x.dtype, device=x.device)
    block = chunk_rows(n_vocab, n_rows, x.device, _logit_bytes(x.dtype, logits_dtype))  # the chunks' budget
    for v0 in range(0, n_vocab, block):
        v1 = min(v0 + block, n_vocab)
        logits = _chunk_logits(x, w[v0:v1], None if bias is None else bias[v0:v1], logits_dtype)
        block_grad(logits, labels, scale, lse, v0)
        torch.mm(logits.to(x.dtype).t(), rows_side, out=dw[v0:v1])
        del logits
    return dw


def _logit_bytes(x_dtype: torch.dtype, logits_dtype: torch.dtype) -> int:
    """Bytes a chunk holds per logit: the logits, and the half copy of s∘G that a half GEMM
    needs when they are fp32."""
    copy = x_dtype in _HALF_DTYPES and logits_dtype != x_dtype
    return logits_dtype.itemsize * (2 if copy else 1)


def chunk_rows(n_rows: int, n_vocab: int, device: torch.device, logit_bytes: int) -> int:
    """Rows per chunk: as many as the logit budget allows but at least MIN_CHUNK_ROWS, a multiple
    of 64, at most ``n_rows``. On CUDA the budget is also at most an eighth of the whole logits
    (a quarter while that is under CHUNK_MIN_BYTES_CUDA), so that the op's peak memory stays a
    small fraction of eager's at every size."""
    budget = CHUNK_BYTES_CPU
    if device.type == "cuda":
        whole = n_rows * n_vocab * logit_bytes
        budget = min(CHUNK_BYTES_CUDA, max(whole // 8, min(CHUNK_MIN_BYTES_CUDA, whole // 4)))
    rows = max(MIN_CHUNK_ROWS, budget // (n_vocab * logit_bytes))
    return min(rows - rows % 64, n_rows)


def _kept_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The indices of the rows whose label is not ignored, when leaving the others out of the
    GEMMs pays (see SKIP_IGNORED_MIN_FRACTION); None to run every row.

    Counting them is a host synchronisation (a data-dependent shape), so the rows stay whole where
    one cannot happen or would be wrong: no ignore index, meta, fake or functional tensors
    (shape inference and tracing: the graph must not depend on the values), while torch.compile
    traces, during CUDA graph capture. Nor when every row is ignored (the chunk loop's own case)."""
    if ignore_index == _NO_IGNORE or type(labels) is not torch.Tensor or labels.device.type == "meta":
        return None
    if torch.compiler.is_compiling() or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    kept = (labels != ignore_index).nonzero().squeeze(1)
    n_rows, n_kept = labels.shape[0], kept.shape[0]
    if n_kept == 0 or n_rows - n_kept < n_rows * SKIP_IGNORED_MIN_FRACTION:
        return None
    return kept


def _chunked(x, w, bias, labels, ignore_index: int, row_scale, rows_op, *, write_grad: bool,
             hidden_grad: bool, weight_grad: bool, bias_grad: bool, dw_per_chunk: bool = False):
    """Loop over row chunks: per-row losses, and (write_grad) ``dh = (s∘G) W``,
    ``dW = (s∘G)ᵀ x``, ``db = Σ s∘G`` for the flags that are set.

    Ignored rows (loss 0, no gradient) are left out of the chunks when :func:`_kept_rows` says so:
    each chunk gathers its kept rows of x, d hidden is scattered back into a zero-filled ``[N, H]``
    chunk by chunk, the losses at the end (no [kept, H] copy of x or of d hidden, except the x that
    dW by vocabulary blocks multiplies in one GEMM).

    Args:
        x: ``[N, H]`` in the GEMM dtype; w: ``[V, H]`` in the GEMM dtype; bias: ``[V]`` or None.
        labels: ``[N]`` integers. row_scale: s ``[N]`` (any stride, 0 for one value) fp32/fp64.
        rows_op: :func:`_torch_rows` or :func:`_triton_rows`.
        dw_per_chunk: sum dW of half inputs chunk by chunk in x's dtype (``weight_grad_accumulation
            = "weight-dtype"``) instead of by vocabulary blocks.
    Returns ``(loss [N] act dtype, dh [N, H] x's dtype or None, dW [V, H] or None, db [V] act
    dtype or None)``. dW of half inputs is in x's dtype, by vocabulary blocks
    (:func:`_weight_grad_by_vocab`) or summed over the chunks; of fp32/fp64 inputs in their dtype.
    """
    kept = _kept_rows(labels, ignore_index)
    if kept is not None:  # from here on, labels and s of the computed rows only
        labels, row_scale = labels.index_select(0, kept), row_scale.index_select(0, kept)
    n_rows = labels.shape[0]
    n_vocab = w.shape[0]
    act_dtype = _act_dtype(x.dtype)
    triton_rows = rows_op is _triton_rows
    logits_dtype = _logits_dtype(x.dtype, triton_rows, x.device)
    step = chunk_rows(n_rows, n_vocab, x.device, _logit_bytes(x.dtype, logits_dtype))
    loss = torch.empty(n_rows, dtype=act_dtype, device=x.device)
    # Contiguous whatever x's strides (the custom op's fake implementation promises it); zeros
    # where ignored rows are left out.
    new_dh = torch.empty if kept is None else torch.zeros
    dh = new_dh(x.shape, dtype=x.dtype, device=x.device) if (write_grad and hidden_grad) else None
    half = x.dtype in _HALF_DTYPES
    by_vocab = write_grad and weight_grad and half and not dw_per_chunk
    lse = torch.empty(n_rows, dtype=act_dtype, device=x.device) if by_vocab else None
    # Summed over the chunks: in fp32/fp64 for full-precision inputs (exact accumulation), in x's
    # dtype for half inputs ("weight-dtype": each chunk's GEMM adds into the rounded sum).
    # The first chunk writes dW (no zero fill; hidden is never empty: checked first).
    dw = (torch.empty(w.shape, dtype=x.dtype if half else act_dtype, device=x.device)
          if (write_grad and weight_grad and not by_vocab) else None)
    db = torch.zeros(n_vocab, dtype=act_dtype, device=x.device) if (write_grad and bias_grad) else None
    row_grad = dh is not None or dw is not None or db is not None  # the chunk pass needs s∘G
    # fp16 has little range below 1: s∘G of a "mean" over many tokens falls into its subnormals
    # and below (s·p < 6e-8 is lost: at 8192 tokens every probability under 5e-4). So in fp16 G is
    # rounded unscaled, each dh row is scaled after its GEMM, dW takes s on the hidden side,
    # ``Gᵀ (s∘x)``, and db is ``Gᵀ s`` (bf16 has fp32's range: s stays folded into G).
    scale_after = x.dtype == torch.float16 and row_grad
    g_scale = torch.ones((), dtype=row_scale.dtype, device=x.device).expand(n_rows) if scale_after else row_scale
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        x_c = x[start:stop] if kept is None else x.index_select(0, kept[start:stop])
        logits = _chunk_logits(x_c, w, bias, logits_dtype)
        rows_op(logits, labels[start:stop], g_scale[start:stop], ignore_index, row_grad,
                lse_out=None if lse is None else lse[start:stop], loss_out=loss[start:stop])
        if not row_grad:
            continue
        grad = logits if logits.dtype == x.dtype else logits.to(x.dtype)  # s∘G in the GEMM dtype
        if dh is not None:
            dh_c = torch.mm(grad, w, out=dh[start:stop]) if kept is None else torch.mm(grad, w)
            if scale_after:
                dh_c.mul_(row_scale[start:stop].unsqueeze(1))  # in fp32, rounded once
            if kept is not None:
                dh.index_copy_(0, kept[start:stop], dh_c)
            del dh_c
        if dw is not None:
            rows_side = (x_c * row_scale[start:stop].unsqueeze(1)).to(x.dtype) if scale_after else x_c
            if start == 0:
                torch.mm(grad.t(), rows_side, out=dw)  # the first chunk writes dW: no zero fill
            else:
                dw.addmm_(grad.t(), rows_side)
        if db is not None:
            if scale_after:
                # Gᵀ s with s over its largest entry (s itself may lie below fp16's range)
                s_c = row_scale[start:stop]
                peak = s_c.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
                db += torch.mv(logits.t(), (s_c / peak).to(logits.dtype)).to(act_dtype) * peak
            else:
                db += logits.sum(0, dtype=act_dtype)
        del logits, grad
    if by_vocab:
        block_grad = _triton_vocab_block_grad if triton_rows else _torch_vocab_block_grad
        x_rows = x if kept is None else x.index_select(0, kept)
        dw = _weight_grad_by_vocab(x_rows, w, bias, labels, ignore_index, row_scale, lse, logits_dtype, block_grad)
    if kept is not None:
        loss = loss.new_zeros(x.shape[0]).index_copy_(0, kept, loss)
    return loss, dh, dw, db


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True where this torch
    cannot tell, or while torch.compile traces the backward (the answer would be the tracer's)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or torch.compiler.is_compiling():
        return True
    return bool(keep_graph())


def _forward_work(hidden, weight, bias, labels, ignore_index: int, reduction: str, rows_op, *,
                  hidden_grad: bool, weight_grad: bool, bias_grad: bool, dw_per_chunk: bool = False):
    """The forward on 2-D inputs: ``(loss, dh, dW, db)``, each gradient the one of the loss with an
    upstream gradient of 1 (None where not asked for, and dW, db always None for ``"none"``: its
    upstream is per token, so they are recomputed in the backward)."""
    write_grad = hidden_grad or weight_grad or bias_grad
    gemm_dtype = _gemm_dtype(hidden.dtype, hidden.device)
    act_dtype = _act_dtype(hidden.dtype)
    x, w = hidden.to(gemm_dtype), weight.to(gemm_dtype)
    n_rows = x.shape[0]
    n_valid = (labels != ignore_index).sum()
    if reduction == "mean":
        scale = 1.0 / n_valid.clamp(min=1).to(act_dtype)
    else:
        scale = torch.ones((), dtype=act_dtype, device=x.device)
    loss, dh, dw, db = _chunked(
        x, w, bias, labels, ignore_index, scale.expand(n_rows), rows_op, write_grad=write_grad,
        hidden_grad=hidden_grad, weight_grad=weight_grad and reduction != "none",
        bias_grad=bias_grad and reduction != "none", dw_per_chunk=dw_per_chunk)
    if reduction == "none":
        return loss, dh, dw, db
    # Summed in fp64 (N values: free), rounded once, as PyTorch's CPU nll_loss accumulates: an fp32
    # sum of large per-token losses was off by a unit in the last place of the total.
    total = loss.sum(dtype=torch.float64)
    return (total / n_valid if reduction == "mean" else total).to(act_dtype), dh, dw, db


def _recomputed_weight_grads(hidden, weight, bias, labels, grad_loss, ignore_index: int, rows_op, *,
                             weight_grad: bool, bias_grad: bool, dw_per_chunk: bool = False):
    """dW and db of ``"none"`` with the per-token upstream ``grad_loss [N]``: the logits of each
    chunk again (one GEMM), their gradient scaled row by row, then ``Gᵀ h`` and ``Σ G``. Returns
    ``(dW or None, db or None)`` in fp32 (fp64 for fp64 inputs; dW of a half GEMM in its dtype)."""
    gemm_dtype = _gemm_dtype(hidden.dtype, hidden.device)
    act_dtype = _act_dtype(hidden.dtype)
    _, _, dw, db = _chunked(
        hidden.to(gemm_dtype), weight.to(gemm_dtype), bias, labels, ignore_index, grad_loss.to(act_dtype),
        rows_op, write_grad=True, hidden_grad=False, weight_grad=weight_grad, bias_grad=bias_grad,
        dw_per_chunk=dw_per_chunk)
    return dw, db


def _scaled(saved, g, dtype, in_place: bool):
    """``saved · g`` in ``dtype``; in place on ``saved`` when it is never read again (no
    retain_graph), so that the backward needs no second [V, H] (or [N, H]) buffer. A traced
    backward (fake or functional tensor subclasses: torch.compile, AOT tracing) never mutates
    what the forward saved: the partitioner forbids it."""
    if saved.dtype == torch.float16:
        return _scaled_fp16(saved, g, dtype, in_place and type(saved) is torch.Tensor)
    if saved.dtype == torch.bfloat16:
        # dW by vocabulary blocks is already in the weight's dtype: scale it there, with no fp32
        # copy of [V, H] (g rounded to it: the result is rounded to it anyway; bf16 has fp32's range).
        g = g.to(saved.dtype)
        in_place = in_place and type(saved) is torch.Tensor
        return (saved.mul_(g) if in_place else saved * g).to(dtype)
    g = g.to(torch.promote_types(saved.dtype, torch.float32))
    in_place = in_place and type(saved) is torch.Tensor
    if in_place and saved.dtype == torch.promote_types(saved.dtype, g.dtype):
        return saved.mul_(g).to(dtype)
    return (saved * g).to(dtype)


# Elements of fp16 [V, H] or [N, H] scaled in fp32 at a time (a 64 MiB fp32 block).
SCALE_BLOCK_ELEMENTS = 16 << 20


def _scaled_fp16(saved, g, dtype, in_place: bool):
    """``saved · g`` for fp16 ``saved``, multiplied in fp32 a block of rows at a time: g rounded
    to fp16 would overflow from 65520, and GradScaler's first loss scale is 2¹⁶. (A product that
    is past fp16's range is inf, as in eager's fp16 gradient.)"""
    g = g.float()
    out = saved if in_place else torch.empty_like(saved)
    rows = max(1, SCALE_BLOCK_ELEMENTS // max(1, saved[0].numel()))  # saved is dh, dW or db: never 0-d
    for start in range(0, saved.shape[0], rows):
        block_g = g if g.dim() == 0 else g[start:start + rows]
        out[start:start + rows].copy_(saved[start:start + rows].float() * block_g)
    return out.to(dtype)


def _save_for_backward(ctx, hidden, weight, bias, labels, ignore_index: int, reduction: str, dw_per_chunk: bool,
                       dh, dw, db, parameter_grad: bool, anchor=None) -> None:
    """What both paths' backward reads: the forward's gradients, and for ``"none"`` the labels
    (to zero the upstream gradient at ignored tokens) and, when dW or db is needed, the inputs
    that recompute them; last, the PyTorch path's ``anchor`` (see :func:`_graph_anchor`)."""
    ctx.reduction, ctx.ignore_index, ctx.dw_per_chunk = reduction, ignore_index, dw_per_chunk
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    per_token = reduction == "none"
    inputs = (hidden, weight, bias) if per_token and parameter_grad else (None,) * 3
    ctx.save_for_backward(dh, dw, db, *inputs, labels if per_token else None, anchor)


def _ignored_zeroed(g: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The per-token upstream gradient with 0 at ignored tokens, as eager's ``nll_loss`` writes
    there whatever arrives: an inf or NaN there (a masked loss scaled past range) would otherwise
    turn the zero row of d hidden, and its share of dW, into NaN."""
    return g.masked_fill(labels == ignore_index, 0)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for the PyTorch path on 2-D inputs (see the module docstring for the math); the
    Triton path is the custom op ``tgr_kernels::linear_cross_entropy_forward`` below."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, reduction: str, dw_per_chunk: bool,
                anchor=None):
        hidden_grad, weight_grad, bias_grad = ctx.needs_input_grad[:3]
        loss, dh, dw, db = _forward_work(hidden, weight, bias, labels, ignore_index, reduction, _torch_rows,
                                         hidden_grad=hidden_grad, weight_grad=weight_grad, bias_grad=bias_grad,
                                         dw_per_chunk=dw_per_chunk)
        _save_for_backward(ctx, hidden, weight, bias, labels, ignore_index, reduction, dw_per_chunk,
                           dh, dw, db, weight_grad or bias_grad, anchor)
        return loss

    @staticmethod
    @once_differentiable_strict("linear_cross_entropy")
    def backward(ctx, grad_loss):
        dh, dw, db, hidden, weight, bias, labels, _ = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        hidden_grad, weight_grad, bias_grad = ctx.needs_input_grad[:3]
        grad_hidden = grad_weight = grad_bias = None
        in_place = not _graph_kept()
        if ctx.reduction != "none":
            if hidden_grad:
                grad_hidden = _scaled(dh, grad_loss, hidden_dtype, in_place)
            if weight_grad:
                grad_weight = _scaled(dw, grad_loss, weight_dtype, in_place)
            if bias_grad:
                grad_bias = _scaled(db, grad_loss, bias_dtype, in_place)
            return grad_hidden, grad_weight, grad_bias, None, None, None, None, None
        g = _ignored_zeroed(grad_loss.reshape(-1), labels, ctx.ignore_index)
        if hidden_grad:
            grad_hidden = _scaled(dh, g.unsqueeze(1), hidden_dtype, in_place)
        if weight_grad or bias_grad:
            dw, db = _recomputed_weight_grads(hidden, weight, bias, labels, g, ctx.ignore_index, _torch_rows,
                                              weight_grad=weight_grad, bias_grad=bias_grad,
                                              dw_per_chunk=ctx.dw_per_chunk)
            grad_weight = None if dw is None else dw.to(weight_dtype)
            grad_bias = None if db is None else db.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The Triton path as custom ops (torch.compile sees one opaque op per direction)
# --------------------------------------------------------------------------------------------
# torch.compile cannot trace a Triton launcher (Python that picks chunks and launches kernels),
# so the Triton path is registered with torch.library.custom_op, as the attention ops are in
# _ops.py: a fake implementation gives the output shapes and dtypes, register_autograd attaches
# the backward. A gradient that is not needed comes back as an empty tensor (custom ops return
# tensors, not None). The implementations run with autocast off: the dispatcher chose the dtypes.


def _weight_grad_dtype(hidden: torch.Tensor, act_dtype: torch.dtype) -> torch.dtype:
    """dW's dtype from the ops: the GEMM dtype when it is half (dW by vocabulary blocks, written
    once), else fp32/fp64."""
    gemm_dtype = _gemm_dtype(hidden.dtype, hidden.device)
    return gemm_dtype if gemm_dtype in _HALF_DTYPES else act_dtype


def _empty_like_none(reference: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    # Custom-op outputs may not alias each other: a fresh empty tensor for each missing one.
    return reference.new_empty(0) if t is None else t


@torch.library.custom_op("tgr_kernels::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,  # noqa: UP045
    ignore_index: int, reduction: str, hidden_grad: bool, weight_grad: bool, bias_grad: bool, dw_per_chunk: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: UP006
    """Triton forward on ``hidden [N, H]``, ``labels [N]`` (int64): ``(loss, dh, dW, db)``: the loss
    (``[]``, or ``[N]`` for ``"none"``, fp32) and the gradients of an upstream 1 that were asked for
    (dh ``[N, H]`` in the GEMM dtype, dW ``[V, H]`` in :func:`_weight_grad_dtype`, db ``[V]`` fp32;
    empty otherwise, and dW, db always empty for ``"none"``, whose backward recomputes them).
    ``dw_per_chunk``: half dW summed chunk by chunk in its dtype (``"weight-dtype"``)."""
    with _launch_context(hidden):
        loss, dh, dw, db = _forward_work(hidden, weight, bias, labels, ignore_index, reduction, _triton_rows,
                                         hidden_grad=hidden_grad, weight_grad=weight_grad, bias_grad=bias_grad,
                                         dw_per_chunk=dw_per_chunk)
    return loss, _empty_like_none(hidden, dh), _empty_like_none(loss, dw), _empty_like_none(loss, db)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, hidden_grad, weight_grad, bias_grad, dw_per_chunk):
    act_dtype = _act_dtype(hidden.dtype)
    gemm_dtype = _gemm_dtype(hidden.dtype, hidden.device)
    per_token = reduction == "none"
    loss = hidden.new_empty((hidden.shape[0],) if per_token else (), dtype=act_dtype)
    dh = hidden.new_empty(hidden.shape if hidden_grad else (0,), dtype=gemm_dtype if hidden_grad else hidden.dtype)
    dw = hidden.new_empty(weight.shape if weight_grad and not per_token else (0,),
                          dtype=_weight_grad_dtype(hidden, act_dtype))
    db = hidden.new_empty((weight.shape[0],) if bias_grad and not per_token else (0,), dtype=act_dtype)
    return loss, dh, dw, db


@torch.library.custom_op("tgr_kernels::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,  # noqa: UP045
    grad_loss: torch.Tensor, ignore_index: int, weight_grad: bool, bias_grad: bool, dw_per_chunk: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
    """Triton backward of ``"none"`` for the weight and the bias: ``(dW [V, H], db [V])`` for the
    per-token upstream ``grad_loss [N]`` (the logits recomputed chunk by chunk; dW in the GEMM
    dtype when it is half, fp32 otherwise, db fp32); empty where not asked for."""
    with _launch_context(hidden):
        dw, db = _recomputed_weight_grads(hidden, weight, bias, labels, grad_loss, ignore_index, _triton_rows,
                                          weight_grad=weight_grad, bias_grad=bias_grad, dw_per_chunk=dw_per_chunk)
    act_dtype = _act_dtype(hidden.dtype)
    return (_empty_like_none(grad_loss.new_empty(0, dtype=_weight_grad_dtype(hidden, act_dtype)), dw),
            _empty_like_none(grad_loss.new_empty(0, dtype=act_dtype), db))


@linear_cross_entropy_backward.register_fake
def _(hidden, weight, bias, labels, grad_loss, ignore_index, weight_grad, bias_grad, dw_per_chunk):
    act_dtype = _act_dtype(hidden.dtype)
    return (hidden.new_empty(weight.shape if weight_grad else (0,), dtype=_weight_grad_dtype(hidden, act_dtype)),
            hidden.new_empty((weight.shape[0],) if bias_grad else (0,), dtype=act_dtype))


def _triton_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, _, weight_grad, bias_grad, dw_per_chunk = inputs
    _, dh, dw, db = output
    # The gradients kept for the backward are outputs of the op; without this, autograd would
    # hand the backward a zero tensor for each (a second dW: +1 GiB at 128256 × 4096 in bf16).
    ctx.set_materialize_grads(False)
    _save_for_backward(ctx, hidden, weight, bias, labels, ignore_index, reduction, dw_per_chunk,
                       dh, dw, db, weight_grad or bias_grad)


@once_differentiable_strict("linear_cross_entropy (Triton path)")
def _triton_backward(ctx, grad_loss, grad_dh, grad_dw, grad_db):
    dh, dw, db, hidden, weight, bias, labels, _ = ctx.saved_tensors
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    hidden_grad, weight_grad, bias_grad = ctx.needs_input_grad[:3]
    nones = (None,) * 7
    if grad_loss is None:
        return (None,) * 3 + nones
    in_place = not _graph_kept()
    # A gradient the forward was not asked for is empty: its input did not need one then.
    hidden_grad, weight_grad, bias_grad = (hidden_grad and dh.numel() > 0, weight_grad, bias_grad)
    grad_hidden = grad_weight = grad_bias = None
    if ctx.reduction != "none":
        if hidden_grad:
            grad_hidden = _scaled(dh, grad_loss, hidden_dtype, in_place)
        if weight_grad and dw.numel() > 0:
            grad_weight = _scaled(dw, grad_loss, weight_dtype, in_place)
        if bias_grad and db.numel() > 0:
            grad_bias = _scaled(db, grad_loss, bias_dtype, in_place)
        return (grad_hidden, grad_weight, grad_bias) + nones
    g = _ignored_zeroed(grad_loss.reshape(-1), labels, ctx.ignore_index)
    if hidden_grad:
        grad_hidden = _scaled(dh, g.unsqueeze(1), hidden_dtype, in_place)
    if (weight_grad or bias_grad) and hidden is not None:
        dw, db = linear_cross_entropy_backward(hidden, weight, bias, labels, g.contiguous(), ctx.ignore_index,
                                               weight_grad, bias_grad, ctx.dw_per_chunk)
        grad_weight = dw.to(weight_dtype) if weight_grad else None
        grad_bias = db.to(bias_dtype) if bias_grad else None
    return (grad_hidden, grad_weight, grad_bias) + nones


linear_cross_entropy_forward.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _register_backward_double_backward_error() -> None:
    def backward(ctx, *grads):
        raise RuntimeError(
            "linear_cross_entropy (Triton path): second derivatives (a backward through the backward, e.g. "
            "create_graph=True followed by another grad) are not implemented; use backend='reference' for "
            "double backward")

    def setup_context(ctx, inputs, output):
        pass

    linear_cross_entropy_backward.register_autograd(backward, setup_context=setup_context)


_register_backward_double_backward_error()


def _triton_fused(hidden, weight, bias, labels, ignore_index: int, reduction: str, dw_per_chunk: bool) -> torch.Tensor:
    """The differentiable Triton path on 2-D inputs: asks the forward op for the gradients that
    autograd will want (none under no_grad or for inputs that need none)."""
    grad_on = torch.is_grad_enabled()
    hidden_grad, weight_grad, bias_grad = (
        grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return linear_cross_entropy_forward(hidden, weight, bias, labels, ignore_index, reduction,
                                        hidden_grad, weight_grad, bias_grad, dw_per_chunk)[0]


# --------------------------------------------------------------------------------------------
# Checks, reference and dispatch
# --------------------------------------------------------------------------------------------


def check_linear_cross_entropy_inputs(hidden, weight, labels, bias, ignore_index, reduction,
                                      labels_name: str = "labels") -> None:
    """Shapes, dtypes, devices and options; raises ValueError/TypeError naming the argument."""
    check_tensor("hidden", hidden)
    if hidden.dim() == 0:
        raise ValueError("hidden must be [..., H] (at least one dim), got a 0-d tensor")
    check_tensor("weight", weight, dims=(2,))
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim must equal weight.shape[1] (weight is [V, H]): hidden "
                         f"{_shape(hidden)}, weight {_shape(weight)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{labels_name} must be an integer tensor (token ids), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{labels_name} must have hidden's leading shape {list(hidden.shape[:-1])}, "
                         f"got {_shape(labels)} (hidden {_shape(hidden)})")
    if bias is not None:
        check_tensor("bias", bias, dims=(1,))
        check_float("bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [{weight.shape[0]}] to match weight {_shape(weight)}, got {_shape(bias)}")
    check_same_device(hidden=hidden, weight=weight, **{labels_name: labels}, bias=bias)
    if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_dtypes_match(hidden, weight, bias) -> None:
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        bias_text = "" if bias is None else f", bias {bias.dtype}"
        raise TypeError(f"hidden, weight and bias must share a dtype (as F.linear requires): hidden "
                        f"{hidden.dtype}, weight {weight.dtype}{bias_text}; cast hidden to weight.dtype")


def check_label_values(labels, n_vocab: int, ignore_index, labels_name: str = "labels") -> None:
    """Every label in ``[0, V)`` or equal to ``ignore_index``, per the value-check mode."""
    mode = _effective_mode(labels.device)
    if mode == "off":
        return
    # In int64, as the ops read the labels (``labels.long()``): compared in a narrower dtype,
    # ignore_index wraps around (-100 is 156 in uint8), so an out-of-range label passed as
    # "ignored" here and gave a NaN loss there.
    labels = labels.long()
    bad = (labels < 0) | (labels >= n_vocab)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if _is_compiling():
        # A traced assertion's message is a constant of the graph: V and ignore_index may be
        # SymInts there (dynamic=True, or a recompile for a new ignore_index), which an f-string
        # cannot format (a graph break, an error under fullgraph).
        allowed = "[0, V) (V = weight.shape[0])" + ("" if ignore_index is None else " and not ignore_index")
    else:
        allowed = f"[0, {n_vocab}) (V = weight.shape[0])" + (
            "" if ignore_index is None else f" and not ignore_index={ignore_index}")
    if mode == "async":
        torch._assert_async(~bad.any(), f"{labels_name} has a value outside {allowed}")
        return
    if bool(bad.any()):
        position = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{labels_name}[{', '.join(map(str, position))}] = {int(labels[position])} is outside "
                         f"{allowed}")


def linear_cross_entropy_ref(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean",
                             upcast: bool = True) -> torch.Tensor:
    """Eager reference: ``F.cross_entropy(F.linear(hidden, weight, bias), labels)``, the full logits.

    ``upcast=True`` computes in fp32 (fp64 stays fp64), ``upcast=False`` in the inputs' dtype
    (PyTorch's own low-precision answer, which the tests measure). ``"none"`` returns
    ``labels.shape``.
    """
    check_linear_cross_entropy_inputs(hidden, weight, labels, bias, ignore_index, reduction)
    dtype = weight.dtype
    if upcast:
        dtype = _act_dtype(dtype)
    b = None if bias is None else bias.to(dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), b)
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1).long(),
                           ignore_index=_NO_IGNORE if ignore_index is None else ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def linear_log_probs_ref(hidden, weight, targets, bias=None, *, ignore_index: int | None = None,
                         upcast: bool = True) -> torch.Tensor:
    """Eager reference: ``log_softmax(F.linear(hidden, weight, bias)).gather(targets)``, 0 where
    ``targets == ignore_index``."""
    check_linear_cross_entropy_inputs(hidden, weight, targets, bias, ignore_index, "none", labels_name="targets")
    dtype = weight.dtype
    if upcast:
        dtype = _act_dtype(dtype)
    b = None if bias is None else bias.to(dtype)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), b)
    keep = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None else targets != ignore_index
    picked = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(keep, targets, 0).long().unsqueeze(-1))
    return torch.where(keep, picked.squeeze(-1), torch.zeros((), dtype=logits.dtype, device=logits.device))


def check_weight_grad_accumulation(weight_grad_accumulation) -> None:
    if weight_grad_accumulation not in WEIGHT_GRAD_ACCUMULATIONS:
        raise ValueError(f"weight_grad_accumulation must be one of {WEIGHT_GRAD_ACCUMULATIONS}, "
                         f"got {weight_grad_accumulation!r}")


def _autocast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.to(dtype)


def _prepare(hidden, weight, labels, bias, ignore_index, reduction, backend, labels_name, weight_grad_accumulation):
    """Validation, backend choice and autocast, shared by the two ops; returns
    ``(backend, hidden, weight, bias)`` ready for the Function (or the reference)."""
    check_linear_cross_entropy_inputs(hidden, weight, labels, bias, ignore_index, reduction, labels_name)
    check_weight_grad_accumulation(weight_grad_accumulation)
    chosen = resolve_backend(backend, hidden.device)
    dtype = autocast_dtype(hidden.device.type)
    if dtype is not None:
        # As F.linear under autocast: the GEMMs run in the autocast dtype (the row work and the
        # accumulators stay fp32); autograd casts the gradients back to each input's dtype.
        # Autocast leaves float64 tensors as they are.
        hidden, weight = _autocast(hidden, dtype), _autocast(weight, dtype)
        bias = None if bias is None else _autocast(bias, dtype)
    _check_dtypes_match(hidden, weight, bias)
    if chosen == "triton" and hidden.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("backend='triton' has no float64 kernel (hidden is torch.float64); use backend='torch'")
        chosen = "torch"
    check_label_values(labels, weight.shape[0], ignore_index, labels_name)
    return chosen, hidden, weight, bias


def _graph_anchor(*tensors):
    """A 0-d zero whose graph reaches each of ``tensors`` that needs a gradient, holding none of
    their memory (the sum of an empty slice), or None. The PyTorch path's Function saves it so that
    a second derivative with respect to an input whose tensor it does not keep (hidden, weight and
    bias are kept only for ``"none"`` with a trainable lm_head) reaches the guard of
    ``once_differentiable_strict`` and raises, instead of silently getting no second-order term."""
    if not torch.is_grad_enabled():
        return None
    needed = [t.narrow(0, 0, 0).sum() for t in tensors if t is not None and t.requires_grad]
    return sum(needed[1:], needed[0]) if needed else None


def _fused_loss(hidden, weight, labels, bias, ignore_index, reduction, use_triton, weight_grad_accumulation):
    ignore = _NO_IGNORE if ignore_index is None else ignore_index
    dw_per_chunk = weight_grad_accumulation == "weight-dtype"
    with autocast_off(hidden.device.type):
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        labels1d = labels.reshape(-1).long().contiguous()
        if use_triton:
            loss = _triton_fused(hidden2d, weight, bias, labels1d, ignore, reduction, dw_per_chunk)
        else:
            if not torch.is_grad_enabled():  # needs_input_grad would still ask for the gradients
                hidden2d, weight = hidden2d.detach(), weight.detach()
                bias = None if bias is None else bias.detach()
            loss = _LinearCrossEntropyFunction.apply(hidden2d, weight, bias, labels1d, ignore, reduction, dw_per_chunk,
                                                     _graph_anchor(hidden2d, weight, bias))
    return loss.view(labels.shape) if reduction == "none" else loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    weight_grad_accumulation: str = "fp32",
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without the ``[tokens × V]`` logits.

    Args:
        hidden: ``[..., H]``, any leading dims and strides; fp16, bf16, fp32 (fp64: torch and
            reference backends).
        weight: ``[V, H]``, the lm_head's weight (frozen or trainable), hidden's dtype.
        labels: ``[...]`` (hidden's leading shape), integer token ids in ``[0, V)`` or
            ``ignore_index``. The caller shifts them (``hidden[:, :-1]`` with ``labels[:, 1:]``).
        bias: ``[V]`` or None.
        ignore_index: label value that contributes no loss and no gradient.
        reduction: ``"mean"`` (over non-ignored labels; NaN, as in ``F.cross_entropy``, when
            every label is ignored, with zero gradients), ``"sum"`` or ``"none"`` (per-token
            losses, 0 at ignored labels, shape ``labels.shape``).
        backend: ``"triton"`` (the row kernel between torch GEMMs: CUDA, or CPU tensors under
            TRITON_INTERPRET=1), ``"torch"`` (PyTorch row ops), ``"reference"`` (the full logits,
            eager) or ``"auto"`` (Triton on CUDA, torch elsewhere and for float64).
        weight_grad_accumulation: how dW of a half-precision (fp16/bf16) weight is summed over
            the tokens. ``"fp32"`` (default): in fp32 over every token and rounded once, by
            vocabulary blocks (one GEMM more than eager: four with a trainable lm_head).
            ``"weight-dtype"``: chunk by chunk during the forward, each row chunk's product
            added into dW in the weight's dtype (eager's three GEMMs, one rounding per row
            chunk, as Liger-Kernel's default). Same result either way for fp32/fp64 weights, and
            nothing changes for a frozen lm_head. See the module docstring for the trade.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): log-sum-exp, losses and their sum are
        accumulated in fp32 whatever the input dtype. Under ``torch.autocast`` the GEMMs run in
        the autocast dtype, as ``F.linear`` would.

    Differentiable in hidden, weight and bias; only the gradients that are needed are computed
    (a frozen lm_head gets no dW work). Labels outside ``[0, V)``: see the module docstring.
    """
    chosen, hidden, weight, bias = _prepare(hidden, weight, labels, bias, ignore_index, reduction, backend, "labels",
                                            weight_grad_accumulation)
    if chosen == "reference":
        with autocast_off(hidden.device.type):  # eager's own precision; the documented fp32 result
            return linear_cross_entropy_ref(hidden, weight, labels, bias, ignore_index=ignore_index,
                                            reduction=reduction, upcast=False).to(_act_dtype(hidden.dtype))
    return _fused_loss(hidden, weight, labels, bias, ignore_index, reduction, chosen == "triton",
                       weight_grad_accumulation)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int | None = None,
    backend: str = "auto",
    weight_grad_accumulation: str = "fp32",
) -> torch.Tensor:
    """Per-token ``log p(target | hidden) = log_softmax(hidden @ weight.T + bias)[target]``,
    without the full logits (for scoring candidates).

    ``targets`` has hidden's leading shape, every value in ``[0, V)``; with ``ignore_index`` set,
    targets equal to it get log-probability 0. Returns ``targets.shape`` in fp32 (fp64 for fp64
    inputs); differentiable like :func:`linear_cross_entropy` (``reduction="none"``, and the same
    ``weight_grad_accumulation``), of which it is the negative.
    """
    chosen, hidden, weight, bias = _prepare(hidden, weight, targets, bias, ignore_index, "none", backend, "targets",
                                            weight_grad_accumulation)
    if chosen == "reference":
        with autocast_off(hidden.device.type):
            return linear_log_probs_ref(hidden, weight, targets, bias, ignore_index=ignore_index,
                                        upcast=False).to(_act_dtype(hidden.dtype))
    return -_fused_loss(hidden, weight, targets, bias, ignore_index, "none", chosen == "triton",
                        weight_grad_accumulation)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class LinearCrossEntropy(nn.Module):
    """``loss = module(hidden, weight, labels, bias=None)``: :func:`linear_cross_entropy` with
    fixed options, for a model that owns its lm_head and passes its weight."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                 weight_grad_accumulation: str = "fp32"):
        super().__init__()
        check_backend(backend)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_weight_grad_accumulation(weight_grad_accumulation)
        if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
            raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.weight_grad_accumulation = weight_grad_accumulation

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, labels, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, backend=self.backend,
                                    weight_grad_accumulation=self.weight_grad_accumulation)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"weight_grad_accumulation={self.weight_grad_accumulation!r}")
