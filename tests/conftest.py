"""Test set-up: run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before triton is first imported, so this runs
before any test module imports tgr_kernels (tgr_kernels/_interpreter.py, loaded from its path:
importing it through the package would import triton first).
"""
import importlib.util
import pathlib

import torch

_spec = importlib.util.spec_from_file_location(
    "_tgr_interpreter", pathlib.Path(__file__).resolve().parents[1] / "tgr_kernels" / "_interpreter.py")
_interpreter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_interpreter)
_interpreter.use_interpreter_without_gpu("tests/conftest.py")

import pytest  # noqa: E402

from helpers import DEVICE, word_level_tokenizer  # noqa: E402, F401  (DEVICE: for modules that import it from here)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes on a CPU, e.g. the static GPU proof (make test-fast "
                                       "deselects them: -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(0)
    # Parity criteria assume full-precision fp32 matmuls on the GPU.
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Kernel outputs start as NaN in tests: an element a kernel forgets to write fails."""
    from tgr_kernels import _backend

    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level fast tokenizer for the data and evaluation tests (needs the model extra)."""
    return word_level_tokenizer()
