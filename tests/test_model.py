"""TGRLlamaModel on tiny random Llama checkpoints loaded through the real 4-bit NF4 path.

Parity of the backends (logits, loss, head gradients) against a float64 truth, the seed's math
with backend "reference", training (plain loop, HF Trainer with checkpoints and resume, LoRA),
save/load, and the CPU run end to end.
"""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import DEVICE  # noqa: E402
from parity import assert_parity  # noqa: E402
from tgr import TGRConfig, TGRLlamaModel, build_tiny_llama  # noqa: E402
from tgr.config import CONFIG_NAME  # noqa: E402
from tgr.model import WEIGHTS_NAME, CheckpointError  # noqa: E402
from tgr_kernels.reference import temperature_guided_attention_ref  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:  # the GPU test machine has no bitsandbytes: the base loads unquantized there
    HAVE_BNB = False
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")

HEAD_KEYS = {"temperature_mechanisms.0.proj.weight", "temperature_mechanisms.0.proj.bias"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """hidden 64, 2 layers: one TGR head of width 64 (flash/SDPA path), or 4 heads of 16."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny64"), hidden_size=64, num_hidden_layers=2, vocab_size=256)


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """hidden 288 > 256: one TGR head takes the wide path (288 is no multiple of any block)."""
    return build_tiny_llama(tmp_path_factory.mktemp("wide288"), hidden_size=288, num_hidden_layers=1,
                            intermediate_size=288, vocab_size=128)


def make_model(base, **overrides) -> TGRLlamaModel:
    fields = dict(base_model_name_or_path=base, temperature_heads=4, compute_dtype="float32",
                  load_in_4bit=HAVE_BNB)
    fields.update(overrides)
    return TGRLlamaModel(TGRConfig(**fields))


def batch(model, B=3, S=12, left_pad=(0, 3, 5), seed=1):
    """Token ids, a left-padded 0/1 mask, and labels (−100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for row, pad in enumerate(left_pad[:B]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(model.device), mask.to(model.device), labels.to(model.device)


def head_params(model):
    proj = model.temperature_mechanisms[0].proj
    return proj.weight, proj.bias


def run(model, ids, mask, labels):
    """logits, loss and the head's gradients."""
    for p in head_params(model):
        p.grad = None
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    w, b = head_params(model)
    return out.logits.detach(), out.loss.detach(), w.grad.clone(), b.grad.clone()


def truth(model, ids, mask, labels):
    """The TGR head in float64 on the base's hidden states (written out here, independently of
    the model's code): logits, loss and the head's gradients."""
    config = model.config
    with torch.no_grad():
        h = model.base_llama_model.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    w, b = (p.detach().double().requires_grad_() for p in head_params(model))
    t = torch.clamp(torch.sigmoid(h @ w.T + b), config.temperature_clamp_min, config.temperature_clamp_max)
    B, S, H = h.shape
    n = config.num_tgr_heads
    q = h.view(B, S, n, H // n).transpose(1, 2)
    threshold = config.temperature_conf_threshold if config.gsoT_enabled else None
    out = temperature_guided_attention_ref(q, q, q, t, mask.bool(), causal=config.causal,
                                           gsot_threshold=threshold)
    y = out.transpose(1, 2).reshape(B, S, H)
    logits = F.linear(y, model.base_llama_model.lm_head.weight.double())
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    real = mask.double()[..., None].expand_as(t)
    reg = (((t - config.initial_temperature) ** 2) * real).sum() / real.sum()
    loss = ce + config.temperature_regularization_weight * reg
    loss.backward()
    return logits.detach(), loss.detach(), w.grad, b.grad


def set_gsot_threshold_between_rows(model, ids, mask):
    """A GSoT threshold that prunes about half of the real tokens, far (relative to rounding)
    from every token's mean temperature, so all backends prune the same rows."""
    with torch.no_grad():
        t_bar = model(ids, attention_mask=mask).temperatures.mean(-1)[mask.bool()].sort().values
    gaps = t_bar[1:] - t_bar[:-1]
    mid = len(t_bar) // 2
    lo, hi = max(1, mid - len(t_bar) // 4), min(len(gaps), mid + len(t_bar) // 4)
    i = lo + int(gaps[lo:hi].argmax())
    assert gaps[i] > 1e-5, "temperatures too close together to place a threshold"
    threshold = float((t_bar[i] + t_bar[i + 1]) / 2)
    model.config = model.config.copy(temperature_conf_threshold=threshold)
    return threshold


# ----------------------------------------------------------------------------------------------
# Loading, freezing, outputs
# ----------------------------------------------------------------------------------------------


@needs_bnb
def test_base_is_4bit_nf4_double_quant_and_frozen(tiny_base):
    import bitsandbytes as bnb

    model = make_model(tiny_base)
    linears = [m for m in model.base_llama_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    state = linears[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantization
    assert all(not p.requires_grad for p in model.base_llama_model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == HEAD_KEYS
    assert all(p.dtype == torch.float32 for p in head_params(model))
    assert set(model.state_dict()) == HEAD_KEYS  # the base never enters the state dict
    assert set(model.state_dict(prefix="module.")) == {f"module.{k}" for k in HEAD_KEYS}  # as under DDP
    model.load_state_dict(model.state_dict(), strict=True)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2  # filled from the base


def test_unquantized_base_and_bf16_compute(tiny_base):
    model = make_model(tiny_base, load_in_4bit=False, compute_dtype="bfloat16", attention_backend="torch")
    assert model.base_llama_model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in head_params(model))
    ids, mask, labels = batch(model)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.temperatures.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits[mask.bool()]).all()
    out.loss.backward()
    assert head_params(model)[0].grad.dtype == torch.float32


def test_output_fields_and_seed_dict_access(tiny_base):
    model = make_model(tiny_base, attention_backend="torch")
    ids, mask, labels = batch(model)
    out = model(ids, attention_mask=mask)
    assert out["loss"] is None and out.loss is None  # the seed's dict had "loss": None
    assert out["logits"].shape == (3, 12, model.vocab_size)
    assert out["temperatures"].shape == (3, 12, 4)
    assert out.gsot_mask.dtype == torch.bool and out.gsot_mask.shape == (3, 12)
    expected = out.temperatures.mean(-1) >= model.config.temperature_conf_threshold
    assert torch.equal(out.gsot_mask, expected)
    assert out[0] is out.logits  # positional access skips the None loss
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, out.lm_loss + out.temperature_loss)
    assert not any(k in out for k in ("hidden_states", "attention_probs"))  # no 33 stored layers


def test_gsot_disabled_keeps_every_row(tiny_base):
    model = make_model(tiny_base, attention_backend="torch", gsoT_enabled=False, temperature_conf_threshold=1.0)
    ids, mask, _ = batch(model)
    out = model(ids, attention_mask=mask)
    assert out.gsot_mask.all()
    assert (out.logits[mask.bool()].abs().sum(-1) > 0).all()


def test_bad_inputs_and_base_mismatch(tiny_base):
    model = make_model(tiny_base, attention_backend="torch")
    ids, mask, labels = batch(model)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=labels[:2])
    with pytest.raises(ValueError, match="integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match="hidden_size=128 but the base"):
        make_model(tiny_base, hidden_size=128)
    with pytest.raises(ValueError, match="num_tgr_heads=3 must divide hidden_size=64"):
        make_model(tiny_base, num_tgr_heads=3)
    with pytest.raises(TypeError, match="TGRConfig"):
        TGRLlamaModel({"base_model_name_or_path": tiny_base})


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------


def _seed_forward(model, input_ids, attention_mask, labels):
    """The seed's TGRLlamaModel.forward, transcribed (its fp16 casts dropped: fp32 throughout)."""
    outputs = model.base_llama_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    final_hidden = outputs.hidden_states[-1]
    proj = model.temperature_mechanisms[0].proj
    temperature_vals = torch.clamp(torch.sigmoid(proj(final_hidden)), model.config.temperature_clamp_min,
                                   model.config.temperature_clamp_max)
    q = k = v = final_hidden.unsqueeze(1)
    extended_mask = None
    if attention_mask is not None:
        extended_mask = ((1.0 - attention_mask.unsqueeze(1).unsqueeze(2)) * -1e4).to(final_hidden.dtype)
    temp_mean = temperature_vals.mean(dim=-1).unsqueeze(1).unsqueeze(-1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores * temp_mean
    if extended_mask is not None:
        scores += extended_mask
    context = torch.matmul(F.softmax(scores, dim=-1), v)
    new_hidden = context.squeeze(1)
    token_temp_avg = temperature_vals.mean(dim=-1)
    confident = (token_temp_avg >= model.config.temperature_conf_threshold).float().unsqueeze(-1)
    new_hidden = new_hidden * confident
    logits = model.base_llama_model.lm_head(new_hidden)
    main_loss = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1),
                                ignore_index=-100)
    weight = model.config.temperature_regularization_weight
    reg = ((temperature_vals - model.config.initial_temperature) ** 2).mean() * weight
    return logits, temperature_vals, main_loss + reg


def test_reference_backend_is_the_seed(tiny_base):
    model = make_model(tiny_base, attention_backend="reference", causal=False)
    ids, mask, _ = batch(model)
    set_gsot_threshold_between_rows(model, ids, mask)
    with torch.no_grad():
        # The seed's own labels (input_ids, padding included) and its mask.
        out = model(ids, attention_mask=mask, labels=ids)
        logits, temps, loss = _seed_forward(model, ids, mask, ids)
        assert torch.allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.temperatures, temps)
        assert not out.gsot_mask.all() and out.gsot_mask.any()
        # Without padding the regularizer (over real tokens here) is the seed's too.
        full = torch.ones_like(mask)
        out = model(ids, attention_mask=full, labels=ids)
        _, _, loss = _seed_forward(model, ids, full, ids)
        assert torch.allclose(out.loss, loss, rtol=1e-6, atol=1e-6)


PARITY_CASES = [  # (base fixture, num_tgr_heads, causal): the kernel path each one takes
    pytest.param("tiny_base", 1, True, id="D64-causal"),
    pytest.param("tiny_base", 1, False, id="D64-seed"),
    pytest.param("tiny_base", 4, True, id="4headsD16-causal"),
    pytest.param("tiny_base", 4, False, id="4headsD16-seed"),
    pytest.param("wide_base", 1, True, id="wide-D288-causal"),
    pytest.param("wide_base", 1, False, id="wide-D288-seed"),
]


@pytest.mark.parametrize("base_name, heads, causal", PARITY_CASES)
def test_backend_parity(request, base_name, heads, causal):
    """torch and triton vs float64 truth, within 2x the reference backend's (eager fp32) error."""
    model = make_model(request.getfixturevalue(base_name), num_tgr_heads=heads, causal=causal,
                       attention_backend="reference")
    ids, mask, labels = batch(model)
    threshold = set_gsot_threshold_between_rows(model, ids, mask)
    real = mask.bool()

    true_logits, true_loss, true_dw, true_db = truth(model, ids, mask, labels)
    eager = run(model, ids, mask, labels)
    for backend in ("torch", "triton"):
        model.set_attention_backend(backend)
        logits, loss, dw, db = run(model, ids, mask, labels)
        tag = f"{backend} {base_name} heads={heads} causal={causal} gsot={threshold:.4f}"
        assert_parity(f"{tag} logits", logits[real], eager[0][real], true_logits[real], torch.float32)
        assert_parity(f"{tag} loss", loss, eager[1], true_loss, torch.float32)
        assert_parity(f"{tag} dW", dw, eager[2], true_dw, torch.float32)
        assert_parity(f"{tag} db", db, eager[3], true_db, torch.float32)
    # Some rows were pruned, some kept: the parity covered GSoT both ways.
    gate = model(ids, attention_mask=mask).gsot_mask[real]
    assert gate.any() and not gate.all()


def test_causal_head_ignores_later_tokens(tiny_base):
    model = make_model(tiny_base, attention_backend="torch", gsoT_enabled=False)
    ids, _, _ = batch(model, B=1, left_pad=(0,))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 7) % model.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-5)
    seed_mode = make_model(tiny_base, attention_backend="torch", gsoT_enabled=False, causal=False)
    with torch.no_grad():
        a, b = seed_mode(ids).logits, seed_mode(changed).logits
    assert not torch.allclose(a[0, :8], b[0, :8], atol=1e-5)  # the seed's head looks ahead


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def test_plain_loop_trains_the_head_only(tiny_base):
    model = make_model(tiny_base, attention_backend="torch")
    ids, mask, labels = batch(model, B=4, S=16, left_pad=(0, 0, 4, 9))
    frozen = {n: p.detach().clone() for n, p in model.base_llama_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.base_llama_model.named_parameters())


def test_lora_adapters_train_and_round_trip(tiny_base, tmp_path):
    pytest.importorskip("peft")
    model = make_model(tiny_base, attention_backend="torch", lora_r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = trainable - HEAD_KEYS
    assert lora and all("lora_" in n for n in lora) and HEAD_KEYS <= trainable
    assert set(model.state_dict()) == trainable
    ids, mask, labels = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in model.named_parameters() if "lora_B" in n)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "lora")
    again = TGRLlamaModel.from_pretrained(tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, before)


