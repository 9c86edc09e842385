"""Roofline of every benchmark case on an H200: the FLOPs and bytes of the kernels as designed, and
the least time they can take there.

    python -m benchmarks.roofline [--out DIR]     (default benchmarks/results/roofline-h200)

writes ``table.md`` and ``roofline.json``; ``benchmarks.report`` divides a GPU record's measured
time into this one (:func:`estimate`) and shows the fraction of the roofline beside it.

The model. Each launch (a Triton kernel, a library GEMM, an elementwise pass) is one term::

    t = Σ_launches max(flops / peak, bytes / bandwidth)

(launches run one after another, so each is bounded on its own and the bounds add up). H200:
989 TFLOP/s dense bf16/fp16 on tensor cores, 494 TFLOP/s tf32, 67 TFLOP/s fp32 without tensor
cores (fp32 dots with TF32 off, as the benchmarks run them), 4.8 TB/s of HBM. FLOPs are those of
the matrix products, counted as the kernels issue them: whole tiles, padding included (a flash
tile on the causal diagonal computes all of its BLOCK_M × BLOCK_N logits; the projection's 8
temperature heads fill a 16-wide tile). Softmax, exponentials and masking are not counted (the
exponentials run on the special-function units, which this model leaves out; for D = 128 they are
not negligible). Bytes are every load and store the design makes to global memory, as if each went
to HBM: re-reads that the L2 cache may serve are charged in full, so a measured time can in
principle beat this bound (a fraction of the roofline above 100%), and doing so shows the cache
at work.

Counted per kernel family (e = bytes per element of the inputs; statistics are fp32):

- attention-flash and attention-gqa (D <= 256, ``attention_flash``), per (batch, query head):
  forward: one program per BLOCK_M query rows reads its Q rows once, then for every key tile it
  may see (all, or up to the diagonal when causal) a BLOCK_N × D tile of K and of V (of the k/v
  head it reads, h // GROUP, with grouped-query attention), plus the key-padding bytes of the
  tile; two dots per tile; writes O and the log-sum-exp.
  backward (from the ungated dY: the kernels apply the GSoT gate themselves): the dQ kernel (per
  query block: Q, dO, t̄ and the lse once; two passes over the key tiles, each reading K, V and the padding bytes per
  tile, two dots per tile in the first (Δ, dt̄) and three in the second (dQ); writes Δ, the
  renormalised lse, this head's dt̄ and dQ), then the dK/dV kernel (one program per BLOCK_N keys
  of one k/v head: reads its K, V tile once and, for each of the GROUP query heads that read it
  and each query tile, Q, dO, three row statistics and the padding bytes; four dots per step;
  writes dK, dV), and the sum of dt̄ over heads. A configuration with RELOAD_ROWS reloads the
  tiles it would otherwise hold (Q and dO in the dQ kernel, K and V in the dK/dV kernel) at every
  step, and is charged for each load.
- attention-decode (``attention_decode``, S_q query rows against a cache of S_k keys): the split
  kernel, one program per (query row, key chunk of ``chunk`` keys; ``_configs.decode_num_splits``
  chunks), reads its q row and t̄, the chunk's K and V in BLOCK_N-key blocks (products as fp32
  ``tl.sum`` reductions, not tensor-core dots: two per element of each whole block, at the fp32
  peak) and writes its partials (D + 2 fp32); the combine kernel, one program per row, reads the
  row's partials and t̄ and writes the output. Bytes charge the KV cache (and its padding bytes)
  once: the GROUP · S_q programs of one chunk read the same K/V block at the same time, and the
  design counts on the L2 to serve their re-reads (the flash path is charged every load; one
  decoding step is bound by the cache's bytes and nothing else).
- attention-wide (D > 256, ``attention_wide``), per chunk of query rows (the chunks, and the
  causal row blocks that see only the keys they can, come from ``attention_wide._chunks``):
  forward: GEMM ``Z = Q_c Kᵀ``, the row kernel (two passes reading Z, one writing P in place),
  GEMM ``O_c = P V``; a training forward also keeps Z for the backward (one copy).
  backward (from the ungated dY, dO below; the row kernel applies the gate): Z from the forward
  (one copy, as P overwrites it) or a GEMM again; GEMM ``dP = dO_c Vᵀ``; the row kernel (two
  passes reading Z and dP, writing P and G in place); then ``dQ = G K``, ``dK = Gᵀ Q``,
  ``dV = Pᵀ dO`` (three GEMMs), or for q = k = v in one chunk ``dX = (G + Gᵀ) X + Pᵀ dO`` (one
  pass forming G + Gᵀ, two GEMMs and an add); over several chunks the key-side gradients add up
  in fp32 (read and write of the accumulator each time).
  Each GEMM reads its operands and writes its result once (a library GEMM's own tiling reuses
  them on chip).
- projection (``temperature_projection``): the forward kernel streams h once; each program of
  BLOCK_M rows reads all of W (T × H) once; writes t, and σ (fp32) when training. The backward's
  row kernel reads σ and dt, each program reads W again, writes dz (fp32) and d h; the weight
  kernel streams h once more and reads each row block's dz once per BLOCK_K columns; the partial
  sums of its row splits (as many as fill 2 programs per SM, 132 SMs) are added on the host.

Where the tile sizes come from: :func:`flash_tiles`, :func:`flash_reload_rows`, :func:`decode_tiles`
and :func:`projection_tiles` ask
``tgr_kernels._configs`` (the launchers' own choice) for the CUDA configuration, its first
(default) candidate when the launcher autotunes over several; :func:`wide_chunks` asks
``attention_wide._chunks`` with the CUDA chunk size. Change those three functions if the
configuration moves again.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

from . import cases as bench_cases

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "roofline-h200")
JSON_NAME = "roofline.json"
TABLE_NAME = "table.md"


@dataclass(frozen=True)
class Device:
    name: str
    match: str  # a GPU record whose device_name contains this is read against this device
    tensor_half_flops: float  # dense bf16/fp16 on tensor cores, FLOP/s
    tf32_flops: float
    fp32_flops: float  # without tensor cores
    hbm_bytes_per_s: float
    sms: int


H200 = Device("NVIDIA H200", "H200", 989e12, 494e12, 67e12, 4.8e12, 132)

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
STAT = 4  # fp32 row statistics (t̄, log-sum-exp, Δ, dt̄) and accumulators


@dataclass
class Launch:
    """One launch: its matrix-product FLOPs, the bytes it moves, and the peak its products run at."""
    name: str
    flops: float
    bytes: float
    peak: str  # "tensor_half", "tf32", "fp32" or "none" (no products)

    def compute_seconds(self, device: Device) -> float:
        rate = {"tensor_half": device.tensor_half_flops, "tf32": device.tf32_flops,
                "fp32": device.fp32_flops}.get(self.peak)
        return self.flops / rate if rate else 0.0

    def seconds(self, device: Device) -> float:
        return max(self.compute_seconds(device), self.bytes / device.hbm_bytes_per_s)


def _dot_peak(dtype_name: str, tf32: bool) -> str:
    """The rate the products of ``dtype_name`` inputs run at: tensor cores for half types; fp32
    products use TF32 tensor cores only when PyTorch allows it (the benchmarks do not)."""
    if dtype_name in ("bfloat16", "float16"):
        return "tensor_half"
    return "tf32" if tf32 else "fp32"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ----------------------------------------------------------------------------- configurations
@contextlib.contextmanager
def _cuda_branch(module):
    """The launchers' CUDA choice, also when this process runs Triton's interpreter (which has its
    own small tiles): the module's interpreter switch is turned off for the call."""
    saved = module.TRITON_INTERPRET
    module.TRITON_INTERPRET = False
    try:
        yield
    finally:
        module.TRITON_INTERPRET = saved


