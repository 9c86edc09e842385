"""The Triton paths as PyTorch custom operators (``torch.ops.tgr_kernels.*``).

``torch.compile`` cannot look inside a Triton launcher (Python that picks tiles and launches
kernels), so each launcher is registered with ``torch.library.custom_op``: the compiler sees one
opaque op per forward and per backward, with a fake implementation that gives the output shapes
and dtypes, and autograd is attached with ``register_autograd``. In eager mode the ops behave as
the autograd Functions they replace.

Conventions shared by the ops:

- A gradient that is not needed comes back as an empty tensor (custom ops return tensors, not
  None) and the autograd wrapper maps it to None.
- The implementations run with autocast disabled: the caller decides the dtypes (see
  ``attention.py``), and a GEMM inside a launcher must not be recast behind its back.
- The ops' extra outputs (lse, Z, σ, the fused loss's saved gradients) never receive a gradient:
  every ``setup_context`` turns off the materialisation of their missing gradients, which would
  otherwise allocate a zero tensor of each (for the fused loss a second dW, 1 GiB at Llama-3's
  vocabulary × 4096, seen on an H200).
- Second derivatives are not implemented: the backward ops are registered with an autograd
  formula that raises a RuntimeError naming the op, so ``create_graph=True`` followed by a second
  ``grad`` fails loudly instead of returning wrong values.
- A call that needs no autograd, in eager mode, runs the launcher directly (``_runs_directly``):
  the op's dispatch measured about 0.1 ms a call on an H200's host, as much as a decoding step's
  two kernels. Under torch.compile, export or any dispatch mode the op is always called.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Launchers are looked up on their modules at call time (tests replace them with spies).
from . import _gate, attention_decode, attention_flash, attention_wide
from . import temperature_projection as projection

_NS = "tgr_kernels"


@contextlib.contextmanager
def _launch_context(t: torch.Tensor):
    """Launch on ``t``'s GPU (not the current one), with autocast off for every device. Each
    context is entered only when it changes something: together they cost ~70 µs a call on an
    H200's host."""
    with contextlib.ExitStack() as stack:
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            stack.enter_context(torch.cuda.device_of(t))
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _runs_directly(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call may skip the custom op and run its launcher directly: eager (neither
    torch.compile nor export is tracing, no dispatch mode is active), plain tensors (no fake or
    functional subclasses), and no gradient to track. Under a torch.func transform (vmap, grad,
    ...) the tensors are functorch wrappers whose storage a launcher cannot read: the op, which
    the transforms know how to run, is called."""
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    return not any(t is not None and (type(t) not in _PLAIN_TENSORS or (grad and t.requires_grad))
                   for t in tensors)


def _none_if_empty(t: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t.numel() == 0 else t


def _register_double_backward_error(backward_op, op: str, use: str = "backend='reference'") -> None:
    """``use``: the backends that do differentiate twice (the attention's "torch" paths do not)."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: second derivatives (a backward through the backward, e.g. create_graph=True "
            f"followed by another grad) are not implemented for the Triton kernels; use "
            f"{use} for double backward"
        )

    def setup_context(ctx, inputs, output):
        pass

    backward_op.register_autograd(backward, setup_context=setup_context)


# ----------------------------------------------------------------------------- flash attention
@torch.library.custom_op(f"{_NS}::flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_bar: torch.Tensor,
    key_padding: Optional[torch.Tensor], additive: Optional[torch.Tensor],
    causal: bool, gsot_threshold: Optional[float], gsot_mode: int, gsot_width: float, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flash forward: ``(out [B, H, S_q, D] in q's dtype, lse [B, H, S_q] fp32)``."""
    gate = _gate.from_op_args(gsot_threshold, gsot_mode, gsot_width)
    return _flash_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale)


def _flash_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale):
    with _launch_context(q):
        return attention_flash.flash_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale)


