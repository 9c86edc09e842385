"""The e2e suite: a TGR model's training step and generation speed, per attention backend.

The model is ``tgr.TGRLlamaModel`` over a random Llama base written to a temporary folder (no
network, no 4-bit: the base is loaded in the benchmark dtype and frozen, as the model does):

    CPU    hidden 1024, 2 layers, 8 heads, vocabulary 32000     (--quick: hidden 256, 1 layer)
    GPU    hidden 4096, 2 layers, 32 heads, vocabulary 32000    (Llama-2-7B's widths, 2 of its 32 layers)

with the seed's TGR head: one head as wide as the hidden state (the wide path), TTM with 8
heads, GSoT at 0.4, causal. Providers are the model's ``attention_backend``, which drives both
the temperature projection and the attention: ``reference`` (the seed's eager math, reported
as eager-seed), ``torch`` (tgr-torch) and ``triton`` (tgr-triton, GPU only).

    e2e-train-step  (mode full)     forward with labels, loss.backward(), AdamW step on the head.
    e2e-generate    (mode forward)  ``model.generate`` greedy, prompt of S tokens, 32 new tokens
                                    (4 with --quick), KV and hidden-state caches; the record's
                                    tokens_per_s counts new tokens over the whole call (prefill
                                    included).

One model serves every backend (``set_attention_backend``), so the base is loaded once; the
backends are interleaved per repetition like the op suites' providers.

Every-layer TGR (providers ``base-sdpa`` and ``tgr-layers``): a randomly initialised Llama with
grouped-query attention, built in memory,

    CPU    hidden 1024, 8 layers, 16 heads, 4 key/value heads (D = 64), vocabulary 32000, fp32
    GPU    the same widths in bf16                               (--quick: hidden 256, 2 layers)

``base-sdpa`` is the model with its sdpa attention; ``tgr-layers`` the same model object after
``tgr.apply_tgr(model)`` (every layer, backend auto, 8 temperature heads, GSoT 0.4), timed with
the patch switched off (``tgr.tgr_layers_disabled``) for the base, so both run the same weights:

    e2e-layers-train-step  (mode full)     the model's own forward with labels, backward, AdamW
                                           step over every parameter (all trainable, for both:
                                           the base's weights, and the layers' temperature
                                           mechanisms for tgr-layers), batch 1, S tokens.
    e2e-layers-generate    (mode forward)  HF ``generate``, greedy, DynamicCache, a prompt of
                                           S tokens, exactly 64 new tokens (4 with --quick);
                                           tokens_per_s counts new tokens over the whole call.

The check: the freshly patched model's loss equals the base's (TGR starts as the identity). Each
tgr-layers record carries ``vs_base``: its time over base-sdpa's (train step) or its tokens/s
over base-sdpa's (generate).
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .measure import Job, describe_error, peak_memory_mib, summarize, time_interleaved

BACKENDS = {"eager-seed": "reference", "tgr-torch": "torch", "tgr-triton": "triton"}
NEW_TOKENS, QUICK_NEW_TOKENS = 32, 4
E2E_MODES = ("full", "forward")  # the training step, the generation
CHECK_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def base_shape(device: str, quick: bool) -> dict:
    if quick:
        return {"hidden": 256, "layers": 1, "llama_heads": 4, "vocab": 1024}
    if device == "cuda":
        return {"hidden": 4096, "layers": 2, "llama_heads": 32, "vocab": 32000}
    return {"hidden": 1024, "layers": 2, "llama_heads": 8, "vocab": 32000}


def write_random_llama(path: str, shape: dict, max_len: int, dtype: torch.dtype, device: str) -> str:
    """A random Llama saved in ``path`` (built on ``device``: a 7B-wide one initialises in
    seconds on a GPU, not in a minute on its CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=int(shape["hidden"] * 8 / 3) // 64 * 64,
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["llama_heads"],
                         num_key_value_heads=shape["llama_heads"], max_position_embeddings=max_len,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    del model
    return path


def _available(provider: str, device: str, allow_interpreter: bool) -> str | None:
    if provider == "tgr-triton" and device != "cuda" and not (
            allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton needs a GPU (on CPU only its interpreter runs: --triton-interpret)"
    return None


LAYER_PROVIDERS = ("base-sdpa", "tgr-layers")
LAYER_NEW_TOKENS, LAYER_QUICK_NEW_TOKENS = 64, 4


def layer_model_shape(quick: bool) -> dict:
    if quick:
        return {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1024}
    return {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 32000}


def layer_seq_lens(device: str, quick: bool) -> list[int]:
    return [64] if quick else [2048] if device == "cuda" else [512]


def random_gqa_llama(shape: dict, max_len: int, dtype: torch.dtype, device: str):
    """A random Llama with grouped-query attention and sdpa attention, in ``dtype`` on ``device``,
    every parameter trainable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=int(shape["hidden"] * 8 / 3) // 64 * 64,
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=max_len,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


def run_layers(args, emit, deadline: float | None) -> list[str]:
    """The every-layer rows: base-sdpa against tgr-layers (see the module's docstring)."""
    import tgr

    device, quick = args.device, args.quick
    shape = layer_model_shape(quick)
    seq_lens = args.seq_lens or layer_seq_lens(device, quick)
    new_tokens = LAYER_QUICK_NEW_TOKENS if quick else LAYER_NEW_TOKENS
    providers = [p for p in LAYER_PROVIDERS if p in args.providers]
    skipped = []
    for dtype in args.dtypes:
        dtype_name = str(dtype).replace("torch.", "")
        model = random_gqa_llama(shape, max(seq_lens) + new_tokens + 8, dtype, device)
        tgr.apply_tgr(model, layers="all", backend="auto")
        for S in seq_lens:
            if deadline is not None and time.monotonic() > deadline:
                skipped.append(f"e2e-layers S={S} {dtype_name}")
                continue
            print(f"  e2e every-layer hidden={shape['hidden']} layers={shape['layers']} heads={shape['heads']}/"
                  f"{shape['kv_heads']} seq_len={S} {dtype_name} ...", flush=True)
            _measure_layers(model, providers, shape, S, new_tokens, dtype, args, emit)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return skipped


def _measure_layers(model, providers, shape, S, new_tokens, dtype, args, emit):
    import tgr

    device = args.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab"], (1, S), generator=g).to(device)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # every parameter: the base's and the layers'
    model.train()

    def patched(enabled: bool, fn):
        def run(state):
            if enabled:
                return fn(state)
            with tgr.tgr_layers_disabled(model):
                return fn(state)
        return run

    def train_step(_state):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def generate(_state):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False)

    enabled = {"base-sdpa": False, "tgr-layers": True}
    losses = {}
    for name in providers:  # the check, before any training step: TGR starts as the identity
        try:
            with torch.no_grad():
                losses[name] = float(patched(enabled[name], lambda _s: model(input_ids=ids, attention_mask=mask,
                                                                             labels=ids).loss)(None))
        except Exception as exc:
            losses[name] = describe_error(exc)
    base = {"batch": 1, "seq_len": S, "hidden": shape["hidden"], "layers": shape["layers"],
            "heads": shape["heads"], "kv_heads": shape["kv_heads"], "head_dim": shape["hidden"] // shape["heads"],
            "vocab": shape["vocab"], "dtype": str(dtype).replace("torch.", ""), "causal": True, "device": device,
            "trainable": "all parameters"}
    for op, mode, fn in (("e2e-layers-train-step", "full", train_step),
                         ("e2e-layers-generate", "forward", generate)):
        if mode not in args.modes:  # --modes: full is the train step, forward the generation
            continue
        model.train(op.endswith("train-step"))
        jobs = {name: Job(prepare=lambda i: None, run=patched(enabled[name], fn)) for name in providers}
        time_interleaved(jobs, device, args.reps, args.warmup)
        recs = {}
        for name in providers:
            rec = {**base, "op": op, "mode": mode, "provider": name}
            job = jobs[name]
            if job.error:
                emit({**rec, "status": "n/a", "reason": job.error})
                continue
            stats = summarize(job.times_ms)
            rec.update(status="ok", **stats, first_ms=job.first_ms)
            if op == "e2e-layers-generate":
                rec.update(new_tokens=new_tokens, prompt_tokens=S,
                           tokens_per_s=new_tokens / (stats["median_ms"] * 1e-3))
            try:
                rec.update(peak_memory_mib(lambda: None, job.run, device))
            except Exception as exc:
                rec.update(peak_mib=None, memory_method=describe_error(exc))
            ref, mine = losses.get("base-sdpa"), losses.get(name)
            if isinstance(ref, float) and isinstance(mine, float):
                err = abs(mine - ref) / max(abs(ref), 1e-30)
                tol = CHECK_FLOOR.get(dtype, 1e-3)
                rec.update(check_ok=err <= tol, check_rel_err=err, check_tol=tol,
                           check_what="loss at start vs base-sdpa (identity at start)")
            recs[name] = rec
        mine, ref = recs.get("tgr-layers"), recs.get("base-sdpa")
        if mine and ref:
            if op == "e2e-layers-generate":
                mine["vs_base"] = mine["tokens_per_s"] / ref["tokens_per_s"]
                what = f"tokens/s {mine['tokens_per_s']:.3g} vs {ref['tokens_per_s']:.3g}"
            else:
                mine["vs_base"] = mine["median_ms"] / ref["median_ms"]
                what = f"step {mine['median_ms']:.0f} ms vs {ref['median_ms']:.0f} ms"
            print(f"    {op} S={S}: tgr-layers / base-sdpa = {mine['vs_base']:.3f} ({what}); peak "
                  f"{mine.get('peak_mib') or 0:.0f} vs {ref.get('peak_mib') or 0:.0f} MiB", flush=True)
        for rec in recs.values():
            emit(rec)
    model.train(False)


def run(args, emit, deadline: float | None) -> list[str]:
    """The e2e rows: the TGR head's (providers eager-seed, tgr-torch, tgr-triton) and every-layer
    TGR's (base-sdpa, tgr-layers), each when one of its providers is asked for."""
    skipped = []
    if not any(m in E2E_MODES for m in args.modes):
        print(f"  e2e: none of the modes {args.modes} applies (it has {list(E2E_MODES)})")
        return skipped
    if any(p in BACKENDS for p in args.providers):
        skipped += run_head(args, emit, deadline)
    if any(p in LAYER_PROVIDERS for p in args.providers):
        try:
            import tgr  # noqa: F401
        except ImportError as exc:
            print(f"  e2e every-layer: n/a (tgr is not importable: {exc})")
        else:
            skipped += run_layers(args, emit, deadline)
    return skipped


def run_head(args, emit, deadline: float | None) -> list[str]:
    try:
        import tgr
    except ImportError as exc:
        print(f"  e2e: n/a (tgr is not importable: {exc})")
        return []
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in the benchmark's output
    except ImportError:
        pass
    device, quick = args.device, args.quick
    shape = base_shape(device, quick)
    seq_lens = args.seq_lens or ([64] if quick else [512])
    new_tokens = QUICK_NEW_TOKENS if quick else NEW_TOKENS
    providers = [p for p in args.providers if p in BACKENDS]
    skipped = []
    with tempfile.TemporaryDirectory(prefix="tgr-bench-llama-") as folder:
        for dtype in args.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            path = write_random_llama(os.path.join(folder, dtype_name), shape, max(seq_lens) + new_tokens + 8, dtype,
                                      device)
            config = tgr.TGRConfig(base_model_name_or_path=path, load_in_4bit=False, compute_dtype=dtype_name,
                                   device=device, causal=True, num_tgr_heads=1)
            model = tgr.TGRLlamaModel(config)
            for S in seq_lens:
                if deadline is not None and time.monotonic() > deadline:
                    skipped.append(f"e2e S={S} {dtype_name}")
                    continue
                print(f"  e2e hidden={shape['hidden']} layers={shape['layers']} seq_len={S} {dtype_name} ...",
                      flush=True)
                _measure(model, providers, shape, S, new_tokens, dtype, args, emit)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return skipped


def _measure(model, providers, shape, S, new_tokens, dtype, args, emit):
    device = args.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab"], (1, S), generator=g).to(device)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    live = {p: BACKENDS[p] for p in providers if _available(p, device, args.triton_interpret) is None}

    def with_backend(backend, fn):
        def run(state):
            model.set_attention_backend(backend)
            return fn(state)
        return run

    def train_step(_state):
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def generate(_state):
        return model.generate(ids, mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])

    base = {"batch": 1, "seq_len": S, **{k: shape[k] for k in ("hidden", "layers", "vocab")},
            "dtype": str(dtype).replace("torch.", ""), "causal": True, "device": device}
    losses = {}
    for name, backend in live.items():  # the check: each backend's loss on the same batch
        model.set_attention_backend(backend)
        try:
            with torch.no_grad():
                losses[name] = float(model(ids, attention_mask=mask, labels=ids).loss)
        except Exception as exc:
            losses[name] = describe_error(exc)
    for op, mode, fn in (("e2e-train-step", "full", train_step), ("e2e-generate", "forward", generate)):
        if mode not in args.modes:  # --modes: full is the train step, forward the generation
            continue
        jobs = {name: Job(prepare=lambda i: None, run=with_backend(backend, fn)) for name, backend in live.items()}
        time_interleaved(jobs, device, args.reps, args.warmup)
        for name in providers:
            rec = {**base, "op": op, "mode": mode, "provider": name, "backend": BACKENDS[name]}
            job = jobs.get(name)
            reason = _available(name, device, args.triton_interpret) or (job.error if job else None)
            if reason:
                emit({**rec, "status": "n/a", "reason": reason})
                continue
            stats = summarize(job.times_ms)
            rec.update(status="ok", **stats, first_ms=job.first_ms)
            if name == "tgr-triton" and device == "cpu":
                rec["note"] = "Triton's interpreter: checks the wiring; its time is not a kernel's speed"
            if op == "e2e-generate":
                rec.update(new_tokens=new_tokens, tokens_per_s=new_tokens / (stats["median_ms"] * 1e-3))
            try:
                rec.update(peak_memory_mib(lambda: None, job.run, device))
            except Exception as exc:
                rec.update(peak_mib=None, memory_method=describe_error(exc))
            ref, mine = losses.get("eager-seed"), losses.get(name)
            if isinstance(ref, float) and isinstance(mine, float):
                err = abs(mine - ref) / max(abs(ref), 1e-30)
                tol = CHECK_FLOOR.get(dtype, 1e-3)
                rec.update(check_ok=err <= tol, check_rel_err=err, check_tol=tol, check_what="loss vs eager-seed")
            emit(rec)
    model.set_attention_backend("auto")
