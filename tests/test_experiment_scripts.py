"""experiments/t2i_geneval.py builds the commands it runs right: dry runs, every train command parsed by the CLI."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from thinking_pixel.cli import build_parser
from thinking_pixel.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "t2i_geneval.py"


def dry_run(tmp_path, *args, env=None):
    """The commands a dry run prints, each as its argument list after ``-m thinking_pixel``."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return [c[c.index("thinking_pixel") + 1:] for c in commands]


def parse_train(argv):
    args = vars(build_parser().parse_args(argv))
    assert args.pop("command") == "train"
    return TrainConfig.from_flat(**args), args


def test_recipe_scale_trains_both_stages_then_the_chosen_variants_from_the_second(tmp_path):
    out = tmp_path / "out"
    commands = dry_run(tmp_path, "--scale", "recipe", "--stages", "base,finetune",
                       "--variants", "tp_M2_T2_multi,lora_peft")
    first, second, *finetunes = commands
    assert first[first.index("--recipe") + 1] == "t2i-compositional"
    assert first[first.index("--output-dir") + 1] == str(out / "base_stage1")
    assert second[second.index("--recipe") + 1] == "t2i-compositional-cooldown"
    assert second[second.index("--finetune-from") + 1] == str(out / "base_stage1")
    assert second[second.index("--output-dir") + 1] == str(out / "base")
    names = [Path(c[c.index("--output-dir") + 1]).name for c in finetunes]
    assert names == [f"{v}_s{s}" for s in (0, 1, 2) for v in ("lora_peft", "tp_M2_T2_multi")]
    for c in finetunes:
        assert c[c.index("--finetune-from") + 1] == str(out / "base")
    for c in commands:
        parse_train(c)
    _, args = parse_train(finetunes[1])
    assert (args["experts"], args["recursion_steps"], args["recursion_layers"]) == (2, 2, (1, 2, 3))


def test_scratch_stage_trains_the_base_seeds_without_the_recursion(tmp_path):
    env = {**os.environ, "TP_SCRATCH_SEEDS": "0", "TP_SCRATCH_BASE_SEEDS": "1,2"}
    commands = dry_run(tmp_path, "--scale", "adaln", "--stages", "scratch", env=env)
    names = [Path(c[c.index("--output-dir") + 1]).name for c in commands]
    assert names == ["base_s1", "base_s2", "tp_M2_T2_multi_scratch_s0"]
    for c, seed in zip(commands, (1, 2, 0)):
        _, args = parse_train(c)
        assert args["seed"] == seed and args["max_steps"] == 16000 and args["recipe"] == "t2i-compositional"
    assert parse_train(commands[0])[0].recursion is None
    recursion = parse_train(commands[2])[0].recursion
    assert (recursion.experts, recursion.steps, recursion.layers) == (2, 2, (1, 2, 3))


def test_unknown_variant_is_refused_by_name(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--variants", "tp_M9"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--variants" in proc.stderr and "tp_M9" in proc.stderr and "tp_M2_T2_multi" in proc.stderr


@pytest.mark.parametrize("scale", ["small", "adaln", "recipe"])
def test_every_dry_run_command_parses(tmp_path, scale):
    for c in dry_run(tmp_path, "--scale", scale, "--stages", "base,finetune"):
        parse_train(c)
