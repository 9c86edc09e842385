"""Input checks shared by every backend. They run before any kernel, and their messages name the
argument and the shapes, so a mistake never surfaces as a crash deep inside a kernel."""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ._gate import DEFAULT_GSOT_WIDTH, FP32_MAX, FP32_NORMAL_MIN, Gate, is_finite_number, make_gate

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")

# ---------------------------------------------------------------------------- value checks
# Checks on shapes, dtypes and devices read only metadata and always run. Checks on values
# (NaN/±inf in the temperature or the mask, a 2-D float mask that is not 0/1) need the data:
# on a GPU, raising a Python error from them means copying a flag to the host, which stalls the
# stream, serialises the launch queue and breaks CUDA-graph capture. So they follow a switch:
#
#   "auto"   the default: "sync" for CPU tensors (the flag is already on the host), "off" for
#            CUDA tensors; inside torch.compile, "async" for CPU tensors and "off" for CUDA.
#   "sync"   check now and raise ValueError (one host sync per call on a GPU). Inside
#            torch.compile a graph cannot branch on data, so "sync" acts as "async" there.
#   "async"  queue a device-side assertion (torch._assert_async): no sync; on a GPU a failure
#            surfaces as a CUDA error at the next synchronising call, on a CPU as a RuntimeError.
#   "off"    no value checks.
VALUE_CHECK_MODES = ("auto", "sync", "async", "off")
_value_check_mode = "auto"


def set_value_checks(mode: str) -> str:
    """Choose how the ops check input values (NaN/±inf); returns the previous mode.

    ``mode``: "auto" (default), "sync", "async" or "off"; see :func:`value_checks`.
    """
    global _value_check_mode
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"value-check mode must be one of {VALUE_CHECK_MODES}, got {mode!r}")
    previous, _value_check_mode = _value_check_mode, mode
    return previous


def get_value_checks() -> str:
    """The current value-check mode (see :func:`set_value_checks`)."""
    return _value_check_mode


@contextlib.contextmanager
def value_checks(mode: str) -> Iterator[None]:
    """Context manager form of :func:`set_value_checks`, restoring the previous mode on exit.

    - "auto": sync checks on CPU tensors, none on CUDA tensors (the default).
    - "sync": check and raise ValueError before any kernel runs (a host sync on a GPU).
    - "async": device-side assertions, no host sync (under torch.compile, "sync" acts so).
    - "off": no value checks.
    """
    previous = set_value_checks(mode)
    try:
        yield
    finally:
        set_value_checks(previous)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _effective_mode(device: torch.device) -> str:
    if torch._C._are_functorch_transforms_active():
        return "off"  # vmap's batched tensors have no host value (nor a data-dependent branch)
    mode = _value_check_mode
    if mode == "auto":
        if device.type != "cpu":
            return "off"
        mode = "sync"
    if mode == "sync" and _is_compiling():
        return "async"
    return mode


def _run_value_checks(device: torch.device, checks: list[tuple[object, object]]) -> None:
    """``checks``: (zero-arg function returning a bool tensor that is True when the values are
    bad, message or zero-arg function making it). Evaluated according to the value-check mode;
    "sync" copies every flag to the host in one transfer. Messages are made only when needed:
    formatting them on every call showed in a decoding step's host time. Under a torch.func
    transform (vmap) nothing is checked (``_effective_mode``)."""
    mode = _effective_mode(device)
    if mode == "off" or not checks:
        return
    bad = [bad_fn() for bad_fn, _ in checks]
    if mode == "async":
        for flag, (_, message) in zip(bad, checks, strict=True):
            torch._assert_async(~flag, _text(message))
        return
    flags = torch.stack(bad).tolist()  # the one host sync
    for flag, (_, message) in zip(flags, checks, strict=True):
        if flag:
            raise ValueError(_text(message))


def _text(message) -> str:
    return message() if callable(message) else message


def _shape(t: torch.Tensor) -> str:
    if _is_compiling():
        # A traced assertion's message is a constant of the graph: a dynamic dim (a SymInt after a
        # recompile for a new length) cannot be formatted into it (str() of it breaks the graph),
        # and the graph serves other lengths too. Only the rank is shown there.
        return "[" + ", ".join("?" for _ in range(t.dim())) + "]"
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, dims: tuple | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(t)}): nothing to compute")


def _is_real(x) -> bool:
    """A Python or NumPy real number (bools excluded: ``scale=True`` is a mistake)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_projection_inputs(hidden, weight, bias, clamp_min: float, clamp_max: float) -> None:
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, dims=(2,))
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight.shape[1]: hidden {_shape(hidden)}, weight {_shape(weight)}"
        )
    if bias is not None:
        check_tensor("bias", bias, dims=(1,))
        check_float("bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [{weight.shape[0]}] to match weight {_shape(weight)}, got {_shape(bias)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    check_clamp_bounds(clamp_min, clamp_max)


def check_clamp_bounds(clamp_min, clamp_max) -> None:
    """The temperature's clamp bounds: real numbers with ``0 <= clamp_min <= clamp_max <= 1``."""
    for name, bound in (("clamp_min", clamp_min), ("clamp_max", clamp_max)):
        if not _is_real(bound):
            raise TypeError(f"{name} must be a real number (a Python float), got {type(bound).__name__} {bound!r}")
    if not (0.0 <= clamp_min <= clamp_max <= 1.0):
        raise ValueError(f"need 0 <= clamp_min <= clamp_max <= 1, got clamp_min={clamp_min}, clamp_max={clamp_max}")


