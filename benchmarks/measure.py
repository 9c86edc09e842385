"""How every number in the benchmarks is taken: timing, peak memory, ceilings, the environment.

Timing. ``time_interleaved`` runs every provider once per repetition, in turn, so that slow drift
of the machine (other processes, clocks, thermals) lands on all providers alike instead of on
whichever ran last. A warm-up comes first; it is timed separately (``first_ms``: it holds
torch.compile's and Triton's compilation). Statistics are the median and the 20th/80th
percentiles of the repetitions.

- CPU: a wall clock (``time.perf_counter``) around each call; the garbage collector is off
  while timing.
- CUDA: a pair of CUDA events around each call, on the current stream. The untimed part of a
  call (``prepare``: e.g. the forward before a timed backward) is queued before the start event.

Peak memory: the extra memory one warm call needs on top of what was allocated before it (its
inputs, and the saved forward for a backward), its outputs included.

- CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: PyTorch keeps no CPU allocator statistics. ``peak_mib`` replays the profiler's timeline
  of tensor allocations and frees (``profile_memory=True``): exact, deterministic, and the same
  quantity as on the GPU (tensors only). ``peak_rss_mib`` samples the process's resident set
  size every ~0.2 ms (glibc told to return freed blocks to the OS while measuring): what the OS
  saw, library workspaces (MKL, oneDNN) included; a few MiB of resolution. ``validate_cpu_memory``
  checks both on known allocations.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import importlib.metadata
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MiB = 1 << 20


# ----------------------------------------------------------------------------- statistics
def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of an ascending list."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict[str, float]:
    s = sorted(times_ms)
    return {"median_ms": percentile(s, 50), "p20_ms": percentile(s, 20), "p80_ms": percentile(s, 80),
            "reps": len(s)}


# ----------------------------------------------------------------------------- timing
@dataclass
class Job:
    """One thing to time. ``prepare(i)`` (untimed) returns the state for ``run`` on input copy i."""

    prepare: Callable[[int], Any]
    run: Callable[[Any], Any]
    n_copies: int = 1
    times_ms: list[float] = field(default_factory=list)
    first_ms: float = float("nan")
    error: str | None = None


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a table cell."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _call_once_ms(job: Job, copy: int, device: str) -> float:
    """Wall time of one prepared call, synchronized (the warm-up's clock)."""
    state = job.prepare(copy)
    _sync(device)
    start = time.perf_counter()
    out = job.run(state)
    _sync(device)
    del out, state
    return (time.perf_counter() - start) * 1e3


def time_interleaved(jobs: dict[str, Job], device: str, reps: int, warmup: int) -> None:
    """Fill each job's ``times_ms`` (and ``first_ms``, or ``error`` if it raised)."""
    for job in jobs.values():
        try:
            job.first_ms = _call_once_ms(job, 0, device)
            for i in range(1, warmup):
                _call_once_ms(job, i % job.n_copies, device)
        except Exception as exc:  # a provider that cannot run these inputs: reported, not fatal
            job.error = describe_error(exc)
            if device == "cuda":
                torch.cuda.empty_cache()
    live = {name: job for name, job in jobs.items() if job.error is None}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(reps):
            for job in live.values():
                if job.error is not None:
                    continue
                try:
                    job.times_ms.append(_timed_call(job, rep % job.n_copies, device))
                except Exception as exc:
                    job.error = describe_error(exc)
    finally:
        if gc_was_enabled:
            gc.enable()


def _timed_call(job: Job, copy: int, device: str) -> float:
    state = job.prepare(copy)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = job.run(state)
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end)
    start = time.perf_counter()
    out = job.run(state)
    elapsed = time.perf_counter() - start
    del out
    return elapsed * 1e3


# ----------------------------------------------------------------------------- peak memory
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.mallopt  # noqa: B018  (glibc only)
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    if _LIBC is None:
        return False
    ok = _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return ok and _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


def fix_malloc_for_timing() -> bool:
    """Fixed glibc thresholds for the whole run, at their usual steady-state values.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so without
    this, one provider's frees change how the next one's allocations are served. Fixing the
    thresholds at the values glibc's own adjustment settles on removes that coupling, and the
    memory measurement can lower them temporarily (setting them once disables the adjustment).
    """
    return _set_malloc(32 * MiB, 64 * MiB)


