"""pytest-benchmark suites: each provider of each op, forward and full (forward + backward).

    pytest benchmarks/test_ops.py --benchmark-only                       # all of them
    pytest benchmarks/test_ops.py --benchmark-only -k "wide and full"    # a group

Shapes are small on a CPU (seconds for the whole file) and the seed's own on a GPU; benchmarks
are grouped by op and mode, so pytest-benchmark's table compares the providers side by side.
The runner (``python -m benchmarks``) is the tool for sweeps, memory, checks and plots; these
suites are for quick comparisons and for pytest-benchmark's own history (``--benchmark-save``).
"""
import pytest
import torch

from benchmarks.cases import Case
from benchmarks.providers import ATTENTION_PROVIDERS, PROJECTION_PROVIDERS
from benchmarks.suite_ops import make_job

from .conftest import DEVICE

GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
SHAPES = {  # the seed's shapes on a GPU; on a CPU small enough for a few ms per call
    "projection": {"batch": 1, "seq_len": 4096 if GPU else 512, "hidden": 4096, "temp_heads": 8},
    "attention-wide": {"batch": 1, "heads": 1, "seq_len": 2048 if GPU else 256, "head_dim": 4096},
    "attention-flash": {"batch": 1, "heads": 32 if GPU else 8, "seq_len": 2048 if GPU else 256, "head_dim": 128},
}
PARAMS = [(op, name) for op, provs in (("projection", PROJECTION_PROVIDERS),
                                       ("attention-wide", ATTENTION_PROVIDERS),
                                       ("attention-flash", ATTENTION_PROVIDERS)) for name in provs]


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("op,provider", PARAMS, ids=[f"{op}-{p}" for op, p in PARAMS])
def test_op(benchmark, op, provider, mode):
    case = Case(op, SHAPES[op], DTYPE, DEVICE, causal=op != "projection")
    registry = PROJECTION_PROVIDERS if op == "projection" else ATTENTION_PROVIDERS
    reason = registry[provider].available(case)
    if reason or (provider == "tgr-triton" and not GPU):  # the interpreter's speed means nothing
        pytest.skip(reason or "tgr-triton runs on CPU only interpreted")
    x = case.make_inputs(seed=0)
    if mode == "forward":
        x = x.detached()
    job = make_job(registry[provider].build(case), [x], mode)
    try:
        job.run(job.prepare(0))  # compilation and first-call set-up stay out of the timing
    except Exception as exc:  # e.g. FlexAttention has no backward on CPU
        pytest.skip(f"{provider} cannot run this: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")

    def call():
        out = job.run(job.prepare(0))
        _sync()
        return out

    benchmark.group = f"{op} {mode} {case.dtype_name} " + " ".join(f"{k}={v}" for k, v in case.shape.items())
    benchmark.extra_info.update(device=DEVICE, dtype=case.dtype_name, causal=case.causal, **case.shape)
    out = benchmark.pedantic(call, rounds=5 if not GPU else 20, warmup_rounds=1, iterations=1)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(bool(torch.isfinite(o).all()) for o in outs)
