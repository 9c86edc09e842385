"""The static GPU proof (``python -m tgr_kernels.aot``) runs in the suite, and its gate can fail.

The proof compiles for sm_90, sm_80 and sm_86 with real JIT functions, which the interpreter replaces
(conftest sets TRITON_INTERPRET=1 for this process), so it runs in a subprocess without it.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import make_inputs, make_mask
from tgr_kernels import _configs, aot
from tgr_kernels.attention import temperature_guided_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# Every flash candidate the dispatcher can return, over head dims 1..256, the four dtypes and both
# targets, keyed as (kernel, arch, dtype, size key of the head dim, BLOCK_M, BLOCK_N, warps, stages).
# The launchers pad a head dim to a multiple of FLASH_HEAD_DIM_ALIGN before asking for
# configurations, so do we.
_FLASH_WANT = textwrap.dedent("""
    import json
    import torch
    from tgr_kernels import _configs, aot, attention_decode
    from tgr_kernels.attention_flash import FLASH_HEAD_DIM_ALIGN
    from tgr_kernels._backend import triton_dot_precision

    def flash_candidates(size_key):
        names = {"fwd": "_flash_fwd_kernel", "bwd_dkdv": "_flash_bwd_dkdv_kernel", "bwd_dq": "_flash_bwd_dq_kernel"}
        out = set()
        for precision in aot.ATTENTION_PRECISIONS:
            with precision.active():
                dot = triton_dot_precision(precision.dtype)
            for arch, (cc, _, _) in aot.ARCHES.items():
                for kernel in _configs.FLASH_KERNELS:
                    for d in range(1, 257):
                        d += -d % FLASH_HEAD_DIM_ALIGN
                        kernel_dot = _configs.flash_dot_precision(kernel, d, precision.dtype, dot, cc)
                        for c in _configs.flash_configs(kernel, d, precision.dtype, kernel_dot, cc):
                            out.add((names[kernel], arch, precision.name, size_key(d),
                                     c["BLOCK_M"], c["BLOCK_N"], c.num_warps, c.num_stages))
        return out
""")

_FLASH_CANDIDATES = _FLASH_WANT + textwrap.dedent("""
    print(json.dumps(sorted(flash_candidates(lambda d: 64 if d <= 64 else (128 if d <= 128 else 256)))))
