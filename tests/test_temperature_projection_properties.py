"""Property-based parity of the temperature projection: many odd configurations at once.

Each example draws a backend, the hidden and weight dtypes (the model's mixes included), one to
three leading dims, H from 1, T from 1 to 128, bias, which inputs need gradients, the clamp, the
pre-activations' scale (sigmoid saturates at the largest), a constant outlier dimension of the
hidden states that the bias cancels, strided hidden and weight, and the upstream gradient's
kind. Output and gradients meet the library's criterion against float64 (tests/parity.py, the
larger floor of the two dtypes) plus one unit in the last place at the truth's magnitude
(tests/properties.py); dW's column of the outlier dimension, C·Σ dz, is compared at db's scale.
The examples are derandomized: the same on every run.

The clamp's gradient mask is discontinuous at its bounds: where the float64 pre-activation lies
within rounding distance of a bound (and not on it), any low-precision evaluation may fall on the
other side. The upstream gradient is zero there, for every path alike.
"""
import math

import pytest
import torch

import properties as props
from helpers import DEVICE
from parity import FLOOR, max_err
from tgr_kernels import temperature_projection
from tgr_kernels.reference import temperature_projection_ref

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

# (hidden, weight) dtypes; bf16 under Triton's interpreter is computed in fp32 by the op itself.
DTYPE_PAIRS = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16 h, fp32 W": (torch.bfloat16, torch.float32),
    "fp16 h, fp32 W": (torch.float16, torch.float32),
    "fp32 h, fp16 W": (torch.float32, torch.float16),
}


@st.composite
def cases(draw, backend):
    return dict(
        **props.draw_common(draw, st, backend),
        dtypes=draw(st.sampled_from(sorted(DTYPE_PAIRS))),
        hidden_size=draw(st.integers(1, 80)),
        heads=draw(st.sampled_from([1, 2, 3, 5, 8, 17, 32, 64, 65, 128])),
        clamp=draw(st.sampled_from([(0.0, 1.0), (0.01, 0.99), (0.3, 0.7), (0.5, 0.5)])),
        scale=draw(st.sampled_from([0.1, 2.0, 20.0])),
        outlier=draw(st.sampled_from([None, None, 256.0])),
        upstream=draw(st.sampled_from(["randn", "ones expanded", "large"])),
    )


def build(case):
    """hidden, weight, bias (in their dtypes, strided as drawn) and the upstream gradient."""
    g, randn = props.seeded_randn(case["seed"])
    hidden_dtype, weight_dtype = DTYPE_PAIRS[case["dtypes"]]
    lead, t = case["lead"], case["heads"]
    hidden, weight = props.strided_hidden_and_weight(randn, lead, case["hidden_size"], t, case["scale"],
                                               case["hidden_layout"], case["weight_layout"])
    bias = randn(t) if case["bias"] else None
    if case["outlier"] is not None:
        hidden[..., 0] = case["outlier"]
        weight[:, 0] = 1.0 + torch.rand(t, generator=g).to(DEVICE)  # the product is ~C·(1..2)
        if bias is not None:  # cancels the outlier's product: z stays O(scale)
            bias = -case["outlier"] * weight[:, 0].to(weight_dtype).double()
    hidden, weight = hidden.to(hidden_dtype), weight.to(weight_dtype)
    bias = None if bias is None else bias.to(weight_dtype)
    out_dtype = torch.promote_types(hidden_dtype, weight_dtype)
    shape = (*lead, t)
    if case["upstream"] == "ones expanded":  # what out.sum().backward() hands: stride 0
        upstream = torch.ones((), device=DEVICE, dtype=out_dtype).expand(shape)
    else:
        upstream = (randn(*shape) * (100.0 if case["upstream"] == "large" else 1.0)).to(out_dtype)
    return hidden, weight, bias, _off_the_clamp_edges(upstream, hidden, weight, bias, case["clamp"])


def _off_the_clamp_edges(upstream, hidden, weight, bias, clamp):
    """Zero the upstream gradient where the float64 pre-activation z is within rounding distance
    of a clamp bound (fp32 accumulation, or a bf16 GEMM's output: 2⁻⁸ of Σ|h w| + |b|) but not on
    it: there the clamp's gradient mask may flip in any low-precision evaluation."""
    h64 = hidden.double().reshape(-1, hidden.shape[-1])
    w64 = weight.double()
    z = h64 @ w64.t()
    reach = h64.abs() @ w64.abs().t()
    if bias is not None:
        z, reach = z + bias.double(), reach + bias.double().abs()
    sigma = torch.sigmoid(z)
    near = torch.zeros_like(z, dtype=torch.bool)
    for bound in clamp:
        if 0.0 < bound < 1.0:
            near |= ((z - math.log(bound / (1 - bound))).abs() <= 2.0 ** -8 * reach + 1e-12) & (sigma != bound)
    return upstream.masked_fill(near.reshape(upstream.shape), 0)


def check(case):
    hidden, weight, bias, upstream = build(case)
    low, high = case["clamp"]
    tensors = (hidden, weight, bias)

    def ours(h, w, b):
        return temperature_projection(h, w, b, low, high, backend=case["backend"])

    def eager(h, w, b):
        return temperature_projection_ref(h, w, b, low, high, upcast=False)

    got = props.value_and_grads(ours, props.leaves(tensors, case["requires"]), upstream)
    base = props.value_and_grads(eager, props.leaves(tensors, case["requires"]), upstream)
    truth = props.value_and_grads(eager, props.leaves(tensors, case["requires"], torch.float64), upstream.double())
    floor = max(FLOOR[hidden.dtype], FLOOR[weight.dtype])
    dtypes = {"out": got[0].dtype, "d hidden": hidden.dtype, "dW": weight.dtype, "db": weight.dtype}
    assert got[0].dtype == torch.promote_types(hidden.dtype, weight.dtype)
    for name, a, e, t, src in zip(("out", "d hidden", "dW", "db"), got, base, truth, (None, *tensors), strict=True):
        if t is None:
            assert a is None, name
            continue
        assert a.shape == t.shape and (src is None or a.dtype == src.dtype), name
        if not math.isfinite(max_err(e, t)):  # eager itself overflows (an fp16 dW past 65504)
            continue
        if name == "dW" and case["outlier"] is not None:
            # dW's column 0 is C·Σ dz (h's outlier dimension is the constant C), the db check at
            # C times its magnitude: compared at db's scale.
            a, e, t = (x.double().clone() for x in (a, e, t))
            for x in (a, e, t):
                x[:, 0] /= case["outlier"]
        props.assert_close_to_truth(name, a, e, t, dtypes[name], floor)


@pytest.mark.parametrize("backend,examples", [("torch", 300), ("triton", 150)])
def test_properties(backend, examples):
    props.run_examples(hypothesis, cases(backend), check, examples)
