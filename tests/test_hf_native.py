"""TGRLlamaModel as a Hugging Face model: a PreTrainedModel registered with the Auto classes, a
bitwise save/load round trip through AutoModelForCausalLM, a base the user loaded wrapped as it
is, a model card, one-line errors for damaged or unreachable saved models, and generate with HF
GenerationConfig objects."""
import json
import os
import re
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)

from tgr import TGRConfig, TGRLlamaModel, build_tiny_llama  # noqa: E402
from tgr.model import CheckpointError  # noqa: E402

try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:  # the GPU test machine has no bitsandbytes: the base loads unquantized there
    HAVE_BNB = False

HEAD_KEYS = {"temperature_mechanisms.0.proj.weight", "temperature_mechanisms.0.proj.bias"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny64hf"), hidden_size=64, num_hidden_layers=2, vocab_size=256)


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """No test here may reach for the network, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def make_model(base, **overrides) -> TGRLlamaModel:
    fields = dict(base_model_name_or_path=base, temperature_heads=4, compute_dtype="float32",
                  load_in_4bit=HAVE_BNB, attention_backend="torch")
    fields.update(overrides)
    return TGRLlamaModel(TGRConfig(**fields))


def batch(model, B=2, S=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :3] = 0
    return ids.to(model.device), mask.to(model.device)


def train_a_step(model, lr=0.05):
    ids, mask = batch(model)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    model.eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------------------------
# PreTrainedModel and the Auto classes
# ----------------------------------------------------------------------------------------------


def test_auto_model_round_trip_is_bitwise(tiny_base, tmp_path):
    model = make_model(tiny_base)
    train_a_step(model)
    ids, mask = batch(model)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path / "saved")
    assert type(AutoConfig.from_pretrained(tmp_path / "saved")) is TGRConfig

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is TGRLlamaModel and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits(loaded, ids, mask), before)
    # Keyword arguments naming config fields replace them, as with TGRLlamaModel.from_pretrained.
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attention_backend="reference",
                                                 dtype=torch.bfloat16)
    assert other.config.attention_backend == "reference" and other.config.compute_dtype == "bfloat16"
    with pytest.raises(TypeError, match="device_mapp.*base="):
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_mapp="auto")


def test_a_cast_since_loading_is_saved(tiny_base, tmp_path):
    """``config.compute_dtype`` is what the model was loaded in; a ``.to(dtype)`` since then is
    written by save_pretrained, so the reload computes as the saved model did, and an "auto"
    that still holds is kept as "auto"."""
    model = make_model(tiny_base, load_in_4bit=False, compute_dtype="auto", device="cpu")
    model.save_pretrained(tmp_path / "auto")
    assert TGRConfig.from_pretrained(tmp_path / "auto").compute_dtype == "auto"
    model.to(torch.bfloat16)
    assert model.compute_dtype == model.dtype == torch.bfloat16 and model.config.compute_dtype == "auto"
    model.save_pretrained(tmp_path / "cast")
    loaded = TGRLlamaModel.from_pretrained(tmp_path / "cast")
    assert loaded.config.compute_dtype == "bfloat16" and loaded.dtype == torch.bfloat16


def test_a_model_saved_after_a_cast_reloads_bitwise(tiny_base, tmp_path):
    """After model.to(torch.bfloat16) the head, TGR layers and adapters compute in bf16; the reload
    rebuilt them in fp32 (a new model's dtype), so its logits differed from the saved model's. (The
    base is loaded in bf16 here, and its rotary buffers are put back in fp32 after the cast: in
    transformers itself a cast base differs from one loaded in bf16, whose inv_freq stays fp32.)"""
    model = make_model(tiny_base, load_in_4bit=False, device="cpu", compute_dtype="bfloat16", tgr_mode="both",
                       tgr_layers=[1], lora_r=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    rotary = model.hf_base_model.model.rotary_emb
    buffers = {name: buffer.clone() for name, buffer in rotary.named_buffers()}
    model.eval().to(torch.bfloat16)
    for name, buffer in buffers.items():  # transformers' cast rounds them, its bf16 load does not
        setattr(rotary, name, buffer)
    ids, mask = batch(model)
    before = logits(model, ids, mask)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert set(dtypes.values()) == {torch.bfloat16}
    model.save_pretrained(tmp_path / "cast")
    for loaded in (TGRLlamaModel.from_pretrained(tmp_path / "cast"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "cast")):
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == dtypes
        assert torch.equal(logits(loaded, ids, mask), before)
    # Asked to compute in another dtype, the reload builds its head as a new model's (fp32).
    fp32 = TGRLlamaModel.from_pretrained(tmp_path / "cast", compute_dtype="float32")
    assert all(v.dtype == torch.float32 for v in fp32.state_dict().values())
    # Cast from fp32 after loading: the reload computes in bf16, the TGR parts included.
    model = make_model(tiny_base, load_in_4bit=False, device="cpu", compute_dtype="float32").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "from32")
    loaded = TGRLlamaModel.from_pretrained(tmp_path / "from32")
    assert all(v.dtype == torch.bfloat16 for v in loaded.state_dict().values())


def test_pretrained_model_contract(tiny_base, monkeypatch):
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model = make_model(tiny_base, load_in_4bit=False)
    assert isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)
    assert TGRLlamaModel.config_class is TGRConfig and TGRLlamaModel.can_generate()
    # HF's base_model (getattr(self, base_model_prefix)) is the seed's base LM attribute.
    assert model.base_model is model.base_llama_model and model.base_model_prefix == "base_llama_model"
    assert model.main_input_name == "input_ids" and model.supports_gradient_checkpointing
    assert {"TemperatureMechanism", "LlamaDecoderLayer"} <= set(model._no_split_modules)
    # post_init drew no new weights into the loaded base.
    for (name, p), (_, q) in zip(model.base_llama_model.named_parameters(), plain.named_parameters(),
                                 strict=True):
        assert torch.equal(p, q), name
    assert set(model.state_dict()) == HEAD_KEYS
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.config.keys_to_ignore_at_inference == ["lm_loss", "temperature_loss", "gsot_mask",
                                                        "layer_temperatures", "layer_gsot_mask"]
    assert model.generation_config.eos_token_id == plain.generation_config.eos_token_id

    model.activation_checkpointing_enable()
    assert model.base_llama_model.is_activation_checkpointing and model.is_activation_checkpointing
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing

    # generate() is TGR's own (the head's logits with its caches), never GenerationMixin's loop.
    def not_this_one(*args, **kwargs):
        raise AssertionError("GenerationMixin.generate was called")

    monkeypatch.setattr(GenerationMixin, "generate", not_this_one)
    ids, mask = batch(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=[])
    assert out.shape == (2, ids.shape[1] + 2)


def test_generate_takes_a_generation_config(tiny_base):
    model = make_model(tiny_base, load_in_4bit=False, gsoT_enabled=False).eval()
    ids, mask = batch(model)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    config = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=config, eos_token_id=[]), greedy)
    # Arguments override the config; sampling settings come from it.
    sampled = GenerationConfig(max_new_tokens=5, do_sample=True, top_k=1)
    out = model.generate(ids, attention_mask=mask, generation_config=sampled, max_new_tokens=3, eos_token_id=[],
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, greedy)  # top_k=1 sampling is greedy
    with pytest.raises(TypeError, match="generation_config"):
        model.generate(ids, generation_config={"max_new_tokens": 3})


# ----------------------------------------------------------------------------------------------
# Wrapping a base the user loaded
# ----------------------------------------------------------------------------------------------


def test_from_base_wraps_a_loaded_base_and_reloads(tiny_base, tmp_path, monkeypatch):
    import tgr.model as model_module

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, device_map="cpu")
    load_base = model_module.load_base_model

    def no_reload(*args, **kwargs):
        raise AssertionError("the base was loaded again")

    monkeypatch.setattr(model_module, "load_base_model", no_reload)
    model = TGRLlamaModel.from_base(base, temperature_heads=4, attention_backend="torch")
    assert model.base_llama_model is base and model.hf_base_model is base
    assert all(not p.requires_grad for p in base.parameters())
    assert model.device == base.lm_head.weight.device
    config = model.config
    assert (config.base_model_name_or_path, config.load_in_4bit, config.compute_dtype) == (tiny_base, False, "float32")
    assert config.hidden_size == 64 and config.temperature_heads == 4
    with pytest.raises(TypeError, match="causal LM"):
        TGRLlamaModel.from_base(torch.nn.Linear(2, 2))

    train_a_step(model)
    ids, mask = batch(model)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path / "saved")
    # The saved folder on the same loaded base, still without a reload ...
    again = TGRLlamaModel.from_pretrained(tmp_path / "saved", base=base).eval()
    assert again.base_llama_model is base and torch.equal(logits(again, ids, mask), before)
    # ... and by the name the config recorded.
    monkeypatch.setattr(model_module, "load_base_model", load_base)
    by_name = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(logits(by_name, ids, mask), before)


# ----------------------------------------------------------------------------------------------
# The saved folder
# ----------------------------------------------------------------------------------------------


def test_saved_folder_holds_config_head_and_model_card(tiny_base, tmp_path):
    model = make_model(tiny_base, load_in_4bit=False)
    path = model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "tgr" and config["architectures"] == ["TGRLlamaModel"]
    assert config["base_model_name_or_path"] == tiny_base
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and tiny_base in card
    # A card of the user's own is kept; tgr's own is refreshed.
    (tmp_path / "saved" / "README.md").write_text("my notes\n")
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text() == "my notes\n"
    # Trainer's call: a given state dict, and nothing written by a process that is not the main one.
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(TypeError, match="unexpected argument"):
        model.save_pretrained(tmp_path / "saved", shard_everything=True)


def test_hub_errors_are_one_line(tiny_base):
    with pytest.raises(CheckpointError) as err:
        TGRLlamaModel.from_pretrained("someone/no-such-tgr-model")
    assert "\n" not in str(err.value) and "someone/no-such-tgr-model" in str(err.value)
    model = make_model(tiny_base, load_in_4bit=False)
    with pytest.raises(CheckpointError) as err:  # README: a hub that cannot be reached is a CheckpointError
        model.push_to_hub("someone/tgr-test")
    assert "\n" not in str(err.value) and "someone/tgr-test" in str(err.value)


def test_push_to_hub_uploads_the_saved_files_and_a_failure_is_one_checkpoint_error(tiny_base, monkeypatch):
    """With huggingface_hub's calls mocked: what is uploaded is what save_pretrained writes, with the
    commit arguments; a network failure at either call is a one-line CheckpointError (it was an
    OSError), and keyword arguments push_to_hub does not use are refused, not swallowed."""
    import huggingface_hub

    model = make_model(tiny_base, load_in_4bit=False)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private))
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), kwargs["commit_message"],
                          kwargs["commit_description"]))
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert model.push_to_hub("me/tgr", token="tok", private=True, commit_description="why",
                             max_shard_size="5GB") == "commit-url"
    assert calls == [("init", "tok"), ("create", "me/tgr", True),
                     ("upload", "me/tgr", ["README.md", "config.json", "model.safetensors"], "Upload TGR model", "why")]
    with pytest.raises(TypeError, match="unexpected argument.*use_temp_dir"):
        model.push_to_hub("me/tgr", use_temp_dir=True)
    # save_pretrained(push_to_hub=True) passes transformers' hub arguments on (create_pr was refused).
    calls.clear()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(os.path.join(folder, "tgr-run"), push_to_hub=True, create_pr=True,
                              commit_description="d")
    assert calls[1] == ("create", "tgr-run", None) and calls[2][-1] == "d"

    for failing in ("create_repo", "upload_folder"):
        def fail(*args, **kwargs):
            raise ConnectionError("Max retries exceeded with url: /api/repos/create\n(Caused by NameResolutionError)")

        monkeypatch.setattr(FakeApi, failing, fail)
        with pytest.raises(CheckpointError) as err:
            model.push_to_hub("me/tgr")
        assert "\n" not in str(err.value) and "me/tgr" in str(err.value) and "Max retries" in str(err.value)


def _damage(file, how):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("loader", ["TGRLlamaModel", "AutoModelForCausalLM"])
def test_damaged_saved_model_is_one_line_naming_the_file(tiny_base, tmp_path, loader, name, how):
    make_model(tiny_base, load_in_4bit=False).save_pretrained(tmp_path / "saved")
    file = tmp_path / "saved" / name
    _damage(file, how)
    load = TGRLlamaModel.from_pretrained if loader == "TGRLlamaModel" else AutoModelForCausalLM.from_pretrained
    if loader == "AutoModelForCausalLM" and name == "config.json":
        # AutoConfig parses config.json before it can know the model is TGR's: the error is
        # transformers' own, one line that names the file.
        expected = OSError
    else:
        expected = CheckpointError
    with pytest.raises(expected) as err:
        load(tmp_path / "saved")
    message = str(err.value)
    assert "\n" not in message.strip() and str(file) in message, message


def test_missing_folder_or_weights_is_a_checkpoint_error(tiny_base, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TGRLlamaModel.from_pretrained(tmp_path / "nowhere")
    make_model(tiny_base, load_in_4bit=False).save_pretrained(tmp_path / "saved")
    os.remove(tmp_path / "saved" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        TGRLlamaModel.from_pretrained(tmp_path / "saved")


def test_generate_honours_max_length_and_refuses_what_it_does_not_do(tiny_base):
    model = make_model(tiny_base, load_in_4bit=False, gsoT_enabled=False).eval()
    ids, mask = batch(model)
    out = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_length=ids.shape[1] + 2),
                         eos_token_id=[])
    assert out.shape[1] == ids.shape[1] + 2  # as HF: max_length counts the prompt
    both = GenerationConfig(max_length=ids.shape[1] + 2, max_new_tokens=4)
    out = model.generate(ids, attention_mask=mask, generation_config=both, eos_token_id=[])
    assert out.shape[1] == ids.shape[1] + 4  # max_new_tokens wins
    for field, value in (("num_beams", 4), ("repetition_penalty", 50.0), ("no_repeat_ngram_size", 1),
                         ("top_h", 0.5), ("stop_strings", ["."]), ("max_time", 1.0), ("dola_layers", "high")):
        with pytest.raises(ValueError, match=re.escape(f"generate does not implement {field}={value!r}")):
            model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**{field: value}))


def test_modes_a_model_comes_in(tiny_base, tmp_path):
    """A new model is in one mode throughout (train, as an nn.Module), base and head alike; a
    loaded one is in eval mode, as transformers' from_pretrained gives it."""
    model = make_model(tiny_base, load_in_4bit=False, tgr_mode="both", tgr_layers=[0])
    assert all(m.training for m in model.modules())
    model.save_pretrained(tmp_path)
    for loaded in (TGRLlamaModel.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert not any(m.training for m in loaded.modules())


def test_dtype_follows_a_cast(tiny_base):
    model = make_model(tiny_base, load_in_4bit=False)
    assert model.dtype == torch.float32
    assert model.half().dtype == torch.float16


def test_a_config_built_with_dtype_loads_the_base_in_it(tiny_base):
    config = TGRConfig(base_model_name_or_path=tiny_base, temperature_heads=4, load_in_4bit=False,
                       attention_backend="torch", dtype=torch.bfloat16)
    model = TGRLlamaModel(config)
    assert model.dtype == torch.bfloat16 and model.config.compute_dtype == "bfloat16"


def test_generation_config_return_dict_in_generate_is_honoured(tiny_base):
    model = make_model(tiny_base, load_in_4bit=False, gsoT_enabled=False).eval()
    ids, mask = batch(model)
    out = model.generate(ids, attention_mask=mask, eos_token_id=[],
                         generation_config=GenerationConfig(max_new_tokens=2, return_dict_in_generate=True,
                                                            output_scores=True))
    assert out.sequences.shape[1] == ids.shape[1] + 2 and len(out.scores) == 2
    plain = model.generate(ids, attention_mask=mask, eos_token_id=[], output_scores=False,
                           generation_config=GenerationConfig(max_new_tokens=2, return_dict_in_generate=True))
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences)  # the argument wins


@pytest.mark.parametrize("field", ["remove_invalid_values", "output_attentions", "output_hidden_states"])
def test_generation_config_fields_it_cannot_honour_are_refused(tiny_base, field):
    model = make_model(tiny_base, load_in_4bit=False, gsoT_enabled=False).eval()
    ids, mask = batch(model)
    with pytest.raises(ValueError, match=re.escape(f"generate does not implement {field}=True")):
        model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**{field: True}))


def test_generation_config_max_length_the_prompt_fills_is_an_error(tiny_base):
    """As HF: a max_length the prompt already fills is an error, not a silently empty generation."""
    model = make_model(tiny_base, load_in_4bit=False, gsoT_enabled=False).eval()
    ids, mask = batch(model)
    for max_length in (ids.shape[1], ids.shape[1] - 3):
        with pytest.raises(ValueError, match="max_length"):
            model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_length=max_length))


def test_a_new_saved_folder_has_the_mode_os_makedirs_gives(tiny_base, tmp_path):
    """The folder is written as a temporary one and renamed into place; mkdtemp makes it 0700, so a
    saved model was unreadable to anyone else on a shared machine (os.makedirs gives 0777 less the umask)."""
    model = make_model(tiny_base, load_in_4bit=False)
    previous = os.umask(0o022)
    try:
        path = model.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o755