""")


def _compiled_flash_candidates(records):
    out = set()
    for r in records:
        if r["kernel"].startswith("_flash"):
            d = r["scenario"]["D"]
            bucket = 64 if d <= 64 else (128 if d <= 128 else 256)
            assert d % 16 == 0, r  # padded by the launcher
            out.add((r["kernel"], r["arch"], r["dtype"], bucket, r["constexprs"]["BLOCK_M"],
                     r["constexprs"]["BLOCK_N"], r["num_warps"], r["num_stages"]))
    return out


@pytest.mark.slow  # compiles every kernel configuration for three architectures: minutes on a CPU
def test_every_launch_configuration_passes_the_static_proof(tmp_path):
    # The one full compile of the suite (the other tests compile a few kernels at most).
    proc = _run(["-m", "tgr_kernels.aot", "--out", str(tmp_path)], timeout=3600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "records.json").read_text())
    records = data["records"]
    assert (tmp_path / "table.md").read_text().count("| ok |") > 0
    # Every kernel family, on every target, in every dtype it is launched with.
    assert {(r["family"], r["arch"]) for r in records} == {(f, a) for f in aot.FAMILIES.values() for a in aot.ARCHES}
    flash = {r["dtype"] for r in records if r["family"].startswith("flash")}
    assert flash == {"fp16", "bf16", "fp32", "fp32+tf32"}
    assert any(r["dtype"] == "bf16 h, fp32 W" for r in records if r["family"].startswith("projection"))
    for rec in records:
        assert rec["ok"] and rec["error"] is None, rec
        assert rec["stack"] == 0, rec  # no spill in any kernel, fp32 (ieee and tf32) included
        if rec["tensor_core_dots"]:
            assert rec["sass"][aot.ARCHES[rec["arch"]][2]] > 0, rec
    # The model's projection mix (bf16 hidden, fp32 weights) runs on tensor cores, without spills.
    # (The dh kernel launched without HIDDEN_GRAD only scales dz: it has no matmul to check.)
    mixed = [r for r in records if r["dtype"] == "bf16 h, fp32 W"]
    no_matmul = [r for r in mixed if r["family"] == "projection bwd dh" and not r["scenario"]["hidden_grad"]]
    assert mixed and all(r["stack"] == 0 for r in mixed)
    assert all(r["tensor_core_dots"] for r in mixed if r not in no_matmul)
    # The enumeration is reduced (variants for the default candidate only), but every flash candidate
    # the dispatcher can choose is compiled, for each head-dim bucket, alignment, dtype and arch.
    expected = _run(["-c", _FLASH_CANDIDATES], timeout=120)
    assert expected.returncode == 0, expected.stderr[-4000:]
    expected = {tuple(x) for x in json.loads(expected.stdout)}
    missing = expected - _compiled_flash_candidates(records)
    assert not missing, sorted(missing)[:20]


# What the dispatcher can launch, against what the proof enumerates (no compile: the launches are
# recorded and bound as for a compile, so this runs in seconds).
_ENUMERATION = _FLASH_WANT + textwrap.dedent("""
    launches = aot.collect(list(aot.FAMILY_LAUNCHES), list(aot.ARCHES), full=True)
    jobs = [(launch, aot.compile_job(launch)) for launch in launches]
    missing = {}

    # Every flash candidate, for each BLOCK_D (not only each bucket), dtype and target.
    got = {(l.kernel.fn.__name__, l.arch, l.scenario["dtype"], l.kwargs["BLOCK_D"], l.kwargs["BLOCK_M"],
            l.kwargs["BLOCK_N"], l.kwargs["num_warps"], l.kwargs["num_stages"])
           for l in launches if l.kernel.fn.__name__.startswith("_flash")}
    missing["flash"] = sorted(flash_candidates(_configs.flash_block_d) - got)

    # Every flash candidate with each mask a call can pass (one attn_mask: key padding or an additive
    # bias), and never both at once (a kernel no call launches).
    masks = {}
    for l in launches:
        if l.kernel.fn.__name__.startswith("_flash"):
            key = (l.kernel.fn.__name__, l.arch, l.scenario["dtype"], l.kwargs["BLOCK_D"], l.kwargs["BLOCK_M"],
                   l.kwargs["BLOCK_N"], l.kwargs["num_warps"], l.kwargs["num_stages"])
            masks.setdefault(key, set()).add((l.kwargs["HAS_KPM"], l.kwargs["HAS_BIAS"]))
    missing["flash_masks"] = sorted(f"{key}: {sorted(seen)}" for key, seen in masks.items()
                                    if not {(True, False), (False, True)} <= seen or (True, True) in seen)

    # The decode combine kernel's BLOCK_S for every split count, on each target.
    got = {(l.arch, l.kwargs["BLOCK_S"]) for l in launches if l.kernel is attention_decode._decode_combine_kernel}
    want = {(arch, triton_n) for arch in aot.ARCHES
            for triton_n in {1 << (n - 1).bit_length() for n in range(1, _configs.DECODE_MAX_SPLITS + 1)}}
    missing["decode_combine"] = sorted(want - got)

    # The projection: every (hidden, weight) dtype pair the op takes, TF32 allowed or not, each
    # kernel's dot precision and operand types, on each target.
    def projection_key(job):
        sig = job["signature"]
        return (job["name"], job["arch"], sig.get("hidden_ptr"), sig.get("weight_ptr"),
                str(sorted(str(v) for v in job["constexprs"].values() if v in ("ieee", "tf32", "tf32x3"))))
    got = {projection_key(job) for l, job in jobs if l.kernel.fn.__name__.startswith("_projection")}
    want = set()
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for h in dtypes:
        for w in dtypes:
            for tf32 in (False, True):
                for arch in aot.ARCHES:
                    hidden, weight = torch.zeros(64, 4096, dtype=h), torch.zeros(8, 4096, dtype=w)
                    with aot.Precision(torch.float32, tf32).active():
                        recorded = aot.record(lambda: aot.temperature_projection._launch_forward(
                            hidden, weight, None, 0.01, 0.99, True), arch)
                        recorded += aot.record(lambda: aot.temperature_projection._launch_backward_rows(
                            torch.zeros(64, 8, dtype=torch.promote_types(h, w)), torch.zeros(64, 8), weight, h,
                            0.01, 0.99, True, True), arch)
                        recorded += aot.record(lambda: aot.temperature_projection._launch_backward_weight(
                            torch.zeros(64, 8), hidden, w), arch)
                    want |= {projection_key(aot.compile_job(l)) for l in recorded}
    missing["projection"] = sorted(want - got)

    # Every mask and t-bar dtype an attention kernel can read (the op passes any floating additive
    # mask as it is, and an fp64 t-bar without GSoT).
    seen = {}
    for l, job in jobs:
        for arg in ("BIAS", "T_BAR"):
            if arg in job["signature"]:
                seen.setdefault((job["name"], arg), set()).add(job["signature"][arg])
    want = {"BIAS": {"*fp16", "*bf16", "*fp32", "*fp64"}, "T_BAR": {"*fp32", "*fp64"}}
    missing["mask_dtypes"] = sorted(f"{name} {arg}: {sorted(want[arg] - types)}"
                                    for (name, arg), types in seen.items() if want[arg] - types)
    print(json.dumps(missing))
