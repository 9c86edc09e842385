"""LoRA the standard way: peft's get_peft_model with a LoraConfig (prepare_model_for_kbit_training
first on a 4-bit base), adapters saved in peft's format beside the head, loadable by
PeftModel.from_pretrained and mergeable with merge_and_unload; Trainer checkpoints resume them."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tgr import TGRConfig, TGRLlamaModel, build_tiny_llama  # noqa: E402
from tgr.config import LEGACY_CONFIG_NAME  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:
    HAVE_BNB = False


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny64peft"), hidden_size=64, num_hidden_layers=2,
                            vocab_size=256)


def make_model(base, **overrides) -> TGRLlamaModel:
    fields = dict(base_model_name_or_path=base, temperature_heads=4, compute_dtype="float32", load_in_4bit=False,
                  attention_backend="torch", lora_r=4, lora_alpha=8.0)
    fields.update(overrides)
    return TGRLlamaModel(TGRConfig(**fields))


def batch(model, B=2, S=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def train(model, steps=2):
    ids, mask, labels = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_adapters_are_peft_and_load_with_peft_from_pretrained(tiny_base, tmp_path):
    from peft import PeftModel

    model = make_model(tiny_base)
    assert isinstance(model.base_llama_model, PeftModel)
    assert model.hf_base_model is model.base_llama_model.get_base_model()
    assert {"TemperatureMechanism", "LlamaDecoderLayer"} <= set(model._no_split_modules)
    assert model.base_llama_model.peft_config["default"].r == 4
    train(model)
    assert all(p.abs().sum() > 0 for n, p in lora_params(model).items() if "lora_B" in n)  # trained, non-zero
    path = model.save_pretrained(tmp_path / "saved")
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json"} <= set(
        os.listdir(path))
    adapter_config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]

    ids, mask, _ = batch(model)
    with torch.no_grad():
        tgr_base_logits = model.base_llama_model(input_ids=ids, attention_mask=mask).logits
        fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        plain_logits = fresh(input_ids=ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(fresh, path).eval()
        peft_logits = peft_model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(peft_logits, plain_logits, atol=1e-4)  # the adapters do something
        assert torch.equal(peft_logits, tgr_base_logits)
        merged = peft_model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged_logits, tgr_base_logits, rtol=1e-5, atol=1e-5)


def test_loading_a_tgr_folder_restores_the_adapters(tiny_base, tmp_path):
    model = make_model(tiny_base)
    train(model)
    ids, mask, _ = batch(model)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    for name, param in lora_params(model).items():
        assert torch.equal(dict(loaded.named_parameters())[name], param), name
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, before)

    # A folder saved by tgr 0.1 (tgr_config.json; adapters injected into the bare base) loads too.
    old = tmp_path / "old"
    old.mkdir()
    state = load_file(str(tmp_path / "saved" / "model.safetensors"))
    save_file({k.replace("base_llama_model.base_model.model.", "base_llama_model."): v for k, v in state.items()},
              str(old / "model.safetensors"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    (old / LEGACY_CONFIG_NAME).write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    with torch.no_grad():
        assert torch.equal(TGRLlamaModel.from_pretrained(old).eval()(ids, attention_mask=mask).logits, before)


def test_kbit_preparation_only_for_a_4bit_base(tiny_base, monkeypatch):
    calls = []
    prepare = peft.prepare_model_for_kbit_training

    def counting(model, *args, **kwargs):
        calls.append(kwargs)
        return prepare(model, *args, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", counting)
    make_model(tiny_base)
    assert calls == []
    if HAVE_BNB:
        model = make_model(tiny_base, load_in_4bit=True)
        assert len(calls) == 1
        assert not model.is_activation_checkpointing  # left to the training arguments
        train(model, steps=1)
        assert all(p.grad is not None for n, p in lora_params(model).items() if "lora_A" in n)
    with pytest.raises(ValueError, match="matched no module"):
        make_model(tiny_base, lora_target_modules=["no_such_proj"])


def test_trainer_checkpoints_resume_the_adapters(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments, default_data_collator

    def args(max_steps):
        return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=2,
                                 learning_rate=0.05, save_strategy="steps", save_steps=2, report_to="none",
                                 use_cpu=True, disable_tqdm=True, eval_strategy="no")

    model = make_model(tiny_base)
    ids, mask, labels = batch(model, B=4)
    data = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels, strict=True)]
    Trainer(model=model, args=args(2), train_dataset=data, data_collator=default_data_collator).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()  # Trainer saves through save_pretrained
    trained = {n: p.detach().clone() for n, p in lora_params(model).items()}

    fresh = make_model(tiny_base)
    assert not all(torch.equal(p, trained[n]) for n, p in lora_params(fresh).items())
    Trainer(model=fresh, args=args(2), train_dataset=data,
            data_collator=default_data_collator).train(resume_from_checkpoint=str(checkpoint))
    for name, param in lora_params(fresh).items():
        assert torch.equal(param, trained[name]), name
    # The checkpoint's adapters load with peft alone.
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(checkpoint))


def test_an_adapter_on_the_temperature_projection_takes_effect():
    """peft's "all-linear" LoRA wraps a TemperatureMechanism's proj too: the mechanism runs the
    wrapped projection (the fused op read proj.weight, and the adapter did nothing)."""
    from tgr_kernels import TemperatureMechanism

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mechanism = TemperatureMechanism(16, 4, backend="torch")

        def forward(self, x):
            return self.mechanism(x)

    torch.manual_seed(0)
    holder = Holder()
    x = torch.randn(2, 5, 16)
    before = holder(x)
    wrapped = peft.get_peft_model(holder, peft.LoraConfig(r=2, target_modules=["proj"]))
    lora = wrapped.base_model.model.mechanism.proj
    torch.nn.init.normal_(lora.lora_B["default"].weight)
    got = wrapped(x)
    expected = torch.sigmoid(lora(x)).clamp(0.01, 0.99)
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert lora.lora_B["default"].weight.grad is not None


@pytest.mark.parametrize("mode", ["head", "layers"])
def test_the_base_head_that_eval_scores_is_the_base_without_its_adapters(tiny_base, mode):
    """tgr eval's "base_head" is the baseline: the base as loaded, not the base with the LoRA adapters
    that TGR trained (through the TGR head's loss)."""
    from tgr.evaluation import _base_logits

    model = make_model(tiny_base, tgr_mode=mode)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters away from their zero start, as after training
    model.eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids, mask, _ = batch(model)
    mask = torch.ones_like(mask)
    with torch.no_grad():
        expected = torch.log_softmax(plain(input_ids=ids).logits[:, :-1].float(), -1)
        expected = expected.gather(-1, ids[:, 1:, None]).squeeze(-1)
        both = model.heads_target_log_probs(ids, mask)
        alone = model.target_log_probs(ids, mask, head="base")
        through_logits = _base_logits(model, ids, mask)
        adapted = model.base_model(input_ids=ids).logits  # the adapters are on again afterwards
    torch.testing.assert_close(both["base"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(through_logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert (adapted - plain(input_ids=ids).logits).abs().max() > 1e-2
    assert (both["tgr"] - both["base"]).abs().max() > 1e-3


def test_a_given_state_dict_is_what_the_peft_files_hold_too(tiny_base, tmp_path):
    """save_pretrained(state_dict=...) (as Trainer passes it) wrote the given adapters into
    model.safetensors but the live ones into adapter_model.safetensors: tgr and peft loaded different
    adapters from one folder."""
    from peft import PeftModel

    model = make_model(tiny_base)
    train(model)
    given = {k: v + 0.25 if "lora_" in k else v for k, v in model.state_dict().items()}
    path = model.save_pretrained(tmp_path / "saved", state_dict=given)
    by_tgr = dict(TGRLlamaModel.from_pretrained(path).named_parameters())
    fresh = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    by_peft = dict(PeftModel.from_pretrained(fresh, path).named_parameters())
    lora_keys = [k for k in given if "lora_" in k]
    assert lora_keys
    for key in lora_keys:
        assert torch.equal(by_tgr[key], given[key]), key
        assert torch.equal(by_peft[key.removeprefix("base_llama_model.")], given[key]), key
    with pytest.raises(ValueError, match="variant"):
        model.save_pretrained(tmp_path / "variant", variant="fp16")


def test_a_failed_load_onto_a_given_base_gives_the_base_back_as_it_came(tiny_base, tmp_path):
    """from_pretrained(folder, base=base) whose weights do not fit left the caller's base frozen, with
    TGR layers and LoRA adapters in it: passing it again failed ('already has TGR layers')."""
    from tgr.layers import is_tgr_applied

    model = make_model(tiny_base, tgr_mode="both", tgr_layers=[1])
    train(model)
    path = model.save_pretrained(tmp_path / "saved")
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    names = [n for n, _ in base.named_parameters()]
    with pytest.raises(ValueError, match="do not fit"):
        TGRLlamaModel.from_pretrained(path, base=base, temperature_heads=3)
    assert not is_tgr_applied(base) and not hasattr(base, "peft_config")
    assert [n for n, _ in base.named_parameters()] == names and all(p.requires_grad for p in base.parameters())
    ids, mask, _ = batch(model)
    loaded = TGRLlamaModel.from_pretrained(path, base=base)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
