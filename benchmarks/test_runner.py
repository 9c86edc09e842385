"""The runner works (CI's quick pass), its measurements mean what they say, and wrong answers
are caught. Speed is not tested here."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import measure
from benchmarks.cases import Case
from benchmarks.providers import ATTENTION_PROVIDERS, Provider
from benchmarks.report import load_records, render_markdown
from benchmarks.suite_ops import check_providers, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fields every record carries (benchmarks/README.md, "Records")
SCHEMA = ["op", "provider", "mode", "seq_len", "batch", "dtype", "device_name", "median_ms", "p20_ms", "p80_ms",
          "peak_mib", "versions", "date"]


def _tgr_importable() -> bool:
    try:
        import tgr  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_pass_writes_records_table_and_plots(quick_run):
    out, stdout = quick_run
    records = load_records(out / "records.jsonl")
    meas = [r for r in records if r["kind"] == "measurement"]
    ops = {r["op"] for r in meas}
    op_suites = {"projection", "attention-wide", "attention-flash", "attention-gqa", "attention-decode"}
    assert op_suites <= ops
    e2e_ops = {"e2e-train-step", "e2e-generate", "e2e-layers-train-step", "e2e-layers-generate"}
    assert ops - op_suites <= e2e_ops
    # the grouped-query suites: fewer k/v heads than query heads; decode is one row, forward only
    grouped = [r for r in meas if r["op"] in ("attention-gqa", "attention-decode")]
    assert all(r["kv_heads"] < r["heads"] for r in grouped)
    assert {r["mode"] for r in meas if r["op"] == "attention-gqa"} == {"forward", "backward", "full"}
    assert all(r["causal"] for r in meas if r["op"] == "attention-gqa")  # Llama's attention
    decode = [r for r in meas if r["op"] == "attention-decode"]
    assert {r["mode"] for r in decode} == {"forward"} and all(r["q_len"] == 1 for r in decode)
    assert {"sdpa-prescaled", "tgr-torch"} <= {r["provider"] for r in grouped if r["status"] == "ok"}
    if _tgr_importable():
        assert e2e_ops <= ops
        layers = [r for r in meas if r["op"].startswith("e2e-layers")]
        assert {r["provider"] for r in layers} == {"base-sdpa", "tgr-layers"}
        assert all(r["status"] == "ok" and r["kv_heads"] < r["heads"] for r in layers)  # grouped-query attention
    assert {r["mode"] for r in meas} == {"forward", "backward", "full"}
    ok = [r for r in meas if r["status"] == "ok"]
    assert {"eager-seed", "tgr-torch", "sdpa-prescaled"} <= {r["provider"] for r in ok}
    for rec in ok:
        missing = [k for k in SCHEMA if rec.get(k) is None]
        assert not missing, (rec["op"], rec["provider"], missing)
        assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
        assert rec["check_ok"] is True, rec  # every provider agrees with the seed's math
    for rec in meas:
        if rec["status"] != "ok":
            assert rec["reason"], rec
    assert any(r["kind"] == "run" for r in records) and any(r["kind"] == "ceiling" for r in records)
    table = (out / "table.md").read_text()
    assert "eager-seed" in table and "tgr-torch" in table and "1.00×" in table
    assert "| S |" in stdout  # the table is printed too
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {f"{op}_float32_cpu.png" for op in ops} == set(pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rebuilds_from_records(quick_run):
    out, _ = quick_run
    os.remove(out / "table.md")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention-wide" in (out / "table.md").read_text()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the CPU memory method reads /proc")
def test_cpu_peak_memory_method_reads_known_allocations():
    for r in measure.validate_cpu_memory():
        assert abs(r["tensor_mib"] - r["expected_mib"]) <= 0.01 * r["expected_mib"] + 0.5, r
        assert abs(r["rss_mib"] - r["expected_mib"]) <= 0.05 * r["expected_mib"] + 2, r


def test_cpu_peak_memory_of_a_backward_counts_the_frees_of_its_saved_forward():
    """prepare() allocates (the forward's saved tensors); run() frees them: the peak is run's own."""
    n = 64 << 20

    def prepare():
        return [torch.ones(n // 4)]  # 64 MiB, alive when run starts

    def run(state):
        state.pop()  # frees the 64 MiB
        return torch.ones(n // 8)  # 32 MiB: below the level at the start

    got = measure.peak_memory_mib(prepare, run, "cpu")
    assert got["peak_mib"] < 1, got


def test_statistics():
    s = measure.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median_ms"] == 3.0 and s["p20_ms"] == pytest.approx(1.8) and s["p80_ms"] == pytest.approx(4.2)


def _tiny_case(op="attention-flash", **kw):
    shape = {"batch": 2, "heads": 2, "seq_len": 40, "head_dim": 32 if op == "attention-flash" else 300}
    if op == "attention-gqa":  # 4 query heads reading 2 k/v heads
        shape = {"batch": 2, "heads": 4, "kv_heads": 2, "seq_len": 40, "head_dim": 32}
    elif op == "attention-decode":  # one query row against a cache of 70 keys
        shape = {"batch": 2, "heads": 4, "kv_heads": 2, "q_len": 1, "seq_len": 70, "head_dim": 32}
        kw.setdefault("causal", False)
    return Case(op, shape, kw.pop("dtype", torch.float32), "cpu", causal=kw.pop("causal", True), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_flags_wrong_answers(dtype):
    """A fast wrong answer must not look good: no temperature, NaN, or a dropped gate all fail."""
    case = _tiny_case(dtype=dtype)
    good = ATTENTION_PROVIDERS["eager-seed"].build(case)
    no_temp = ATTENTION_PROVIDERS["sdpa-prescaled"].build(case)

    def without_temperature(x):
        ones = torch.ones_like(x.temperature)
        return no_temp(type(x)({**x.tensors, "temperature": ones * 0.5 + x.temperature * 0}, x.leaf_names))

    def nan_out(x):
        return good(x) * float("nan")

    def same_as_good(x):
        return good(x) + 0 * x.temperature.sum()

    def no_gate(x):
        from benchmarks.providers import seed_additive_mask, seed_temperature_guided_attention
        ctx, _ = seed_temperature_guided_attention(x.q, x.k, x.v, x.temperature, seed_additive_mask(case))
        return ctx

    fns = {"good": good, "no-temperature": without_temperature, "nan": nan_out, "no-gate": no_gate,
           "same-as-good": same_as_good}
    x = case.make_inputs(seed=1)
    results = check_providers(case, fns, x, with_grads=True)
    assert results["good"]["ok"] and results["same-as-good"]["ok"]
    for bad in ("no-temperature", "nan", "no-gate"):
        assert results[bad]["ok"] is False, (bad, results[bad])


@pytest.mark.parametrize("op", ["attention-gqa", "attention-decode"])
def test_check_flags_a_wrong_grouping(op):
    """A provider that maps query heads to the wrong k/v heads is fast and wrong: the check says so,
    and so do its records and the table."""
    case = _tiny_case(op)
    tgr_torch = ATTENTION_PROVIDERS["tgr-torch"].build(case)
    group = case.shape["heads"] // case.kv_heads

    def with_kv(x, k, v):
        return tgr_torch(type(x)({**x.tensors, "k": k, "v": v}, x.leaf_names))

    def tiled_heads(x):  # query head h reads k/v head h % H_kv (repeat, not repeat_interleave)
        return with_kv(x, x.k.repeat(1, group, 1, 1), x.v.repeat(1, group, 1, 1))

    def first_kv_head(x):  # every query head reads k/v head 0
        return with_kv(x, x.k[:, :1], x.v[:, :1])

    fns = {"tgr-torch": tgr_torch, "tiled-heads": tiled_heads, "first-kv-head": first_kv_head}
    x = case.make_inputs(seed=1)
    results = check_providers(case, fns, x, with_grads=op == "attention-gqa")
    assert results["tgr-torch"]["ok"], results["tgr-torch"]
    for bad in ("tiled-heads", "first-kv-head"):
        assert results[bad]["ok"] is False, (bad, results[bad])

    records = []
    wrong = Provider("tgr-triton", lambda c: tiled_heads)  # in a provider's place in the runner
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ATTENTION_PROVIDERS, "tgr-triton", wrong)
        run_case(case, ["eager-seed", "tgr-torch", "tgr-triton"], ["forward"], reps=1, warmup=1, check=True,
                 emit=records.append)
    by = {r["provider"]: r for r in records}
    assert by["tgr-torch"]["check_ok"] is True and by["tgr-triton"]["check_ok"] is False
    assert "**MISMATCH**" in render_markdown(records)


def test_decode_runs_forward_only():
    records = []
    run_case(_tiny_case("attention-decode"), ["eager-seed", "sdpa-prescaled"], ["forward", "backward", "full"],
             reps=1, warmup=1, check=True, emit=records.append)
    assert {r["mode"] for r in records} == {"forward"}
    assert all(r["status"] == "ok" and r["check_ok"] for r in records), records


def test_failing_provider_is_reported_not_fatal(monkeypatch):
    def broken(case):
        def run(x):
            raise RuntimeError("no kernel for this")
        return run

    monkeypatch.setitem(ATTENTION_PROVIDERS, "tgr-triton", Provider("tgr-triton", broken))
    records = []
    run_case(_tiny_case(), ["eager-seed", "tgr-triton"], ["forward", "full"], reps=2, warmup=1, check=True,
             emit=records.append)
    by = {(r["provider"], r["mode"]): r for r in records}
    assert by[("eager-seed", "full")]["status"] == "ok"
    assert by[("tgr-triton", "full")]["status"] == "n/a"
    assert "no kernel for this" in by[("tgr-triton", "full")]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is the CPU's")
@pytest.mark.parametrize("op", ["attention-flash", "attention-wide", "projection", "attention-gqa",
                                "attention-decode"])
def test_triton_provider_matches_under_interpreter(op):
    """tgr-triton's wiring, checked where Triton runs only interpreted (its time is not reported)."""
    if op == "projection":
        case = Case(op, {"batch": 1, "seq_len": 40, "hidden": 64, "temp_heads": 8}, torch.float32, "cpu",
                    allow_interpreter=True)
    else:
        case = _tiny_case(op, allow_interpreter=True)
    records = []
    run_case(case, ["eager-seed", "tgr-triton"], ["forward", "full"], reps=1, warmup=1, check=True,
             emit=records.append)
    triton_recs = [r for r in records if r["provider"] == "tgr-triton"]
    assert triton_recs and all(r["status"] == "ok" and r["check_ok"] for r in triton_recs), triton_recs


def test_records_are_json_lines(quick_run):
    out, _ = quick_run
    with open(out / "records.jsonl", encoding="utf-8") as f:
        for line in f:
            json.loads(line)


def test_check_flags_a_wrong_inference_path(monkeypatch):
    """The forward cells time a no_grad call (tgr's ops skip the custom op there, the decode kernels run):
    a provider wrong only without autograd is MISMATCH in forward, even when the run has a backward mode."""
    build = ATTENTION_PROVIDERS["tgr-torch"].build

    def wrong_without_grad(case):
        fn = build(case)
        return lambda x: fn(x) if torch.is_grad_enabled() else fn(x) * 0

    monkeypatch.setitem(ATTENTION_PROVIDERS, "tgr-triton", Provider("tgr-triton", wrong_without_grad))
    records = []
    run_case(_tiny_case(), ["eager-seed", "tgr-triton"], ["forward", "full"], reps=1, warmup=1, check=True,
             emit=records.append)
    by = {(r["provider"], r["mode"]): r for r in records}
    assert by[("eager-seed", "forward")]["check_ok"] is True and by[("eager-seed", "full")]["check_ok"] is True
    assert by[("tgr-triton", "forward")]["check_ok"] is False, by[("tgr-triton", "forward")]
    assert by[("tgr-triton", "full")]["check_ok"] is True
    assert by[("tgr-triton", "forward")]["check_what"] == "output"


def test_environment_counts_the_cores_this_process_may_use(monkeypatch):
    """A container or taskset limits the cores; os.cpu_count() reports the host's."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert measure.environment("cpu")["cpu_cores"] == 3


def test_gsot_curves_default_folder_is_the_runs_own_not_an_earlier_runs():
    """Without --out a gsot_curves run writes into a folder named by its device and today's date, as
    every run is (benchmarks/README.md, "Results"): it once defaulted to the committed
    gsot-curves-cpu-2026-11-30/, whose records a run empties first, whatever the device or the day."""
    import datetime

    from benchmarks import gsot_curves

    today = datetime.date.today().isoformat()
    assert gsot_curves.default_out("cpu") == gsot_curves.RESULTS / f"gsot-curves-cpu-{today}"
    assert gsot_curves.default_out("cuda:1").name == f"gsot-curves-cuda-{today}"
    assert gsot_curves.device_label("cpu").startswith("cpu")
    with pytest.raises(SystemExit):  # --report-only names the folder to rebuild
        gsot_curves.main(["--report-only"])


def test_warmup_zero_is_kept_and_bad_counts_are_refused():
    """``--warmup 0`` was read as "not given" (``args.warmup or default``): the run made 2 warm-up
    calls on a CPU and its table said so; ``--reps 0`` likewise became 10."""
    from benchmarks.__main__ import parse_args

    args = parse_args(["--device", "cpu", "--warmup", "0", "--out", "unused"])
    assert args.warmup == 0 and args.reps == 10
    assert parse_args(["--device", "cpu", "--quick", "--out", "unused"]).warmup == 1
    for bad in (["--reps", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu", "--out", "unused", *bad])


@pytest.mark.skipif(not _tgr_importable(), reason="the e2e suite needs tgr's model extra")
def test_e2e_honours_modes():
    """--modes forward: the e2e suites time generation alone (their forward), no training step (full);
    a mode they do not have builds no model."""
    import argparse

    from benchmarks import suite_e2e

    args = argparse.Namespace(device="cpu", quick=True, seq_lens=[16], dtypes=[torch.float32], reps=1, warmup=1,
                              providers=["eager-seed", "base-sdpa", "tgr-layers"], triton_interpret=False,
                              modes=["forward"])
    records = []
    suite_e2e.run(args, records.append, None)
    assert {r["op"] for r in records} == {"e2e-generate", "e2e-layers-generate"}, {r["op"] for r in records}
    assert {r["mode"] for r in records} == {"forward"}
    records.clear()
    suite_e2e.run(argparse.Namespace(**{**vars(args), "modes": ["backward"]}), records.append, None)
    assert records == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's dry run of the sanitized program")
def test_sanitized_program_runs_the_decode_and_fused_loss_kernels(monkeypatch):
    """benchmarks/sanitize_kernels.py is what compute-sanitizer watches, "every Triton kernel": the split-KV
    decode kernels (no gradient) and the fused linear cross-entropy's kernels were never launched."""
    import importlib

    from benchmarks import sanitize_kernels

    decode = importlib.import_module("tgr_kernels.attention_decode")
    lce = importlib.import_module("tgr_kernels.linear_cross_entropy")
    ran = set()

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            ran.add(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(decode, "decode_forward", spy("decode", decode.decode_forward))
    monkeypatch.setattr(lce, "_triton_rows", spy("linear-cross-entropy", lce._triton_rows))
    sanitize_kernels.main()
    assert ran == {"decode", "linear-cross-entropy"}
