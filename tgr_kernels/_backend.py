"""Backend resolution and Triton launch helpers shared by the ops.

Triton runs on CUDA tensors, or on CPU tensors under Triton's interpreter, which is only active
when ``TRITON_INTERPRET=1`` was in the environment before triton was first imported.
"""
from __future__ import annotations

import functools
import os

import torch

from ._validation import check_backend

# Read once: the interpreter is chosen when triton is imported, so a later change has no effect.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend and reject Triton where it cannot run."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and TRITON_INTERPRET):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {device}. Use backend='torch' on this device."
        )
    return backend


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: fp32 inputs multiply in full precision ("ieee") unless
    PyTorch allows TF32; half inputs keep Triton's default ("tf32", which means tensor cores and
    does not round them), so that no half-precision dot is ever sent to the scalar path."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Tests set this to fill every kernel output with NaN before launch, so that an element a kernel
# forgets to write fails the test instead of passing with stale memory.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised kernel output (NaN-filled when ``POISON_OUTPUTS`` is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU's GEMMs run ``dtype`` at least as fast as fp32.

    Measured on this project's machines: with AMX/AVX-512 BF16 a bf16 GEMM is ~6x faster than
    fp32, while fp16 runs at fp32 speed; CPUs without bf16 instructions emulate it, ~100x slower.
    Where it is not native, the CPU paths compute half-precision inputs in fp32.
    """
    if dtype == torch.bfloat16:
        return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())
    if dtype == torch.float16:
        return "amx_fp16" in _cpu_flags()
    return True
