"""Crash safety: kill -9 at several points then the same command, signals, time-interval checkpoints,
full / read-only disks, broken weights, file permissions."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from subprocess_env import subprocess_env
from test_train import losses, tiny
from thinking_pixel import ThinkingPixelDiT
from thinking_pixel.checkpoints import CheckpointError
from thinking_pixel.sample import sample_checkpoint
from thinking_pixel.train import train

DRIVER = Path(__file__).with_name("train_driver.py")
TINY = ["--image-size", "8", "--patch-size", "2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
        "--rank", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress",
        "--no-sample-grid", "--threads", "1"]


def test_kill_9_at_several_points_then_the_same_command_gives_the_same_losses(tmp_path):
    steps, every = 12, 3
    reference = tmp_path / "reference"
    train(tiny(tmp_path, "reference", max_steps=steps, checkpoint_every=every, lr=1e-3, warmup_steps=0))
    out = tmp_path / "crashed"
    command = ["train", "--output-dir", str(out), "--max-steps", str(steps), "--checkpoint-every", str(every), *TINY]
    env = subprocess_env()

    def run(*hooks):
        return subprocess.run([sys.executable, str(DRIVER), *hooks, "--", *command], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    # 1. killed with the first checkpoint's files written but not yet renamed into place
    result = run("--kill-at", "files:3")
    assert result.returncode == -signal.SIGKILL and "starting a new run of 12 steps" in result.stdout
    assert not (out / "latest").exists()
    # 2. killed with checkpoint 6 in place but `latest` not yet re-pointed from 3 (its temp file written)
    result = run("--kill-at", "latest:6")
    assert result.returncode == -signal.SIGKILL and "starting a new run" in result.stdout
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000003"
    # 3. killed from outside at a moment of its choosing, after step 7's metrics line
    process = subprocess.Popen([sys.executable, "-m", "thinking_pixel", *command], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 7:
            process.kill()
            break
        time.sleep(0.01)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert "resuming from step 3 of 12" in stdout
    # 4. the same command again: resumes from the last complete checkpoint and finishes
    result = run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from step 6 of 12" in result.stdout or "resuming from step 9 of 12" in result.stdout
    assert losses(out) == losses(reference)
    a = load_file(reference / "checkpoints" / "step_0000012" / "ema" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step_0000012" / "ema" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "temporaries left"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_stops_after_the_step(tmp_path, signum, capsys):
    def send_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signum)

    cfg = tiny(tmp_path, max_steps=50, checkpoint_every=100)
    before = signal.getsignal(signum)  # SIG_IGN for SIGINT when pytest runs as a background job
    result = train(cfg, on_step=send_at_2)
    name = signal.Signals(signum).name
    assert result.stopped_by == name and result.step == 3  # seen at the next step boundary
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_0000003"
    assert f"stopped by {name} at step 3 of 50" in capsys.readouterr().out
    assert signal.getsignal(signum) == before  # handlers restored
    train(tiny(tmp_path, max_steps=4, checkpoint_every=100))
    assert "resuming from step 3 of 4" in capsys.readouterr().out and len(losses(tmp_path / "run")) == 4


def test_short_runs_checkpoint_on_a_time_interval(tmp_path):
    # every 0.06 ms: each step is past the interval, so each one is saved though checkpoint_every is never reached
    train(tiny(tmp_path, max_steps=3, checkpoint_every=1000, checkpoint_minutes=1e-6, keep_checkpoints=0))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
        ["step_0000001", "step_0000002", "step_0000003"]


def _one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_a_full_disk_is_a_one_line_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    train(tiny(tmp_path, max_steps=2))
    import thinking_pixel._run_dir as ckpt

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(CheckpointError) as error:
        train(tiny(tmp_path, max_steps=4))
    message = _one_line(error.value)
    assert "No space left on device" in message and "step_0000002 is intact" in message
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_0000002"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002"]


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (needs root and mount rights: skips otherwise)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_full_and_read_only_filesystems(tmp_path):
    with small_filesystem(tmp_path / "fs", "4m") as fs:
        cfg = dict(output_dir=str(fs / "run"), max_steps=4, checkpoint_every=2)

        def fill_disk_at_3(step, metrics):  # leave 16 KiB: room for metrics lines, not for a checkpoint
            if step == 3:
                free = os.statvfs(fs)
                with open(fs / "filler", "wb") as f, contextlib.suppress(OSError):
                    f.write(b"\0" * (free.f_bavail * free.f_frsize - 16384))

        with pytest.raises(CheckpointError) as error:
            train(tiny(tmp_path, **cfg), on_step=fill_disk_at_3)
        assert "No space left on device" in _one_line(error.value)
        assert (fs / "run" / "latest").read_text().strip() == "checkpoints/step_0000002"
        assert ThinkingPixelDiT.from_pretrained(fs / "run") is not None  # the previous checkpoint loads
        (fs / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(CheckpointError) as error:
            train(tiny(tmp_path, **cfg))
        assert "not writable" in _one_line(error.value) and "Read-only file system" in str(error.value)


def test_nan_weights_fail_at_load_and_garbage_weights_write_no_image(tmp_path):
    result = train(tiny(tmp_path, max_steps=2))
    weights = result.checkpoint / "ema" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    save_file({**state, name: torch.full_like(state[name], float("nan"))}, weights)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        sample_checkpoint(tmp_path / "run", tmp_path / "nan.png", num_steps=2, per_class=1, classes=[0])
    garbage = {k: (v * 1e30 if v.is_floating_point() else v) for k, v in state.items()}  # finite, but overflows
    save_file(garbage, weights)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sample_checkpoint(tmp_path / "run", tmp_path / "garbage.png", num_steps=2, per_class=1, classes=[0])
    assert not (tmp_path / "nan.png").exists() and not (tmp_path / "garbage.png").exists()


def test_checkpoints_have_the_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        result = train(tiny(tmp_path, max_steps=1))
    finally:
        os.umask(previous)
    out = tmp_path / "run"
    for path in [out / "latest", out / "metrics.jsonl", result.checkpoint, result.checkpoint / "model",
                 *result.checkpoint.rglob("*")]:
        expected = 0o755 if path.is_dir() else 0o644
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"


def test_from_pretrained_accepts_a_run_directory(tmp_path):
    result = train(tiny(tmp_path, max_steps=1))
    model = ThinkingPixelDiT.from_pretrained(tmp_path / "run")
    ema = load_file(result.checkpoint / "ema" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    with pytest.raises(FileNotFoundError):
        ThinkingPixelDiT.from_pretrained(tmp_path)
    assert json.loads((result.checkpoint / "train_config.json").read_text())["optimisation"]["max_steps"] == 1


def test_every_file_and_directory_is_fsynced_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    import thinking_pixel._run_dir as ckpt
    import thinking_pixel._fileio as fileio

    synced, renames = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        renames.append((str(src), str(dst), list(synced)))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(fileio.os, "replace", replace)
    result = train(tiny(tmp_path, max_steps=1))
    step_rename = next(r for r in renames if r[1] == str(result.checkpoint))
    tmp = Path(step_rename[0])
    written = [str(tmp / p.relative_to(result.checkpoint)) for p in result.checkpoint.rglob("*")] + [str(tmp)]
    assert set(written) <= set(step_rename[2]), "published before every file and directory was fsynced"
    latest = next(r for r in renames if r[1].endswith("latest"))
    assert latest[0] in latest[2] and str(result.checkpoint.parent) in latest[2]  # new checkpoint's entry durable
    assert str(tmp_path / "run") in synced[len(latest[2]):]  # and the new `latest` entry after its rename


def test_a_diverging_run_stops_before_writing_a_checkpoint(tmp_path, capsys):
    from thinking_pixel import cli

    argv = ["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "3", *TINY, "--lr", "1e30",
            "--grad-clip", "0"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinking-pixel: error: loss became") and "\n" not in err
    assert not (tmp_path / "run" / "latest").exists()
