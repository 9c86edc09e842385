"""pytest set-up for benchmarks/: Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be in the environment before triton is first imported (tgr_kernels
imports it), so this runs before any benchmark module is collected. It lets the tgr-triton
provider be checked for correctness here; its speed under the interpreter is never reported.
"""
import importlib.util
import pathlib

import torch

# tgr_kernels/_interpreter.py, loaded from its path: importing it through the package would
# import triton first.
_spec = importlib.util.spec_from_file_location(
    "_tgr_interpreter", pathlib.Path(__file__).resolve().parents[1] / "tgr_kernels" / "_interpreter.py")
_interpreter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_interpreter)
_interpreter.use_interpreter_without_gpu("benchmarks/conftest.py")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
