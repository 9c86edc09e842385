"""Launch configurations of the Triton kernels: which tiles, warps and pipeline stages each runs with.

This module is the one place where they are chosen. The launchers in ``attention_flash``,
``attention_wide`` and ``temperature_projection`` ask it for their configurations and launch
through :func:`launch`; the static proof (``python -m tgr_kernels.aot``) calls the same launchers
and compiles every configuration these functions can return, for sm_90, sm_80 and sm_86, so a change
here is checked (registers, spills, shared memory, tensor cores) before it reaches a GPU.

Under Triton's interpreter (CPU tests) each kernel has one small configuration: the interpreter
cannot autotune, and its time grows with the tile. On CUDA a kernel with several candidates is
autotuned over them (``triton.autotune``, once per problem bucket); every candidate is compiled by
the proof. Setting ``TGR_AUTOTUNE=0`` before import launches the first candidate (the default).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from ._backend import TRITON_INTERPRET, cuda_capability, next_power_of_2

AUTOTUNE = not TRITON_INTERPRET and os.environ.get("TGR_AUTOTUNE", "1").lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class LaunchConfig:
    """Constexpr tile sizes (``meta``, name/value pairs) plus ``num_warps`` and ``num_stages``,
    and ``maxnreg`` (ptxas's register cap per thread) where a configuration sets one."""

    meta: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def __getitem__(self, name: str) -> int:
        return dict(self.meta)[name]

    def kwargs(self) -> dict:
        """Keyword arguments of one kernel launch with this configuration."""
        options = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        return dict(self.meta, num_warps=self.num_warps, num_stages=self.num_stages, **options)

    def to_triton(self) -> triton.Config:
        return triton.Config(dict(self.meta), num_warps=self.num_warps, num_stages=self.num_stages,
                             maxnreg=self.maxnreg)

    def __str__(self) -> str:
        tiles = " ".join(f"{k}={v}" for k, v in self.meta)
        cap = "" if self.maxnreg is None else f" maxnreg={self.maxnreg}"
        return f"{tiles} warps={self.num_warps} stages={self.num_stages}{cap}"


def _config(num_warps: int, num_stages: int, maxnreg: int | None = None, **meta: int) -> LaunchConfig:
    return LaunchConfig(tuple(meta.items()), num_warps, num_stages, maxnreg)


# ----------------------------------------------------------------------------- flash attention
FLASH_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")


def flash_block_d(head_dim: int) -> int:
    """BLOCK_D of the flash kernels: the head dim padded to a power of two (>= 16 for tl.dot)."""
    return max(16, next_power_of_2(head_dim))


def device_arch(device: torch.device) -> int:
    """The compute capability of a CUDA device as 10 * major + minor (90 = H100/H200, 80 = A100,
    86/89 = RTX 30/40, A10, L4, L40S); 0 for any other device."""
    if device.type != "cuda":
        return 0
    return cuda_capability(device)


def _flash_bucket(head_dim: int) -> int:
    # Head dims that are not a multiple of 16 never reach the kernels: the launchers pad them
    # (attention_flash.FLASH_HEAD_DIM_ALIGN), so every row loads as vectors.
    return 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)


# Compute capabilities whose blocks get at most 99 KiB (101,376 B) of shared memory: Ampere and Ada
# consumer and workstation cards (RTX 30/40, A10, A40, L4, L40S) and consumer Blackwell (RTX 50).
SMALL_SHARED_MEMORY_ARCHES = (86, 89, 120, 121)


def _arch_name(arch: int) -> str:
    """The tile set of a compute capability: "sm_90" (Hopper), "sm_86" (99 KiB of shared memory per
    block, SMALL_SHARED_MEMORY_ARCHES) or "sm_80" (A100's 163 KiB; every other GPU)."""
    if 90 <= arch < 100:
        return "sm_90"
    return "sm_86" if arch in SMALL_SHARED_MEMORY_ARCHES else "sm_80"


def flash_dot_precision(kernel: str, head_dim: int, dtype: torch.dtype, precision: str, arch: int = 90) -> str:
    """tl.dot's input_precision for one flash kernel: ``precision`` (``_backend.triton_dot_precision``
    of q's dtype), except fp32 with TF32 allowed where no tf32 tile compiles without spills
    (``_FLASH_TF32`` has None there): those kernels multiply in full fp32 ("ieee") on their
    spill-free fp32 tiles. TF32 is a permission to round, not a requirement."""
    if kernel not in FLASH_KERNELS:
        raise ValueError(f"kernel must be one of {FLASH_KERNELS}, got {kernel!r}")
    if dtype == torch.float32 and precision != "ieee":
        if _FLASH_TF32[_arch_name(arch)][kernel][_flash_bucket(head_dim)] is None:
            return "ieee"
    return precision


