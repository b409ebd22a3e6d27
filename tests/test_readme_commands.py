"""README.md's commands: every thinking-pixel command line parses, the command-line section's commands run as
written and write where the README says, the install and test commands are the ones .ci/run runs, and every
repository path the README names exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from thinking_pixel import cli

from subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def bash_blocks(text):
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def section(heading):
    """README's text from ``heading`` to the next heading of the same level."""
    start = README.index(heading)
    level = heading.split(" ")[0]
    end = README.find(f"\n{level} ", start + len(heading))
    return README[start:] if end < 0 else README[start:end]


def thinking_pixel_commands(text):
    """The argv of every ``thinking-pixel`` command in ``text``'s bash blocks."""
    commands = []
    for line in "".join(bash_blocks(text)).replace("\\\n", " ").splitlines():
        words = shlex.split(line.replace("$(which thinking-pixel)", "thinking-pixel"), comments=True)
        while "thinking-pixel" in words:
            words = words[words.index("thinking-pixel") + 1:]
            argv = words[:words.index("&&")] if "&&" in words else words
            if "..." not in argv:
                commands.append(argv)
    return commands


def test_every_readme_command_line_parses():
    commands = thinking_pixel_commands(README)
    assert {argv[0] for argv in commands} >= {"train", "sample", "evaluate", "analyze"}, commands
    for argv in commands:
        cli.build_parser().parse_args(argv)  # exits (a test failure) on an unknown or abbreviated option


@pytest.mark.slow
def test_the_command_line_section_runs_as_written(tmp_path):
    commands = thinking_pixel_commands(section("## 3. The command line"))
    assert [argv[0] for argv in commands] == ["train", "train", "train", "sample", "evaluate", "analyze"]
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "thinking_pixel", *argv], cwd=tmp_path, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"thinking-pixel {shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    # where the README says the outputs go
    for run in ("runs/quick", "runs/dit", "runs/tp"):
        assert (tmp_path / run / "metrics.jsonl").is_file()
        assert any((tmp_path / run / "checkpoints").iterdir())
        assert not (tmp_path / run / "samples.png").exists()  # --no-sample-grid
    assert (tmp_path / "grid.png").is_file()
    assert (tmp_path / "acc.json").is_file() and (tmp_path / "acc_samples").is_dir()
    assert (tmp_path / "analysis" / "routing_stats.json").is_file()


def test_install_and_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install = bash_blocks(section("## Install"))
    assert install[0].splitlines() == ["pip install torch==2.14.1 torchvision==0.29.1", "pip install ."]
    assert all(line in ci for line in install[0].splitlines())
    assert install[1].strip() == 'pip install ".[test]" && pytest tests'
    assert 'pip install ".[test]"' in ci and "run_pytest pytest tests" in ci


def test_every_repository_path_the_readme_names_exists():
    tops = "tp_kernels|thinking_pixel|csrc|benchmarks|experiments|tests|\\.ci"
    paths = {m.rstrip(".") for m in re.findall(rf"(?<![\w./-])((?:{tops})/[\w./-]*)", README)}
    paths |= set(re.findall(r"\]\(([\w./-]+\.md)\)", README))
    assert len(paths) >= 10, paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing
