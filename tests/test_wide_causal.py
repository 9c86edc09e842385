"""The causal wide path in row blocks: block r multiplies its query rows only against the keys
they can see, ``K[:end_r]``, forward and backward. Parity against the float64 reference on both
row-op implementations, and a count of the GEMM work that fails if causal falls back to the
full square."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_inputs, make_mask, rebuild_inputs
from parity import assert_parity
from tgr_kernels import attention_wide
from tgr_kernels._validation import check_attention_inputs
from tgr_kernels.reference import temperature_guided_attention_ref

F32, BF16 = torch.float32, torch.bfloat16


def wide(q, k, v, temperature, mask, causal, thr, row_ops, chunk_bytes=None):
    args = check_attention_inputs(q, k, v, temperature, mask, causal, thr, None)
    return attention_wide.wide_attention(q, k, v, temperature.float().mean(-1), args.key_padding, args.additive,
                                         causal, args.gate, args.scale, row_ops=row_ops, chunk_bytes=chunk_bytes)


def check_causal_parity(row_ops, B, H, S_q, S_k, D, mask_kind, thr, same_qkv, dtype, chunk_bytes=None,
                        frozen=()):
    """Output and every gradient (of the leaves not in ``frozen``) within the library's criterion."""
    leaves, (q, k, v), temperature = make_inputs(B, H, S_q, S_k, D, dtype, same_qkv)
    for i in frozen:
        leaves[i].requires_grad_(False)
    wanted = [x for x in leaves if x.requires_grad] + [temperature]
    mask = make_mask(mask_kind, B, H, S_q, S_k)
    out = wide(q, k, v, temperature, mask, True, thr, row_ops, chunk_bytes)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, wanted, grad_out)

    def reference(dtype_, upcast):
        new, qkv, t = rebuild_inputs(leaves, temperature, same_qkv, dtype_)
        for i in frozen:
            new[i].requires_grad_(False)
        ref = temperature_guided_attention_ref(*qkv, t, mask, causal=True, gsot_threshold=thr, upcast=upcast)
        grads_ = torch.autograd.grad(ref, [x for x in new if x.requires_grad] + [t], grad_out.to(ref.dtype))
        return ref, grads_

    truth, truth_grads = reference(torch.float64, True)
    eager, eager_grads = reference(dtype, False)
    assert_parity("out", out, eager, truth, dtype)
    for i, (g, ge, gt) in enumerate(zip(grads, eager_grads, truth_grads, strict=True)):
        assert_parity(f"grad {i}", g, ge, gt, dtype)


@pytest.fixture
def row_block_of_8(monkeypatch):
    """Blocks of 8 query rows: several blocks (and a short last one) at test sizes, for the plain
    row blocks and for the triangle's leaves alike."""
    monkeypatch.setattr(attention_wide, "CAUSAL_ROW_BLOCK", 8)
    monkeypatch.setattr(attention_wide, "CAUSAL_TRIANGLE_ROW_BLOCK", 8)


# (B, H, S_q, S_k, D, mask, gsot_threshold, q = k = v)
TORCH_CASES = [
    (1, 1, 45, 45, 264, "kpm", 0.45, True),      # the seed's shape: one X, key padding, GSoT
    (2, 1, 33, 33, 288, None, None, False),      # separate q, k, v; last block of one row
    (1, 2, 20, 52, 272, "additive_inf", 0.5, False),  # S_q < S_k: bottom-right causal
    (2, 1, 40, 19, 264, "kpm_dead", None, False),  # S_q > S_k: the first 21 rows see no key
    (2, 2, 24, 24, 264, "bool4d", None, True),
]


def _id(case):
    B, H, S_q, S_k, D, mask, thr, same = case
    return f"{B}x{H}x{S_q}x{S_k}x{D}-{mask}-gsot{thr}-{'qkv' if same else 'sep'}"


@pytest.mark.parametrize("case", TORCH_CASES, ids=_id)
def test_torch_row_blocks_fp32(case, row_block_of_8):
    check_causal_parity("torch", *case, F32)


@pytest.mark.parametrize("case", TORCH_CASES[:3], ids=_id)
def test_torch_row_blocks_bf16(case, row_block_of_8):
    check_causal_parity("torch", *case, BF16)


@pytest.mark.parametrize("case", TORCH_CASES[:2], ids=_id)
def test_torch_row_blocks_recompute_scores(case, row_block_of_8):
    """A triangle over chunk_bytes: the forward keeps no Z and the backward recomputes each block's."""
    B, H, S_q, S_k = case[:4]
    check_causal_parity("torch", *case, F32, chunk_bytes=B * H * 8 * S_k * 4)


