"""The split-KV decode path (``tgr_kernels.attention_decode``): a few query rows against a long
key/value cache, forward only. Parity against the float64 reference (the library's criterion) with
every mask form, causal decoding (bottom-right aligned), GSoT, the three dtypes and grouped-query
attention; the same result for any number of key chunks; and the dispatcher's choice of it."""

import pytest
import torch

from helpers import DEVICE, grouped_inputs, make_mask
from parity import FLOOR, assert_parity, max_err
from tgr_kernels import _configs, attention_decode, attention_flash
from tgr_kernels._gate import Gate
from tgr_kernels.attention import temperature_guided_attention
from tgr_kernels.reference import temperature_guided_attention_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Long enough for several chunks of the interpreter's 32-key blocks, and odd (no block divides it).
S_K = 301


def decode_mask(kind, B, H_q, S_q, S_k, dtype):
    """``helpers.make_mask``'s masks, plus Hugging Face's 4-D additive form for cached decoding:
    ``finfo(dtype).min`` on left padding of one sequence and on every key of one query row."""
    if kind == "hf4d":
        mask = torch.zeros(B, 1, S_q, S_k, dtype=dtype, device=DEVICE)
        mask[-1, :, :, :5] = torch.finfo(dtype).min  # left padding
        mask[0, :, -1, :] = torch.finfo(dtype).min  # a row that sees no key
        return mask
    return make_mask(kind, B, H_q, S_q, S_k)


decode_inputs = grouped_inputs


def reference(q, k, v, temperature, mask, dtype, **kwargs):
    """The eager reference in ``dtype`` (float64: the truth), k/v expanded to q's heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    upcast = dtype == torch.float64
    t = temperature.double() if upcast else temperature
    return temperature_guided_attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), t, mask, upcast=upcast, **kwargs)


@pytest.fixture
def launched(monkeypatch):
    """The kernels launched, with their grids and arguments, recorded through ``_configs.launch``."""
    seen = []
    real_launch = _configs.launch

    def spy(kernel, grid, configs, *args, **kwargs):
        seen.append((kernel, grid, args))
        return real_launch(kernel, grid, configs, *args, **kwargs)

    monkeypatch.setattr(_configs, "launch", spy)
    return seen


# (B, H_q, H_kv, S_q, D, mask, causal, gsot_threshold, dtype)
DECODE_CASES = [
    (2, 2, 2, 1, 32, None, False, None, F32),
    (2, 2, 2, 1, 32, "kpm_dead", True, 0.5, F32),  # a sequence with every key masked
    (2, 2, 2, 3, 40, "hf4d", True, None, F32),  # finfo.min, a dead row; D not a multiple of 16
    (2, 2, 2, 3, 32, "kpm", True, 0.5, F16),
    (2, 1, 1, 3, 16, "additive_inf", False, 0.45, F16),
    (2, 2, 2, 1, 64, "hf4d", True, 0.5, BF16),
    (1, 2, 2, 3, 32, "bool4d", True, None, BF16),
    (2, 4, 2, 3, 32, "kpm", True, 0.5, F32),  # grouped-query attention: two query heads per kv head
    (1, 4, 1, 1, 16, "hf4d", True, None, F16),  # one kv head for all four
    (2, 2, 2, 3, 16, "kpm", True, 2.0, F32),  # every row pruned
]


def _case_id(case):
    B, H_q, H_kv, S_q, D, mask, causal, thr, dtype = case
    return (f"B{B}-H{H_q}/{H_kv}-Sq{S_q}-D{D}-{mask}-{'causal' if causal else 'full'}-thr{thr}-"
            f"{str(dtype).split('.')[-1]}")


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_parity_with_reference(case, launched):
    B, H_q, H_kv, S_q, D, mask_kind, causal, thr, dtype = case
    q, k, v, temperature = decode_inputs(B, H_q, H_kv, S_q, S_K, D, dtype)
    mask = decode_mask(mask_kind, B, H_q, S_q, S_K, dtype)
    kwargs = dict(causal=causal, gsot_threshold=thr)
    with torch.no_grad():
        out = temperature_guided_attention(q, k, v, temperature, mask, backend="triton", **kwargs)
    kernels = [kernel for kernel, *_ in launched]
    assert kernels == [attention_decode._decode_split_kernel, attention_decode._decode_combine_kernel]
    split_grid = launched[0][1]
    assert split_grid[0] == B * H_q * S_q and split_grid[1] > 1, split_grid  # several chunks per row
    assert out.dtype == dtype and out.shape == q.shape

    truth = reference(q, k, v, temperature, mask, torch.float64, **kwargs)
    eager = reference(q, k, v, temperature, mask, dtype, **kwargs)
    assert_parity("out", out, eager, truth, dtype)
    # Rows that see no key, and pruned rows, are exactly zero.
    zero_rows = (truth == 0).all(-1)
    assert torch.equal(out[zero_rows], torch.zeros_like(out[zero_rows]))
    if mask_kind in ("kpm_dead", "hf4d") or thr == 2.0:
        assert zero_rows.any()


@pytest.mark.parametrize("dtype", [F32, F16])
def test_every_split_count_gives_the_same_result(dtype, launched):
    """1, 2, 5 and 10 chunks (the whole cache in one program, up to one 32-key block each): each
    passes parity, and they agree to rounding."""
    B, H_q, S_q, D = 2, 2, 3, 32
    q, k, v, temperature = decode_inputs(B, H_q, H_q, S_q, S_K, D, dtype)
    mask = decode_mask("kpm", B, H_q, S_q, S_K, dtype)
    t_bar = temperature.float().mean(-1)
    kwargs = dict(causal=True, gsot_threshold=0.3)
    truth = reference(q, k, v, temperature, mask, torch.float64, **kwargs)
    eager = reference(q, k, v, temperature, mask, dtype, **kwargs)
    outs = {}
    for splits in (1, 2, 5, 10):
        launched.clear()
        outs[splits] = attention_decode.decode_forward(q, k, v, t_bar, mask, None, True, Gate(0.3), D ** -0.5,
                                                       num_splits=splits)
        assert launched[0][1] == (B * H_q * S_q, splits)
        assert_parity(f"out with {splits} chunks", outs[splits], eager, truth, dtype)
    for splits, out in outs.items():
        # fp32 accumulation in every case: the chunkings differ by a few fp32 roundings, then the
        # final cast to the output dtype.
        bound = 1e-6 if dtype == F32 else FLOOR[dtype] / 10
        assert max_err(out, outs[1]) <= bound, f"{splits} chunks differ from one chunk"


def test_causal_decoding_is_bottom_right_aligned():
    """Query i of the last S_q rows sees keys j <= i + S_k − S_q: the last row sees all of them,
    the first one all but the last S_q − 1, as a recomputed full forward's last rows do."""
    B, H, S_q, D = 1, 2, 3, 16
    q, k, v, temperature = decode_inputs(B, H, H, S_q, S_K, D, F32)
    with torch.no_grad():
        out = temperature_guided_attention(q, k, v, temperature, causal=True, backend="triton")
    for i in range(S_q):
        visible = S_K - S_q + i + 1
        row = reference(q[:, :, i:i + 1], k[:, :, :visible], v[:, :, :visible], temperature[:, i:i + 1], None,
                        torch.float64)
        assert max_err(out[:, :, i:i + 1], row) < FLOOR[F32]