def flash_precision(kernel: str, head_dim: int, dtype_name: str, tf32: bool = False) -> str:
    """tl.dot's input_precision of a flash kernel on CUDA (H200: sm_90): fp32 with TF32 allowed
    multiplies in ieee where no tf32 tile is spill-free (``_configs.flash_dot_precision``)."""
    from tgr_kernels import _configs

    precision = "tf32" if dtype_name != "float32" or tf32 else "ieee"
    return _configs.flash_dot_precision(kernel, head_dim, _dtype(dtype_name), precision)


def flash_tiles(kernel: str, head_dim: int, dtype_name: str, tf32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of a flash kernel ("fwd", "bwd_dkdv", "bwd_dq") on CUDA: the
    first candidate of ``tgr_kernels._configs.flash_configs``."""
    from tgr_kernels import _configs

    precision = flash_precision(kernel, head_dim, dtype_name, tf32)
    with _cuda_branch(_configs):
        config = _configs.flash_configs(kernel, head_dim, _dtype(dtype_name), precision)[0]
    return config["BLOCK_M"], config["BLOCK_N"], _configs.flash_block_d(head_dim)


def flash_reload_rows(kernel: str, head_dim: int, dtype_name: str, tf32: bool = False) -> bool:
    """Whether a flash kernel's default CUDA configuration reloads its held tiles at each step."""
    from tgr_kernels import _configs

    precision = flash_precision(kernel, head_dim, dtype_name, tf32)
    with _cuda_branch(_configs):
        config = _configs.flash_configs(kernel, head_dim, _dtype(dtype_name), precision)[0]
    return bool(dict(config.meta).get("RELOAD_ROWS", 0))


def decode_tiles(S_k: int, rows: int, head_dim: int, sm_count: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_D, chunk, num_splits) of the decode split kernel on CUDA, as
    ``attention_decode.decode_forward`` derives them from ``_configs``."""
    from tgr_kernels import _configs

    with _cuda_branch(_configs):
        block_n = _configs.decode_config(head_dim)["BLOCK_N"]
    splits = _configs.decode_num_splits(S_k, rows, block_n, sm_count)
    # whole BLOCK_N blocks per chunk; splits that would start past S_k are dropped
    chunk = math.ceil(math.ceil(max(S_k, 1) / max(1, splits)) / block_n) * block_n
    return block_n, _configs.flash_block_d(head_dim), chunk, max(1, math.ceil(S_k / chunk))


def _flash_peak(kernel: str, head_dim: int, dtype_name: str, tf32: bool) -> str:
    return _dot_peak(dtype_name, flash_precision(kernel, head_dim, dtype_name, tf32) != "ieee")


def projection_tiles(kernel: str, n_heads: int, hidden_dtype: str, weight_dtype: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_T, BLOCK_K) of a projection kernel ("fwd", "bwd_rows", "bwd_weight")."""
    from tgr_kernels import _configs

    with _cuda_branch(_configs):
        config = _configs.projection_config(kernel, n_heads, _dtype(hidden_dtype), _dtype(weight_dtype))
    return config["BLOCK_M"], config["BLOCK_T"], config["BLOCK_K"]


def wide_chunks(S_q: int, S_k: int, B: int, H: int, elem: int, causal: bool):
    """[(row0, row1, n_cols)] of the wide path on CUDA, and whether the forward's Z is kept for
    the backward (one chunk, or causal blocks whose packed Z fits in a chunk)."""
    from tgr_kernels import attention_wide

    chunk_bytes = attention_wide.DEFAULT_CHUNK_BYTES["cuda"]
    chunks = attention_wide._chunks(S_q, S_k, B, H, elem, causal, chunk_bytes)
    if len(chunks) == 1:
        return chunks, True
    packed = sum(B * H * (r1 - r0) * n for r0, r1, n in chunks)
    return chunks, causal and packed * elem <= chunk_bytes


# ----------------------------------------------------------------------------- attention-flash
def _causal_key_end(start_m: int, block_m: int, S_q: int, S_k: int, causal: bool) -> int:
    """One past the last key a query block may see (attention_flash._causal_key_end)."""
    if not causal:
        return S_k
    last_row = min(start_m + block_m, S_q) - 1
    return max(min(S_k, last_row + (S_k - S_q) + 1), 0)


def _query_block_pass(S_q, S_k, D, e, block_m, block_n, block_d, causal, kpm, dots, row_stats):
    """Per (batch, head): the forward's loop over query blocks. Returns (flops, bytes) of the
    key-tile loop and the per-row statistics (Q, O and the lse are added by the caller)."""
    flops = bytes_ = 0
    for start_m in range(0, S_q, block_m):
        rows = min(block_m, S_q - start_m)
        tiles = math.ceil(_causal_key_end(start_m, block_m, S_q, S_k, causal) / block_n)
        keys = min(tiles * block_n, S_k)  # the last tile's loads stop at S_k
        flops += tiles * dots * 2 * block_m * block_n * block_d
        bytes_ += 2 * keys * D * e + (keys if kpm else 0) + row_stats * rows * STAT
    return flops, bytes_


def flash_launches(B, H, S_q, S_k, D, dtype_name, causal, kpm, mode, tf32=False,
                   H_kv: int | None = None) -> list[Launch]:
    """The flash path's launches; ``H_kv`` k/v heads (grouped-query attention), default H."""
    e, BH = ELEMENT_BYTES[dtype_name], B * H
    H_kv = H if H_kv is None else H_kv
    launches = []
    if mode in ("forward", "full"):
        peak = _flash_peak("fwd", D, dtype_name, tf32)
        bm, bn, bd = flash_tiles("fwd", D, dtype_name, tf32)
        f, b = _query_block_pass(S_q, S_k, D, e, bm, bn, bd, causal, kpm, dots=2, row_stats=1)  # t̄
        b += S_q * D * e + S_q * D * e + S_q * STAT  # Q in, O and log-sum-exp out
        launches.append(Launch("flash fwd", BH * f, BH * b, peak))
    if mode in ("backward", "full"):
        launches.append(_flash_dq_launch(B, H, S_q, S_k, D, dtype_name, causal, kpm, tf32))
        launches.append(_flash_dkdv_launch(B, H, H_kv, S_q, S_k, D, dtype_name, causal, kpm, tf32))
        launches.append(Launch("dt̄: sum over heads", 0, BH * S_q * STAT + B * S_q * STAT, "none"))
    return launches


def _flash_dq_launch(B, H, S_q, S_k, D, dtype_name, causal, kpm, tf32) -> Launch:
    """The dQ kernel: per query block two passes over its key tiles (2 dots, then 3 per tile)."""
    e = ELEMENT_BYTES[dtype_name]
    bm, bn, bd = flash_tiles("bwd_dq", D, dtype_name, tf32)
    reload = flash_reload_rows("bwd_dq", D, dtype_name, tf32)
    flops = bytes_ = 0
    for start_m in range(0, S_q, bm):
        rows = min(bm, S_q - start_m)
        tiles = math.ceil(_causal_key_end(start_m, bm, S_q, S_k, causal) / bn)
        keys = min(tiles * bn, S_k)
        flops += tiles * 5 * 2 * bm * bn * bd
        bytes_ += 2 * (2 * keys * D * e + (keys if kpm else 0))  # K, V (and padding) in each pass
        bytes_ += (2 * tiles if reload else 1) * 2 * rows * D * e  # Q and dO: held, or per tile and pass
        bytes_ += 2 * rows * STAT + 3 * rows * STAT + rows * D * e  # t̄, lse in; Δ, lse', dt̄, dQ out
    return Launch("flash bwd dQ dt̄", B * H * flops, B * H * bytes_, _flash_peak("bwd_dq", D, dtype_name, tf32))


def _flash_dkdv_launch(B, H, H_kv, S_q, S_k, D, dtype_name, causal, kpm, tf32) -> Launch:
    """The dK/dV kernel: per key block of a k/v head, every query tile of its GROUP query heads."""
    e, group = ELEMENT_BYTES[dtype_name], H // H_kv
    bm, bn, bd = flash_tiles("bwd_dkdv", D, dtype_name, tf32)
    reload = flash_reload_rows("bwd_dkdv", D, dtype_name, tf32)
    flops = bytes_ = 0
    for start_n in range(0, S_k, bn):
        cols = min(bn, S_k - start_n)
        start_m = (max(start_n - (S_k - S_q), 0) // bm * bm) if causal else 0
        steps = group * math.ceil(max(S_q - start_m, 0) / bm)
        rows = group * max(S_q - start_m, 0)
        flops += steps * 4 * 2 * bm * bn * bd
        bytes_ += (steps if reload else 1) * 2 * cols * D * e  # K, V: held, or per step
        # per step: Q, dO, t̄, lse, Δ of its rows and the tile's key-padding bytes; dK, dV out
        bytes_ += rows * (2 * D * e + 3 * STAT) + (steps * cols if kpm else 0) + 2 * cols * D * e
    return Launch("flash bwd dK dV", B * H_kv * flops, B * H_kv * bytes_,
                  _flash_peak("bwd_dkdv", D, dtype_name, tf32))


# ----------------------------------------------------------------------------- attention-decode
def decode_launches(B, H, H_kv, S_q, S_k, D, dtype_name, causal, kpm, device: Device = H200) -> list[Launch]:
    """The split kernel and the combine kernel of one decoding step (forward only)."""
    e, rows = ELEMENT_BYTES[dtype_name], B * H * S_q
    block_n, block_d, chunk, splits = decode_tiles(S_k, rows, D, device.sms)
    flops = 0
    for i in range(S_q):  # every batch row and query head alike
        end = min(S_k, i + S_k - S_q + 1) if causal else S_k
        for start in range(0, S_k, chunk):
            keys = max(0, min(start + chunk, end) - start)
            flops += math.ceil(keys / block_n) * 2 * 2 * block_n * block_d
    flops *= B * H
    # the cache (K, V, padding bytes) once; q rows and t̄ in; each (row, chunk)'s partials out
    cache = B * H_kv * 2 * S_k * D * e + (B * S_k if kpm else 0)
    split = Launch("decode split", flops, cache + rows * D * e + B * S_q * STAT + rows * splits * (D + 2) * STAT,
                   "fp32")
    combine = Launch("decode combine", 0, rows * splits * (D + 2) * STAT + B * S_q * STAT + rows * D * e, "none")
    return [split, combine]


# ----------------------------------------------------------------------------- attention-wide
def _gemm(name, M, N, K, e, batch, peak, out_e=None) -> Launch:
    """A [M, K] @ [K, N] product over ``batch``: operands read once, the result written once."""
    out_e = e if out_e is None else out_e
    return Launch(name, batch * 2 * M * N * K, batch * ((M * K + K * N) * e + M * N * out_e), peak)


def _accumulating_gemm(name, M, N, K, e, batch, peak) -> Launch:
    """acc[M, N] (fp32) += A[M, K] @ B[K, N]: in the GEMM (read and write of acc) for fp32 inputs;
    for half inputs the product is written in their dtype, then added (attention_wide._add_matmul_)."""
    gemm = _gemm(name, M, N, K, e, batch, peak, out_e=0)
    gemm.bytes += batch * M * N * (2 * STAT if e == STAT else e + e + 2 * STAT)
    return gemm


def wide_launches(B, H, S_q, S_k, D, dtype_name, causal, kpm, mode, same_qkv=True,
                  tf32=False) -> list[Launch]:
    e, peak, BH = ELEMENT_BYTES[dtype_name], _dot_peak(dtype_name, tf32), B * H
    chunks, keeps_z = wide_chunks(S_q, S_k, B, H, e, causal)
    training = mode == "full"  # the timed forward of "backward" is untimed; "forward" is inference
    launches = []
    if mode in ("forward", "full"):
        for row0, row1, n in chunks:
            M = row1 - row0
            if n == 0:
                continue
            launches.append(_gemm("Z = Q Kᵀ", M, n, D, e, BH, peak))
            if training and keeps_z:
                launches.append(Launch("keep Z", 0, BH * 2 * M * n * e, "none"))
            # two passes reading Z (max and sum, then P), one writing P; t̄ in, lse out; padding bytes
            launches.append(Launch("row softmax", 0, BH * (3 * M * n * e + 2 * M * STAT + (2 * M * n if kpm else 0)),
                                   "none"))
            launches.append(_gemm("O = P V", M, D, n, e, BH, peak))
    if mode in ("backward", "full"):
        one_chunk = len(chunks) == 1
        for row0, row1, n in chunks:
            M = row1 - row0
            if n == 0:
                continue
            if keeps_z:
                launches.append(Launch("copy of the kept Z", 0, BH * 2 * M * n * e, "none"))
            else:
                launches.append(_gemm("Z = Q Kᵀ", M, n, D, e, BH, peak))
            launches.append(_gemm("dP = dO Vᵀ", M, n, D, e, BH, peak))
            # two passes reading Z and dP, one writing P and G; t̄, lse in, dt̄ out; padding bytes
            launches.append(Launch("row backward", 0, BH * (6 * M * n * e + 3 * M * STAT + (2 * M * n if kpm else 0)),
                                   "none"))
            if same_qkv and one_chunk:
                launches.append(Launch("G + Gᵀ", 0, BH * 3 * M * n * e, "none"))
                launches.append(_gemm("dX = (G + Gᵀ) X", M, D, n, e, BH, peak))
                launches.append(_gemm("Pᵀ dO", n, D, M, e, BH, peak))
                launches.append(Launch("dX += Pᵀ dO", 0, BH * 3 * M * D * e, "none"))
                continue
            if one_chunk:
                launches += [_gemm("dQ = G K", M, D, n, e, BH, peak), _gemm("dK = Gᵀ Q", n, D, M, e, BH, peak),
                             _gemm("dV = Pᵀ dO", n, D, M, e, BH, peak)]
                continue
            # several chunks: dV, dK (and for q = k = v all of dX) add up in an accumulator
            sums = [("dV += Pᵀ dO", n, M), ("dK += Gᵀ Q", n, M)]
            if same_qkv:
                sums.append(("dX += G K", M, n))
            else:
                launches.append(_gemm("dQ = G K", M, D, n, e, BH, peak))
            for name, rows, inner in sums:
                launches.append(_accumulating_gemm(name, rows, D, inner, e, BH, peak))
        if not one_chunk:  # the fp32 accumulators: zeroed first, cast to the input dtype last
            n_acc = 1 if same_qkv else 2
            launches.append(Launch("accumulators: zero, cast", 0, n_acc * BH * S_k * D * (2 * STAT + e), "none"))
        launches.append(Launch("dt̄: sum over heads", 0, BH * S_q * STAT + B * S_q * STAT, "none"))
    return launches


# ----------------------------------------------------------------------------- projection
def projection_launches(B, S, hidden, T, dtype_name, mode, weight_dtype=None, tf32=False,
                        device: Device = H200) -> list[Launch]:
    weight_dtype = weight_dtype or dtype_name
    eh, ew = ELEMENT_BYTES[dtype_name], ELEMENT_BYTES[weight_dtype]
    same_half = dtype_name == weight_dtype and dtype_name != "float32"
    peak = _dot_peak(dtype_name if same_half else "float32", tf32)
    e_out = max(eh, ew)  # t comes out in the promoted dtype
    N = B * S
    launches = []
    if mode in ("forward", "full"):
        bm, bt, bk = projection_tiles("fwd", T, dtype_name, weight_dtype)
        programs = math.ceil(N / bm)
        sigma = N * T * STAT if mode == "full" else 0  # σ is kept only when training
        k_steps = math.ceil(hidden / bk)
        launches.append(Launch("projection fwd", programs * k_steps * 2 * bm * bt * bk,
                               N * hidden * eh + programs * T * (hidden + 1) * ew + N * T * e_out + sigma, peak))
    if mode in ("backward", "full"):
        bm, bt, bk = projection_tiles("bwd_rows", T, dtype_name, weight_dtype)
        programs = math.ceil(N / bm)
        launches.append(Launch("projection bwd rows", programs * math.ceil(hidden / bk) * 2 * bm * bt * bk,
                               N * T * (STAT + e_out) + programs * T * hidden * ew + N * T * STAT + N * hidden * eh,
                               peak))
        bm, bt, bk = projection_tiles("bwd_weight", T, dtype_name, weight_dtype)
        row_blocks, col_blocks = math.ceil(N / bm), math.ceil(hidden / bk)
        # temperature_projection._num_row_splits on CUDA: enough programs for 2 per SM
        splits = max(1, min(row_blocks, math.ceil(2 * device.sms / col_blocks)))
        rows_per_split = math.ceil(row_blocks / splits) * bm
        splits = math.ceil(N / rows_per_split)
        tiles = col_blocks * splits * math.ceil(rows_per_split / bm)
        launches.append(Launch("projection bwd weight", tiles * 2 * bt * bm * bk,
                               N * hidden * eh + col_blocks * N * T * STAT + splits * T * hidden * STAT, peak))
        tail = (splits * T * hidden * STAT + T * hidden * STAT if splits > 1 else 0)  # sum of the splits
        tail += T * hidden * (STAT + ew) if ew != STAT else 0  # dW to W's dtype
        tail += N * T * STAT + T * STAT  # db = Σ dz
        launches.append(Launch("dW, db on the host", 0, tail, "none"))
    return launches


# ----------------------------------------------------------------------------- cases
def launches_for(op: str, shape: dict[str, int], dtype_name: str, mode: str, causal: bool, mask: str | None,
                 tf32: bool = False) -> list[Launch]:
    """The launches of one benchmark case (the fields of a benchmark record)."""
    if op == "projection":
        return projection_launches(shape["batch"], shape["seq_len"], shape["hidden"], shape["temp_heads"],
                                   dtype_name, mode, tf32=tf32)
    if op not in ("attention-flash", "attention-wide", "attention-gqa", "attention-decode"):
        raise ValueError(f"no roofline model for {op!r}")
    B, H, S, D = shape["batch"], shape["heads"], shape["seq_len"], shape["head_dim"]
    H_kv = shape.get("kv_heads", H)
    kpm = mask == "padding"
    if op == "attention-decode":
        if mode != "forward":
            raise ValueError(f"attention-decode has no {mode!r} mode (forward only)")
        return decode_launches(B, H, H_kv, shape["q_len"], S, D, dtype_name, bool(causal), kpm)
    if op in ("attention-flash", "attention-gqa"):
        return flash_launches(B, H, S, S, D, dtype_name, bool(causal), kpm, mode, tf32=tf32, H_kv=H_kv)
    return wide_launches(B, H, S, S, D, dtype_name, bool(causal), kpm, mode, same_qkv=True, tf32=tf32)


def entry(op, shape, dtype_name, mode, causal, mask, device: Device = H200, tf32: bool = False) -> dict:
    """One roofline row: the case, FLOPs, bytes, the time bound and which limit dominates it."""
    launches = launches_for(op, shape, dtype_name, mode, causal, mask, tf32)
    flops = sum(x.flops for x in launches)
    bytes_ = sum(x.bytes for x in launches)
    seconds = sum(x.seconds(device) for x in launches)
    memory_s = sum(x.bytes / device.hbm_bytes_per_s for x in launches)
    compute_s = sum(x.compute_seconds(device) for x in launches)
    return {"op": op, **shape, "dtype": dtype_name, "mode": mode, "causal": None if op == "projection" else causal,
            "mask": None if op == "projection" else mask, "device": device.name, "flops": flops, "bytes": bytes_,
            "roofline_ms": seconds * 1e3, "compute_ms": compute_s * 1e3, "memory_ms": memory_s * 1e3,
            "bound": "memory" if memory_s >= compute_s else "compute",
            "launches": _by_name(launches, device)}


def _by_name(launches: list[Launch], device: Device) -> list[dict]:
    """The launches summed by name (the wide path repeats each one per chunk), in order."""
    groups: dict[str, dict] = {}
    for x in launches:
        g = groups.setdefault(x.name, {"name": x.name, "count": 0, "flops": 0, "bytes": 0, "ms": 0.0})
        g["count"] += 1
        g["flops"] += x.flops
        g["bytes"] += x.bytes
        g["ms"] += x.seconds(device) * 1e3
    return list(groups.values())


def estimate(record: dict, device: Device = H200) -> dict | None:
    """The roofline entry of a benchmark record, or None: no model for its op, or not measured on
    ``device`` (another GPU has other peaks)."""
    if record.get("device") != "cuda" or device.match not in (record.get("device_name") or ""):
        return None
    if record.get("op") not in bench_cases.OPS or record.get("dtype") not in ELEMENT_BYTES:
        return None
    keys = ("seq_len", *bench_cases.DEFAULT_SHAPES[record["op"]][0])  # the op's shape fields
    if any(record.get(k) is None for k in keys) or record.get("mode") not in bench_cases.op_modes(record["op"]):
        return None
    return entry(record["op"], {k: record[k] for k in keys}, record["dtype"], record["mode"], record.get("causal"),
                 record.get("mask"), device)


# Sequence lengths: the benchmarks' defaults and the GPU run's (benchmarks/gpu_run.sh).
SEQ_LENS = {"attention-flash": sorted(set(bench_cases.DEFAULT_SEQ_LENS) | {8192}),
            "attention-wide": list(bench_cases.DEFAULT_SEQ_LENS),
            "projection": sorted(set(bench_cases.DEFAULT_SEQ_LENS) | {16384, 65536}),
            "attention-gqa": bench_cases.default_seq_lens("attention-gqa", quick=False),
            "attention-decode": sorted(set(bench_cases.default_seq_lens("attention-decode", quick=False))
                                       | {1024, 16384, 32768})}
DTYPES = ("bfloat16", "float32")  # fp16 moves the same bytes at the same peak as bf16


def all_entries(dtypes=DTYPES) -> list[dict]:
    """Every benchmark case (cases.op_cases at full size, key-padding mask) in every mode."""
    rows = []
    for op in bench_cases.OPS:
        for dtype_name in dtypes:
            for case in bench_cases.op_cases(op, SEQ_LENS[op], [_dtype(dtype_name)], "cpu", [False, True],
                                             "padding", quick=False):
                for mode in bench_cases.op_modes(op):
                    rows.append(entry(case.op, case.shape, dtype_name, mode, case.causal,
                                      case.mask if op != "projection" else None))
    return rows


def _fmt_time(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.3g} ms"


def render_table(rows: list[dict], device: Device = H200) -> str:
    out = [f"# Roofline of the benchmark cases on an {device.name}", "",
           f"Generated by `python -m benchmarks.roofline` (the model: that module's docstring). Peaks: "
           f"{device.tensor_half_flops / 1e12:.0f} TFLOP/s bf16/fp16 (tensor cores), "
           f"{device.fp32_flops / 1e12:.0f} TFLOP/s fp32 (TF32 off, as the benchmarks run), "
           f"{device.hbm_bytes_per_s / 1e12:.1f} TB/s HBM. Time = Σ over launches of max(FLOPs / peak, bytes / "
           "bandwidth); bytes charge every load to HBM (no L2 reuse). Key-padding mask as in the benchmarks; "
           "bf16 here (fp16 is the same); bf16 and fp32 in roofline.json, with each launch's share.", ""]
    rows = [r for r in rows if r["dtype"] == "bfloat16"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        shape = ", ".join(f"{k}={r[k]}" for k in ("batch", "heads", "kv_heads", "q_len", "head_dim", "hidden",
                                                   "temp_heads") if k in r)
        groups.setdefault((r["op"], shape, r["mode"]), []).append(r)
    for (op, shape, mode), items in groups.items():
        out += [f"### {op}, {mode} ({shape})", ""]
        causal_values = sorted({r["causal"] for r in items}, key=lambda c: bool(c))
        heads = []
        for c in causal_values:
            tag = "" if c is None else (" causal" if c else " full")
            heads += [f"GFLOP{tag}", f"MB{tag}", f"roofline{tag}"]
        out.append("| S | " + " | ".join(heads) + " |")
        out.append("|---:|" + "---:|" * len(heads))
        for S in sorted({r["seq_len"] for r in items}):
            cells = []
            for c in causal_values:
                r = next(x for x in items if x["seq_len"] == S and x["causal"] == c)
                cells += [f"{r['flops'] / 1e9:.3g}", f"{r['bytes'] / 1e6:.4g}",
                          f"{_fmt_time(r['roofline_ms'])} ({r['bound']})"]
            out.append(f"| {S} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write(out_dir: str = OUT_DIR) -> tuple[str, str]:
    rows = all_entries()
    os.makedirs(out_dir, exist_ok=True)
    json_path, table_path = os.path.join(out_dir, JSON_NAME), os.path.join(out_dir, TABLE_NAME)
    with open(json_path, "w", encoding="utf-8") as f:  # one entry a line: readable diffs
        f.write('{"device": ' + json.dumps(asdict(H200)) + ',\n "entries": [\n')
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]}\n")
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(render_table(rows))
    return json_path, table_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
