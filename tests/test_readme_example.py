"""README's Python examples run as written and do what their comments say; every one of them is run here."""

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = ("## 1. The ops", "## 2. The recursion on a diffusers transformer")  # headings of the tested examples


def example(heading):
    """The first ```python block after ``heading`` in README.md."""
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_python_block_is_a_tested_example():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert sorted(blocks) == sorted(example(heading) for heading in EXAMPLES)


def test_the_diffusers_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    code = example(EXAMPLES[1])
    assert len(code.strip().splitlines()) <= 14
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    stored = load_file(tmp_path / "sd3_recursion" / "recursion.safetensors")
    assert set(stored) == {n for n, p in namespace["model"].named_parameters() if p.requires_grad}
    assert any(v.abs().max() > 0 for k, v in stored.items() if k.endswith("lora_b"))  # the step trained the experts


def test_the_ops_example_reaches_the_router():
    code = example(EXAMPLES[0])
    assert "grads reach lora_b and the router" in code
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["lora_b"].grad.abs().sum() > 0
    router = namespace["router"]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0  # exactly 0 with lora_b at zero