def flash_configs(kernel: str, head_dim: int, dtype: torch.dtype, precision: str,
                  arch: int = 90) -> tuple[LaunchConfig, ...]:
    """Candidate configurations of one flash kernel (``"fwd"``, ``"bwd_dkdv"`` or ``"bwd_dq"``)
    for q of ``dtype`` and head dim ``head_dim`` whose dots run at ``precision`` (tl.dot's
    input_precision, from :func:`flash_dot_precision`), on a GPU of compute capability ``arch``;
    the first is the default. Each has BLOCK_M (query rows) and BLOCK_N (keys), and RELOAD_ROWS
    where the kernel re-loads its own tiles at each step instead of holding them."""
    if kernel not in FLASH_KERNELS:
        raise ValueError(f"kernel must be one of {FLASH_KERNELS}, got {kernel!r}")
    if TRITON_INTERPRET:
        return (_config(4, 1, BLOCK_M=32, BLOCK_N=32),)
    bucket, arch_name = _flash_bucket(head_dim), _arch_name(arch)
    if dtype == torch.float32:
        # fp32 has its own tiles: scalar FMA dots (ieee) or tf32 ones, whose operands take twice
        # the registers and shared memory of fp16/bf16 ones.
        table = _FLASH_FP32_IEEE if precision == "ieee" else _FLASH_TF32[arch_name]
    else:
        table = _FLASH_TENSOR_CORE[arch_name]
    candidates = table[kernel][bucket]
    if candidates is None:
        raise ValueError(f"no tf32 tiles for the flash {kernel} kernel at head dim {head_dim} on {arch_name}: "
                         "its dots run in ieee (see flash_dot_precision)")
    return tuple(_config(w, s, BLOCK_M=m, BLOCK_N=n, **dict(*extra)) for m, n, w, s, *extra in candidates)