@pytest.mark.parametrize("frozen", [(1, 2), (0,)], ids=["only-dq", "only-dkv"])
def test_torch_row_blocks_partial_gradients(frozen, row_block_of_8):
    check_causal_parity("torch", 1, 2, 30, 30, 264, "kpm", None, False, F32, frozen=frozen)


@pytest.mark.parametrize("case", [(1, 1, 20, 20, 264, "kpm", 0.45, True),
                                  (2, 1, 12, 17, 272, "additive_inf", None, False),
                                  (1, 1, 19, 11, 264, "kpm_dead", None, False)], ids=_id)
def test_triton_row_blocks_interpreted(case, row_block_of_8):
    check_causal_parity("triton", *case, F32)


class GemmWork(TorchDispatchMode):
    """Multiply-adds of every matrix product that reaches ATen (mm, bmm, addmm, baddbmm; any
    overload), leaving out row dot products (the row ops' einsums, m = n = 1)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1].rstrip("_")
        if name in ("mm", "bmm", "addmm", "baddbmm"):
            a, b = args[:2] if name in ("mm", "bmm") else args[1:3]
            if a.shape[-2] > 1 or b.shape[-1] > 1:
                self.macs += (a.shape[0] if a.dim() == 3 else 1) * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("same_qkv", [True, False], ids=["qkv", "sep"])
def test_causal_multiplies_only_the_triangle(same_qkv):
    """At the default block size: forward and backward do about half the non-causal GEMM work
    (the triangle plus half of each diagonal block: R / S more, 1/4 at S = 4R)."""
    S, D = 4 * attention_wide.CAUSAL_ROW_BLOCK, 264
    work = {}
    for causal in (False, True):
        leaves, (q, k, v), temperature = make_inputs(1, 1, S, S, D, F32, same_qkv)
        with GemmWork() as forward:
            out = wide(q, k, v, temperature, None, causal, None, "torch")
        with GemmWork() as backward:
            torch.autograd.grad(out, leaves + [temperature], torch.randn_like(out))
        work[causal] = forward.macs, backward.macs
    square = S * S * D
    # Non-causal: QKᵀ and PV forward; dP, dQ, dK, dV backward (dQ + dK in one GEMM when q = k = v).
    assert work[False][0] == 2 * square and work[False][1] >= (3 if same_qkv else 4) * square
    triangle = (S * S / 2) * (1 + attention_wide.CAUSAL_ROW_BLOCK / S) * D  # per GEMM
    assert work[True][0] <= 2 * triangle
    assert work[True][1] <= 4 * triangle


@pytest.mark.parametrize("S_q,S_k,block", [(45, 45, 8), (40, 19, 8), (20, 52, 8), (2048, 2048, 256), (7, 7, 8)])
def test_causal_blocks_tile_each_visible_key_once(S_q, S_k, block, monkeypatch):
    """The large blocks cover exactly what each row chunk sees, each entry once, and flag a block
    as ``written`` exactly when an earlier block already wrote its rows."""
    monkeypatch.setattr(attention_wide, "CAUSAL_ROW_BLOCK", block)
    chunks = attention_wide._chunks(S_q, S_k, 1, 1, 4, True, 1 << 40)
    visible = torch.zeros(S_q, S_k, dtype=torch.int64)
    for row0, row1, n_cols in chunks:
        visible[row0:row1, :n_cols] = 1
    covered = torch.zeros_like(visible)
    rows_written = torch.zeros(S_q, dtype=torch.bool)
    for row0, row1, col0, col1, written in attention_wide._causal_blocks(chunks):
        assert row1 > row0 and col1 > col0
        assert bool(rows_written[row0:row1].all()) == written == bool(rows_written[row0:row1].any())
        covered[row0:row1, col0:col1] += 1
        rows_written[row0:row1] = True
    assert torch.equal(covered, visible)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [TORCH_CASES[0], TORCH_CASES[3]], ids=_id)
def test_torch_row_blocks_inference(case, dtype, row_block_of_8):
    """No gradient wanted: no autograd node and no kept Z, the causal square filled in large blocks."""
    B, H, S_q, S_k, D, mask_kind, thr, same = case
    with torch.no_grad():
        _, (q, k, v), temperature = make_inputs(B, H, S_q, S_k, D, dtype, same)
        mask = make_mask(mask_kind, B, H, S_q, S_k)
        out = wide(q, k, v, temperature, mask, True, thr, "torch")
        eager = temperature_guided_attention_ref(q, k, v, temperature, mask, causal=True, gsot_threshold=thr)
        truth = temperature_guided_attention_ref(q.double(), k.double(), v.double(), temperature.double(), mask,
                                                 causal=True, gsot_threshold=thr, upcast=True)
    assert_parity("out", out, eager, truth, dtype)