""")


@pytest.fixture(scope="module")
def enumeration_gaps():
    proc = _run(["-c", _ENUMERATION], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("what", ["flash", "flash_masks", "decode_combine", "projection", "mask_dtypes"])
def test_the_proof_enumerates_every_launch_the_dispatcher_can_make(enumeration_gaps, what):
    # flash: the smaller BLOCK_D (D <= 32) with every candidate on every target; flash_masks: each
    # candidate with key padding and with a bias (it was compiled with both at once); decode_combine:
    # BLOCK_S up to DECODE_MAX_SPLITS; projection: every dtype pair, TF32 allowed or not;
    # mask_dtypes: float64 and cross-half masks, an fp64 t-bar.
    assert not enumeration_gaps[what], enumeration_gaps[what][:20]


# Per compute capability, the proof target whose tiles the dispatcher picks and every flash candidate
# it can launch there (bucketed as in the records).
_FLASH_BY_CAPABILITY = textwrap.dedent("""
    import json
    import torch
    from tgr_kernels import _configs, aot
    from tgr_kernels._backend import triton_dot_precision

    out = {}
    for cc in map(int, __import__("sys").argv[1].split(",")):
        keys = set()
        for precision in aot.ATTENTION_PRECISIONS:
            with precision.active():
                dot = triton_dot_precision(precision.dtype)
            for kernel in _configs.FLASH_KERNELS:
                for d in (16, 32, 64, 128, 256):
                    kernel_dot = _configs.flash_dot_precision(kernel, d, precision.dtype, dot, cc)
                    for c in _configs.flash_configs(kernel, d, precision.dtype, kernel_dot, cc):
                        keys.add((kernel, precision.name, d, c["BLOCK_M"], c["BLOCK_N"], c.num_warps,
                                  c.num_stages))
        out[cc] = dict(target=_configs._arch_name(cc), keys=sorted(keys))
    print(json.dumps(out))
""")
# Shared memory per block (opt-in maximum) of real GPUs, by compute capability: A100, RTX 30 / A10 /
# A40, RTX 40 / L4 / L40S, H100 / H200, RTX 50, DGX Spark.
_SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376, 121: 101376}


def test_every_gpu_gets_flash_tiles_the_committed_proof_fits_in_its_shared_memory():
    """The flash tiles each GPU generation gets have a passing record in the committed proof, within
    that GPU's shared memory: cards with 99 KiB per block (RTX 30/40, A10, L4, L40S) got the A100's
    tiles, six of whose dK/dV kernels need up to 163,840 B."""
    proc = _run(["-c", _FLASH_BY_CAPABILITY, ",".join(map(str, _SHARED_MEMORY_PER_BLOCK))], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    wanted = json.loads(proc.stdout.splitlines()[-1])
    path = os.path.join(ROOT, "benchmarks", "results", "static-proof", "records.json")
    with open(path) as f:
        records = json.load(f)["records"]
    names = {"_flash_fwd_kernel": "fwd", "_flash_bwd_dkdv_kernel": "bwd_dkdv", "_flash_bwd_dq_kernel": "bwd_dq"}
    compiled = {}
    for r in records:
        if r["kernel"] in names and not r["scenario"].get("odd"):
            key = (names[r["kernel"]], r["dtype"], r["scenario"]["D"], r["constexprs"]["BLOCK_M"],
                   r["constexprs"]["BLOCK_N"], r["num_warps"], r["num_stages"])
            compiled.setdefault((r["arch"], key), []).append(r)
    for cc, limit in _SHARED_MEMORY_PER_BLOCK.items():
        target = wanted[str(cc)]["target"]
        assert aot.ARCHES[target][1] <= limit, (cc, target)
        for key in map(tuple, wanted[str(cc)]["keys"]):
            found = compiled.get((target, key))
            assert found, f"compute capability {cc}: {key} has no {target} record (regenerate the proof)"
            for r in found:
                shared = r["shared_dynamic"] + r["shared_static"]
                assert r["ok"] and shared <= limit, (cc, key, shared, r["failures"])


_BAD_CONFIGS = textwrap.dedent("""
    import sys
    import torch
    from tgr_kernels import _configs, aot
    from tgr_kernels._configs import _config

    # A forward tile too large for the register file (128 x 256 fp32 accumulator on 4 warps), and
    # backward tiles too small for wgmma (32 rows: sm_80-style HMMA on sm_90).
    def bad(kernel, head_dim, dtype, precision, arch=90):
        if kernel == "fwd":
            return (_config(4, 1, BLOCK_M=128, BLOCK_N=128),)
        return (_config(8, 1, BLOCK_M=32, BLOCK_N=32),)

    _configs.flash_configs = bad
    aot.ATTENTION_PRECISIONS = (aot.Precision(torch.float16),)
    aot.largest_per_group = lambda domain, config_of: [256]
    sys.exit(aot.main(["--family", "flash", "--quick", "--arch", "sm_90", "--out", sys.argv[1], "--jobs", "2"]))