# ptxas's register cap at the hardware's 255: without one, ptxas aims some kernels at a lower count
# (80 or 128 registers, for occupancy) and stores 8 B to the stack; with it, the same kernels
# allocate 96-176 registers and no stack (static proof, each such candidate, key padding or bias).
_FULL_REGISTERS = (("maxnreg", 255),)
# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages[, other launch settings]) per arch, kernel and
# head-dim bucket (D <= 64, <= 128, <= 256), the default first, chosen with `python -m tgr_kernels.aot`: each
# compiles without spills, within shared memory, and (sm_90) to wgmma. wgmma gives each group of
# four warps 64 rows, so on sm_90 BLOCK_M (and BLOCK_N of the dK/dV kernel, whose dots run over
# keys) is 64 per four warps where registers allow. On sm_80 mma.sync keeps both operands in
# registers, so its tiles are smaller. Cards with 99 KiB of shared memory per block take the sm_86
# set below; other GPUs take the sm_80 set.
_FLASH_TENSOR_CORE = {
    "sm_90": {
        # D > 64: also without spills when the mask and bias rows are unaligned (odd S).
        "fwd": {64: [(128, 64, 8, 3), (64, 64, 4, 3)], 128: [(128, 32, 8, 2), (64, 32, 8, 2)],
                256: [(64, 32, 8, 2), (128, 16, 8, 2)]},
        "bwd_dkdv": {64: [(64, 64, 4, 2), (128, 64, 8, 2)], 128: [(64, 32, 8, 1), (64, 64, 8, 1)],
                     256: [(16, 64, 8, 1)]},
        "bwd_dq": {64: [(128, 64, 8, 2), (64, 64, 8, 2)], 128: [(64, 32, 8, 2), (64, 16, 8, 2)],
                   256: [(64, 16, 8, 2)]},
    },
    "sm_80": {
        "fwd": {64: [(128, 32, 8, 2), (64, 64, 4, 2)], 128: [(64, 32, 8, 1), (32, 32, 4, 1)],
                256: [(64, 32, 8, 1), (32, 32, 4, 1)]},
        # One stage at D <= 64: with two, the loop over a grouped-query group spills 8 B. 64 x 64
        # spilled 24 B (72 B on sm_86) with a key-padding mask, at 255 registers.
        "bwd_dkdv": {64: [(64, 32, 8, 1, _FULL_REGISTERS), (32, 32, 8, 1, _FULL_REGISTERS)],
                     128: [(64, 32, 8, 1), (32, 64, 8, 2)],
                     256: [(64, 32, 8, 1), (32, 32, 8, 1)]},
        "bwd_dq": {64: [(128, 32, 8, 2), (64, 32, 4, 2)], 128: [(64, 32, 8, 2), (32, 32, 8, 1)],
                   256: [(64, 16, 8, 2)]},
    },
}
# fp32 with TF32 allowed: tf32 dots on tensor cores, each candidate spill-free in the static proof
# (aligned and unaligned head dims, every mask/flag). None: no tile tried (BLOCK_M 16-128, BLOCK_N
# 16-64, 4/8/16 warps, 1-2 stages, with and without RELOAD_ROWS) compiles to the arch's tensor-core
# instruction without spills; the least found: sm_90 forward D = 256 200 B, dK/dV D = 128 56 B and
# D = 256 48 B, dQ D = 256 424 B; sm_80 dQ D = 256 8 B (triton 3.7.1, ptxas 12.8). Those kernels
# multiply in ieee on the spill-free fp32 tiles below (flash_dot_precision).
_FLASH_TF32 = {
    "sm_90": {
        "fwd": {64: [(128, 64, 8, 3), (64, 64, 4, 3)], 128: [(128, 32, 8, 2), (64, 32, 8, 2)], 256: None},
        "bwd_dkdv": {64: [(64, 64, 8, 2), (64, 32, 4, 2)], 128: None, 256: None},
        "bwd_dq": {64: [(64, 64, 8, 2)], 128: [(64, 32, 8, 2), (64, 16, 8, 2)], 256: None},
    },
    "sm_80": {
        "fwd": {64: [(128, 32, 8, 2), (64, 64, 4, 2)], 128: [(64, 32, 8, 1), (32, 32, 4, 1)],
                256: [(64, 16, 8, 1), (32, 32, 8, 1)]},
        "bwd_dkdv": {64: [(64, 64, 8, 2), (64, 32, 8, 1, _FULL_REGISTERS)], 128: [(64, 32, 8, 1), (32, 64, 8, 2)],
                     256: [(32, 16, 4, 1)]},
        "bwd_dq": {64: [(64, 32, 8, 1)], 128: [(64, 16, 8, 1)], 256: None},
    },
}
# sm_86 (SMALL_SHARED_MEMORY_ARCHES): the sm_80 tiles, but where they need more than 99 KiB of shared
# memory per block (dK/dV: fp16/bf16 at D > 128 102,400 B; fp32 with TF32 at D > 32 up to 163,840 B)
# or spill there (ptxas allocates for sm_86 otherwise than for sm_80: the fp32 + TF32 forward at
# D > 64 spilled 16-48 B with sm_80's tiles). Chosen with the static proof's sm_86 target.
_FLASH_TENSOR_CORE["sm_86"] = {
    "fwd": {**_FLASH_TENSOR_CORE["sm_80"]["fwd"], 128: [(64, 32, 8, 1), (32, 32, 4, 1, _FULL_REGISTERS)]},
    "bwd_dkdv": {**_FLASH_TENSOR_CORE["sm_80"]["bwd_dkdv"], 256: [(32, 32, 8, 1), (32, 16, 4, 1)]},
    "bwd_dq": {**_FLASH_TENSOR_CORE["sm_80"]["bwd_dq"],
               64: [(128, 32, 8, 2, _FULL_REGISTERS), (64, 32, 4, 2, _FULL_REGISTERS)]}}
_FLASH_TF32["sm_86"] = {
    "fwd": {**_FLASH_TF32["sm_80"]["fwd"], 128: [(64, 16, 8, 1), (32, 32, 4, 1)],
            256: [(32, 16, 4, 1), (16, 32, 8, 1)]},
    "bwd_dkdv": {64: [(64, 32, 8, 1, _FULL_REGISTERS), (32, 64, 8, 1)], 128: [(32, 32, 8, 1), (32, 16, 4, 1)],
                 256: [(16, 16, 4, 1), (16, 16, 8, 1)]},
    "bwd_dq": _FLASH_TF32["sm_80"]["bwd_dq"]}

