"""What a new user meets first: a fast --help, early argument checks, clean output."""

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from thinking_pixel import _arguments, cli

REPO = Path(__file__).resolve().parents[1]


def test_the_parser_imports_no_heavy_module():
    # --help, argument errors and a bad sample --output run only this much: its imports decide how long they take
    code = ("import sys; from thinking_pixel import cli\n"
            "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['analyze', '--help'],\n"
            "             ['train', '--max-steps', 'x'], ['sample', '--checkpoint', 'c', '--sampler', 'euler']):\n"
            "    try: cli.build_parser().parse_args(argv)\n"
            "    except SystemExit: pass\n"
            "assert cli.main(['sample', '--checkpoint', 'c', '--output', '/no-such-dir/grid.png']) == 1\n"
            # a missing checkpoint or dataset is reported before the imports
            "for argv in (['sample', '--checkpoint', '/no/run'], ['evaluate', '--checkpoint', '/no/run'],\n"
            "             ['analyze', '--checkpoint', '/no/run', '--output-dir', 'a'], ['train', '--dataset', 'folder',\n"
            "             '--data-dir', '/no/data'], ['train', '--dataset', 'latents'], ['train', '--finetune-from',\n"
            "             '/no/run'], ['sample', '--checkpoint', '.', '--prompts-file', '/no/prompts.txt']):\n"
            "    assert cli.main(argv) == 1, argv\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'numpy', 'tp_kernels', 'thinking_pixel.evaluate')\n"
            "               if m in sys.modules)\n"
            "import os; print('HEAVY', heavy, os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=env)
    # and the OpenMP wait policy is set before torch would read it
    assert "HEAVY [] PASSIVE" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]


def test_name_constants_match_the_registries():
    from thinking_pixel.datasets import DATASETS
    from thinking_pixel.diffusion import SAMPLERS

    assert sorted(_arguments.DATASET_NAMES) == sorted(DATASETS)
    assert tuple(_arguments.SAMPLER_NAMES) == tuple(SAMPLERS)
    roots = {name: inspect.signature(cls).parameters.get("root") for name, cls in DATASETS.items()}
    without_default = [name for name, root in roots.items() if root is not None and root.default is root.empty]
    assert sorted(_arguments.DATA_DIR_REQUIRED) == sorted(without_default)


def test_the_old_steps_option_points_to_recursion_steps(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--steps", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--steps was renamed --recursion-steps" in err and "--max-steps" in err


@pytest.mark.parametrize("output, message", [
    ("{tmp}/missing/grid.png", "directory '{tmp}/missing' does not exist"),
    ("{tmp}/file.txt/grid.png", "'{tmp}/file.txt' is a file, not a directory"),
    ("{tmp}/grid.gif", "unknown image extension '.gif'"),
    ("{tmp}/grid", "unknown image extension '(none)'"),
    ("{tmp}", "unknown image extension"),
])
def test_sample_output_is_checked_before_any_work(tmp_path, capsys, output, message):
    (tmp_path / "file.txt").write_text("")
    # the checkpoint does not exist either: the output is reported first, before anything is loaded
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "nope"), "--output", output.format(tmp=tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinking-pixel: error: --output") and message.format(tmp=tmp_path) in err
    assert "\n" not in err and not (tmp_path / "missing").exists()


def test_fashion_mnist_not_found_names_data_dir(tmp_path):
    from thinking_pixel.datasets import make_dataset

    with pytest.raises(FileNotFoundError, match="--data-dir"):
        make_dataset("fashion_mnist", root=tmp_path)


def test_fid_weights_conversion_is_quiet():
    from thinking_pixel.metrics import fid

    try:
        path = fid.torchscript_inception_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = fid.convert_torchscript_inception(path)
    assert all(torch.is_tensor(v) for v in weights.values())


def test_benchmarks_time_the_installed_extension_when_the_checkout_has_none(tmp_path):
    import shutil

    def package(root, built):  # a stand-in tp_kernels: the choice looks only at the package directory
        (root / "tp_kernels").mkdir(parents=True)
        (root / "tp_kernels" / "__init__.py").write_text("")
        if built:
            (root / "tp_kernels" / "_cpu_kernels.so").write_bytes(b"")
        return root

    checkout = package(tmp_path / "checkout", built=False)
    shutil.copytree(REPO / "benchmarks", checkout / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    site = package(tmp_path / "site", built=True)

    def imported():
        code = ("import importlib.util, sys, benchmarks\n"
                "module = sys.modules.get('tp_kernels')\n"
                "print('FROM', module.__file__ if module else importlib.util.find_spec('tp_kernels').origin)")
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{checkout}:{site}"}
        result = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                                timeout=120)
        return result.stdout + result.stderr

    assert f"FROM {site}" in imported()  # the unbuilt checkout is passed over for the installed copy
    (checkout / "tp_kernels" / "_cpu_kernels.so").write_bytes(b"")
    assert f"FROM {checkout}" in imported()  # a development build is timed as it is


def test_samplers_build_without_warnings():
    from thinking_pixel.diffusion import SAMPLERS, GaussianDiffusion, make_scheduler

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in SAMPLERS:
            make_scheduler(name, GaussianDiffusion(), 10)


@pytest.mark.parametrize("argv, usage", [
    (["train", "--max-step", "10"], "usage: thinking-pixel train"),  # a prefix of --max-steps
    (["sample", "--checkpoint", "c", "--num-step", "2"], "usage: thinking-pixel sample"),
    (["evaluate", "--checkpoint", "c", "--metrics", "fid"], "usage: thinking-pixel evaluate"),
])
def test_flag_prefixes_and_typos_are_errors_with_the_commands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(usage) and f"unrecognized arguments: {argv[-2]}" in err


def test_an_empty_prompt_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sample", "--checkpoint", "c", "--prompt", "a red circle", "--prompt", " "])
    assert exc.value.code == 2 and "argument --prompt: expected a caption" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["sample", "--checkpoint", "{tmp}/run"], "--checkpoint '{tmp}/run' not found"),
    (["analyze", "--checkpoint", "{tmp}", "--checkpoint", "{tmp}/b", "--output-dir", "{tmp}/a"],
     "--checkpoint '{tmp}/b' not found"),
    (["train", "--output-dir", "{tmp}/out", "--dataset", "folder", "--data-dir", "{tmp}/data"],
     "--data-dir '{tmp}/data' not found"),
    (["train", "--output-dir", "{tmp}/out", "--dataset", "captions"], "--dataset captions needs --data-dir (where its files are)"),
    (["train", "--output-dir", "{tmp}/out", "--pipeline", "{tmp}/sd3"], "--pipeline '{tmp}/sd3' not found"),
])
def test_missing_inputs_are_one_line_errors_naming_the_argument(tmp_path, capsys, argv, message):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"thinking-pixel: error: {message.format(tmp=tmp_path)}"
    assert not (tmp_path / "out").exists()  # no output dir made for a run that cannot start