@flash_attention_forward.register_fake
def _(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, gsot_mode, gsot_width, scale):
    B, H, S_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S_q), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_bar: torch.Tensor,
    key_padding: Optional[torch.Tensor], additive: Optional[torch.Tensor],
    causal: bool, gsot_threshold: Optional[float], gsot_mode: int, gsot_width: float, scale: float,
    lse: torch.Tensor, grad_out: torch.Tensor, need_dq: bool, need_dkv: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash backward: ``(dq, dk, dv, dt̄ [B, S_q] fp32)``; unneeded gradients are empty."""
    gate = _gate.from_op_args(gsot_threshold, gsot_mode, gsot_width)
    with _launch_context(q):
        dq, dk, dv, dt = attention_flash.flash_backward(
            q, k, v, t_bar, key_padding, additive, causal, gate, scale, lse, grad_out,
            need_dq=need_dq, need_dkv=need_dkv)
    # Custom-op outputs may not alias each other: a fresh empty tensor for each missing one.
    return tuple(q.new_empty(0) if g is None else g for g in (dq, dk, dv)) + (dt,)


@flash_attention_backward.register_fake
def _(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, gsot_mode, gsot_width, scale, lse,
      grad_out, need_dq, need_dkv):
    B, H, S_q, _ = q.shape
    return (q.new_empty(q.shape if need_dq else (0,)),
            k.new_empty(k.shape if need_dkv else (0,)),
            v.new_empty(v.shape if need_dkv else (0,)),
            q.new_empty((B, S_q), dtype=torch.float32))


def _flash_setup_context(ctx, inputs, output):
    q, k, v, t_bar, key_padding, additive, *options = inputs
    _, lse = output  # the output itself is not needed: Δ comes from the backward's first pass
    ctx.set_materialize_grads(False)  # no zero tensor for the gradient of an unused output
    ctx.save_for_backward(q, k, v, t_bar, key_padding, additive, lse)
    ctx.options = tuple(options)  # causal, the gate's three fields, scale


def _flash_backward(ctx, grad_out, grad_lse):
    q, k, v, t_bar, key_padding, additive, lse = ctx.saved_tensors
    need_q, need_k, need_v, need_t = ctx.needs_input_grad[:4]
    nones = (None,) * 7
    if grad_out is None or not (need_q or need_k or need_v or need_t):
        return (None,) * 4 + nones
    dq, dk, dv, dt = flash_attention_backward(
        q, k, v, t_bar, key_padding, additive, *ctx.options, lse, grad_out.contiguous(),
        need_q, need_k or need_v,
    )
    return (_none_if_empty(dq) if need_q else None, dk if need_k else None, dv if need_v else None,
            dt if need_t else None) + nones


flash_attention_forward.register_autograd(_flash_backward, setup_context=_flash_setup_context)
_register_double_backward_error(flash_attention_backward, "temperature_guided_attention (Triton flash path)")


def flash_attention(q, k, v, t_bar, key_padding, additive, causal, gate, scale):
    """Differentiable flash attention (inputs validated by the caller; t̄ fp32 ``[B, S_q]``;
    ``gate``: a ``_gate.Gate`` or None)."""
    if _runs_directly(q, k, v, t_bar, key_padding, additive):
        return _flash_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale)[0]
    return flash_attention_forward(q, k, v, t_bar, key_padding, additive, causal, *_gate.op_args(gate),
                                   scale)[0]


# ----------------------------------------------------------------------------- decode (split-KV)
@torch.library.custom_op(f"{_NS}::decode_attention_forward", mutates_args=())
def decode_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_bar: torch.Tensor,
    key_padding: Optional[torch.Tensor], additive: Optional[torch.Tensor],
    causal: bool, gsot_threshold: Optional[float], gsot_mode: int, gsot_width: float, scale: float,
) -> torch.Tensor:
    """Split-KV decode forward: the output ``[B, H, S_q, D]`` in q's dtype. No autograd is
    registered: the dispatcher sends a call here only when no gradient is needed."""
    gate = _gate.from_op_args(gsot_threshold, gsot_mode, gsot_width)
    return _decode_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale)


def _decode_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale):
    with _launch_context(q):
        return attention_decode.decode_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale)


@decode_attention_forward.register_fake
def _(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, gsot_mode, gsot_width, scale):
    return q.new_empty(q.shape)


def decode_attention(q, k, v, t_bar, key_padding, additive, causal, gate, scale):
    """Split-KV decoding for a few query rows (inputs validated by the caller; no gradient)."""
    if _runs_directly(q, k, v, t_bar, key_padding, additive):
        return _decode_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale)
    return decode_attention_forward(q, k, v, t_bar, key_padding, additive, causal, *_gate.op_args(gate), scale)


# ----------------------------------------------------------------------------- wide attention (Triton rows)
@torch.library.custom_op(f"{_NS}::wide_attention_forward", mutates_args=())
def wide_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_bar: torch.Tensor,
    key_padding: Optional[torch.Tensor], additive: Optional[torch.Tensor],
    causal: bool, gsot_threshold: Optional[float], gsot_mode: int, gsot_width: float, scale: float,
    chunk_bytes: int, keep_scores: bool, same_qkv: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wide forward with the Triton row kernels: ``(out, lse, Z)``; Z = QKᵀ ``[B, H, S_q, S_k]``
    when ``keep_scores`` (gradients wanted and Z fits in ``chunk_bytes``), else empty.
    ``same_qkv`` is only read by the backward (q, k and v are one tensor)."""
    gate = _gate.from_op_args(gsot_threshold, gsot_mode, gsot_width)
    with _launch_context(q):
        out, lse, scores = attention_wide.wide_forward(
            q, k, v, t_bar, key_padding, additive, causal, gate, scale, "triton", chunk_bytes,
            keep_scores=keep_scores)
    if keep_scores and scores is None:
        # The fake implementation promises Z whenever keep_scores is set.
        raise ValueError("wide_attention_forward: keep_scores needs a [B, H, S_q, S_k] buffer that fits "
                         "in chunk_bytes")
    return out, lse, q.new_empty(0) if scores is None else scores


