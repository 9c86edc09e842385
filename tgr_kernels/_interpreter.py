"""Where the Triton kernels run on a machine without a GPU: Triton's interpreter, set up in one place.

Triton chooses between compiled kernels and its CPU interpreter when a ``@triton.jit`` function
is defined, from ``TRITON_INTERPRET`` in the environment, so the variable must be set before
``tgr_kernels`` (which defines its kernels on import) or triton is imported; setting it later has
no effect, and a launch then fails with "0 active drivers". Every entry point goes through this
module: the test and benchmark conftests (:func:`use_interpreter_without_gpu`), the ``python -m``
commands (:func:`rerun_with_interpreter`, :func:`rerun_without_interpreter`).

This module imports only the standard library (and torch, inside the functions), so that a
conftest can load it from its path before anything imports triton: importing it as
``tgr_kernels._interpreter`` runs ``tgr_kernels/__init__.py`` first, which imports triton.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

ENV_VAR = "TRITON_INTERPRET"
_ON = ("1", "true", "yes", "on")


def interpreter_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter (the values Triton accepts)."""
    return (os.environ if environ is None else environ).get(ENV_VAR, "0").lower() in _ON


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def use_interpreter_without_gpu(caller: str) -> bool:
    """Run the Triton kernels through the interpreter when there is no GPU; returns whether it is on.

    Sets ``TRITON_INTERPRET=1`` where CUDA is unavailable (and leaves a GPU machine alone). Raises
    RuntimeError, naming ``caller``, when triton was already imported without it: the kernels
    would then be compiled ones that cannot run here.
    """
    if _gpu_available():
        return interpreter_enabled()
    if not interpreter_enabled() and "triton" in sys.modules:
        raise RuntimeError(f"triton was imported before {caller} could set {ENV_VAR}=1; set it in the "
                           "environment, or import nothing that imports triton before this call")
    os.environ[ENV_VAR] = "1"
    return True


def rerun_with_interpreter(module: str, argv: Sequence[str]) -> None:
    """For ``python -m module``: where there is no GPU and the interpreter is off, re-execute
    ``python -m module *argv`` with ``TRITON_INTERPRET=1`` (the package, and so triton, is
    imported before a ``__main__`` runs, so only a new process can turn it on). Returns where
    nothing needs to change."""
    if _gpu_available() or interpreter_enabled():
        return
    os.environ[ENV_VAR] = "1"
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def rerun_without_interpreter(module: str, argv: Sequence[str]) -> None:
    """For ``python -m module`` commands that compile real kernels (the static proof): with the
    interpreter on, re-execute ``python -m module *argv`` without ``TRITON_INTERPRET``. Returns
    where it is already off."""
    if not interpreter_enabled():
        return
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
