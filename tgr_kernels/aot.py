"""``python -m tgr_kernels.aot``: the static GPU proof of every Triton kernel of tgr_kernels.

Triton compiles for a CUDA target on a machine without a GPU. This command compiles every kernel
with every launch configuration the dispatcher can choose, for sm_90 (H100/H200), sm_80 (A100)
and sm_86 (the cards with 99 KiB of shared memory per block: RTX 30/40, A10, L4, L40S, which get
their own tiles), and reads from each cubin what a GPU would run:

- registers per thread and stack bytes (spills), from ``cuobjdump --dump-resource-usage``;
- shared memory (Triton's dynamic allocation plus any static), against the per-block limit
  (227 KB = 232448 B on sm_90, 163 KB = 166912 B on sm_80, 99 KB = 101376 B on sm_86);
- the tensor-core instructions in the SASS (``nvdisasm``): HGMMA (wgmma) on sm_90, HMMA on
  sm_80 and sm_86, checked against the kernel's ``tl.dot`` operations (from its TTIR), and how each dot
  was lowered (from its TTGIR: wgmma, mma.sync or scalar FMAs).

It fails (exit status 1) on a compile error, shared memory over the limit, any spill (in any
kernel, whatever its dtype), a kernel with half-precision (or tf32) dots but none of the
architecture's tensor-core instruction, or any such dot lowered to FMAs. On sm_90 a dot whose tile
cannot take wgmma (fewer than 64 rows per warp group) runs as HMMA (mma.sync) beside the kernel's
wgmma dots: on tensor cores, so it passes, and the table lists it ("wgmma k of n dots"). It
writes ``table.md`` and ``records.json``.

Nothing is listed by hand: the launches come from the launchers themselves. Each launcher
(``flash_forward``, ``flash_backward``, ``_triton_rows_forward``/``_backward``, the projection's
``_launch_*``) is called on small CPU tensors with every JIT kernel's ``run`` replaced by a
recorder, so nothing executes; the recorded arguments go through Triton's own binder, giving
the exact signature, divisibility specialisation, constexprs, warps and stages that a launch
on a GPU compiles. Where a launcher would autotune, the recorder takes every candidate. The
input domain (head dims 1..256, row lengths, temperature heads, dtypes, masks, flags) is
covered by probing the configuration functions of ``_configs`` over it and taking one
representative of each distinct configuration.
"""
from __future__ import annotations

import os
import sys

from ._interpreter import rerun_without_interpreter

if __name__ == "__main__":
    # The proof needs real JIT functions; the interpreter replaces them. Re-run without it.
    rerun_without_interpreter("tgr_kernels.aot", sys.argv[1:])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from . import _configs, attention_decode, attention_flash, attention_wide  # noqa: E402
from ._backend import TRITON_INTERPRET, cpu_name, triton_dot_precision, usable_cpu_cores  # noqa: E402
from ._gate import GATE_STRAIGHT_THROUGH, Gate  # noqa: E402

# The package exports a function of the same name, so fetch the module itself.
temperature_projection = importlib.import_module(f"{__package__ or 'tgr_kernels'}.temperature_projection")
linear_cross_entropy = importlib.import_module(f"{__package__ or 'tgr_kernels'}.linear_cross_entropy")

# ----------------------------------------------------------------------------- targets and checks
# (compute capability, shared memory per block (opt-in maximum), tensor-core SASS instruction)
ARCHES = {
    "sm_90": (90, 232448, "HGMMA"),
    "sm_80": (80, 166912, "HMMA"),
    "sm_86": (86, 101376, "HMMA"),
}
DEFAULT_OUT = os.path.join("benchmarks", "results", "static-proof")
KERNEL_MODULES = (attention_flash, attention_decode, attention_wide, temperature_projection, linear_cross_entropy)
# Kernel families, for the table: kernel name -> family.
FAMILIES = {
    "_flash_fwd_kernel": "flash fwd",
    "_flash_bwd_dkdv_kernel": "flash bwd dK/dV",
    "_flash_bwd_dq_kernel": "flash bwd dQ/dt",
    "_wide_softmax_fwd_kernel": "wide rows fwd",
    "_wide_softmax_bwd_kernel": "wide rows bwd",
    "_projection_forward_kernel": "projection fwd",
    "_projection_backward_rows_kernel": "projection bwd dh",
    "_projection_backward_weight_kernel": "projection bwd dW",
    "_lce_rows_kernel": "linear CE rows",
    "_lce_vocab_block_grad_kernel": "linear CE dW blocks",
    "_decode_split_kernel": "decode split",
    "_decode_combine_kernel": "decode combine",
}
_HALF_TYPES = ("fp16", "bf16")
_TENSOR_CORE_PRECISIONS = ("tf32", "tf32x3")
_BIN_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str) -> str:
    return os.path.join(_BIN_DIR, name)


def ptxas_version() -> str:
    out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"{found.group(1)} ({found.group(2)})" if found else out.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- capturing launches