class _RssSampler:
    """Samples this process's resident set size in a background thread."""

    def __init__(self, interval_s: float = 2e-4):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def sample(self) -> None:
        self.peak = max(self.peak, self.rss())

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.sample()
        self._stop.set()
        self._thread.join()
        os.close(self.fd)


def peak_memory_mib(prepare: Callable[[], Any], run: Callable[[Any], Any], device: str) -> dict[str, Any]:
    """Extra peak memory (MiB) of ``run(prepare())`` over what was allocated before ``run``.

    CUDA: the caching allocator's peak. CPU: ``peak_mib`` from the profiler's timeline of tensor
    allocations (exact and deterministic, and the same quantity as the GPU's: tensors only), and
    ``peak_rss_mib`` from sampling the RSS (what the OS saw, so MKL/oneDNN workspaces too).
    """
    gc.collect()
    if device == "cuda":
        state = prepare()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run(state)  # noqa: F841  (alive until the peak is read: it is part of the footprint)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out, state
        return {"peak_mib": peak / MiB, "memory_method": "cuda max_memory_allocated"}
    result = {"peak_mib": None, "peak_rss_mib": None}
    try:
        result["peak_mib"] = _tensor_peak_cpu(prepare, run) / MiB
        result["memory_method"] = "tensor allocations (profiler timeline)"
    except Exception as exc:  # a private API of torch.profiler: fall back to the RSS
        result["memory_method"] = f"RSS (profiler timeline failed: {describe_error(exc)})"
    if os.path.exists("/proc/self/statm"):
        result["peak_rss_mib"] = _rss_peak_cpu(prepare, run) / MiB
        if result["peak_mib"] is None:
            result["peak_mib"] = result["peak_rss_mib"]
    return result


_MARKER_BYTES = 65543  # an odd size no op allocates: its allocation marks where ``run`` starts


class _quiet_stderr:
    """Kineto prints two log lines on stderr per profiling session; keep them out of the output."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)


def _tensor_peak_cpu(prepare, run) -> int:
    """Peak bytes of live tensors during ``run``, over those live when it starts.

    ``prepare`` runs inside the profiled window too, so that tensors it allocates (the forward's
    saved activations before a timed backward) are known when ``run`` frees them.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        state = prepare()
        marker = torch.empty(_MARKER_BYTES, dtype=torch.uint8)
        out = run(state)
        del out, state, marker
    live, base, peak = 0, None, 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
            if base is None and size == _MARKER_BYTES:
                base = peak = live
        elif action == Action.DESTROY:
            live -= size
        if base is not None:
            peak = max(peak, live)
    if base is None:
        raise RuntimeError("the marker allocation is missing from the profiler's timeline")
    return peak - base


def _rss_peak_cpu(prepare, run) -> int:
    """Peak RSS during ``run`` over the RSS before it, sampled every 0.2 ms.

    For RSS to follow tensors, freed memory must go back to the OS: while measuring, glibc puts
    every block of 64 KiB or more in its own mmap, and free heap pages are trimmed first.
    """
    _set_malloc(64 << 10, 0)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # let the sampler thread in while Python code runs
    try:
        state = prepare()
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # free heap pages go back to the OS: reusing them would not show
        with _RssSampler() as sampler:
            base = sampler.rss()
            out = run(state)
            sampler.sample()  # the output is part of the call's footprint: read before freeing it
        del out, state
    finally:
        sys.setswitchinterval(switch)
        fix_malloc_for_timing()
    return max(0, sampler.peak - base)


