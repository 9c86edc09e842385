"""Test set-up: run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before triton is first imported, so this runs
before any test module imports tgr_kernels.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long interpreter runs (deselect with -m 'not slow')")
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