@dataclass
class Launch:
    """One recorded kernel launch: what the launcher passed, and which candidate it was."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    candidate: int
    n_candidates: int
    arch: str
    scenario: dict = field(default_factory=dict)


def jit_kernels() -> dict[str, JITFunction]:
    """Every @triton.jit kernel (not helper) of the kernel modules, by name."""
    found = {}
    for module in KERNEL_MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name in FAMILIES:
                found[name] = obj
    # A new kernel must get a family here, or the proof would silently leave it out.
    unknown = [name for module in KERNEL_MODULES for name, obj in vars(module).items()
               if isinstance(obj, JITFunction) and name.endswith("_kernel") and name not in FAMILIES]
    if unknown:
        raise RuntimeError(f"kernels without a family in tgr_kernels.aot.FAMILIES: {unknown}")
    return found


class _EveryCandidate:
    """Stands in for the autotuner: launches every candidate in turn (each is recorded)."""

    def __init__(self, kernel, configs):
        self.kernel, self.configs = kernel, configs

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            for config in self.configs:
                self.kernel[grid](*args, **kwargs, **config.kwargs())
        return run


@contextlib.contextmanager
def capture(arch: str) -> Iterator[list[Launch]]:
    """Within the block, kernel launches are recorded instead of run (nothing executes), and the
    launchers choose their configurations as on a GPU of ``arch``."""
    if TRITON_INTERPRET:
        raise RuntimeError("the static proof needs TRITON_INTERPRET unset before triton is imported "
                           "(run `python -m tgr_kernels.aot`, which re-executes itself without it)")
    launches: list[Launch] = []
    state = {"configs": None}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            configs = state["configs"] or ()
            index = next((i for i, c in enumerate(configs)
                          if all(kwargs.get(k) == v for k, v in c.kwargs().items())), -1)
            launches.append(Launch(kernel, args, dict(kwargs), index, len(configs), arch))
        return run

    real_launch, real_autotuner, real_autotune = _configs.launch, _configs._autotuner, _configs.AUTOTUNE
    real_arch = _configs.device_arch

    def launch(kernel, grid, configs, *args, **kwargs):
        state["configs"] = tuple(configs)
        try:
            real_launch(kernel, grid, configs, *args, **kwargs)
        finally:
            state["configs"] = None

    kernels = jit_kernels()
    for kernel in kernels.values():
        kernel.run = recorder(kernel)  # an instance attribute shadows JITFunction.run
    _configs.launch = launch
    _configs._autotuner = lambda kernel, configs, key, bucket: _EveryCandidate(kernel, configs)
    _configs.AUTOTUNE = True
    _configs.device_arch = lambda device: ARCHES[arch][0]
    try:
        yield launches
    finally:
        for kernel in kernels.values():
            kernel.__dict__.pop("run", None)
        _configs.launch, _configs._autotuner, _configs.AUTOTUNE = real_launch, real_autotuner, real_autotune
        _configs.device_arch = real_arch


def record(call: Callable[[], object], arch: str, **scenario) -> list[Launch]:
    """The launches that ``call`` (a launcher on CPU tensors) makes for ``arch``, labelled with
    ``scenario``."""
    with capture(arch) as launches:
        call()
    for launch_ in launches:
        launch_.scenario = dict(scenario)
    return launches


# ----------------------------------------------------------------------------- the input domain
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Precision:
    """A dtype of the data and whether PyTorch allows TF32 (which changes fp32 dots)."""

    dtype: torch.dtype
    allow_tf32: bool = False

    @property
    def name(self) -> str:
        return DTYPE_NAMES[self.dtype] + ("+tf32" if self.allow_tf32 else "")

    @contextlib.contextmanager
    def active(self):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev


ATTENTION_PRECISIONS = (Precision(torch.float16), Precision(torch.bfloat16), Precision(torch.float32),
                        Precision(torch.float32, allow_tf32=True))


def representatives(domain: Sequence[int], config_of: Callable[[int], object]) -> list[tuple[int, int]]:
    """One (aligned, odd) pair of values per distinct configuration over ``domain``: the largest
    multiple of 16 (or largest value) and the largest odd value that give that configuration.
    Integer arguments divisible by 16 are specialised by Triton, so both kinds are compiled."""
    groups: dict[object, list[int]] = {}
    for value in domain:
        groups.setdefault(config_of(value), []).append(value)
    reps = []
    for values in groups.values():
        aligned = [v for v in values if v % 16 == 0] or values
        odd = [v for v in values if v % 2 == 1] or values
        reps.append((max(aligned), max(odd)))
    return sorted(reps)


def largest_per_group(domain: Sequence[int], config_of: Callable[[int], object]) -> list[int]:
    """The largest value of ``domain`` per distinct configuration (the most registers and shared
    memory that configuration meets), ascending."""
    groups: dict[object, int] = {}
    for value in domain:
        key = config_of(value)
        groups[key] = max(groups.get(key, value), value)
    return sorted(groups.values())


def _flash_group(head_dim: int):
    keys = []
    for precision in ATTENTION_PRECISIONS:
        with precision.active():
            dot = triton_dot_precision(precision.dtype)
        keys.append(tuple(
            _configs.flash_configs(k, head_dim, precision.dtype,
                                   _configs.flash_dot_precision(k, head_dim, precision.dtype, dot, cc), cc)
            for k in _configs.FLASH_KERNELS for cc, _, _ in ARCHES.values()))
    return _configs.flash_block_d(head_dim), tuple(keys)


# The dtypes an additive mask reaches the kernels in: the op takes any floating mask as it is
# (``_validation._split_mask``; a bool 3-/4-D mask becomes an fp32 one), so besides q's dtype and
# fp32 a float64 mask and a half mask of the other half dtype are launched. t̄ is fp32, and fp64
# for an fp64 temperature without GSoT (``attention._gated_in_fp32`` rounds it only for a gate).
BIAS_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
T_BAR_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
_MASK_DTYPE_VARIANTS = (dict(bias_dtype="fp32"), dict(bias_dtype="fp64"), dict(bias_dtype="fp16"),
                        dict(bias_dtype="bf16"), dict(gsot=False, t_bar="fp64"))

# Mask and flag settings: every flag on (the base) with each mask a call can pass (BASE_MASKS: one
# attn_mask is a key-padding mask or an additive bias, never both: ``_validation._split_mask``),
# then each varied alone. "gqa": grouped-query attention (2 query heads on 1 k/v head), whose dK/dV
# kernel loops over the group at run time; without it the group size is 1, a constant to the compiler.
BASE_MASKS = ("bias", "kpm")
FLASH_BASE = dict(mask="bias", bias_dtype="q", t_bar="fp32", causal=True, gsot=True, need_dq=True, need_dkv=True,
                  gqa=True, odd=False)
FLASH_VARIANT_DTYPES = ("bf16", "fp32+tf32")
FLASH_VARIANTS = (dict(mask="none"), *_MASK_DTYPE_VARIANTS,
                  dict(causal=False), dict(gsot=False), dict(need_dq=False), dict(gqa=False))
WIDE_BASE = dict(mask="bias", bias_dtype="q", t_bar="fp32", causal=True, gsot=True, store_p=True, store_g=True,
                 odd=False)
WIDE_VARIANT_DTYPES = ("bf16", "fp32")
WIDE_VARIANTS = (dict(mask="none"), *_MASK_DTYPE_VARIANTS,
                 dict(causal=False), dict(gsot=False), dict(store_p=False), dict(store_p=False, store_g=False))
# The dtype mixes of (hidden, weight): the model's fp32 head on bf16/fp16 hidden states, fp32,
# and one dtype throughout (every size class and flag variant below), then every other pair the
# op takes (fp32 hidden states on a half head, one half on the other: dots in fp32).
PROJECTION_MIXES = ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
                    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                    (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16))


def projection_precisions() -> list[tuple[torch.dtype, torch.dtype, bool]]:
    """(hidden dtype, weight dtype, TF32 allowed): each mix with TF32 off (PyTorch's default), and
    with TF32 allowed where that changes the kernels' dot precision (fp32 dots: "tf32" instead of
    "ieee" or "tf32x3")."""
    out = []
    for hidden_dtype, weight_dtype in PROJECTION_MIXES:
        precisions = []
        for allow_tf32 in (False, True):
            with Precision(torch.float32, allow_tf32).active():
                precision = temperature_projection._precision(hidden_dtype, weight_dtype)
            if precision not in precisions:
                precisions.append(precision)
                out.append((hidden_dtype, weight_dtype, allow_tf32))
    return out


def projection_mix_name(hidden_dtype: torch.dtype, weight_dtype: torch.dtype, allow_tf32: bool) -> str:
    return f"{DTYPE_NAMES[hidden_dtype]} h, {DTYPE_NAMES[weight_dtype]} W" + (" +tf32" if allow_tf32 else "")


PROJECTION_BASE = dict(bias=True, save_sigma=True, store_grad_logits=True, hidden_grad=True, odd=False)
PROJECTION_VARIANT_DTYPES = ("bf16 h, fp32 W", "bf16 h, bf16 W")
PROJECTION_VARIANTS = (dict(bias=False), dict(save_sigma=False), dict(store_grad_logits=False),
                       dict(hidden_grad=False))


# Where the one-at-a-time variants are compiled. Every candidate of every size class, dtype and arch
# is compiled with every flag on and each mask; the variants (odd sizes of an aligned class, each flag varied
# alone) change loads and masks, not tiles, so they are compiled for the default candidate on the
# primary target only, and the flag variants only at a family's largest size and for the dtypes in
# its *_VARIANT_DTYPES (a half-precision one, whose spills are gated, and an fp32 or mixed one): this
# keeps the proof within a CI job's time on two cores.
PRIMARY_ARCH = "sm_90"


def _settings(base: dict, variants: Sequence[dict], arch: str, full: bool, odd_sizes: bool,
              flags: bool) -> list[dict]:
    """Every flag on with aligned sizes (with each of BASE_MASKS where the kernel takes masks), for
    every candidate; on ``PRIMARY_ARCH`` (with ``full``) and for the default candidate, odd sizes
    (``odd_sizes``) and each flag varied alone (``flags``)."""
    out = _every_candidate(base)
    if full and arch == PRIMARY_ARCH:
        if odd_sizes:
            out += [dict(setting, odd=True, all_candidates=False) for setting in _every_candidate(base)]
        if flags:
            out += [{**base, **v, "all_candidates": False} for v in variants]
    return out


def _every_candidate(base: dict) -> list[dict]:
    """The all-candidate settings of ``base``: one per mask of BASE_MASKS where it has a mask."""
    if "mask" not in base:
        return [dict(base, all_candidates=True)]
    return [dict(base, mask=mask, all_candidates=True) for mask in BASE_MASKS]


def _keep(launches: list[Launch], setting: dict) -> list[Launch]:
    """All recorded candidates, or only the default one."""
    return launches if setting["all_candidates"] else [launch_ for launch_ in launches if launch_.candidate <= 0]


def _masks(mask: str, bias_dtype: str, dtype, B, H, S_q, S_k):
    key_padding = additive = None
    if "kpm" in mask:
        key_padding = torch.ones(B, S_k, dtype=torch.bool)
    if "bias" in mask:
        additive = torch.zeros(B, 1, S_q, S_k, dtype=dtype if bias_dtype == "q" else BIAS_DTYPES[bias_dtype])
    return key_padding, additive


def flash_launches(arch: str, full: bool = True) -> list[Launch]:
    """Forward and backward launches of the flash path over head dims 1..FLASH_MAX_HEAD_DIM: the
    largest head dim of each distinct (BLOCK_D, candidate list). Head dims that are not multiples
    of 16 are padded to one by the launchers, so the largest of each group is a multiple of 16."""
    launches = []
    head_dims = largest_per_group(range(1, attention_flash.FLASH_MAX_HEAD_DIM + 1), _flash_group)
    largest = max(head_dims)
    # The largest head dim with each candidate list (the bucket's largest BLOCK_D).
    by_candidates: dict[object, int] = {}
    for head_dim in head_dims:
        key = _flash_group(head_dim)[1]
        by_candidates[key] = max(by_candidates.get(key, head_dim), head_dim)
    bucket_largest = set(by_candidates.values())
    for precision in ATTENTION_PRECISIONS:
        for head_dim in head_dims:
            if head_dim not in bucket_largest:
                # A smaller BLOCK_D of a bucket (same candidates, smaller tiles): every candidate
                # with every flag on, on each target (the dispatcher launches each of them there).
                settings = _every_candidate(FLASH_BASE)
            else:
                # Odd S (unaligned mask and bias rows) as a variant; the flags vary at the largest D.
                settings = _settings(FLASH_BASE, FLASH_VARIANTS, arch, full, odd_sizes=True,
                                     flags=head_dim == largest and precision.name in FLASH_VARIANT_DTYPES)
            for s in settings:
                D, S = head_dim, (97 if s["odd"] else 128)
                B, H = 1, 2
                H_kv = 1 if s["gqa"] else H
                q = torch.zeros(B, H, S, D, dtype=precision.dtype)
                k, v = (torch.zeros(B, H_kv, S, D, dtype=precision.dtype) for _ in range(2))
                t_bar = torch.full((B, S), 0.5, dtype=T_BAR_DTYPES[s["t_bar"]])
                key_padding, additive = _masks(s["mask"], s["bias_dtype"], precision.dtype, B, H, S, S)
                gsot = Gate(0.1, GATE_STRAIGHT_THROUGH) if s["gsot"] else None
                scale = D ** -0.5
                label = dict(dtype=precision.name, D=D, S=S, **{k: s[k] for k in FLASH_BASE})
                with precision.active():
                    launches += _keep(record(lambda: attention_flash.flash_forward(
                        q, k, v, t_bar, key_padding, additive, s["causal"], gsot, scale), arch, **label), s)
                    lse = torch.zeros(B, H, S)
                    launches += _keep(record(lambda: attention_flash.flash_backward(
                        q, k, v, t_bar, key_padding, additive, s["causal"], gsot, scale, lse,
                        torch.zeros_like(q), need_dq=s["need_dq"], need_dkv=s["need_dkv"]), arch, **label), s)
    return launches


def wide_launches(arch: str, full: bool = True) -> list[Launch]:
    """The wide path's row kernels over row lengths 1..16384 (longer rows share the last block)."""
    launches = []
    reps = representatives(range(1, (1 << 14) + 1), _configs.wide_row_config)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for aligned_n, odd_n in reps:
            # The flags are varied at the largest size (the most registers and shared memory).
            for s in _settings(WIDE_BASE, WIDE_VARIANTS, arch, full, odd_sizes=True,
                               flags=(aligned_n, odd_n) == reps[-1] and DTYPE_NAMES[dtype] in WIDE_VARIANT_DTYPES):
                n_cols = odd_n if s["odd"] else aligned_n
                B, H, M = 1, 1, 2
                S_q, S_k = M, n_cols
                z, dp = torch.zeros(B, H, M, n_cols, dtype=dtype), torch.zeros(B, H, M, n_cols, dtype=dtype)
                t_bar = torch.full((B, S_q), 0.5, dtype=T_BAR_DTYPES[s["t_bar"]])
                lse, dt = torch.zeros(B, H, S_q), torch.zeros(B, H, S_q)
                key_padding, additive = _masks(s["mask"], s["bias_dtype"], dtype, B, H, S_q, S_k)
                gsot = Gate(0.1, GATE_STRAIGHT_THROUGH) if s["gsot"] else None
                label = dict(dtype=DTYPE_NAMES[dtype], n_cols=n_cols, **{k: s[k] for k in WIDE_BASE})
                launches += _keep(record(lambda: attention_wide._triton_rows_forward(
                    z, 0, t_bar, key_padding, additive, s["causal"], gsot, 0.1, lse, S_q, S_k), arch, **label), s)
                launches += _keep(record(lambda: attention_wide._triton_rows_backward(
                    z, dp, 0, t_bar, key_padding, additive, s["causal"], gsot, 0.1, lse, dt, S_q, S_k,
                    store_p=s["store_p"], store_g=s["store_g"]), arch, **label), s)
    return launches