def test_evaluation_leaves_the_base_as_it_was(tiny_base):
    """An eval-mode pass must not change the base (bitsandbytes repacks 4-bit weights for CPU
    inference on AVX512-BF16 machines, which changes the numbers and drops the gradients)."""
    pytest.importorskip("peft")
    model = make_model(tiny_base, attention_backend="torch", lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids, mask, labels = batch(model)

    def logits_and_grads():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = logits_and_grads()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, logits)
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    model.train()
    logits_after, grads_after = logits_and_grads()
    assert torch.equal(logits_after, logits)
    for name, grad in grads.items():
        assert grads_after[name] is not None and torch.equal(grads_after[name], grad), name


def _token_dataset(model, n=8, S=16):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(4, model.vocab_size, (S,), generator=g)
        mask = torch.ones(S, dtype=torch.long)
        mask[S - (i % 4):] = 0  # right padding, as a training collator makes
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def test_hf_trainer_checkpoints_hold_the_head_and_resume(tiny_base, tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments, default_data_collator

    def args(max_steps):
        return TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=2,
            learning_rate=0.05, save_strategy="steps", save_steps=2, logging_steps=1, report_to="none",
            use_cpu=DEVICE == "cpu", disable_tqdm=True, eval_strategy="no",
        )

    model = make_model(tiny_base, attention_backend="torch")
    data = _token_dataset(model)
    trainer = Trainer(model=model, args=args(4), train_dataset=data, data_collator=default_data_collator)
    result = trainer.train()
    assert result.global_step == 4 and all("loss" in log for log in trainer.state.log_history[:-1])
    metrics = trainer.evaluate(eval_dataset=data[:4])
    assert math.isfinite(metrics["eval_loss"])
    checkpoint = tmp_path / "run" / "checkpoint-4"
    saved = load_file(str(checkpoint / WEIGHTS_NAME))
    assert set(saved) == HEAD_KEYS  # the 4-bit base is not in the checkpoint
    assert torch.equal(saved["temperature_mechanisms.0.proj.weight"], head_params(model)[0].detach().cpu())

    trainer.save_model(str(tmp_path / "final"))  # Trainer saves through TGRLlamaModel.save_pretrained
    assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(tmp_path / "final"))
    reloaded = TGRLlamaModel.from_pretrained(tmp_path / "final")
    ids, mask, _ = batch(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert os.path.exists(tmp_path / "final" / "training_args.bin")  # Trainer's file survived our save

    # Resume into a fresh model (new random head): Trainer loads the head from the checkpoint.
    fresh = make_model(tiny_base, attention_backend="torch")
    assert not torch.equal(head_params(fresh)[0].detach().cpu(), saved["temperature_mechanisms.0.proj.weight"])
    trainer = Trainer(model=fresh, args=args(4), train_dataset=data, data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(head_params(fresh)[0].detach().cpu(), saved["temperature_mechanisms.0.proj.weight"])
    trainer = Trainer(model=fresh, args=args(6), train_dataset=data, data_collator=default_data_collator)
    assert trainer.train(resume_from_checkpoint=str(checkpoint)).global_step == 6


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------


def _perturb_head(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("heads", [1, 4])
def test_save_load_round_trip(tiny_base, tmp_path, heads):
    model = make_model(tiny_base, attention_backend="torch", num_tgr_heads=heads, causal=False)
    _perturb_head(model)
    ids, mask, _ = batch(model)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    path = model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert os.path.getsize(os.path.join(path, WEIGHTS_NAME)) < 10_000  # the head only, not the base
    loaded = TGRLlamaModel.from_pretrained(path)
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, before)
    # Overrides at load time: another backend gives the same logits within rounding.
    other = TGRLlamaModel.from_pretrained(path, attention_backend="reference")
    assert other.config.attention_backend == "reference"
    with torch.no_grad():
        assert torch.allclose(other(ids, attention_mask=mask).logits[mask.bool()], before[mask.bool()], atol=1e-4)


def test_a_base_in_a_relative_folder_loads_from_any_working_directory(tiny_base, tmp_path, monkeypatch):
    """config.json named the base by the relative path it was given: from another working directory
    from_pretrained looked for it there (or on the hub)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(os.path.dirname(tiny_base))
    relative = os.path.basename(tiny_base)
    new = make_model(relative, attention_backend="torch")
    wrapped = TGRLlamaModel.from_base(AutoModelForCausalLM.from_pretrained(relative, dtype=torch.float32),
                                      temperature_heads=4, attention_backend="torch")
    paths = [model.save_pretrained(tmp_path / name) for model, name in ((new, "new"), (wrapped, "wrapped"))]
    monkeypatch.chdir(tmp_path)
    for path in paths:
        loaded = TGRLlamaModel.from_pretrained(path)
        assert os.path.samefile(loaded.config.base_model_name_or_path, tiny_base)
        assert os.path.isabs(loaded.config.base_model_name_or_path)


def test_save_replaces_atomically_and_keeps_other_files(tiny_base, tmp_path, monkeypatch):
    import tgr.model as model_module

    model = make_model(tiny_base, attention_backend="torch")
    _perturb_head(model, seed=1)
    target = tmp_path / "saved"
    model.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    good = {name: (target / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    ids, mask, _ = batch(model)
    with torch.no_grad():
        good_logits = model(ids, attention_mask=mask).logits

    # A save that dies half-way through writing the weights leaves the good save untouched.
    _perturb_head(model, seed=2)

    def dying_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "save_file", dying_save_file)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert {name: (target / name).read_bytes() for name in good} == good
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary folder left behind
    with torch.no_grad():
        assert torch.equal(TGRLlamaModel.from_pretrained(target)(ids, attention_mask=mask).logits, good_logits)

    # A completed save replaces the files, and leaves the folder's other files alone.
    model.save_pretrained(target)
    assert (target / WEIGHTS_NAME).read_bytes() != good[WEIGHTS_NAME]
    assert (target / "tokenizer.json").read_text() == "{}"
    with pytest.raises(NotADirectoryError):
        model.save_pretrained(target / "tokenizer.json")


def test_load_rejects_mismatched_weights(tiny_base, tmp_path):
    model = make_model(tiny_base, attention_backend="torch")
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="do not fit"):
        TGRLlamaModel.from_pretrained(tmp_path / "saved", temperature_heads=3)
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        TGRLlamaModel.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# End to end on the CPU
# ----------------------------------------------------------------------------------------------


def test_cpu_end_to_end(tiny_base, tmp_path):
    """Tokenize, train the head, save, reload, generate text: all on the CPU."""
    from transformers import AutoTokenizer

    from tgr import ClampLogits

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = make_model(tiny_base, device="cpu")  # attention_backend "auto" -> "torch" on the CPU
    texts = ["Q: What is water made of?\nA: Water is made of hydrogen and oxygen.",
             "Q: How many legs does a spider have?\nA: A spider has eight legs."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "tgr")
    tokenizer.save_pretrained(tmp_path / "tgr")
    model = TGRLlamaModel.from_pretrained(tmp_path / "tgr").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tgr", padding_side="left")
    prompts = tokenizer(["Q: Why is the sky blue?\nA:", "Q: What is water?\nA:"], padding=True, return_tensors="pt")
    out = model.generate(prompts.input_ids, attention_mask=prompts.attention_mask, max_new_tokens=8,
                         do_sample=True, temperature=0.7, top_p=0.9, logits_processor=[ClampLogits()],
                         generator=torch.Generator().manual_seed(0))
    assert out.device.type == "cpu" and out.shape[0] == 2 and out.shape[1] <= prompts.input_ids.shape[1] + 8
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert texts[0].startswith("Q: Why is the sky blue?")
