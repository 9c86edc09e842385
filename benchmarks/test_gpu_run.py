"""benchmarks/gpu_run.sh, the GPU run, exercised as a dry run (no CUDA here): every step runs in
its tiny CPU form and writes its results; the budget skips the steps it has no time for; a run
killed part way leaves its results and a summary that says where it stopped."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
STEPS = ["parity", "cuda-tests", "bench-lce", "profile-lce", "bench-flash", "bench-gqa", "bench-wide", "bench-proj",
         "bench-e2e", "overhead", "report", "determinism", "kernels"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what runs without CUDA")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_RUN_BUDGET_S")}
    env.setdefault("PYTHON", sys.executable)  # the interpreter running the tests, not python3 on PATH
    env.update(extra)
    return env


def _step_lines(summary: str):
    lines = summary.split("--- steps\n", 1)[1].split("\n---", 1)[0].splitlines()
    return {line.split()[0]: line for line in lines if line.strip()}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    start = time.monotonic()
    # the script ends within its budget (540 s by default); the README's outer timeout: the budget plus a minute
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=540 + 60)
    return out, proc, time.monotonic() - start


def test_dry_run_runs_every_step_and_writes_its_results(dry_run):
    out, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["host-overhead.txt", "lce", "log.txt", "parity.txt", "records.jsonl", "summary.txt",
                     "table.md"], files
    assert sorted(os.listdir(out / "lce")) == ["records.jsonl", "table.md"]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu_run: DRY RUN") and ", finished," in summary
    steps = _step_lines(summary)
    assert list(steps) == STEPS, summary
    for line in steps.values():
        assert " ok " in line, line
    parity = (out / "parity.txt").read_text()
    assert "PASS flash" in parity and "PASS wide" in parity and "PASS projection" in parity
    assert " 0 failed, 0 not run" in parity.splitlines()[-1]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    ops = {r["op"] for r in records if r["kind"] == "measurement" and r["status"] == "ok"}
    assert ops == {"projection", "attention-wide", "attention-flash", "attention-gqa", "attention-decode",
                   "e2e-layers-train-step", "e2e-layers-generate"}
    e2e = [r for r in records if r.get("op", "").startswith("e2e-layers") and r["status"] == "ok"]
    assert {r["provider"] for r in e2e} == {"base-sdpa", "tgr-layers"}
    assert all(r["check_ok"] for r in e2e)  # the patched model starts as the base
    assert all(r["vs_base"] > 0 for r in e2e if r["provider"] == "tgr-layers")
    lce = [json.loads(line) for line in (out / "lce" / "records.jsonl").read_text().splitlines()]
    lce_ok = [r for r in lce if r["kind"] == "measurement" and r["status"] == "ok"]
    assert {r["provider"] for r in lce_ok} == {"gemms", "eager", "tgr-torch", "tgr-torch-dw-per-chunk"}
    assert all(r["check_ok"] is (None if r["provider"] == "gemms" else True) for r in lce_ok)
    log = (out / "log.txt").read_text()
    assert "### profile 96 x 1000 trainable tgr-torch: CPU only" in log and "aten::mm" in log
    assert "--- benchmarks/lce/records.jsonl\n7 measurements ({'ok': 7}), mismatches: none" in summary, summary
    table = (out / "table.md").read_text()
    assert all(f"### {op}" in table for op in ops)
    assert "determinism (cpu, backend triton): all bitwise identical" in summary
    assert "sanitize_kernels: all kernels ran" in summary
    assert "== model-decode ==" in (out / "host-overhead.txt").read_text()
    tests_line = [line for line in summary.splitlines() if " passed" in line and line[0].isdigit()]
    assert tests_line and "failed" not in tests_line[0], summary
    log = (out / "log.txt").read_text()
    marks = [line.split()[1].rstrip(":") for line in log.splitlines() if line.startswith("=== ")]
    assert sorted(marks) == sorted(2 * STEPS), marks  # each step's start and end (not pytest's rules)


def test_budget_skips_steps_that_would_start_too_late(tmp_path):
    """30 s, less the 25 s kept for the end: no step can have its minimum, so each is skipped."""
    start = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path)], cwd=ROOT, env=_env(GPU_RUN_BUDGET_S="30"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 30
    summary = (tmp_path / "summary.txt").read_text()
    steps = _step_lines(summary)
    assert list(steps) == [s for s in STEPS if s != "report"], summary  # no records: no report
    for line in steps.values():
        assert "SKIPPED" in line, line
    log = (tmp_path / "log.txt").read_text()
    assert log.count("SKIPPED, ") == len(steps)
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "summary.txt"]


def test_killed_run_leaves_its_results_and_says_where_it_stopped(tmp_path):
    """A run killed from outside (an outer timeout) must still leave what it did, and say where."""
    proc = subprocess.Popen(["bash", SCRIPT, str(tmp_path)], cwd=ROOT, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    parity = tmp_path / "parity.txt"
    # wait until the next step has started after parity, then kill the whole run in it
    while time.monotonic() < deadline and "=== bench-flash (" not in _read(tmp_path / "log.txt"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert "gpu_parity: " in parity.read_text()
    summary = (tmp_path / "summary.txt").read_text()
    assert "running bench-flash" in summary and "RUNNING (stopped here?)" in summary, summary
    assert " ok " in _step_lines(summary)["parity"]


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
