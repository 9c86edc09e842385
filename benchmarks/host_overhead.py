"""Where the host (Python) time of small attention calls goes.

Small calls (a decoding step, a short flash forward, the projection of one token) are bound by
the host, not the device: this probe times them two ways and profiles them, so that the
overhead can be attributed to functions.

    python -m benchmarks.host_overhead [--device cuda|cpu] [--quick] [--out FILE]

Sections (each starts with a ``== name ==`` line):

    header          device, versions, date (benchmarks.measure.environment)
    timing          per case, ms per call: ``throughput`` = N calls, one sync at the end (the host
                    issue rate); ``synced`` = a sync after each call (host + device latency);
                    against SDPA (for the projection: eager Linear + sigmoid + clamp) on the
                    same inputs
    profile:<case>  cProfile of the case's calls: the top functions by cumulative and by own
                    time; on CUDA, device activities (kernels, copies) per call from
                    torch.profiler
    model-decode    one decoding step (one new token against a cache) of the every-layer TGR
                    model (benchmarks.suite_e2e's model and ``tgr.apply_tgr``) against the same
                    model without TGR; the difference per layer; its profile

Backends: "triton" on CUDA; "torch" on a CPU, where the Triton interpreter's time would say
nothing about the launcher's. Triton's launcher, autotuner lookups and CUDA kernel counts can only
be seen on a GPU.
"""
from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.measure import _sync, environment

TOP_FUNCTIONS = 25


