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
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import List, Optional

import torch

from .measure import Job, describe_error, peak_memory_mib, summarize, time_interleaved

BACKENDS = {"eager-seed": "reference", "tgr-torch": "torch", "tgr-triton": "triton"}
NEW_TOKENS, QUICK_NEW_TOKENS = 32, 4
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


def _available(provider: str, device: str, allow_interpreter: bool) -> Optional[str]:
    if provider == "tgr-triton" and device != "cuda" and not (
            allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton needs a GPU (on CPU only its interpreter runs: --triton-interpret)"
    return None


def run(args, emit, deadline: Optional[float]) -> List[str]:
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
                print(f"  e2e hidden={shape['hidden']} layers={shape['layers']} seq_len={S} {dtype_name} ...", flush=True)
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