@wide_attention_forward.register_fake
def _(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, gsot_mode, gsot_width, scale, chunk_bytes,
      keep_scores, same_qkv):
    B, H, S_q, _ = q.shape
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = q.new_empty((B, H, S_q, k.shape[2])) if keep_scores else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty((B, H, S_q), dtype=stats), scores


@torch.library.custom_op(f"{_NS}::wide_attention_backward", mutates_args=())
def wide_attention_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_bar: torch.Tensor,
    key_padding: Optional[torch.Tensor], additive: Optional[torch.Tensor],
    causal: bool, gsot_threshold: Optional[float], gsot_mode: int, gsot_width: float, scale: float,
    chunk_bytes: int, lse: torch.Tensor, scores: torch.Tensor, grad_out: torch.Tensor,
    need_dq: bool, need_dkv: bool, same_qkv: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wide backward: ``(dq, dk, dv, dt̄ [B, S_q])``; unneeded gradients are empty. When q, k, v
    are one tensor and all are needed, dq holds dQ + dK + dV and dk, dv are empty."""
    gate = _gate.from_op_args(gsot_threshold, gsot_mode, gsot_width)
    with _launch_context(q):
        dq, dk, dv, dt = attention_wide.wide_backward(
            q, k, v, t_bar, key_padding, additive, causal, gate, scale, "triton", chunk_bytes, lse,
            _none_if_empty(scores), grad_out, need_dq=need_dq, need_dkv=need_dkv, same_qkv=same_qkv)
    # Custom-op outputs may not alias each other: a fresh empty tensor for each missing one.
    return tuple(q.new_empty(0) if g is None else g for g in (dq, dk, dv)) + (dt,)


@wide_attention_backward.register_fake
def _(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, gsot_mode, gsot_width, scale, chunk_bytes,
      lse, scores, grad_out, need_dq, need_dkv, same_qkv):
    B, _, S_q, _ = q.shape
    separate_dkv = need_dkv and not (same_qkv and need_dq)
    return (q.new_empty(q.shape if need_dq else (0,)),
            k.new_empty(k.shape if separate_dkv else (0,)),
            v.new_empty(v.shape if separate_dkv else (0,)),
            q.new_empty((B, S_q), dtype=lse.dtype))


def _wide_setup_context(ctx, inputs, output):
    q, k, v, t_bar, key_padding, additive, *options, _, same_qkv = inputs
    _, lse, scores = output
    ctx.set_materialize_grads(False)  # else autograd makes a zero [B, H, S_q, S_k] gradient for Z
    ctx.save_for_backward(q, k, v, t_bar, key_padding, additive, lse, scores)
    ctx.options = tuple(options)  # causal, the gate's three fields, scale, chunk_bytes
    ctx.same_qkv = same_qkv


def _wide_backward(ctx, grad_out, grad_lse, grad_scores):
    q, k, v, t_bar, key_padding, additive, lse, scores = ctx.saved_tensors
    need_q, need_k, need_v, need_t = ctx.needs_input_grad[:4]
    nones = (None,) * 10
    if grad_out is None or not (need_q or need_k or need_v or need_t):
        return (None,) * 4 + nones
    dq, dk, dv, dt = wide_attention_backward(
        q, k, v, t_bar, key_padding, additive, *ctx.options, lse, scores, grad_out.contiguous(),
        need_q, need_k or need_v, ctx.same_qkv,
    )
    return (_none_if_empty(dq) if need_q else None, _none_if_empty(dk) if need_k else None,
            _none_if_empty(dv) if need_v else None, dt if need_t else None) + nones


wide_attention_forward.register_autograd(_wide_backward, setup_context=_wide_setup_context)
_register_double_backward_error(wide_attention_backward, "temperature_guided_attention (Triton wide path)")


def wide_triton_attention(q, k, v, t_bar, key_padding, additive, causal, gate, scale, chunk_bytes):
    """Differentiable wide attention with the Triton row kernels (inputs validated by the caller)."""
    B, H, S_q, _ = q.shape
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, t_bar))
    # wide_forward keeps Z for the backward when a whole [B, H, S_q, S_k] buffer fits in a chunk.
    scores_fit = B * H * S_q * k.shape[2] * q.element_size() <= chunk_bytes
    same_qkv = q is k and k is v
    return wide_attention_forward(q, k, v, t_bar, key_padding, additive, causal, *_gate.op_args(gate), scale,
                                  chunk_bytes, need_grad and scores_fit, same_qkv)[0]


# ----------------------------------------------------------------------------- temperature projection
@torch.library.custom_op(f"{_NS}::temperature_projection_forward", mutates_args=())
def temperature_projection_forward(
    hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    clamp_min: float, clamp_max: float, save_sigma: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused TTM forward on ``[N, H]``: ``(t [N, T], σ [N, T] fp32 or empty)``."""
    out, sigma = _projection_forward(hidden2d, weight, bias, clamp_min, clamp_max, save_sigma)
    return out, hidden2d.new_empty(0, dtype=torch.float32) if sigma is None else sigma


