"""README's "Recursion on your diffusers transformer" example runs as written."""

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading):
    """The first ```python block after ``heading`` in README.md."""
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_diffusers_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    code = example("## Recursion on your diffusers transformer")
    assert len(code.strip().splitlines()) <= 14
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    stored = load_file(tmp_path / "sd3_recursion" / "recursion.safetensors")
    assert set(stored) == {n for n, p in namespace["model"].named_parameters() if p.requires_grad}
    assert any(v.abs().max() > 0 for k, v in stored.items() if k.endswith("lora_b"))  # the step trained the experts