def _projection_group(n_heads: int):
    return tuple(_configs.projection_config(k, n_heads, h, w)
                 for k in _configs.PROJECTION_KERNELS for h, w in PROJECTION_MIXES)


# The mixes compiled in every setting, TF32 allowed or not (the rest with every flag on, at aligned
# sizes, on each target).
PROJECTION_FULL_MIXES = tuple(m + tf32 for m in ("bf16 h, fp32 W", "fp16 h, fp32 W", "fp32 h, fp32 W")
                              for tf32 in ("", " +tf32")) + ("bf16 h, bf16 W", "fp16 h, fp16 W")


def projection_launches(arch: str, full: bool = True) -> list[Launch]:
    """The projection's three kernels over 1..MAX_TEMPERATURE_HEADS heads and the dtype mixes."""
    launches = []
    reps = representatives(range(1, temperature_projection.MAX_TEMPERATURE_HEADS + 1), _projection_group)
    for hidden_dtype, weight_dtype, allow_tf32 in projection_precisions():
        for aligned_t, odd_t in reps:
            # The flags are varied at the largest size (the most registers and shared memory).
            mix = projection_mix_name(hidden_dtype, weight_dtype, allow_tf32)
            for s in _settings(PROJECTION_BASE, PROJECTION_VARIANTS, arch, full and mix in PROJECTION_FULL_MIXES,
                               odd_sizes=True,
                               flags=(aligned_t, odd_t) == reps[-1] and mix in PROJECTION_VARIANT_DTYPES):
                T, N, Hd = (odd_t, 97, 4095) if s["odd"] else (aligned_t, 256, 4096)
                hidden = torch.zeros(N, Hd, dtype=hidden_dtype)
                weight = torch.zeros(T, Hd, dtype=weight_dtype)
                bias = torch.zeros(T, dtype=weight_dtype) if s["bias"] else None
                out_dtype = torch.promote_types(hidden_dtype, weight_dtype)
                grad_out = torch.zeros(N, T, dtype=out_dtype)
                sigma = torch.zeros(N, T)
                label = dict(dtype=mix, T=T, H=Hd, **{k: s[k] for k in PROJECTION_BASE})
                with Precision(torch.float32, allow_tf32).active():
                    launches += _keep(record(lambda: temperature_projection._launch_forward(
                        hidden, weight, bias, 0.01, 0.99, save_sigma=s["save_sigma"]), arch, **label), s)
                    launches += _keep(record(lambda: temperature_projection._launch_backward_rows(
                        grad_out, sigma, weight, hidden_dtype, 0.01, 0.99,
                        store_grad_logits=s["store_grad_logits"], hidden_grad=s["hidden_grad"]), arch, **label), s)
                    launches += _keep(record(lambda: temperature_projection._launch_backward_weight(
                        torch.zeros(N, T), hidden, weight_dtype), arch, **label), s)
    return launches


