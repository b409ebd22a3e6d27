"""Command line: argument mapping onto TrainConfig, one-line errors, train -> sample round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from thinking_pixel import cli
from thinking_pixel.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "8", "--patch-size", "2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
        "--rank", "4", "--batch-size", "4", "--no-progress", "--no-sample-grid", "--threads", "1"]


def train_config(argv):
    args = cli.build_parser().parse_args(["train", *argv])
    return TrainConfig.from_flat(**{k: v for k, v in vars(args).items() if k != "command"})


def test_train_without_arguments_uses_the_defaults():
    assert train_config([]) == TrainConfig()


def test_train_options_map_onto_the_config():
    cfg = train_config(["--max-steps", "7", "--output-dir", "x", "--dataset", "digits", "--recursion-steps", "3",
                        "--experts", "5", "--rank", "8", "--recursion-layers", "1,3", "--bf16", "--compile",
                        "--lr", "3e-4", "--seed", "2", "--finetune-from", "ckpt", "--no-freeze-base"])
    assert (cfg.optimisation.max_steps, cfg.run.output_dir, cfg.data.dataset, cfg.recursion.steps,
            cfg.recursion.experts, cfg.recursion.rank) == (7, "x", "digits", 3, 5, 8)
    assert cfg.recursion.layers == (1, 3) and cfg.optimisation.bf16 and cfg.run.compile
    assert cfg.optimisation.lr == 3e-4 and cfg.run.seed == 2
    assert cfg.model.finetune_from == "ckpt" and not cfg.model.freeze_base and cfg.text_to_image is None
    assert train_config(["--no-recursion"]).recursion is None
    assert train_config(["--gate-inputs", "tokens,timestep"]).recursion.gate_inputs == ("tokens", "timestep")


@pytest.mark.parametrize("argv", [
    ["train", "--max-steps", "abc"],
    ["train", "--max-steps", "0"],
    ["train", "--dataset", "imagenet"],
    ["train", "--recursion-layers", "a,b"],
    ["sample"],  # --checkpoint is required
    ["sample", "--checkpoint", "x", "--sampler", "euler"],
    ["frobnicate"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinking-pixel: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_train_then_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--output-dir", str(out), "--max-steps", "2", *TINY]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    grid = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(out), "--output", str(grid), "--num-steps", "2", "--per-class", "1",
            "--classes", "0,1", "--sampler", "dpm", "--seed", "3", "--threads", "1"]
    assert cli.main(argv) == 0 and grid.is_file()
    # A setting that changes the computation cannot be resumed on the same output dir.
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(out), "--max-steps", "3", "--lr", "0.5", *TINY]) == 1
    assert "different settings" in _one_line_error(capsys)


def test_bad_gate_inputs_are_a_one_line_error(tmp_path, capsys):
    assert cli.main(["train", "--output-dir", str(tmp_path / "run"), "--gate-inputs", "tokens,text", *TINY]) == 1
    assert "gate_inputs" in _one_line_error(capsys)


def test_unreadable_checkpoints_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "not found" in _one_line_error(capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert cli.main(["sample", "--checkpoint", str(bad)]) == 1
    assert "not valid JSON" in _one_line_error(capsys)
    (bad / "config.json").write_text(json.dumps({"format": 1, "class": "DiT", "dit": {"depth": 2}}))
    assert cli.main(["sample", "--checkpoint", str(bad)]) == 1
    _one_line_error(capsys)
    assert cli.main(["train", "--output-dir", str(tmp_path / "ft"), "--finetune-from", str(bad), *TINY]) == 1
    _one_line_error(capsys)


def test_missing_plugin_command_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_plugin", lambda name: None)
    assert cli.main(["analyze", "--checkpoint", str(tmp_path), "--output-dir", "out"]) == 1
    err = capsys.readouterr().err.strip()
    assert "'analyze' command is not available" in err and "\n" not in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "thinking_pixel", "train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-steps" in result.stdout and "--no-recursion" in result.stdout