@dataclass
class AttentionInputs:
    """Validated attention inputs, with the mask split into its two kinds.

    key_padding: bool ``[B, S_k]``, True = keep (or None).
    additive: float tensor broadcastable to ``[B, H, S_q, S_k]``, −inf = masked (or None).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    temperature: torch.Tensor
    key_padding: torch.Tensor | None
    additive: torch.Tensor | None
    causal: bool
    gate: Gate | None
    scale: float


def _split_mask(attn_mask, B: int, H: int, S_q: int, S_k: int, checks: list):
    """Return (key_padding, additive) from the user's mask; value checks are appended to
    ``checks`` (see :func:`_run_value_checks`)."""
    if attn_mask is None:
        return None, None
    check_tensor("attn_mask", attn_mask, dims=(2, 3, 4))
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (B, S_k):
            raise ValueError(
                f"a 2-D attn_mask is a key-padding mask and must be [B, S_k] = [{B}, {S_k}], "
                f"got {_shape(attn_mask)}"
            )
        if attn_mask.dtype == torch.bool:
            return attn_mask, None
        checks.append((
            lambda: ((attn_mask != 0) & (attn_mask != 1)).any(),
            "a 2-D attn_mask is a key-padding mask: its values must be 0/1 or bool (true = keep); "
            "pass an additive mask as 4-D [B, 1, 1, S_k]",
        ))
        return attn_mask != 0, None
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, (B, H, S_q, S_k)) == (B, H, S_q, S_k)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attn_mask {_shape(attn_mask)} does not broadcast to [B, H, S_q, S_k] = [{B}, {H}, {S_q}, {S_k}]"
        )
    if attn_mask.dtype == torch.bool:
        additive = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        return None, additive.masked_fill_(~attn_mask, -math.inf)
    if not attn_mask.is_floating_point():
        raise TypeError(f"a {attn_mask.dim()}-D attn_mask must be bool or floating (additive), got {attn_mask.dtype}")
    # −inf masks a key; NaN or +inf would make the whole row NaN.
    checks.append((
        lambda: (torch.isnan(attn_mask) | torch.isposinf(attn_mask)).any(),
        lambda: f"attn_mask {_shape(attn_mask)} contains NaN or +inf (an additive mask uses 0 to keep a key "
                f"and -inf or a large negative value to mask it)",
    ))
    return None, attn_mask


def check_attention_inputs(
    q, k, v, temperature, attn_mask, causal: bool, gsot_threshold, scale,
    gsot_mode: str = "hard", gsot_width=DEFAULT_GSOT_WIDTH,
) -> AttentionInputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dims=(4,))
        check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_tensor("temperature", temperature, dims=(2, 3))
    check_float("temperature", temperature)
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dims=(2, 3, 4))
    check_same_device(q=q, k=k, v=v, temperature=temperature, attn_mask=attn_mask)

    B, H, S_q, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"q, k, v must share batch and heads: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads: k {_shape(k)}, v {_shape(v)}")
    # Grouped-query attention: query head h reads k/v head h // (H_q / H_kv).
    H_kv = k.shape[1]
    if H % H_kv:
        raise ValueError(
            f"q's heads must be a multiple of k/v's heads (grouped-query attention), got H_q = {H} and "
            f"H_kv = {H_kv}: q {_shape(q)}, k {_shape(k)}"
        )
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, k, v must share the head dim D: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length S_k: k {_shape(k)}, v {_shape(v)}")
    S_k = k.shape[2]
    if tuple(temperature.shape[:2]) != (B, S_q):
        raise ValueError(
            f"temperature must be [B, S_q] or [B, S_q, T] = [{B}, {S_q}, ...] for q {_shape(q)}, "
            f"got {_shape(temperature)}"
        )
    # ±inf in a temperature scales a row's logits to ±inf: a NaN row.
    checks = [(lambda: (~torch.isfinite(temperature)).any(),
               lambda: f"temperature {_shape(temperature)} contains NaN or ±inf")]

    # Python and NumPy numbers alike (np.float32 is a numbers.Real, not a float).
    if gsot_threshold is not None:
        if not _is_real(gsot_threshold) or gsot_threshold != gsot_threshold:  # NaN (SymFloat-safe)
            raise TypeError(f"gsot_threshold must be a number or None, got {gsot_threshold!r}")
        gsot_threshold = float(gsot_threshold)
    gate = make_gate(gsot_threshold, gsot_mode, gsot_width)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not _is_real(scale) or not (scale > 0 and is_finite_number(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    elif not FP32_NORMAL_MIN <= scale <= FP32_MAX:
        # The kernels scale the logits in fp32: a scale that rounds to 0 or inf there gave
        # uniform or NaN rows where float64 eager did not.
        raise ValueError(f"scale must lie in float32's normal range [{FP32_NORMAL_MIN:.3g}, {FP32_MAX:.3g}] "
                         f"(the kernels scale the logits in float32), got {scale!r}")
    key_padding, additive = _split_mask(attn_mask, B, H, S_q, S_k, checks)
    _run_value_checks(q.device, checks)
    return AttentionInputs(q, k, v, temperature, key_padding, additive, bool(causal), gate, float(scale))
