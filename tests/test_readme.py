"""The README's Python examples run as written, scaled to this machine: the hub model becomes a
tiny Llama written here, "cuda" the CPU, H = 4096 a small width. Every replacement must find its
text, so an example that changes shape fails here instead of going stale."""
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tgr import build_tiny_llama  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def example_with(fragment: str) -> str:
    found = [code for code in python_examples() if fragment in code]
    assert len(found) == 1, f"README: expected one Python example containing {fragment!r}, found {len(found)}"
    return found[0]


def scaled(code: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("readme-llama"), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def test_the_readme_has_the_examples_this_file_runs():
    assert len(python_examples()) == 4


def test_apply_tgr_example(tiny_llama):
    code = scaled(example_with("tgr.apply_tgr("), ('"meta-llama/Llama-3.2-1B"', repr(tiny_llama)),
                  ("max_new_tokens=32", "max_new_tokens=3"))
    input_ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    scope = {"input_ids": input_ids, "attention_mask": attention_mask}
    exec(compile(code, "README.md (apply_tgr)", "exec"), scope)
    model = scope["model"]
    assert scope["out"].logits.shape == (2, 7, model.config.vocab_size)
    assert scope["ids"].shape[0] == 2 and 7 < scope["ids"].shape[1] <= 10
    assert model.config._attn_implementation != "tgr"  # remove_tgr restored the original attention


def test_kernels_example():
    code = scaled(example_with("temperature_projection("), ('device="cuda"', 'device="cpu"'),
                  ("4096", "64"))
    scope: dict = {}
    exec(compile(code, "README.md (kernels)", "exec"), scope)
    assert scope["t"].shape == (2, 128, 4) and scope["t"].dtype == torch.float32
    assert ((scope["t"] >= 0.01) & (scope["t"] <= 0.99)).all()
    assert scope["y"].shape == scope["x"].shape and torch.isfinite(scope["y"].float()).all()


def test_value_checks_example():
    import tgr_kernels

    before = tgr_kernels.set_value_checks("auto")
    try:
        code = scaled(example_with("set_value_checks("), ("...", "assert tgr_kernels.get_value_checks() == 'off'"))
        exec(compile(code, "README.md (value checks)", "exec"), {})
        assert tgr_kernels.get_value_checks() == "sync"
    finally:
        tgr_kernels.set_value_checks(before)


def test_linear_cross_entropy_example():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 32, generator=g, requires_grad=True)
    lm_head = torch.nn.Linear(32, 50, bias=False)
    input_ids = torch.randint(0, 50, (2, 9), generator=g)
    labels = input_ids.masked_fill(torch.rand(2, 9, generator=g) < 0.2, -100)
    scope = {"hidden": hidden, "lm_head": lm_head, "labels": labels, "input_ids": input_ids}
    exec(compile(example_with("linear_cross_entropy("), "README.md (linear cross-entropy)", "exec"), scope)
    logits = lm_head(hidden[:, :-1]).double()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(scope["loss"].double(), expected, rtol=1e-5, atol=1e-5)
    assert scope["loss"].dtype == torch.float32 and scope["loss"].dim() == 0
    expected_logp = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(scope["logp"].double(), expected_logp, rtol=1e-5, atol=1e-5)
