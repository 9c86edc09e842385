"""The version of the ``tgr`` distribution (``tgr`` and ``tgr_kernels``): the one place it is written.

``tgr.__version__``, ``tgr_kernels.__version__`` and the package metadata (``pyproject.toml``)
all read it from here. It imports nothing, so reading it costs no torch or triton import.
"""
__version__ = "0.2.0"