""")


# fp32 with ieee dots (scalar FMAs, every operand in registers) on the half-precision kernels'
# D <= 64 tiles: 64 x 32 with 8 warps spills in the dK/dV kernel (768 B on sm_90).
_SPILLING_FP32_CONFIGS = textwrap.dedent("""
    import sys
    import torch
    from tgr_kernels import _configs, aot
    from tgr_kernels._configs import _config

    _configs.flash_configs = lambda kernel, head_dim, dtype, precision, arch=90: (
        _config(8, 1, BLOCK_M=64, BLOCK_N=32),)
    aot.ATTENTION_PRECISIONS = (aot.Precision(torch.float32),)
    aot.largest_per_group = lambda domain, config_of: [64]
    sys.exit(aot.main(["--family", "flash", "--quick", "--arch", "sm_90", "--out", sys.argv[1], "--jobs", "2"]))
""")


def test_the_gate_fails_on_a_spilling_fp32_configuration(tmp_path):
    proc = _run(["-c", _SPILLING_FP32_CONFIGS, str(tmp_path)], timeout=600)
    assert proc.returncode == 1 and "FAIL:" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads((tmp_path / "records.json").read_text())["records"]
    dkdv = [r for r in records if r["family"] == "flash bwd dK/dV"]
    assert dkdv and all(r["dtype"] == "fp32" and not r["half_precision"] for r in dkdv), dkdv
    assert all(r["stack"] > 0 and f"spills {r['stack']} B" in r["failures"] for r in dkdv), dkdv


def test_the_gate_fails_on_a_spilling_and_a_non_tensor_core_configuration(tmp_path):
    proc = _run(["-c", _BAD_CONFIGS, str(tmp_path)], timeout=600)
    assert proc.returncode == 1 and "FAIL:" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads((tmp_path / "records.json").read_text())["records"]
    failures = {r["family"]: " ".join(r["failures"]) for r in records}
    assert "spills" in failures["flash fwd"], failures
    assert "fp16 dot without HGMMA" in failures["flash bwd dK/dV"], failures
    assert "fp16 dot without HGMMA" in failures["flash bwd dQ/dt"], failures
    assert "FAIL" in (tmp_path / "table.md").read_text()


def _record(**overrides):
    rec = dict(arch="sm_90", error=None, shared_dynamic=1024, shared_static=0, stack=0, half_precision=True,
               tensor_core_dots=["bf16"], sass={"HGMMA": 8, "HMMA": 0, "FFMA": 10})
    rec.update(overrides)
    return rec


@pytest.mark.parametrize("overrides,reason", [
    (dict(error="PTXASError: out of resources"), "compile error"),
    (dict(shared_dynamic=232448, shared_static=1024), "shared memory 233472 B > 232448 B"),
    (dict(arch="sm_80", shared_dynamic=166913, sass={"HGMMA": 0, "HMMA": 4, "FFMA": 0}), "> 166912 B"),
    (dict(arch="sm_86", shared_dynamic=101377, sass={"HGMMA": 0, "HMMA": 4, "FFMA": 0}), "> 101376 B"),
    (dict(stack=8), "spills 8 B"),
    # fp32 with ieee dots (no tensor cores asked for) and fp32 with tf32 dots spill no more than fp16.
    (dict(stack=8, half_precision=False, tensor_core_dots=[], sass={"HGMMA": 0, "HMMA": 0, "FFMA": 99}), "spills 8 B"),
    (dict(stack=16, half_precision=False, tensor_core_dots=["tf32"]), "spills 16 B"),
    (dict(sass={"HGMMA": 0, "HMMA": 16, "FFMA": 0}), "bf16 dot without HGMMA"),
    (dict(arch="sm_80", sass={"HGMMA": 0, "HMMA": 0, "FFMA": 64}, tensor_core_dots=["tf32x3"]),
     "tf32x3 dot without HMMA"),
    # One bf16 dot on wgmma, another on scalar FMAs: the SASS has HGMMA, the TTGIR shows the FMA dot.
    (dict(dot_lowering=dict(wgmma=1, mma=0, fma=1, fma_tensor_core=1)), "1 fp16/bf16/tf32 dot(s) on FMA"),
])
def test_gate_rules(overrides, reason):
    assert any(reason in f for f in aot.check(_record(**overrides)))


def test_gate_passes_a_clean_kernel_and_fp32_fma():
    assert aot.check(_record()) == []
    # An fp32 kernel with ieee dots: scalar FMAs are what it asks for.
    assert aot.check(_record(half_precision=False, tensor_core_dots=[], sass={"HGMMA": 0, "HMMA": 0, "FFMA": 99})) == []


def test_dot_lowering_is_read_from_the_ttgir():
    ttgir = """
      %a = ttng.warp_group_dot %q, %k, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<64x32xf16, #shared, #smem> * !ttg.memdesc<32x32xf16, #shared1, #smem> -> tensor<64x32xf32, #mma>
      %b = tt.dot %p, %v, %c, inputPrecision = tf32 : tensor<32x64xf32, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 4}>> * tensor<64x32xf32, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 4}>> -> tensor<32x32xf32, #mma1>
      %d = tt.dot %q, %k, %c : tensor<32x256xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked1}>> * tensor<256x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked1}>> -> tensor<32x16xf32, #blocked1>
      %e = tt.dot %q, %k, %c : tensor<16x16xbf16, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xbf16, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked>
      %f = tt.dot %q, %k, %c, inputPrecision = tf32 : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked>
    """  # noqa: E501 (TTGIR lines as the compiler writes them)
    assert aot.dot_lowering_of(ttgir) == dict(wgmma=1, mma=1, fma=3, fma_tensor_core=2)


def test_dots_are_read_from_the_ttir():
    ttir = """
      %a = tt.dot %q, %k, %c, inputPrecision = tf32 : tensor<128x64xbf16> * tensor<64x64xbf16> -> tensor<128x64xf32>
      %b = tt.dot %h, %w, %c : tensor<64x64xf32> * tensor<64x16xf32> -> tensor<64x16xf32>
      %d = tt.dot %h, %w, %c, inputPrecision = tf32x3 : tensor<64x64xf32> * tensor<64x16xf32> -> tensor<64x16xf32>
    """
    dots = aot.dots_of(ttir)
    assert [(d["types"], d["precision"]) for d in dots] == [
        (["bf16"], "tf32"), (["fp32"], "ieee"), (["fp32"], "tf32x3")]


@pytest.mark.parametrize("mask_kind,causal", [("kpm_dead", True), ("additive_inf", False)])
def test_reload_rows_tiles_compute_what_held_tiles_do(monkeypatch, mask_kind, causal):
    """RELOAD_ROWS (chosen by the proof for fp32 at D = 256) only changes where each kernel's own
    tiles come from at each step: outputs and every gradient are bitwise those of held tiles."""
    leaves, (q, k, v), temperature = make_inputs(2, 2, 37, 45, 48, torch.float32, same_qkv=False)
    mask = make_mask(mask_kind, 2, 2, 37, 45)

    def run():
        out = temperature_guided_attention(q, k, v, temperature, mask, causal=causal, gsot_threshold=0.3,
                                           backend="triton")
        return [out, *torch.autograd.grad(out, leaves + [temperature], grad_out)]

    grad_out = torch.randn(q.shape)
    held = run()
    (config,) = _configs.flash_configs("fwd", 48, torch.float32, "ieee")
    assert "RELOAD_ROWS" not in dict(config.meta)
    reloading = _configs.LaunchConfig(config.meta + (("RELOAD_ROWS", 1),), config.num_warps, config.num_stages)
    monkeypatch.setattr(_configs, "flash_configs", lambda *args, **kwargs: (reloading,))
    reloaded = run()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtemperature"], held, reloaded, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