# Re-load the kernel's own tiles (q and dO in the dQ kernel) at each step instead of holding them:
# held fp32 tiles at D = 256 spill (168-2184 B in the dQ kernel, every tile tried); re-loaded, they
# drop to 58-160 registers. ptxas then picks a low register target for some mask/flag variants and
# stores 8-16 B to the stack; a cap of 168 registers makes it allocate without (every variant, both
# arches, in the proof).
_RELOAD = (("RELOAD_ROWS", 1), ("maxnreg", 168))
# fp32 with ieee dots (TF32 off, or no spill-free tf32 tile): scalar FMA dots, whose operands and
# accumulators all sit in registers, so the tiles shrink as the head dim grows and eight warps share
# the accumulators. One list for both arches (neither has fp32 tensor cores).
_FLASH_FP32_IEEE = {
    "fwd": {64: [(64, 16, 8, 1)], 128: [(32, 16, 8, 1, _FULL_REGISTERS)], 256: [(32, 16, 8, 1)]},
    # D <= 128: 16 keys, as at D = 256; with 32 the loop over a grouped-query group spills
    # 8-40 B on sm_90 when S is odd (also with maxnreg 128 or 168).
    "bwd_dkdv": {64: [(16, 32, 8, 1)], 128: [(16, 16, 8, 1)], 256: [(16, 16, 8, 1, _FULL_REGISTERS)]},
    "bwd_dq": {64: [(32, 32, 8, 1, _FULL_REGISTERS)], 128: [(16, 16, 8, 1)], 256: [(16, 16, 8, 1, _RELOAD)]},
}


def flash_tune_bucket(S_q: int, S_k: int) -> tuple[int, int]:
    """Sequence lengths that share one autotuning result (powers of two), so that a new length
    within a bucket (each decoding step, each batch of another length) does not re-tune."""
    return next_power_of_2(S_q), next_power_of_2(S_k)


# Arguments whose values change the best configuration beyond the bucket and the dtypes.
FLASH_TUNE_KEY = ("D", "HAS_KPM", "HAS_BIAS", "CAUSAL")


# ----------------------------------------------------------------------------- decode (split-KV)
# Streaming multiprocessors assumed where the device cannot be asked (the static proof, CPU): an
# H200's (and H100 SXM's) 132.
DEFAULT_SM_COUNT = 132
# Programs per SM the split count aims for: a decode program is small (4 warps, no shared-memory
# tiles), so several are resident per SM and their loads overlap.
DECODE_PROGRAMS_PER_SM = 4
# Each chunk spans at least this many BLOCK_N key blocks, so the partials written and merged stay
# small beside the keys and values a chunk reads.
DECODE_MIN_CHUNK_BLOCKS = 4
DECODE_MAX_SPLITS = 128


def device_sm_count(device: torch.device) -> int:
    """The number of SMs of a CUDA device; DEFAULT_SM_COUNT for any other device."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    # Read once per GPU: the properties query runs on every decoding step otherwise.
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_config(head_dim: int) -> LaunchConfig:
    """BLOCK_N (keys per loop step) and warps of the decode split kernel: one query row against a
    [BLOCK_N, BLOCK_D] K tile and V tile held in fp32, about 8K elements each at 4 warps (64
    registers per thread per tile); the static proof measures at most 147 registers and no spill
    (sm_90 and sm_80, every dtype and mask). A head dim that is not a multiple of 16 loads element
    by element, each with its own 64-bit address: with the aligned tiles such kernels reached 255
    registers (the cap) on sm_90, with half the keys per step at most 240."""
    if TRITON_INTERPRET:
        return _config(4, 1, BLOCK_N=32)
    block_n = max(16, min(128, 8192 // flash_block_d(head_dim)))
    # maxnreg 255: with ptxas's own register target the key-padding and bias-only kernels stored
    # 8 B to the stack at 56-128 registers (odd D on sm_90; D = 16 fp32 on sm_86).
    return _config(4, 2, 255, BLOCK_N=block_n if head_dim % 16 == 0 else block_n // 2)


def decode_combine_config() -> LaunchConfig:
    """Warps of the decode combine kernel: one configuration, as each program reads only one query
    row's partials (at most DECODE_MAX_SPLITS rows of BLOCK_D fp32)."""
    return _config(4, 1)


