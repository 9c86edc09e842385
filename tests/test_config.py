"""TGRConfig: the seed's defaults, JSON round trips, and clear errors for bad values; a
PretrainedConfig registered with AutoConfig; old tgr_config.json folders; damaged files."""
import json
import math

import pytest
import torch
from transformers import AutoConfig, PretrainedConfig

from tgr import ConfigError, TGRConfig
from tgr.config import CONFIG_NAME, LEGACY_CONFIG_NAME, CheckpointError


def test_seed_defaults_and_new_fields():
    c = TGRConfig()
    assert c.base_model_name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (c.temperature_heads, c.initial_temperature, c.temperature_regularization_weight) == (8, 0.5, 0.01)
    assert (c.temperature_clamp_min, c.temperature_clamp_max) == (0.01, 0.99)
    assert c.gsoT_enabled is True and c.temperature_conf_threshold == 0.4
    assert c.causal is True and c.attention_backend == "auto" and c.num_tgr_heads == 1
    assert c.load_in_4bit is True and c.compute_dtype == "auto" and c.lora_r == 0


def test_seed_style_construction():
    # The seed's demo config, and its Llama size fields.
    c = TGRConfig(base_model_name_or_path="meta-llama/Llama-2-7b-hf", temperature_heads=4, gsoT_enabled=True,
                  temperature_conf_threshold=0.4, hidden_size=4096, num_hidden_layers=32,
                  intermediate_size=11008, num_attention_heads=32, max_position_embeddings=2048)
    assert c.temperature_heads == 4 and c.hidden_size == 4096


def test_json_round_trip(tmp_path):
    c = TGRConfig(base_model_name_or_path=str(tmp_path / "base"), temperature_heads=3, causal=False,
                  attention_backend="reference", num_tgr_heads=2, load_in_4bit=False, compute_dtype="bfloat16",
                  lora_r=4, lora_target_modules=["q_proj", "k_proj"], hidden_size=64, device="cpu")
    d = c.to_dict()
    assert d["model_type"] == "tgr" and "tgr_version" in d
    json.dumps(d)  # JSON-ready
    assert TGRConfig.from_dict(d) == c
    assert TGRConfig.from_json_string(c.to_json_string()) == c
    path = c.save_pretrained(tmp_path / "saved")
    assert path.endswith(CONFIG_NAME)
    assert TGRConfig.from_pretrained(tmp_path / "saved") == c
    assert TGRConfig.from_pretrained(path) == c
    assert TGRConfig.from_pretrained(tmp_path / "saved", attention_backend="torch").attention_backend == "torch"
    assert c.copy(temperature_heads=5).temperature_heads == 5 and c.temperature_heads == 3


@pytest.mark.parametrize("field, value, words", [
    ("temperature_heads", 0, "temperature_heads"),
    ("temperature_heads", 2.5, "temperature_heads"),
    ("temperature_heads", True, "temperature_heads"),
    ("temperature_clamp_min", -0.1, "temperature_clamp_min"),
    ("temperature_clamp_max", 1.5, "temperature_clamp_max"),
    ("initial_temperature", math.nan, "initial_temperature"),
    ("temperature_conf_threshold", "0.4", "temperature_conf_threshold"),
    ("temperature_regularization_weight", -1.0, "temperature_regularization_weight"),
    ("temperature_regularization_weight", math.inf, "temperature_regularization_weight"),
    ("gsoT_enabled", "yes", "gsoT_enabled"),
    ("causal", 1, "causal"),
    ("load_in_4bit", None, "load_in_4bit"),
    ("attention_backend", "cuda", "attention_backend"),
    ("num_tgr_heads", 0, "num_tgr_heads"),
    ("compute_dtype", "fp8", "compute_dtype"),
    ("device", "gpu0", "device"),
    ("base_model_name_or_path", "", "base_model_name_or_path"),
    ("hidden_size", -64, "hidden_size"),
    ("lora_r", -1, "lora_r"),
    ("lora_alpha", 0, "lora_alpha"),
    ("lora_dropout", 1.0, "lora_dropout"),
    ("lora_target_modules", [], "lora_target_modules"),
])
def test_bad_values_name_the_field(field, value, words):
    with pytest.raises((ValueError, TypeError), match=words):
        TGRConfig(**{field: value})


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="temperature_clamp_min <= temperature_clamp_max"):
        TGRConfig(temperature_clamp_min=0.8, temperature_clamp_max=0.2)
    with pytest.raises(ConfigError, match="num_tgr_heads=5 must divide hidden_size=64"):
        TGRConfig(hidden_size=64, num_tgr_heads=5)
    assert issubclass(ConfigError, ValueError)  # callers that catch ValueError still do


def test_mutation_is_validated_on_use():
    c = TGRConfig()
    c.attention_backend = "fast"
    with pytest.raises(ValueError, match="attention_backend"):
        c.to_json_string()


