"""What is measured: the ops' shapes, their inputs, and the work they do (FLOPs, bytes).

Shapes (the seed's model is Llama-2-7B: hidden 4096, 32 heads of 128, TTM with 8 heads):

    attention-wide   the seed's TGR attention: one head as wide as the hidden state, D = 4096,
                     q = k = v = the final hidden state (one tensor, as the seed passes it).
    attention-flash  multi-head TGR attention: 32 heads, D = 128, separate q, k, v.
    attention-gqa    grouped-query attention as Llama-3 has it: 32 query heads reading 8 key/value
                     heads (k, v [B, 8, S, D]), D = 128, causal.
    attention-decode one decoding step: S_q = 1 query row (``q_len``) of 32 query heads against a
                     KV cache of ``seq_len`` keys in 8 key/value heads, D = 128, forward only.
    projection       TTM: hidden [B, S, 4096] -> 8 temperatures per token.

Inputs: standard-normal q/k/v/hidden; temperatures uniform in [0.01, 0.99] with 8 heads, in the
input dtype as in the seed (their mean t̄ is near 0.5, so GSoT at τ = 0.4 keeps most rows and
prunes some); for decode uniform in [0.5, 0.99], so that the one query row is kept (a pruned row
reads no key at all, and its zero output would check nothing); the key-padding mask
drops the last S/8 keys of the last batch row (right padding, as a tokenizer pads), or is absent
with ``--mask none``. Every input that a training step differentiates requires a gradient: q, k,
v (one tensor on the wide path) and the temperatures; hidden, weight and bias for the projection.

Work, for achieved rates (the convention of FlashAttention's benchmarks):

    attention  forward 4·B·H·S_q·S_k·D FLOPs (two GEMMs; H the query heads, with or without
               grouping), halved when causal (S_q = S_k); backward 2.5× the forward (five GEMMs);
               full (forward + backward) 3.5×.
    decode     bytes (the op is memory bound): q read and the output written once, and the KV
               cache read once, 2·B·H_kv·S_k·D elements.
    projection bytes: forward reads hidden and W, writes t; backward reads dt, hidden and W and
               writes d hidden, dW, db; full is their sum. The op is memory bound (T = 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

OPS = ("projection", "attention-wide", "attention-flash", "attention-gqa", "attention-decode")
MODES = ("forward", "backward", "full")
# Decoding is inference: one step against a cache has no backward.
OP_MODES = {"attention-decode": ("forward",)}
TEMPERATURE_HEADS = 8

# (full size, --quick size): the quick sizes keep each path (wide: D > 256) but run in seconds.
DEFAULT_SHAPES = {
    "attention-wide": ({"batch": 1, "heads": 1, "head_dim": 4096}, {"batch": 1, "heads": 1, "head_dim": 512}),
    "attention-flash": ({"batch": 1, "heads": 32, "head_dim": 128}, {"batch": 1, "heads": 2, "head_dim": 64}),
    "projection": ({"batch": 1, "hidden": 4096, "temp_heads": TEMPERATURE_HEADS},
                   {"batch": 1, "hidden": 256, "temp_heads": TEMPERATURE_HEADS}),
    # Llama-3-8B's attention: 32 query heads, 8 key/value heads of 128
    "attention-gqa": ({"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128},
                      {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 64}),
    "attention-decode": ({"batch": 1, "heads": 32, "kv_heads": 8, "q_len": 1, "head_dim": 128},
                         {"batch": 1, "heads": 4, "kv_heads": 2, "q_len": 1, "head_dim": 64}),
}
DEFAULT_SEQ_LENS = [128, 256, 512, 1024, 2048, 4096]
QUICK_SEQ_LENS = [128]
# Per op where they differ: GQA from S = 512, decode against a 4k cache (seq_len = its length).
OP_SEQ_LENS = {"attention-gqa": ([512, 1024, 2048, 4096], [128]),
               "attention-decode": ([4096], [256])}
# The shape fields of an attention case, in the order of its label and records.
ATTENTION_DIMS = ("batch", "heads", "kv_heads", "q_len", "seq_len", "head_dim")


def default_seq_lens(op: str, quick: bool) -> list[int]:
    full, tiny = OP_SEQ_LENS.get(op, (DEFAULT_SEQ_LENS, QUICK_SEQ_LENS))
    return list(tiny if quick else full)


def op_modes(op: str) -> tuple[str, ...]:
    return OP_MODES.get(op, MODES)


def op_causal_values(op: str, causal_values) -> list[bool]:
    """The projection has no causality; one decoding row against its cache sees every key (bottom-right
    aligned), so decode runs without; GQA is Llama's causal attention: causal alone unless only
    non-causal is asked for."""
    if op in ("projection", "attention-decode"):
        return [False]
    if op == "attention-gqa":
        return [c for c in causal_values if c] or list(causal_values)
    return list(causal_values)


class Inputs:
    """One set of inputs: named tensors, the leaves to differentiate, and an upstream gradient."""

    def __init__(self, tensors: dict[str, torch.Tensor], leaves: list[str]):
        self.tensors = tensors
        self.leaf_names = leaves
        self.grad_out: torch.Tensor | None = None

    def __getattr__(self, name):
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.leaf_names]

    def nbytes(self) -> int:
        unique = {id(t): t for t in self.tensors.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def detached(self) -> Inputs:
        """The same storage, without autograd (inference inputs)."""
        done = {id(t): t.detach() for t in self.tensors.values()}
        copy = Inputs({n: done[id(t)] for n, t in self.tensors.items()}, self.leaf_names)
        copy.grad_out = self.grad_out
        return copy

    def cast(self, dtype: torch.dtype) -> Inputs:
        """A detached copy with floating tensors in ``dtype`` (a tensor passed twice stays one)."""
        done: dict[int, torch.Tensor] = {}
        out = {}
        for name, t in self.tensors.items():
            if id(t) not in done:
                done[id(t)] = t.detach().to(dtype).requires_grad_(t.requires_grad)
            out[name] = done[id(t)]
        copy = Inputs(out, self.leaf_names)
        copy.grad_out = None if self.grad_out is None else self.grad_out.to(dtype)
        return copy


@dataclass
class Case:
    op: str
    shape: dict[str, int]  # batch, heads, seq_len, head_dim | batch, seq_len, hidden, temp_heads
    dtype: torch.dtype
    device: str
    causal: bool = False
    mask: str = "padding"  # "padding" or "none"
    allow_interpreter: bool = False
    compile_dynamic: bool = False  # torch.compile(dynamic=True): one graph for every S
    keep: torch.Tensor | None = field(default=None, repr=False)  # bool [B, S], true = keep

    def __post_init__(self):
        if self.op != "projection" and self.mask == "padding" and self.keep is None:
            B, S = self.shape["batch"], self.shape["seq_len"]  # the keys (a cache's length)
            keep = torch.ones(B, S, dtype=torch.bool)
            keep[-1, S - S // 8:] = False
            self.keep = keep.to(self.device)

    def with_dtype(self, dtype: torch.dtype) -> Case:
        return replace(self, dtype=dtype)

    @property
    def q_len(self) -> int:
        """Query rows: ``q_len`` (decode), else ``seq_len``."""
        return self.shape.get("q_len", self.shape["seq_len"])

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``kv_heads`` (grouped-query attention), else ``heads``."""
        return self.shape.get("kv_heads", self.shape["heads"])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def label(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        extra = " causal" if self.causal else ""
        return f"{self.op} {dims} {self.dtype_name}{extra}"

    # --------------------------------------------------------------- inputs
    def make_inputs(self, seed: int) -> Inputs:
        g = torch.Generator().manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(self.device, self.dtype).requires_grad_()

        s = self.shape
        if self.op == "projection":
            B, S, H, T = s["batch"], s["seq_len"], s["hidden"], s["temp_heads"]
            bound = H ** -0.5  # nn.Linear's initialisation range
            weight = ((torch.rand(T, H, generator=g) * 2 - 1) * bound).to(self.device, self.dtype).requires_grad_()
            bias = ((torch.rand(T, generator=g) * 2 - 1) * bound).to(self.device, self.dtype).requires_grad_()
            x = Inputs({"hidden": randn(B, S, H), "weight": weight, "bias": bias}, ["hidden", "weight", "bias"])
            out_shape = (B, S, T)
        else:
            B, H, S, D = s["batch"], s["heads"], s["seq_len"], s["head_dim"]
            S_q, H_kv = self.q_len, self.kv_heads
            # in the input dtype, as the seed's TTM (cast to the hidden states' dtype) returns it
            low = 0.5 if self.op == "attention-decode" else 0.01
            temperature = (torch.rand(B, S_q, TEMPERATURE_HEADS, generator=g) * (0.99 - low) + low)
            temperature = temperature.to(self.device, self.dtype).requires_grad_()
            if self.op == "attention-wide":
                # q = k = v: with unit-variance entries the diagonal logit q_i·q_i/√D is √D = 64
                # and the softmax is one-hot (its gradients vanish, and so does any check on
                # them); at 1/4 it is 4 (t̄·4 after the temperature) against off-diagonal ones of
                # about 1/16: a softmax that is neither one-hot nor flat.
                h = randn(B, H, S, D, scale=0.25)
                x = Inputs({"q": h, "k": h, "v": h, "temperature": temperature}, ["q", "temperature"])
            else:  # k and v with H_kv heads (grouped-query attention) and S keys
                x = Inputs({"q": randn(B, H, S_q, D), "k": randn(B, H_kv, S, D), "v": randn(B, H_kv, S, D),
                            "temperature": temperature}, ["q", "k", "v", "temperature"])
            out_shape = (B, H, S_q, D)
        x.grad_out = torch.randn(*out_shape, generator=g).to(self.device, self.dtype)
        return x

    # --------------------------------------------------------------- work
    def flops(self, mode: str) -> float | None:
        s = self.shape
        if self.op == "projection":
            n = s["batch"] * s["seq_len"] * s["hidden"] * s["temp_heads"]
            return {"forward": 2 * n, "backward": 4 * n, "full": 6 * n}[mode]
        fwd = 4 * s["batch"] * s["heads"] * self.q_len * s["seq_len"] * s["head_dim"]
        if self.causal:
            fwd /= 2
        return fwd * {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode]

    def bytes(self, mode: str) -> float | None:
        s = self.shape
        e = torch.empty((), dtype=self.dtype).element_size()
        if self.op == "attention-decode":  # q in, output out, the KV cache read once
            B, D = s["batch"], s["head_dim"]
            return (2 * B * s["heads"] * self.q_len * D + 2 * B * self.kv_heads * s["seq_len"] * D) * e
        if self.op != "projection":
            return None
        n_tok, H, T = s["batch"] * s["seq_len"], s["hidden"], s["temp_heads"]
        fwd = (n_tok * H + T * H + T) * e + n_tok * T * e
        bwd = n_tok * T * e + (n_tok * H + T * H) * e + (n_tok * H + T * H + T) * e
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    def record_fields(self) -> dict:
        return {"op": self.op, **self.shape, "dtype": self.dtype_name, "causal": self.causal,
                "mask": self.mask if self.op != "projection" else None}


def op_cases(op: str, seq_lens, dtypes, device: str, causal_values, mask: str, quick: bool,
             batch: int | None = None, allow_interpreter: bool = False,
             compile_dynamic: bool = False) -> list[Case]:
    base = dict(DEFAULT_SHAPES[op][1 if quick else 0])
    if batch:
        base["batch"] = batch
    causals = op_causal_values(op, causal_values)
    cases = []
    for dtype in dtypes:  # shortest first: a run cut short by a time limit loses the longest
        for S in sorted(seq_lens):
            for causal in causals:
                shape = {**base, "seq_len": S}
                if op != "projection":  # keep the order batch, heads, [kv_heads, q_len,] seq_len, head_dim
                    shape = {k: shape[k] for k in ATTENTION_DIMS if k in shape}
                cases.append(Case(op, shape, dtype, device, causal, mask, allow_interpreter, compile_dynamic))
    return cases