def lce_launches(arch: str, full: bool = True) -> list[Launch]:
    """The linear cross-entropy kernels on the logits they read: fp32 (fp32 inputs) or the half
    GEMM's own fp16/bf16 output. The row kernel over vocabularies aligned and odd, loss only or
    loss and gradient, one scale for all rows or one per row, an ignore index that fits int32 and
    the int64 "none"; the vocabulary-block gradient kernel over aligned and odd blocks."""
    launches = []
    rows = 64
    for dtype in (torch.float32, torch.bfloat16, torch.float16) if full else (torch.float32, torch.bfloat16):
        for n_vocab in ((32000, 32001) if full else (32000,)):
            for write_grad in (True, False):
                for per_row_scale in (False, True):
                    for ignore_index in (-100, linear_cross_entropy._NO_IGNORE):
                        scale = torch.ones(rows) if per_row_scale else torch.ones(()).expand(rows)
                        launches += record(lambda: linear_cross_entropy._triton_rows(
                            torch.zeros(rows, n_vocab, dtype=dtype), torch.zeros(rows, dtype=torch.long), scale,
                            ignore_index, write_grad), arch, dtype=DTYPE_NAMES[dtype], V=n_vocab,
                            write_grad=write_grad, per_row_scale=per_row_scale, ignore_index=ignore_index)
            launches += record(lambda: linear_cross_entropy._triton_vocab_block_grad(
                torch.zeros(rows, n_vocab, dtype=dtype), torch.zeros(rows, dtype=torch.long), torch.ones(rows),
                torch.zeros(rows), 1000), arch, dtype=DTYPE_NAMES[dtype], V_block=n_vocab)
    return launches


def _decode_group(head_dim: int):
    return _configs.flash_block_d(head_dim), _configs.decode_config(head_dim)


# The decode kernels' products are tl.sum reductions (one query row), so the gate has no dot to hold
# to tensor cores there; registers, spills and shared memory are checked as everywhere. Base: one
# query row (Triton specialises an integer equal to 1), a kv head per query head, a cache split
# over several chunks; the odd variant: odd D and S_k, 3 query rows, two query heads per kv head;
# "short": a cache of one chunk (num_splits = 1, also specialised).
DECODE_BASE = dict(mask="bias", bias_dtype="q", t_bar="fp32", causal=True, gsot=True, short=False, odd=False)
DECODE_VARIANT_DTYPES = ("bf16", "fp32")
DECODE_VARIANTS = (dict(mask="none"), dict(mask="kpm"), dict(mask="bias"), *_MASK_DTYPE_VARIANTS,
                   dict(causal=False), dict(gsot=False), dict(short=True))


