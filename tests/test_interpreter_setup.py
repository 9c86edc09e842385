"""The one place that sets up Triton's interpreter (tgr_kernels/_interpreter.py) and its rule:
TRITON_INTERPRET must be set before triton is imported, or the caller gets a clear error."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOAD = textwrap.dedent("""
    import importlib.util, os, sys
    path = os.path.join({root!r}, "tgr_kernels", "_interpreter.py")
    spec = importlib.util.spec_from_file_location("_tgr_interpreter", path)
    interpreter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interpreter)
""")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", _LOAD.format(root=ROOT) + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is set up only where there is no GPU")
def test_sets_the_interpreter_before_triton_is_imported():
    proc = _python("""
        assert "triton" not in sys.modules
        assert interpreter.use_interpreter_without_gpu("this script")
        import triton, tgr_kernels
        from tgr_kernels import _backend
        print(os.environ["TRITON_INTERPRET"], _backend.TRITON_INTERPRET)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "True"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is set up only where there is no GPU")
def test_refuses_once_triton_was_imported_without_it():
    proc = _python("""
        import triton
        interpreter.use_interpreter_without_gpu("this script")
    """)
    assert proc.returncode != 0
    assert "RuntimeError: triton was imported before this script could set TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.parametrize("value,enabled", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_reads_the_values_triton_accepts(value, enabled):
    from tgr_kernels._interpreter import interpreter_enabled

    assert interpreter_enabled({"TRITON_INTERPRET": value}) is enabled
    assert interpreter_enabled({}) is False