def case_shapes(device: str, quick: bool) -> dict[str, dict]:
    """The probed shapes: the H200 run's on CUDA, scaled down on a CPU."""
    if device == "cuda":
        return {
            "decode": {"B": 1, "H": 32, "H_kv": 8, "S_q": 1, "S_k": 4096, "D": 128, "dtype": torch.bfloat16},
            "flash-forward": {"B": 1, "H": 16, "H_kv": 16, "S_q": 128, "S_k": 128, "D": 64, "dtype": torch.bfloat16},
            "projection": {"hidden": 1024, "T": 8, "dtype": torch.bfloat16},
        }
    scale = 2 if quick else 1
    return {
        "decode": {"B": 1, "H": 4, "H_kv": 2, "S_q": 1, "S_k": 256 // scale, "D": 64, "dtype": torch.float32},
        "flash-forward": {"B": 1, "H": 16 // scale, "H_kv": 16 // scale, "S_q": 128 // scale,
                          "S_k": 128 // scale, "D": 64, "dtype": torch.float32},
        "projection": {"hidden": 1024, "T": 8, "dtype": torch.float32},
    }


def model_shape(device: str, quick: bool) -> dict:
    from benchmarks.suite_e2e import layer_model_shape

    shape = layer_model_shape(quick)
    shape["prompt"] = 64 if quick else (2048 if device == "cuda" else 256)
    return shape


def _attention_calls(shape: dict, device: str, backend: str) -> dict[str, Callable[[], object]]:
    """tgr and SDPA, one closure each, on the same inputs (no gradient: decoding and inference)."""
    from tgr_kernels import temperature_guided_attention

    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, H_kv, S_q, S_k, D, dtype = (shape[k] for k in ("B", "H", "H_kv", "S_q", "S_k", "D", "dtype"))
    q = torch.randn(B, H, S_q, D, generator=g).to(device, dtype)
    k = torch.randn(B, H_kv, S_k, D, generator=g).to(device, dtype)
    v = torch.randn(B, H_kv, S_k, D, generator=g).to(device, dtype)
    temperature = torch.rand(B, S_q, generator=g).to(device) * 0.5 + 0.5
    causal = S_q > 1
    t_q = q * temperature[:, None, :, None].to(dtype)  # SDPA's share of the work: the scaled query

    def tgr():
        return temperature_guided_attention(q, k, v, temperature, causal=causal, gsot_threshold=0.4,
                                            backend=backend)

    def sdpa():
        return F.scaled_dot_product_attention(t_q, k, v, is_causal=causal, enable_gqa=H != H_kv)

    return {"tgr": tgr, "sdpa": sdpa}


def _projection_calls(shape: dict, device: str, backend: str) -> dict[str, Callable[[], object]]:
    from tgr_kernels import temperature_projection

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, 1, shape["hidden"], generator=g).to(device, shape["dtype"])
    weight = (torch.randn(shape["T"], shape["hidden"], generator=g) * 0.02).to(device)
    bias = torch.zeros(shape["T"], device=device)

    def tgr():
        return temperature_projection(hidden, weight, bias, backend=backend)

    def eager():
        return torch.sigmoid(F.linear(hidden.float(), weight, bias)).clamp(0.01, 0.99)

    return {"tgr": tgr, "sdpa": eager}


def time_per_call_ms(fn: Callable[[], object], device: str, calls: int, sync_each: bool) -> float:
    """Median over 3 rounds of the wall time per call: a sync after each call, or only one after
    all ``calls`` (then the host's issue rate bounds it, as long as the device keeps up)."""
    rounds = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            if sync_each:
                _sync(device)
        _sync(device)
        rounds.append((time.perf_counter() - start) * 1e3 / calls)
    return sorted(rounds)[1]


def profile_text(fn: Callable[[], object], device: str, calls: int) -> str:
    """cProfile of ``calls`` calls: the top functions by cumulative and by own time, and on CUDA
    the device activities per call."""
    _sync(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    _sync(device)
    prof.disable()
    lines = [f"cProfile of {calls} calls; times in µs per call (totals / {calls}), calls per call"]
    lines += [f"-- top {TOP_FUNCTIONS} {title} --" + "\n" + top_functions_table(prof, key, calls)
              for key, title in (("cumulative", "by cumulative time"), ("own", "by own time"))]
    if device == "cuda":
        lines.append(device_activity_text(fn, calls=min(calls, 20)))
    return "\n".join(lines)


def top_functions_table(prof: cProfile.Profile, key: str, calls: int) -> str:
    """The functions with the most cumulative or own time, per probed call, in µs (pstats' own
    table rounds totals to ms, too coarse for calls of tens of µs)."""
    rows = []
    for (filename, lineno, name), (_, ncalls, own, cumulative, _) in pstats.Stats(prof).stats.items():
        where = f"{filename.rsplit('/', 2)[-2]}/{filename.rsplit('/', 1)[-1]}:{lineno}" if "/" in filename else filename
        rows.append((own if key == "own" else cumulative, own, cumulative, ncalls, f"{where}({name})"))
    rows.sort(key=lambda row: -row[0])
    lines = [f"{'cum_us':>9} {'own_us':>9} {'calls':>6}  function"]
    for _, own, cumulative, ncalls, label in rows[:TOP_FUNCTIONS]:
        lines.append(f"{cumulative * 1e6 / calls:9.2f} {own * 1e6 / calls:9.2f} {ncalls / calls:6.2f}  {label}")
    return "\n".join(lines)


def device_activity_text(fn: Callable[[], object], calls: int) -> str:
    """How many device activities (kernels, memcpy, memset) one call issues, by name."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False,
                     with_stack=False) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        counts: dict[str, int] = {}
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                counts[evt.name] = counts.get(evt.name, 0) + 1
    except Exception as exc:  # the profiler's CUDA side missing is reported, not fatal
        return f"device activities: not measured ({type(exc).__name__}: {exc})"
    total = sum(counts.values())
    lines = [f"device activities per call: {total / calls:.2f} ({total} in {calls} calls)"]
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n / calls:6.2f}  {name[:100]}")
    return "\n".join(lines)


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in shape.items())


def _timing_rows(name: str, calls: dict[str, Callable[[], object]], device: str, n: int) -> list[str]:
    rows = []
    for impl, fn in calls.items():
        for _ in range(3):  # warm-up: compilation, autotuning, caches
            fn()
        throughput = time_per_call_ms(fn, device, n, sync_each=False)
        synced = time_per_call_ms(fn, device, n, sync_each=True)
        rows.append(f"{name:<14} {impl:<5} throughput_ms={throughput:.4f} synced_ms={synced:.4f}")
    return rows


def decode_step_calls(device: str, quick: bool, backend: str):
    """One decoding step of the every-layer TGR model and of the same model without TGR: one new
    token against a cache of ``prompt`` tokens, the cache cropped back after each step."""
    from transformers import DynamicCache

    import tgr
    from benchmarks.suite_e2e import random_gqa_llama

    shape = model_shape(device, quick)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_gqa_llama(shape, shape["prompt"] + 16, dtype, device)
    tgr.apply_tgr(model, layers="all", backend=backend)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab"], (1, shape["prompt"] + 1), generator=g).to(device)
    prompt, new = ids[:, :-1], ids[:, -1:]

    def cached(enabled: bool) -> Callable[[], object]:
        cache = DynamicCache()
        with torch.no_grad():
            if enabled:
                model(input_ids=prompt, past_key_values=cache, use_cache=True)
            else:
                with tgr.tgr_layers_disabled(model):
                    model(input_ids=prompt, past_key_values=cache, use_cache=True)
        position = torch.tensor([[shape["prompt"]]], device=device)

        def step():
            with torch.no_grad():
                out = model(input_ids=new, past_key_values=cache, position_ids=position, use_cache=True)
            cache.crop(-1)  # back to the prompt: every step sees the same cache length
            return out.logits

        if enabled:
            return step

        def base_step():
            with tgr.tgr_layers_disabled(model):
                return step()
        return base_step

    return shape, {"tgr": cached(True), "sdpa": cached(False)}


def run_probe(device: str, quick: bool) -> str:
    backend = "triton" if device == "cuda" else "torch"
    n_time = 20 if quick else 100
    n_profile = 30 if quick else 200
    out: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    env = environment(device)
    emit("== header ==")
    emit(f"host-overhead probe, device={env['device']} ({env['device_name']}), date={env['date']}")
    emit("versions: " + " ".join(f"{k}={v}" for k, v in env["versions"].items()))
    emit(f"cpu_cores={env['cpu_cores']} torch_threads={env['torch_threads']} load_avg_1m={env['load_avg_1m']} "
         f"backend={backend} quick={quick}")

    shapes = case_shapes(device, quick)
    cases = {name: _attention_calls(shapes[name], device, backend) for name in ("decode", "flash-forward")}
    cases["projection"] = _projection_calls(shapes["projection"], device, backend)

    emit()
    emit("== timing ==")
    emit(f"ms per call; throughput: {n_time} calls, one sync at the end; synced: a sync after each call; "
         "median of 3 rounds")
    for name, calls in cases.items():
        emit(f"# {name}: {_shape_text(shapes[name])}")
        for row in _timing_rows(name, calls, device, n_time):
            emit(row)

    for name, calls in cases.items():
        emit()
        emit(f"== profile:{name} ==")
        emit(profile_text(calls["tgr"], device, n_profile))
        if device == "cuda":  # the kernels SDPA's call launches, to set ours against
            emit("sdpa " + device_activity_text(calls["sdpa"], calls=20))

    emit()
    emit("== model-decode ==")
    shape, steps = decode_step_calls(device, quick, backend)
    emit("# " + _shape_text(shape) + f" dtype={'bfloat16' if device == 'cuda' else 'float32'}")
    rows = _timing_rows("model-decode", steps, device, n_time)
    for row in rows:
        emit(row)
    per_call = {row.split()[1]: float(row.split("throughput_ms=")[1].split()[0]) for row in rows}
    extra = per_call["tgr"] - per_call["sdpa"]
    emit(f"tgr_extra_ms_per_step={extra:.4f} tgr_extra_ms_per_layer={extra / shape['layers']:.4f} "
         f"layers={shape['layers']}")
    emit(profile_text(steps["tgr"], device, max(n_profile // 4, 10)))
    if device == "cuda":
        emit("without TGR " + device_activity_text(steps["sdpa"], calls=20))
    return "\n".join(out) + "\n"


def check_report(text: str) -> list[str]:
    """What is wrong with a probe's output: missing sections, timings that are not finite and > 0."""
    problems = []
    for section in ("header", "timing", "profile:decode", "profile:flash-forward", "profile:projection",
                    "model-decode"):
        if f"== {section} ==" not in text:
            problems.append(f"section {section} missing")
    for line in text.splitlines():
        for word in line.split():
            if word.startswith(("throughput_ms=", "synced_ms=")):
                value = float(word.split("=", 1)[1])
                if not (math.isfinite(value) and value > 0):
                    problems.append(f"bad timing: {line}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the smallest shapes and fewest calls (the test's)")
    parser.add_argument("--out", help="also write the report to this text file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    text = run_probe(args.device, args.quick)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    problems = check_report(text)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
