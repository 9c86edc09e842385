"""The host-overhead probe (benchmarks/host_overhead.py) runs on a CPU and its report has every
section, with timings that are finite and > 0."""
import subprocess
import sys

import pytest

from benchmarks import host_overhead

SECTIONS = ("header", "timing", "profile:decode", "profile:flash-forward", "profile:projection", "model-decode")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("host_overhead") / "report.txt"
    # A subprocess, as it is run: the command line, --out, and the exit status all checked.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text == proc.stdout  # the file is the printed report
    return text


def test_report_has_every_section_and_sane_numbers(report):
    assert host_overhead.check_report(report) == []
    for section in SECTIONS:
        assert f"== {section} ==" in report
    assert "device=cpu" in report and "torch=" in report and "date=" in report
    timings = [line for line in report.splitlines() if "throughput_ms=" in line]
    # tgr and its SDPA/eager counterpart for each of the three ops and the model step
    assert len(timings) == 8
    assert "tgr_extra_ms_per_layer=" in report
    # our own functions appear by name in the profiles
    assert "temperature_guided_attention" in report and "temperature_projection" in report
    assert report.count("-- top 25 by cumulative time --") == 4
    assert report.count("-- top 25 by own time --") == 4


@pytest.mark.parametrize("section", SECTIONS)
def test_check_catches_a_missing_section(report, section):
    broken = report.replace(f"== {section} ==", "")
    assert any(section in problem for problem in host_overhead.check_report(broken))


@pytest.mark.parametrize("bad", ["0.0000", "nan", "inf", "-0.5"])
def test_check_catches_a_bad_timing(report, bad):
    line = next(line for line in report.splitlines() if "synced_ms=" in line)
    value = line.split("synced_ms=")[1].split()[0]
    broken = report.replace(line, line.replace(f"synced_ms={value}", f"synced_ms={bad}"))
    assert any(problem.startswith("bad timing") for problem in host_overhead.check_report(broken))