def decode_num_splits(S_k: int, rows: int, block_n: int, sm_count: int = DEFAULT_SM_COUNT) -> int:
    """Key chunks per query row: enough (query row, chunk) programs to give every SM
    DECODE_PROGRAMS_PER_SM, but no chunk shorter than DECODE_MIN_CHUNK_BLOCKS key blocks and no
    more than DECODE_MAX_SPLITS chunks. ``rows`` = B·H_q·S_q."""
    wanted = -(-sm_count * DECODE_PROGRAMS_PER_SM // max(1, rows))
    longest = -(-S_k // (block_n * DECODE_MIN_CHUNK_BLOCKS))
    return max(1, min(wanted, longest, DECODE_MAX_SPLITS))


# ----------------------------------------------------------------------------- wide-path row kernels
def wide_row_config(n_cols: int) -> LaunchConfig:
    """BLOCK_N (columns per step of the row loop) and warps of the wide path's row kernels for
    rows of ``n_cols`` scores. One configuration: the kernels rewrite their input in place, so
    they cannot be benchmarked repeatedly on the same buffers."""
    if TRITON_INTERPRET:
        return _config(4, 3, BLOCK_N=min(256, max(16, next_power_of_2(n_cols))))
    # At most 2048 columns a step: the gated backward's five 4096-wide fp32 tiles at 8 warps
    # spilled 8 B on sm_90 (static proof); the kernels stream memory, so the narrower step costs
    # loop iterations, not bandwidth.
    block = min(2048, max(128, next_power_of_2(n_cols)))
    return _config(8 if block >= 2048 else 4, 3, BLOCK_N=block)


# ----------------------------------------------------------------------------- temperature projection
PROJECTION_KERNELS = ("fwd", "bwd_rows", "bwd_weight")
# tl.dot needs every tile dim >= 16 on a GPU, so the T temperature heads are padded to >= 16.
PROJECTION_MIN_BLOCK_T = 16


def projection_block_t(n_heads: int) -> int:
    """BLOCK_T: all T heads in one tile, padded to a power of two >= 16."""
    return max(PROJECTION_MIN_BLOCK_T, next_power_of_2(n_heads))


def projection_config(kernel: str, n_heads: int, hidden_dtype: torch.dtype,
                      weight_dtype: torch.dtype) -> LaunchConfig:
    """The configuration of one projection kernel (``"fwd"``, ``"bwd_rows"`` or ``"bwd_weight"``):
    BLOCK_M rows of h per program (per loop step for ``bwd_weight``), BLOCK_K columns of H per
    loop step (per program for ``bwd_weight``), BLOCK_T. One configuration (no autotuning): the
    op is memory bound, and the weight-gradient launch derives its row split from BLOCK_M."""
    if kernel not in PROJECTION_KERNELS:
        raise ValueError(f"kernel must be one of {PROJECTION_KERNELS}, got {kernel!r}")
    block_t = projection_block_t(n_heads)
    if TRITON_INTERPRET:
        return _config(4, 3, BLOCK_M=64, BLOCK_T=block_t, BLOCK_K=64)
    if kernel == "bwd_weight":
        # The dW dot is dzᵀ h: heads are its M side, and wgmma (sm_90) needs M >= 64. The kernel
        # streams h once and is memory bound, so padding T = 8 to 64 zero rows costs no time.
        block_t = max(64, block_t)
    # BLOCK_M = 64: one wgmma row group per four warps. Unaligned h (odd H or row stride) loads
    # element by element, which costs registers: 32 columns per step, two warp groups from T = 64.
    block_k, warps = 32, (8 if block_t >= 64 else 4)
    if not (hidden_dtype == weight_dtype and hidden_dtype in (torch.float16, torch.bfloat16)) and block_t >= 128:
        # fp32 dots (tf32x3 splits each operand in two; ieee keeps them in registers) on the widest T.
        block_k = 16
    return _config(warps, 3, BLOCK_M=64, BLOCK_T=block_t, BLOCK_K=block_k)


# ----------------------------------------------------------------------------- launching
Grid = tuple[int, ...] | Callable[[dict], tuple[int, ...]]


@functools.cache
def _autotuner(kernel, configs: tuple[LaunchConfig, ...], tune_key: tuple[str, ...], tune_bucket: tuple):
    """One ``triton.autotune`` wrapper per kernel, candidate set and problem bucket: Triton keys
    its cache on argument values (and dtypes); the bucket groups values that should share it."""
    del tune_bucket  # part of the cache key only
    return triton.autotune(configs=[c.to_triton() for c in configs], key=list(tune_key))(kernel)


def launch(kernel, grid: Grid, configs: tuple[LaunchConfig, ...], *args,
           tune_key: tuple[str, ...] = (), tune_bucket: tuple = (), **constexprs) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` with one of ``configs``.

    ``grid`` is a tuple, or a function of the launch's meta-parameters (so it can read the
    chosen BLOCK_* sizes). With several candidates on CUDA the fastest is chosen by
    ``triton.autotune`` (keyed on ``tune_key`` arguments and dtypes, per ``tune_bucket``);
    otherwise, and under the interpreter, the first one runs.
    """
    if len(configs) > 1 and AUTOTUNE:
        _autotuner(kernel, tuple(configs), tuple(tune_key), tuple(tune_bucket))[grid](*args, **constexprs)
        return
    kernel[grid](*args, **constexprs, **configs[0].kwargs())