def test_unknown_and_malformed_input(tmp_path):
    d = TGRConfig().to_dict()
    d["temperature_head"] = 4  # typo
    with pytest.raises(ValueError, match="unknown TGRConfig field.*temperature_head"):
        TGRConfig.from_dict(d)
    with pytest.raises(TypeError):
        TGRConfig(temprature_heads=4)
    with pytest.raises(ValueError, match="not valid JSON"):
        TGRConfig.from_json_string("{not json")
    with pytest.raises(TypeError, match="needs a dict"):
        TGRConfig.from_dict([1, 2])
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        TGRConfig.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        TGRConfig.from_pretrained(tmp_path / "no" / "such" / "folder")
    # What a seed-era (PretrainedConfig) dump adds is tolerated.
    seed_dump = {"model_type": "temperature_guided_llama", "transformers_version": "4.46.0",
                 "temperature_heads": 4}
    assert TGRConfig.from_dict(seed_dump).temperature_heads == 4


def test_a_pretrained_config_registered_with_autoconfig(tmp_path):
    c = TGRConfig(base_model_name_or_path="some/base", temperature_heads=3, lora_r=2, hidden_size=64)
    assert isinstance(c, PretrainedConfig) and TGRConfig.model_type == "tgr"
    path = c.save_pretrained(tmp_path)
    assert path.endswith("config.json") and CONFIG_NAME == "config.json"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "tgr" and saved["temperature_heads"] == 3 and "transformers_version" in saved
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is TGRConfig and loaded == c
    # Keyword arguments that name fields replace them, through AutoConfig too.
    assert AutoConfig.from_pretrained(tmp_path, attention_backend="torch").attention_backend == "torch"
    assert json.loads(c.to_json_string())["lora_r"] == 2  # PretrainedConfig's serialization
    # An attribute set at run time (Trainer sets use_cache) is not saved, so the folder still loads.
    c.use_cache = False
    c.save_pretrained(tmp_path)
    assert "use_cache" not in json.loads((tmp_path / "config.json").read_text())
    assert TGRConfig.from_pretrained(tmp_path) == c


def test_a_folder_with_the_old_tgr_config_json_still_loads(tmp_path):
    old = {"model_type": "tgr", "tgr_version": "0.1.0", "base_model_name_or_path": "some/base",
           "temperature_heads": 5, "causal": False, "lora_target_modules": ["q_proj"], "device": None}
    (tmp_path / LEGACY_CONFIG_NAME).write_text(json.dumps(old, indent=2))
    c = TGRConfig.from_pretrained(tmp_path, attention_backend="torch")
    assert (c.temperature_heads, c.causal, c.attention_backend) == (5, False, "torch")
    # Beside a config.json (a folder saved again), config.json is the one read.
    TGRConfig(base_model_name_or_path="some/base", temperature_heads=2).save_pretrained(tmp_path)
    assert TGRConfig.from_pretrained(tmp_path).temperature_heads == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "a list", "unknown field"])
def test_a_damaged_config_is_one_line_naming_the_file(tmp_path, damage):
    TGRConfig(base_model_name_or_path="some/base").save_pretrained(tmp_path)
    file = tmp_path / "config.json"
    text = file.read_bytes()
    file.write_bytes({"truncated": text[: len(text) // 2], "garbage": bytes(range(256)) * 4, "empty": b"",
                      "a list": b"[1, 2]", "unknown field": text.replace(b'"causal"', b'"casual"')}[damage])
    with pytest.raises(CheckpointError) as err:
        TGRConfig.from_pretrained(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(file) in message and "damaged" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("given", ["bfloat16", torch.bfloat16])
@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_the_inherited_dtype_argument_sets_the_base_compute_dtype(keyword, given):
    # Every PretrainedConfig takes dtype=; a TGR model's only dtype choice is its base's.
    c = TGRConfig(**{keyword: given})
    assert c.compute_dtype == "bfloat16" and c.dtype is None
    assert TGRConfig.from_dict(c.to_dict()).compute_dtype == "bfloat16"  # kept as compute_dtype
    saved = TGRConfig(compute_dtype="float32").to_dict()
    assert TGRConfig.from_dict(saved, **{keyword: given}).compute_dtype == "bfloat16"  # a load-time dtype wins
    assert TGRConfig.from_dict(saved, dtype="auto").compute_dtype == "float32"
    assert TGRConfig(dtype="auto").compute_dtype == "auto"
    assert TGRConfig(dtype="float16", compute_dtype="float16").compute_dtype == "float16"


def test_a_dtype_that_cannot_be_the_base_compute_dtype_is_an_error():
    with pytest.raises(ConfigError, match="dtype=torch.float64 must be one of"):
        TGRConfig(dtype=torch.float64)
    with pytest.raises(ConfigError, match="dtype='fp8' must be one of"):
        TGRConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="dtype='float16' and compute_dtype='bfloat16'"):
        TGRConfig(dtype="float16", compute_dtype="bfloat16")