def decode_launches(arch: str, full: bool = True) -> list[Launch]:
    """The decode path's split and combine kernels over head dims 1..FLASH_MAX_HEAD_DIM: an aligned
    and an odd head dim per distinct configuration; fp16, bf16, fp32 (no dots, so TF32 changes
    nothing)."""
    launches = []
    reps = representatives(range(1, attention_flash.FLASH_MAX_HEAD_DIM + 1), _decode_group)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for aligned_d, odd_d in reps:
            for s in _settings(DECODE_BASE, DECODE_VARIANTS, arch, full, odd_sizes=True,
                               flags=(aligned_d, odd_d) == reps[-1] and DTYPE_NAMES[dtype] in DECODE_VARIANT_DTYPES):
                D, S_q, H, H_kv = (odd_d, 3, 4, 2) if s["odd"] else (aligned_d, 1, 2, 2)
                S_k = 48 if s["short"] else (4095 if s["odd"] else 4096)
                B = 1
                q = torch.zeros(B, H, S_q, D, dtype=dtype)
                k, v = (torch.zeros(B, H_kv, S_k, D, dtype=dtype) for _ in range(2))
                t_bar = torch.full((B, S_q), 0.5, dtype=T_BAR_DTYPES[s["t_bar"]])
                key_padding, additive = _masks(s["mask"], s["bias_dtype"], dtype, B, H, S_q, S_k)
                gsot = Gate(0.1, GATE_STRAIGHT_THROUGH) if s["gsot"] else None
                label = dict(dtype=DTYPE_NAMES[dtype], D=D, S_q=S_q, S_k=S_k, **{k: s[k] for k in DECODE_BASE})
                launches += _keep(record(lambda: attention_decode.decode_forward(
                    q, k, v, t_bar, key_padding, additive, s["causal"], gsot, D ** -0.5), arch, **label), s)
        # The combine kernel's BLOCK_S is num_splits rounded up to a power of two: every one up to
        # DECODE_MAX_SPLITS (and a split count that is not one), at the largest head dim. One query
        # row of two heads against S_k = n chunks of DECODE_MIN_CHUNK_BLOCKS key blocks: n splits.
        D = reps[-1][0]
        block_n = _configs.decode_config(D)["BLOCK_N"]
        for n_splits in DECODE_SPLIT_COUNTS:
            S_k = n_splits * _configs.DECODE_MIN_CHUNK_BLOCKS * block_n
            q = torch.zeros(1, 2, 1, D, dtype=dtype)
            k = v = torch.zeros(1, 2, S_k, D, dtype=dtype)
            t_bar = torch.full((1, 1), 0.5)
            label = dict(dtype=DTYPE_NAMES[dtype], D=D, S_q=1, S_k=S_k, splits=n_splits, **DECODE_BASE)
            launches += [launch_ for launch_ in record(lambda: attention_decode.decode_forward(
                q, k, v, t_bar, None, None, False, Gate(0.1, GATE_STRAIGHT_THROUGH), D ** -0.5), arch, **label)
                if launch_.kernel is attention_decode._decode_combine_kernel]
    return launches


# Split counts whose combine launches the proof compiles: each power of two up to DECODE_MAX_SPLITS
# (each BLOCK_S; 1 is specialised by Triton, multiples of 16 too) and the largest count that is not.
DECODE_SPLIT_COUNTS = (*(1 << p for p in range(_configs.DECODE_MAX_SPLITS.bit_length())),
                       _configs.DECODE_MAX_SPLITS - 1)


FAMILY_LAUNCHES = {"flash": flash_launches, "wide": wide_launches, "projection": projection_launches,
                   "lce": lce_launches, "decode": decode_launches}


