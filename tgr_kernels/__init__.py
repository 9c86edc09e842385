"""tgr_kernels: fast, differentiable Triton kernels for Temperature-Guided Reasoning."""
from . import reference  # noqa: F401

__version__ = "0.1.0"
