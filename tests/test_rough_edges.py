"""What a new user meets first: a fast --help, early argument checks, a README example that is true, clean output."""

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
            "heavy = sorted(m for m in ('torch', 'diffusers', 'numpy', 'tp_kernels', 'thinking_pixel.evaluate')\n"
            "               if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]


def test_name_constants_match_the_registries():
    from thinking_pixel.data import DATASETS
    from thinking_pixel.diffusion import SAMPLERS

    assert sorted(_arguments.DATASET_NAMES) == sorted(DATASETS)
    assert tuple(_arguments.SAMPLER_NAMES) == tuple(SAMPLERS)


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
    from thinking_pixel.data import make_dataset

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