def _projection_forward(hidden2d, weight, bias, clamp_min, clamp_max, save_sigma):
    with _launch_context(hidden2d):
        return projection._launch_forward(hidden2d, weight, bias, clamp_min, clamp_max, save_sigma=save_sigma)


@temperature_projection_forward.register_fake
def _(hidden2d, weight, bias, clamp_min, clamp_max, save_sigma):
    shape = (hidden2d.shape[0], weight.shape[0])
    out = hidden2d.new_empty(shape, dtype=torch.promote_types(hidden2d.dtype, weight.dtype))
    sigma = hidden2d.new_empty(shape if save_sigma else (0,), dtype=torch.float32)
    return out, sigma


@torch.library.custom_op(f"{_NS}::temperature_projection_backward", mutates_args=())
def temperature_projection_backward(
    grad_out: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor, hidden2d: torch.Tensor,
    clamp_min: float, clamp_max: float, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused TTM backward: ``(dh in h's dtype, dW fp32 [T, H], db fp32 [T])``; unneeded ones empty.
    ``hidden2d`` is read only for dW (pass any tensor of h's dtype otherwise)."""
    with _launch_context(sigma):
        grad_logits, grad_hidden = projection._launch_backward_rows(
            grad_out, sigma, weight, hidden2d.dtype, clamp_min, clamp_max,
            store_grad_logits=need_weight or need_bias, hidden_grad=need_hidden,
        )
        grad_weight = (projection._launch_backward_weight(grad_logits, hidden2d, weight.dtype) if need_weight
                       else sigma.new_empty(0))
    grad_bias = grad_logits.sum(dim=0) if need_bias else sigma.new_empty(0)
    return (hidden2d.new_empty(0) if grad_hidden is None else grad_hidden), grad_weight, grad_bias


@temperature_projection_backward.register_fake
def _(grad_out, sigma, weight, hidden2d, clamp_min, clamp_max, need_hidden, need_weight, need_bias):
    n_rows, n_heads = sigma.shape
    return (hidden2d.new_empty((n_rows, weight.shape[1]) if need_hidden else (0,)),
            sigma.new_empty(weight.shape if need_weight else (0,)),
            sigma.new_empty((n_heads,) if need_bias else (0,)))


def _projection_setup_context(ctx, inputs, output):
    hidden2d, weight, bias, clamp_min, clamp_max, _ = inputs
    _, sigma = output
    ctx.set_materialize_grads(False)  # no zero tensor for the gradient of σ
    # σ is normally saved by the forward; called without it (save_sigma=False) while a gradient
    # is wanted, the backward recomputes it from h, W and b.
    ctx.recompute_sigma = sigma.numel() == 0 and hidden2d.shape[0] > 0
    # h is needed only for dW (or to recompute σ): with frozen weights the activation is not kept
    # alive (a 0-row stand-in carries its dtype). W is a parameter that lives anyway.
    keep_hidden = ctx.needs_input_grad[1] or ctx.recompute_sigma
    ctx.save_for_backward(hidden2d if keep_hidden else hidden2d.new_empty(0, hidden2d.shape[1]), weight, sigma,
                          bias if ctx.recompute_sigma else None)
    ctx.clamp = (clamp_min, clamp_max)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _projection_backward(ctx, grad_out, grad_sigma):
    hidden2d, weight, sigma, bias = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_out is None or not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None, None
    if ctx.recompute_sigma:
        _, sigma = temperature_projection_forward(hidden2d, weight, bias, *ctx.clamp, True)
    grad_hidden, grad_weight, grad_bias = temperature_projection_backward(
        grad_out, sigma, weight, hidden2d, *ctx.clamp, need_hidden, need_weight, need_bias,
    )
    return (grad_hidden if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None,
            None, None, None)


temperature_projection_forward.register_autograd(_projection_backward, setup_context=_projection_setup_context)
_register_double_backward_error(temperature_projection_backward, "temperature_projection (Triton kernels)",
                                use="backend='torch' or backend='reference'")


def temperature_projection_triton(hidden2d, weight, bias, clamp_min: float, clamp_max: float) -> torch.Tensor:
    """Differentiable fused TTM on ``[N, H]``; σ is kept only when a gradient will be needed."""
    if _runs_directly(hidden2d, weight, bias):
        return _projection_forward(hidden2d, weight, bias, float(clamp_min), float(clamp_max), False)[0]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden2d, weight, bias)
    )
    return temperature_projection_forward(hidden2d, weight, bias, float(clamp_min), float(clamp_max), needs_grad)[0]