def validate_cpu_memory() -> list[dict[str, float]]:
    """Known allocations through both CPU methods: what, expected MiB, tensor_mib, rss_mib."""
    n = 256 * MiB

    def alloc_256():
        t = torch.empty(n, dtype=torch.uint8)
        t.fill_(1)
        return t

    def alloc_free_alloc():  # 256 MiB, freed, then 128 MiB: the peak is 256, not 384
        t = torch.ones(n // 4, dtype=torch.float32)
        del t
        return torch.ones(n // 8, dtype=torch.float32)

    def matmul_2048():  # output 16 MiB (MKL's own workspace may add a little)
        a = torch.randn(2048, 2048)
        return a @ a

    def many_small():  # 4096 tensors of 16 KiB, all alive: 64 MiB below the mmap threshold
        return [torch.ones(4096) for _ in range(4096)]

    cases = [("empty+fill 256 MiB", 256, alloc_256), ("256 MiB freed, then 128 MiB", 256, alloc_free_alloc),
             ("randn 2048² + matmul (16 + 16 MiB)", 32, matmul_2048), ("4096 × 16 KiB tensors", 64, many_small)]
    fix_malloc_for_timing()
    results = []
    for what, expected, fn in cases:
        fn()  # warm (MKL/oneDNN set up their workspaces once)
        got = peak_memory_mib(lambda: None, lambda _s, fn=fn: fn(), "cpu")
        results.append({"what": what, "expected_mib": expected, "tensor_mib": got["peak_mib"],
                        "rss_mib": got["peak_rss_mib"]})
    return results


# ----------------------------------------------------------------------------- ceilings
def measure_ceilings(device: str, reps: int = 10) -> list[dict[str, Any]]:
    """The machine's own rates, measured now: dense matmul TFLOP/s and copy GB/s.

    GPU: a bf16 (and fp32) 8192³ matmul, a 1 GiB device-to-device copy (bytes read + written).
    CPU: 2048³ fp32 and bf16 matmuls and a 256 MiB copy: a yardstick for the CPU rows. A CPU
    without bf16 instructions emulates bf16 matmuls (minutes for one 2048³ here): fp32 only.
    """
    from tgr_kernels._backend import cpu_computes_natively

    results = []
    n = 8192 if device == "cuda" else 2048
    dtypes = (torch.bfloat16, torch.float32)
    if device != "cuda" and not cpu_computes_natively(torch.bfloat16):
        dtypes = (torch.float32,)
    for dtype in dtypes:
        # random data: a product of zeros runs faster than real data on some GPUs
        a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
        job = Job(prepare=lambda i, a=a, b=b: (a, b), run=lambda ab, c=c: torch.mm(*ab, out=c))
        time_interleaved({"mm": job}, device, reps, warmup=2)
        stats = summarize(job.times_ms)
        results.append({"op": f"ceiling-matmul-{n}", "dtype": str(dtype).replace("torch.", ""),
                        "shape": {"m": n, "n": n, "k": n}, **stats,
                        "tflops": 2 * n ** 3 / (stats["median_ms"] * 1e-3) / 1e12})
        del a, b, c, job
    nbytes = (1 << 30) if device == "cuda" else 256 * MiB
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    job = Job(prepare=lambda i: None, run=lambda _s: dst.copy_(src))
    time_interleaved({"copy": job}, device, reps, warmup=2)
    stats = summarize(job.times_ms)
    results.append({"op": "ceiling-copy", "dtype": "float32", "shape": {"bytes": nbytes}, **stats,
                    "gbps": 2 * nbytes / (stats["median_ms"] * 1e-3) / 1e9})
    return results


# ----------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None




def _cpu_name() -> str:
    from tgr_kernels._backend import cpu_name  # here: importing tgr_kernels imports triton

    return cpu_name()


def _usable_cpu_cores() -> int:
    from tgr_kernels._backend import usable_cpu_cores  # here: importing tgr_kernels imports triton

    return usable_cpu_cores()


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cache_bytes(device: str) -> int:
    """The last-level cache that rotating inputs must overflow (GPU L2; CPU L3 or L2)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 50 * MiB))
    size = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(base):
            with open(os.path.join(base, index, "size"), encoding="utf-8") as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1], 1)
            size = max(size, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        size = 32 * MiB
    return size


def environment(device: str) -> dict[str, Any]:
    """What a reader needs to reproduce or judge a number."""
    from tgr_kernels import __version__ as tgr_version

    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_cores": _usable_cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "cache_mib": round(cache_bytes(device) / MiB, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "tgr": tgr_version,
            "cuda": torch.version.cuda if device == "cuda" else None,
            "git": _git_commit(),
        },
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        # Other processes make CPU timings noisy (with every core in torch's thread pool, one
        # descheduled thread stalls each parallel region): the load says how quiet it was.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["sm_count"] = props.multi_processor_count
        env["gpu_mem_gib"] = round(props.total_memory / (1 << 30), 1)
    return env