# ----------------------------------------------------------------------------- compiling
def compile_job(launch_: Launch) -> dict:
    """What Triton's launcher would compile for ``launch_`` on its arch: the binder's
    signature, constexprs, attributes (divisibility) and options, ready for ``triton.compile``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, arch = launch_.kernel, launch_.arch
    target = GPUTarget("cuda", ARCHES[arch][0], 32)
    backend = make_backend(target)
    kwargs = dict(launch_.kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch_.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    job = dict(module=kernel.fn.__module__, name=kernel.fn.__name__, arch=arch,
               signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__)
    job["key"] = json.dumps([job["module"], job["name"], arch, sorted(signature.items()),
                             sorted((str(k), repr(v)) for k, v in constexprs.items()),
                             sorted((str(k), repr(v)) for k, v in attrs.items()),
                             sorted((k, repr(v)) for k, v in job["options"].items())])
    return job


_DOT = re.compile(r"tt\.dot\s.*?(?:inputPrecision\s*=\s*(\w+)\s*)?:\s*tensor<([\dx]+)x(\w+)>\s*\*\s*"
                  r"tensor<([\dx]+)x(\w+)>")
_TYPE_NAMES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32", "f64": "fp64"}


def dots_of(ttir: str) -> list[dict]:
    """The tl.dot operations of a kernel: operand shapes, element types, input precision."""
    dots = []
    for line in ttir.splitlines():
        found = _DOT.search(line)
        if found:
            precision, a_shape, a_type, b_shape, b_type = found.groups()
            dots.append(dict(a=f"{a_shape}x{_TYPE_NAMES.get(a_type, a_type)}",
                             b=f"{b_shape}x{_TYPE_NAMES.get(b_type, b_type)}",
                             types=sorted({_TYPE_NAMES.get(a_type, a_type), _TYPE_NAMES.get(b_type, b_type)}),
                             precision=precision or "ieee"))
    return dots


_TTGIR_DOT = re.compile(r"\btt\.dot\s.*?(?:inputPrecision\s*=\s*(\w+)\s*)?:\s*tensor<[\dx]+x(\w+),\s*"
                        r"#ttg\.dot_op<\{opIdx = 0, parent = #(\w+?)\d*[,}]")


def dot_lowering_of(ttgir: str) -> dict:
    """How each ``tl.dot`` was lowered (from the TTGIR): ``wgmma`` (Hopper warp-group MMA, HGMMA),
    ``mma`` (mma.sync, HMMA), ``fma`` (scalar FMAs), and ``fma_tensor_core``: the FMA dots of
    fp16/bf16 operands or tf32 precision, which should have run on tensor cores. (SASS counts
    instructions per kernel, so a kernel with one dot on tensor cores and another on FMAs would
    pass a check of the SASS alone.)"""
    out = dict(wgmma=0, mma=0, fma=0, fma_tensor_core=0)
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            out["wgmma"] += 1
            continue
        found = _TTGIR_DOT.search(line)
        if not found:
            continue
        precision, element, parent = found.groups()
        if parent == "mma":
            out["mma"] += 1
        else:
            out["fma"] += 1
            if _TYPE_NAMES.get(element, element) in _HALF_TYPES or precision in _TENSOR_CORE_PRECISIONS:
                out["fma_tensor_core"] += 1
    return out


def resources_of(cubin: bytes, name: str) -> dict:
    """Registers, stack and static shared memory (cuobjdump), tensor-core instructions (nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not found:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump's output:\n{usage}")
    reg, stack, shared, local = (int(x) for x in found.groups())
    counts = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA", "FFMA")}
    return dict(registers=reg, stack=stack, local=local, shared_static=shared, sass=counts)


def run_compile(job: dict) -> dict:
    """Compile one job (in a worker process) and measure it. Never raises: a compiler error is a
    result."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = vars(importlib.import_module(job["module"]))[job["name"]]
    start = time.perf_counter()
    result = dict(key=job["key"])
    try:
        compiled = triton.compile(ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"]),
                                  target=GPUTarget("cuda", ARCHES[job["arch"]][0], 32), options=job["options"])
        result["compile_s"] = round(time.perf_counter() - start, 3)
        result.update(resources_of(compiled.asm["cubin"], job["name"]))
        result["shared_dynamic"] = int(compiled.metadata.shared)
        result["dots"] = dots_of(compiled.asm["ttir"])
        result["dot_lowering"] = dot_lowering_of(compiled.asm["ttgir"])
        result["error"] = None
    except Exception as exc:  # the compiler's error is the finding
        result["compile_s"] = round(time.perf_counter() - start, 3)
        result["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
    return result


def check(rec: dict) -> list[str]:
    """The gate: why this compiled kernel fails, or [] when it passes."""
    if rec["error"]:
        return ["compile error"]
    failures = []
    limit = ARCHES[rec["arch"]][1]
    shared = rec["shared_dynamic"] + rec["shared_static"]
    if shared > limit:
        failures.append(f"shared memory {shared} B > {limit} B")
    if rec["stack"] > 0:
        # A spill goes to local memory (L1, else DRAM) on every access in the kernel's loop.
        failures.append(f"spills {rec['stack']} B")
    instruction = ARCHES[rec["arch"]][2]
    if rec["tensor_core_dots"] and rec["sass"][instruction] == 0:
        failures.append(f"{'/'.join(rec['tensor_core_dots'])} dot without {instruction}")
    on_fma = (rec.get("dot_lowering") or {}).get("fma_tensor_core", 0)
    if on_fma:
        failures.append(f"{on_fma} fp16/bf16/tf32 dot(s) on FMA (no tensor cores)")
    return failures


def _annotate(rec: dict, job: dict) -> None:
    """Fields derived from the job and the compile: precision class and the gate's verdict."""
    pointer_types = {t[1:] for t in job["signature"].values() if isinstance(t, str) and t.startswith("*")}
    dots = rec.get("dots") or []
    rec["half_precision"] = bool(pointer_types & set(_HALF_TYPES)) or any(
        set(d["types"]) & set(_HALF_TYPES) for d in dots)
    kinds = []
    for d in dots:
        kind = "+".join(t for t in d["types"] if t in _HALF_TYPES) or (
            d["precision"] if d["precision"] in _TENSOR_CORE_PRECISIONS else "")
        if kind and kind not in kinds:
            kinds.append(kind)
    rec["tensor_core_dots"] = kinds
    rec["failures"] = check(rec)
    rec["ok"] = not rec["failures"]


def prove(launches: Sequence[Launch], jobs: int = 1, log=None) -> list[dict]:
    """Compile every distinct launch (for its arch) and return one record per compile."""
    unique: dict[str, dict] = {}
    for launch_ in launches:
        job = compile_job(launch_)
        entry = unique.setdefault(job["key"], dict(job=job, launches=[]))
        entry["launches"].append(launch_)
    entries = list(unique.values())
    # Slow compiles first (fp32 FMA dots, wide tiles), so the pool ends together.
    entries.sort(key=lambda e: -_cost_guess(e["job"]))
    if log:
        log(f"{len(launches)} launches -> {len(entries)} distinct compiles, {jobs} processes")
    started = time.perf_counter()
    if jobs > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            results = list(pool.map(run_compile, [e["job"] for e in entries], chunksize=1))
    else:
        results = [run_compile(e["job"]) for e in entries]
    wall = time.perf_counter() - started
    records = []
    for entry, result in zip(entries, results, strict=True):
        job = entry["job"]
        # One record per dtype label that launches this compile (fp32 with TF32 allowed launches
        # the fp32 ieee kernels where it has no spill-free tf32 tile): each dtype's rows show every
        # kernel it runs. The compile is counted once (``shared_compile`` on the others).
        by_dtype: dict[object, list[Launch]] = {}
        for launch_ in entry["launches"]:
            by_dtype.setdefault(launch_.scenario.get("dtype"), []).append(launch_)
        for index, (dtype, launches_) in enumerate(by_dtype.items()):
            first = launches_[0]
            constexprs = {first.kernel.arg_names[path[0]]: value for path, value in job["constexprs"].items()
                          if isinstance(value, (bool, int, str))
                          and not first.kernel.arg_names[path[0]].startswith("stride")}
            rec = dict(
                family=FAMILIES[job["name"]], kernel=job["name"], arch=job["arch"], dtype=dtype,
                candidate=first.candidate, n_candidates=first.n_candidates,
                num_warps=job["options"]["num_warps"], num_stages=job["options"]["num_stages"],
                maxnreg=job["options"].get("maxnreg"),
                constexprs=constexprs, scenario=first.scenario, launches=len(launches_),
                shared_compile=index > 0,
                **{k: v for k, v in result.items() if k != "key"},
            )
            _annotate(rec, job)
            # The dots' kinds are what the report needs; their shapes follow from the tiles.
            rec["dots"] = sorted({f"{'+'.join(d['types'])} {d['precision']}" for d in rec.get("dots") or []})
            records.append(rec)
    if log:
        times = [r["compile_s"] for r in records if not r["shared_compile"]]
        log(f"compiled in {wall:.0f} s wall; per compile mean {sum(times) / max(1, len(times)):.2f} s, "
            f"max {max(times, default=0):.1f} s")
    return records


def _cost_guess(job: dict) -> float:
    cost = 1.0
    if any(v == "ieee" for v in job["constexprs"].values()):
        cost += 4
    return cost


# ----------------------------------------------------------------------------- the report
TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "BLOCK_D", "BLOCK_V")
FLAG_NAMES = ("HAS_KPM", "HAS_BIAS", "CAUSAL", "HAS_GATE", "STORE_DQ", "STORE_P", "STORE_G",
              "HAS_BIAS", "SAVE_SIGMA", "STORE_GRAD_LOGITS", "HIDDEN_GRAD", "PRECISION", "INPUT_PRECISION",
              "DOT_IN_FP32")


def _tiles(rec: dict) -> str:
    tiles = " ".join(f"{k[6:]}={rec['constexprs'][k]}" for k in TILE_NAMES if k in rec["constexprs"])
    # The kernel re-loads its own tiles at each step (see attention_flash._flash_bwd_dq_kernel);
    # maxnreg: ptxas's register cap, where a configuration sets one.
    tiles += " reload" if rec["constexprs"].get("RELOAD_ROWS") else ""
    return tiles + (f" maxnreg={rec['maxnreg']}" if rec.get("maxnreg") else "")


def _tc(rec: dict) -> str:
    if rec["error"]:
        return "-"
    sass = rec["sass"]
    found = [f"{op}×{sass[op]}" for op in ("HGMMA", "HMMA") if sass[op]]
    lowering = rec.get("dot_lowering") or {}
    if lowering.get("wgmma") and lowering.get("mma"):
        # On sm_90 a dot whose tile cannot take wgmma (fewer than 64 rows per warp group) runs as HMMA.
        found.append(f"wgmma {lowering['wgmma']} of {lowering['wgmma'] + lowering['mma']} dots")
    if not rec["tensor_core_dots"] and not found:
        dots = rec.get("dots") or []
        return "no dot" if not dots else "FMA (ieee fp32)"
    return ", ".join(found) or "none"


