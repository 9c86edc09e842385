"""pytest set-up for benchmarks/: Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be in the environment before triton is first imported (tgr_kernels
imports it), so this runs before any benchmark module is collected. It lets the tgr-triton
provider be checked for correctness here; its speed under the interpreter is never reported.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before benchmarks/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
