"""Benchmarks of tgr: every provider (the seed's eager code, torch.compile, SDPA, FlexAttention,
tgr's torch and Triton backends) side by side on the same inputs, on CPU and GPU.

- ``python -m benchmarks``: the runner (tables, JSON records, PNG plots); ``--help`` for flags.
- ``pytest benchmarks/ --benchmark-only``: pytest-benchmark suites on small CPU shapes.
- ``bash benchmarks/gpu_run.sh OUT``: the GPU run (parity, benchmarks, determinism, sanitizer)
  in one command, within 540 s (GPU_RUN_BUDGET_S).
- ``python -m benchmarks.roofline``: FLOPs, bytes and the H200 time bound of every case.

Modules: ``cases`` (shapes, inputs, FLOPs), ``providers`` (the implementations), ``measure``
(timing, peak memory, ceilings, environment), ``suite_ops`` (the op suites), ``report`` and
``plots`` (outputs). See README.md beside this file.
"""
