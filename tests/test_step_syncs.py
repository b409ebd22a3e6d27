"""No host syncs in the training step: metrics stay on the device and are read every log_every steps.

On CUDA, reading a tensor (``.item()``, ``.tolist()``, ``bool(t)``, ...) waits for the GPU. The test runs on CPU,
so it watches the calls themselves: every such call made directly by thinking_pixel code during training must
come from the metrics flush, the checkpoint, or the data sampler (which works on CPU index tensors).
"""

import json
import sys
from pathlib import Path

import torch

import thinking_pixel

from test_train import tiny
from thinking_pixel.train import train

PACKAGE = Path(thinking_pixel.__file__).resolve().parent  # the package under test (installed in CI)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
ALLOWED = {("_train_log.py", "flush"), ("train.py", "_save"), ("base.py", "__iter__")}


def test_the_step_reads_nothing_back_and_metrics_arrive_every_log_every_steps(tmp_path, monkeypatch):
    calls = []

    def watch(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if Path(caller.co_filename).resolve().is_relative_to(PACKAGE):
                calls.append((Path(caller.co_filename).name, caller.co_name, name))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    flushed_at = []
    for name in READS:
        watch(name)
    train(tiny(tmp_path, max_steps=8, log_every=4, checkpoint_every=100, checkpoint_minutes=0),
          on_step=lambda step, metrics: flushed_at.append(step))
    monkeypatch.undo()
    stray = sorted({c for c in calls if (c[0], c[1]) not in ALLOWED})
    assert not stray, f"host syncs in the training step: {stray}"
    assert any(c[:2] == ("_train_log.py", "flush") for c in calls)
    assert flushed_at == list(range(1, 9))  # every step still gets its line, written 4 at a time
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9)) and all(m["world_size"] == 1 for m in lines)