def test_train_help_lists_every_preset_and_groups_options_by_config_section(capsys):
    from thinking_pixel._presets import DIT_CONFIGS, SD3_CONFIGS
    from thinking_pixel.train_config import _RECURSION_OPTIONS, _SECTIONS

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap anywhere
    assert all(name in text for name in [*DIT_CONFIGS, *SD3_CONFIGS]) and "SD3-T/4" in text
    groups = {g.title: {a.dest for a in g._group_actions} for g in cli.build_parser().commands["train"]._action_groups}
    for title, section in _SECTIONS.items():
        assert groups[title] <= {f.name for f in dataclasses.fields(section)}, title
    assert groups["recursion"] - {"steps"} == {"recursion", *_RECURSION_OPTIONS}  # --steps: the renamed option
    assert groups["text-to-image"] == {"pipeline", "peft_lora", "init", "recipe"}


def test_openmp_threads_wait_passively_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli._openmp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli._openmp_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_sample_writes_under_the_run_by_default_and_says_where(tmp_path, capsys):
    from thinking_pixel._run_dir import default_samples_path

    run = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "flat_train_config" / "dit_run", run)
    step = run / "checkpoints" / "step_0000002"
    assert default_samples_path(run) == default_samples_path(step) == default_samples_path(step / "ema") == \
        run / "samples" / "step_0000002.png"
    assert default_samples_path(step / "ema").parent.parent == run and default_samples_path(tmp_path) == \
        tmp_path / "samples.png"  # a model directory outside a run
    argv = ["sample", "--checkpoint", str(run), "--num-steps", "2", "--per-class", "1", "--classes", "0",
            "--threads", "1"]
    assert cli.main(argv) == 0
    assert (run / "samples" / "step_0000002.png").is_file()
    assert f"wrote {run / 'samples' / 'step_0000002.png'}" in capsys.readouterr().out


def test_a_slowdown_on_several_threads_is_pointed_out_once():
    from thinking_pixel._train_log import SlowdownHint

    said = []
    hint = SlowdownHint(2, said.append, window=4)
    for rate in [9.0] * 10 + [2.5] * 10:
        hint.add(rate)
    assert len(said) == 1 and "from 9.0 to 2.5 it/s on 2 threads" in said[0] and "--threads 1" in said[0]
    steady, single = SlowdownHint(2, said.append, window=4), SlowdownHint(1, said.append, window=4)
    for rate in [9.0, 8.0, 7.0, 9.5] * 5 + [3.5] * 4:  # within a factor of 3 of the best
        steady.add(rate)
    for rate in [9.0] * 10 + [1.0] * 10:  # one thread: nothing to suggest
        single.add(rate)
    assert len(said) == 1
