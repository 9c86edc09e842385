"""What is measured: the ops' shapes, their inputs, and the work they do (FLOPs, bytes).

Shapes (the seed's model is Llama-2-7B: hidden 4096, 32 heads of 128, TTM with 8 heads):

    attention-wide   the seed's TGR attention: one head as wide as the hidden state, D = 4096,
                     q = k = v = the final hidden state (one tensor, as the seed passes it).
    attention-flash  multi-head TGR attention: 32 heads, D = 128, separate q, k, v.
    projection       TTM: hidden [B, S, 4096] -> 8 temperatures per token.

Inputs: standard-normal q/k/v/hidden; temperatures uniform in [0.01, 0.99] with 8 heads, in the
input dtype as in the seed (their mean t̄ is near 0.5, so GSoT at τ = 0.4 keeps most rows and
prunes some); the key-padding mask
drops the last S/8 keys of the last batch row (right padding, as a tokenizer pads), or is absent
with ``--mask none``. Every input that a training step differentiates requires a gradient: q, k,
v (one tensor on the wide path) and the temperatures; hidden, weight and bias for the projection.

Work, for achieved rates (the convention of FlashAttention's benchmarks):

    attention  forward 4·B·H·S²·D FLOPs (two GEMMs), halved when causal; backward 2.5× the
               forward (five GEMMs); full (forward + backward) 3.5×.
    projection bytes: forward reads hidden and W, writes t; backward reads dt, hidden and W and
               writes d hidden, dW, db; full is their sum. The op is memory bound (T = 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

OPS = ("projection", "attention-wide", "attention-flash")
MODES = ("forward", "backward", "full")
TEMPERATURE_HEADS = 8

# (full size, --quick size): the quick sizes keep each path (wide: D > 256) but run in seconds.
DEFAULT_SHAPES = {
    "attention-wide": ({"batch": 1, "heads": 1, "head_dim": 4096}, {"batch": 1, "heads": 1, "head_dim": 512}),
    "attention-flash": ({"batch": 1, "heads": 32, "head_dim": 128}, {"batch": 1, "heads": 2, "head_dim": 64}),
    "projection": ({"batch": 1, "hidden": 4096, "temp_heads": TEMPERATURE_HEADS},
                   {"batch": 1, "hidden": 256, "temp_heads": TEMPERATURE_HEADS}),
}
DEFAULT_SEQ_LENS = [128, 256, 512, 1024, 2048, 4096]
QUICK_SEQ_LENS = [128]


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
            B, S = self.shape["batch"], self.shape["seq_len"]
            keep = torch.ones(B, S, dtype=torch.bool)
            keep[-1, S - S // 8:] = False
            self.keep = keep.to(self.device)

    def with_dtype(self, dtype: torch.dtype) -> Case:
        return replace(self, dtype=dtype)

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
            # in the input dtype, as the seed's TTM (cast to the hidden states' dtype) returns it
            temperature = (torch.rand(B, S, TEMPERATURE_HEADS, generator=g) * 0.98 + 0.01)
            temperature = temperature.to(self.device, self.dtype).requires_grad_()
            if self.op == "attention-wide":
                # q = k = v: with unit-variance entries the diagonal logit q_i·q_i/√D is √D = 64
                # and the softmax is one-hot (its gradients vanish, and so does any check on
                # them); at 1/4 it is 4 (t̄·4 after the temperature) against off-diagonal ones of
                # about 1/16: a softmax that is neither one-hot nor flat.
                h = randn(B, H, S, D, scale=0.25)
                x = Inputs({"q": h, "k": h, "v": h, "temperature": temperature}, ["q", "temperature"])
            else:
                x = Inputs({"q": randn(B, H, S, D), "k": randn(B, H, S, D), "v": randn(B, H, S, D),
                            "temperature": temperature}, ["q", "k", "v", "temperature"])
            out_shape = (B, H, S, D)
        x.grad_out = torch.randn(*out_shape, generator=g).to(self.device, self.dtype)
        return x

    # --------------------------------------------------------------- work
    def flops(self, mode: str) -> float | None:
        s = self.shape
        if self.op == "projection":
            n = s["batch"] * s["seq_len"] * s["hidden"] * s["temp_heads"]
            return {"forward": 2 * n, "backward": 4 * n, "full": 6 * n}[mode]
        fwd = 4 * s["batch"] * s["heads"] * s["seq_len"] ** 2 * s["head_dim"]
        if self.causal:
            fwd /= 2
        return fwd * {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode]

    def bytes(self, mode: str) -> float | None:
        if self.op != "projection":
            return None
        s = self.shape
        e = torch.empty((), dtype=self.dtype).element_size()
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
    causals = [False] if op == "projection" else causal_values
    cases = []
    for dtype in dtypes:  # shortest first: a run cut short by a time limit loses the longest
        for S in sorted(seq_lens):
            for causal in causals:
                shape = {**base, "seq_len": S}
                if op != "projection":  # keep the order batch, heads, seq_len, head_dim
                    shape = {"batch": base["batch"], "heads": base["heads"], "seq_len": S,
                             "head_dim": base["head_dim"]}
                cases.append(Case(op, shape, dtype, device, causal, mask, allow_interpreter, compile_dynamic))
    return cases
