"""Backend resolution and Triton launch helpers shared by the ops.

Triton runs on CUDA tensors, or on CPU tensors under Triton's interpreter, which is only active
when ``TRITON_INTERPRET=1`` was in the environment before triton was first imported.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from ._interpreter import interpreter_enabled
from ._validation import check_backend

# Read once: the interpreter is chosen when the kernels are defined, so a later change has no effect.
TRITON_INTERPRET = interpreter_enabled()


# The oldest GPUs the Triton kernels are compiled and checked for: compute capability 8.0 (the static
# proof's targets are sm_80, sm_86 and sm_90). Older ones (V100, T4: less shared memory per block,
# no bf16 tensor cores) run the PyTorch backend.
MIN_TRITON_CAPABILITY = 80


# Compute capability by CUDA device index, read once per device. A plain dict rather than
# functools.cache, which torch.compile warns about; and no torch.compiler decorator, which would
# import the compiler (and sympy) with tgr_kernels.
_CAPABILITIES: dict[int, int] = {}


def cuda_capability(device: torch.device) -> int:
    """The compute capability of a CUDA device as 10 * major + minor."""
    index = torch.cuda.current_device() if device.index is None else device.index
    capability = _CAPABILITIES.get(index)
    if capability is None:
        major, minor = torch.cuda.get_device_capability(index)
        capability = _CAPABILITIES[index] = 10 * major + minor
    return capability


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend and reject Triton where it cannot run."""
    check_backend(backend)
    if device.type == "cuda" and backend in ("auto", "triton"):
        capability = cuda_capability(device)
        if capability < MIN_TRITON_CAPABILITY:
            if backend == "triton":
                raise RuntimeError(
                    f"backend='triton' needs a GPU of compute capability {MIN_TRITON_CAPABILITY // 10}.0 or newer "
                    f"(the kernels' tiles are checked for sm_80, sm_86 and sm_90); {device} is "
                    f"{capability // 10}.{capability % 10}. Use backend='torch' (backend='auto' does)."
                )
            return "torch"
        return "triton"
    if backend == "auto":
        return "torch"
    if backend == "triton" and not (device.type == "cpu" and TRITON_INTERPRET):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {device}. Use backend='torch' on this device."
        )
    return backend


def autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type``; a no-op for meta tensors (shape
    inference), which have no autocast: ``torch.autocast("meta")`` itself raises. (A plain string
    test: torch.compile traces it as a constant.)"""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type``, or None when it is off (always off for meta
    tensors, which have no autocast: ``torch.is_autocast_enabled("meta")`` raises)."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


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


def cpu_name() -> str:
    """The processor's model name (for benchmark and proof records)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def usable_cpu_cores() -> int:
    """The cores this process may run on: a container or ``taskset`` limits them, while
    ``os.cpu_count()`` counts the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def _read_cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# Read once, at import: torch.compile traces cpu_computes_natively and cannot trace open() (a
# functools.cache around the read does not stop it: dynamo traces through the cache).
_CPU_FLAGS = _read_cpu_flags()
_NATIVE_BF16 = bool({"amx_bf16", "avx512_bf16"} & _CPU_FLAGS)
_NATIVE_FP16 = "amx_fp16" in _CPU_FLAGS


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU's GEMMs run ``dtype`` at least as fast as fp32.

    Measured on this project's machines: with AMX/AVX-512 BF16 a bf16 GEMM is ~6x faster than
    fp32, while fp16 runs at fp32 speed; CPUs without bf16 instructions emulate it, ~100x slower.
    Where it is not native, the CPU paths compute half-precision inputs in fp32.
    """
    if dtype == torch.bfloat16:
        return _NATIVE_BF16
    if dtype == torch.float16:
        return _NATIVE_FP16
    return True


def once_differentiable_strict(op: str):
    """Decorator for a ``torch.autograd.Function.backward`` whose result is not differentiable.

    The backward runs under no_grad. When a graph is being built (``create_graph=True``), every
    gradient it returns is routed through a node that raises a RuntimeError if anything
    differentiates through it, so a second derivative fails loudly instead of coming back wrong.
    Unlike ``torch.autograd.function.once_differentiable`` this also holds when the incoming
    gradient itself does not require grad (the gradients still depend on the inputs).

    The backward also runs with autocast off, the state the forward ran in (the dispatcher turns
    autocast off around the ops after choosing their dtypes): the custom_bwd convention, for
    whichever device the tensors live on, so a ``loss.backward()`` called inside an autocast
    region does not recast the backward's GEMMs.
    """
    message = (f"{op}: second derivatives (a backward through the backward, e.g. create_graph=True "
               f"followed by another grad) are not implemented for this path; use backend='reference' "
               f"for double backward").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            tensors = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
            if not tensors:
                return outputs
            # The guard node also takes the forward's saved inputs and the incoming gradients, so that
            # a second grad with respect to them reaches it (and raises) rather than finding no path
            # and skipping it (a zero, silently: torch.autograd.functional.jvp differentiates with
            # respect to the incoming gradient, and reads a missing path as zeros).
            anchors = [t for t in (*ctx.saved_tensors, *grads)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            guard = torch._C._functions.DelayedError(message, len(tensors) + len(anchors))
            guarded = guard(*[outputs[i].detach().requires_grad_() for i in tensors], *anchors)
            if isinstance(guarded, torch.Tensor):
                guarded = (guarded,)
            outputs = list(outputs)
            for i, g in zip(tensors, guarded[:len(tensors)], strict=True):  # the anchors' outputs are dropped
                outputs[i] = g
            return tuple(outputs)

        return wrapper

    return decorate