def _size(rec: dict) -> str:
    s = rec["scenario"]
    for key in ("D", "n_cols", "T"):
        if key in s:
            return f"{key}={s[key]}"
    return ""


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per family × arch × dtype: worst registers, spill and shared memory, and whether
    every tensor-core dot compiled to tensor cores."""
    rows: dict[tuple, dict] = {}
    for rec in records:
        key = (rec["family"], rec["arch"], rec["dtype"])
        row = rows.setdefault(key, dict(family=rec["family"], arch=rec["arch"], dtype=rec["dtype"], compiles=0,
                                        errors=0, registers=0, spill_max=0, spilling=0, shared_max=0,
                                        tc_dots=0, tc_ok=0, tc_instr=set(), failing=0, dots=0))
        row["compiles"] += 1
        row["failing"] += 0 if rec["ok"] else 1
        if rec["error"]:
            row["errors"] += 1
            continue
        row["registers"] = max(row["registers"], rec["registers"])
        row["spill_max"] = max(row["spill_max"], rec["stack"])
        row["spilling"] += 1 if rec["stack"] else 0
        row["shared_max"] = max(row["shared_max"], rec["shared_dynamic"] + rec["shared_static"])
        row["dots"] += 1 if rec.get("dots") else 0
        if rec["tensor_core_dots"]:
            row["tc_dots"] += 1
            instruction = ARCHES[rec["arch"]][2]
            row["tc_ok"] += 1 if rec["sass"][instruction] else 0
        for op in ("HGMMA", "HMMA"):
            if rec["sass"][op]:
                row["tc_instr"].add(op)
    out = []
    for row in rows.values():
        row["tc_instr"] = "+".join(sorted(row["tc_instr"], reverse=True)) or "-"
        out.append(row)
    order = list(dict.fromkeys(FAMILIES.values()))
    return sorted(out, key=lambda r: (order.index(r["family"]), r["arch"], r["dtype"]))


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def enumeration_text(full: bool) -> str:
    variants = (
        f"Variants, for the default candidate on {PRIMARY_ARCH} only: odd sizes of each aligned size class "
        "(flash: S = 97 at D = 64, 128, 256), and, at each family's largest size, each mask/flag value varied "
        "alone for the "
        f"dtypes {', '.join(FLASH_VARIANT_DTYPES)} (flash), {', '.join(WIDE_VARIANT_DTYPES)} (wide rows), "
        f"{'; '.join(PROJECTION_VARIANT_DTYPES)} (projection). (Tiles and warps do not change with these; "
        "loads and masks do.)" if full else "(--quick: no variants.)")
    return (
        "Enumerated from the launchers (`_configs` probed over the input domain; the largest value of each "
        "distinct configuration, the most registers and shared memory it meets). Every autotuning candidate × "
        "dtype × size class × arch (sm_90, sm_80, sm_86) with every flag on, once with each mask a call can pass "
        "(key padding; an additive bias: one attn_mask is one or the other). " + variants + "\n"
        "- **flash** (forward; backward dK/dV; backward dQ and dt̄): head dims 1..256. Each bucket (D <= 64, "
        "<= 128, <= 256) has one candidate list; head dims that are not multiples of 16 are zero-padded by the "
        "launchers to the next multiple (vector loads), so they launch as aligned ones. Every candidate at "
        "the bucket's largest D (64/128/256 with S = 128), and at the smaller BLOCK_D of the first bucket (D = 16, "
        "32: same candidates, smaller tiles), every flag on. "
        "dtypes fp16, bf16, fp32 (ieee dots), fp32 with TF32 allowed (tf32 dots). Flags: key-padding mask, "
        "additive bias (in q's dtype, fp32, fp64, fp16, bf16), t̄ in fp64 (no GSoT), causal, GSoT gate, "
        "STORE_DQ (dQ stored or only dt̄), dK/dV "
        "launched or not, grouped-query attention (2 query heads per k/v head) or not.\n"
        "- **wide rows** (softmax forward, backward): row lengths 1..16384 → one per BLOCK_N/warps (aligned; "
        "odd as a variant); scores in fp16, bf16, fp32. Flags: masks as above, causal, GSoT, STORE_P/STORE_G "
        "(True/True, False/True, False/False).\n"
        "- **projection** (forward, backward dh, backward dW): temperature heads 1..128 → one per BLOCK_T (T a "
        "power of two with H = 4096, N = 256; odd T with H = 4095, N = 97 as a variant); (hidden, weight) = "
        "bf16+fp32, fp16+fp32 (the model's mixes), fp32+fp32 (each with TF32 off and allowed), bf16+bf16, "
        "fp16+fp16; every other pair (fp32 on a half head, one half on the other, TF32 off and allowed) with "
        "every flag on at aligned sizes. Flags: bias, SAVE_SIGMA, STORE_GRAD_LOGITS, HIDDEN_GRAD.\n"
        "- **decode** (split-KV partials; their combine and the GSoT gate): head dims 1..256, an aligned and an "
        "odd one per BLOCK_D; one query row against 4096 keys (several chunks), and as variants 3 rows with two "
        "query heads per kv head (odd D, 4095 keys) and a one-chunk cache; fp16, bf16, fp32; products are "
        "tl.sum reductions (no tl.dot). Flags: masks as above, causal, GSoT. The combine at the largest D for "
        f"{', '.join(map(str, DECODE_SPLIT_COUNTS))} splits (every BLOCK_S up to {_configs.DECODE_MAX_SPLITS}).\n"
        "- **linear CE rows** (loss, lse, and softmax − onehot in place) and **linear CE dW blocks** (s·(softmax − "
        "onehot) of a vocabulary block from each row's lse): the logits the GEMMs (cuBLAS's) give them, fp32 for "
        "fp32 inputs and the half GEMM's own fp16/bf16 output; 64 rows of V = 32000 (aligned) and 32001 (odd); "
        "loss only or with the gradient, one scale for all rows or one per row, ignore index -100 (int32) and "
        "none (int64).\n"
        "- Launches with the same compile key (signature, specialisation, constexprs, options) are compiled once, "
        "and listed under each dtype that launches them (fp32 with TF32 allowed runs the fp32 ieee kernels where "
        "no tf32 tile is spill-free)."
    )


def write_report(records: Sequence[dict], out_dir: str, meta: dict) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    failing = [r for r in records if not r["ok"]]
    lines = [
        "# Static GPU proof of the tgr_kernels Triton kernels",
        "",
        f"Generated by `python -m tgr_kernels.aot` on {meta['date']} on {meta['machine']} (no GPU): "
        f"triton {meta['triton']}, ptxas {meta['ptxas']}, targets sm_90 (H100/H200, limit 232448 B "
        f"shared per block), sm_80 (A100, limit 166912 B) and sm_86 (RTX 30/40, A10, L4, L40S, limit 101376 B). "
        f"{meta['compiles']} distinct compiles from "
        f"{meta['launches']} recorded launches; {meta['wall_s']:.0f} s wall with {meta['jobs']} processes "
        f"(per compile: mean {meta['compile_mean_s']:.2f} s, max {meta['compile_max_s']:.1f} s).",
        "",
        "Checks (each failure exits non-zero): the kernel compiles; shared memory (dynamic + static) is within "
        "the limit; no spill (stack bytes) in any kernel, whatever its dtype; every fp16/bf16 (or tf32) `tl.dot` "
        "runs on tensor cores (none lowered to FMAs, from the TTGIR), and a kernel with such dots has the "
        "architecture's tensor-core instruction (HGMMA on sm_90, HMMA on sm_80 and sm_86; on sm_90 a dot whose "
        "tile cannot take wgmma runs as HMMA, listed as \"wgmma k of n dots\"). Registers "
        "are per thread (cap 255); spill = STACK bytes from `cuobjdump --dump-resource-usage`.",
        "",
        meta["enumeration"],
        "",
        f"**Verdict: {'PASS' if not failing else f'FAIL ({len(failing)} of {len(records)} records)'}.**",
        "",
        "## Summary: kernel family × arch × dtype (worst case over configurations and variants)",
        "",
        "| family | arch | dtype | compiles | errors | registers (max) | spill (max) | spilling | "
        "shared (max) | tensor cores | failing |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in summarize(records):
        tc = (f"{row['tc_instr']} ({row['tc_ok']}/{row['tc_dots']})" if row["tc_dots"]
              else ("no dot" if not row.get("dots") else ("FMA" if row["tc_instr"] == "-" else row["tc_instr"])))
        lines.append(
            f"| {row['family']} | {row['arch']} | {row['dtype']} | {row['compiles']} | {row['errors']} | "
            f"{row['registers']} | {row['spill_max']} B | {row['spilling']} | {_kb(row['shared_max'])} | {tc} | "
            f"{row['failing']} |")
    lines += [
        "",
        "## Every configuration (worst case over its mask/flag variants)",
        "",
        "| family | arch | dtype | size | tiles | warps | stages | candidate | variants | registers | "
        "spill | shared | tensor cores | verdict |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        key = (rec["family"], rec["arch"], rec["dtype"], _size(rec), _tiles(rec), rec["num_warps"],
               rec["num_stages"])
        groups.setdefault(key, []).append(rec)
    order = list(dict.fromkeys(FAMILIES.values()))

    def sort_key(item):
        (family, arch, dtype, size, tiles, warps, stages), _ = item
        number = int(re.sub(r"\D", "", size) or 0)
        return order.index(family), arch, dtype, number, tiles, warps, stages

    for (family, arch, dtype, size, tiles, warps, stages), recs in sorted(groups.items(), key=sort_key):
        ok = [r for r in recs if not r["error"]]
        worst_reg = max((r["registers"] for r in ok), default=0)
        worst_stack = max((r["stack"] for r in ok), default=0)
        worst_shared = max((r["shared_dynamic"] + r["shared_static"] for r in ok), default=0)
        tcs = sorted({_tc(r) for r in recs})
        reasons = sorted({f for r in recs for f in r["failures"]})
        cand = recs[0]
        candidate = (f"{cand['candidate'] + 1} of {cand['n_candidates']}" if cand["n_candidates"] > 1 else "only")
        verdict = "ok" if not reasons else "**FAIL**: " + "; ".join(reasons)
        lines.append(
            f"| {family} | {arch} | {dtype} | {size} | {tiles} | {warps} | {stages} | {candidate} | {len(recs)} | "
            f"{worst_reg} | {worst_stack} B | {_kb(worst_shared)} | {' / '.join(tcs)} | {verdict} |")
    errors = [r for r in records if r["error"]]
    if errors:
        lines += ["", "## Compiler errors", ""]
        for rec in errors[:20]:
            lines.append(f"- {rec['family']} {rec['arch']} {rec['dtype']} {_tiles(rec)}: `{rec['error'][:300]}`")
    table = os.path.join(out_dir, "table.md")
    with open(table, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    data = os.path.join(out_dir, "records.json")
    with open(data, "w", encoding="utf-8") as f:
        # One record per line: small, and diffs line up with compiles.
        f.write('{"meta": ' + json.dumps(meta, default=str) + ',\n "summary": [\n')
        f.write(",\n".join(json.dumps(row, default=str) for row in summarize(records)))
        f.write('],\n "records": [\n')
        f.write(",\n".join(json.dumps(rec, default=str) for rec in records))
        f.write("]}\n")
    return table, data


def collect(families: Sequence[str], arches: Sequence[str], full: bool) -> list[Launch]:
    launches = []
    for name in families:
        for arch in arches:
            launches += FAMILY_LAUNCHES[name](arch, full=full)
    return launches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgr_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for table.md and records.json ({DEFAULT_OUT})")
    parser.add_argument("--jobs", type=int, default=usable_cpu_cores(),
                        help="compile processes (default: all usable cores)")
    parser.add_argument("--arch", action="append", choices=list(ARCHES), help="a target (default: all)")
    parser.add_argument("--family", action="append", choices=list(FAMILY_LAUNCHES),
                        help="a kernel family (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="only the all-flags-on launches (no one-at-a-time variants)")
    args = parser.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    started = time.perf_counter()
    families = args.family or list(FAMILY_LAUNCHES)
    launches = collect(families, args.arch or list(ARCHES), full=not args.quick)
    records = prove(launches, jobs=max(1, args.jobs), log=log)
    times = [r["compile_s"] for r in records if not r["shared_compile"]]
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{cpu_name()} ({usable_cpu_cores()} cores), {platform.system()}",
        triton=triton.__version__, ptxas=ptxas_version(), torch=torch.__version__,
        launches=len(launches), compiles=len(times), jobs=max(1, args.jobs),
        wall_s=time.perf_counter() - started,
        compile_mean_s=sum(times) / max(1, len(times)), compile_max_s=max(times, default=0.0),
        families=families, arches=args.arch or list(ARCHES), full=not args.quick,
        enumeration=enumeration_text(full=not args.quick),
    )
    table, data = write_report(records, args.out, meta)
    failing = [r for r in records if not r["ok"]]
    for row in summarize(records):
        log(f"{row['family']:<18} {row['arch']} {row['dtype']:<16} regs<={row['registers']:<3} "
            f"spill<={row['spill_max']:<6} shared<={_kb(row['shared_max']):>9} tc {row['tc_instr']:<11} "
            f"failing {row['failing']}/{row['compiles']}")
    log(f"wrote {table} and {data}")
    if failing:
        log(f"FAIL: {len(failing)} of {len(records)} records fail the static proof:")
        for rec in failing[:40]:
            log(f"  {rec['family']} {rec['arch']} {rec['dtype']} {_size(rec)} {_tiles(rec)} warps={rec['num_warps']} "
                f"stages={rec['num_stages']}: {'; '.join(rec['failures'])}")
        return 1
    log(f"PASS: {len(records)} records ({meta['compiles']} compiles)")
    return 0




if __name__ == "__main__":
    sys.exit(main())