def test_dispatcher_takes_the_decode_path_only_without_gradient(launched):
    B, H, D = 1, 2, 32
    q, k, v, temperature = decode_inputs(B, H, H, 1, 70, D, F32)
    decode = {attention_decode._decode_split_kernel, attention_decode._decode_combine_kernel}
    with torch.no_grad():
        temperature_guided_attention(q, k, v, temperature, causal=True, backend="triton")
    assert {kernel for kernel, *_ in launched} == decode

    # A gradient is needed: the flash path, which has a backward.
    launched.clear()
    q.requires_grad_()
    out = temperature_guided_attention(q, k, v, temperature, causal=True, backend="triton")
    assert {kernel for kernel, *_ in launched} == {attention_flash._flash_fwd_kernel}
    assert out.requires_grad

    # More query rows than the decode path takes: the flash forward.
    launched.clear()
    S_q = attention_decode.DECODE_MAX_QUERY_ROWS + 1
    q, k, v, temperature = decode_inputs(B, H, H, S_q, 70, D, F32)
    with torch.no_grad():
        temperature_guided_attention(q, k, v, temperature, causal=True, backend="triton")
    assert {kernel for kernel, *_ in launched} == {attention_flash._flash_fwd_kernel}


def test_decode_compiles_as_one_opaque_op(launched):
    """Under torch.compile(fullgraph=True) a decoding step still takes the split-KV kernels, as the
    custom op ``tgr_kernels::decode_attention_forward``, and gives eager's output."""
    B, H_q, H_kv, D = 1, 4, 2, 32
    q, k, v, temperature = decode_inputs(B, H_q, H_kv, 1, 70, D, F32)

    def step(q, k, v, temperature):
        return temperature_guided_attention(q, k, v, temperature, causal=True, gsot_threshold=0.3,
                                            gsot_mode="soft", backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = step(q, k, v, temperature)
        launched.clear()
        out = compiled(q, k, v, temperature)
    assert {kernel for kernel, *_ in launched} == {attention_decode._decode_split_kernel,
                                                   attention_decode._decode_combine_kernel}
    assert torch.equal(out, eager)


def test_decode_op_fake_matches_real():
    q, k, v, temperature = decode_inputs(1, 4, 2, 2, 40, 16, F32)
    args = (q, k, v, temperature.mean(-1), None, None, True, 0.3, 1, 0.05, 0.25)
    torch.library.opcheck(torch.ops.tgr_kernels.decode_attention_forward, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_decode_reads_a_strided_cache_in_place(launched):
    """k and v as views of a [B, S_k, H, D] cache (no contiguous copy): same result."""
    B, H, S_q, D = 2, 2, 1, 32
    q, _, _, temperature = decode_inputs(B, H, H, S_q, S_K, D, F32)
    k_cache, v_cache = (torch.randn(B, S_K, H, D, device=DEVICE) for _ in range(2))
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    with torch.no_grad():
        out = temperature_guided_attention(q, k, v, temperature, causal=True, backend="triton")
    kernel, _, args = launched[0]
    assert kernel is attention_decode._decode_split_kernel
    assert (args[1].data_ptr(), args[2].data_ptr()) == (k_cache.data_ptr(), v_cache.data_ptr())
    truth = reference(q, k.contiguous(), v.contiguous(), temperature, None, torch.float64, causal=True)
    assert max_err(out, truth) < FLOOR[F32]


@pytest.mark.parametrize("S_k,rows,expected", [
    (4096, 32, 8),      # one sequence, 32 heads: 4096 keys in 8 chunks of 4 blocks (the shortest chunk)
    (32768, 32, 17),    # a long cache: enough programs for 4 per SM of 132
    (4096, 4096, 1),    # a large batch fills the GPU without splitting
    (100, 1, 1),        # a short cache: one chunk
    (1 << 20, 1, 128),  # capped
])
def test_split_count_policy(S_k, rows, expected):
    assert _configs.decode_num_splits(S_k, rows, block_n=128, sm_count=132) == expected
