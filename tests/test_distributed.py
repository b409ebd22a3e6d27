"""torchrun on CPU (gloo, 2 processes): training, identical weights across ranks, resuming across process counts.

Each torchrun launch costs a few seconds of process start-up, so the cases share launches: DDP trains from
scratch on 2 processes and resumes on 1; a 1-process run resumes on 2 processes with FSDP2.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subprocess_env import subprocess_env
from test_train import losses, tiny
from thinking_pixel.train import train

DRIVER = Path(__file__).with_name("train_driver.py")
TINY = ["--image-size", "8", "--patch-size", "2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
        "--rank", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress",
        "--no-sample-grid", "--threads", "1"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def torchrun(tmp_path, output_dir, max_steps, *extra, nproc=2, hooks=(), exit_code=0):
    """``thinking-pixel train`` on ``nproc`` gloo processes; returns (stdout, weights held by each rank)."""
    dump = tmp_path / f"weights_{output_dir.name}_{max_steps}"
    dump.mkdir()
    env = subprocess_env(DRIVER.parent)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(DRIVER),
           *hooks, "--dump-weights", str(dump), "--", "train", "--output-dir", str(output_dir), "--max-steps",
           str(max_steps), "--checkpoint-every", "2", *TINY, *extra]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode == 0) == (exit_code == 0), result.stdout[-3000:] + result.stderr[-3000:]
    weights = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    return result.stdout, weights


def world_sizes(output_dir):
    return [json.loads(line)["world_size"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_trains_with_identical_ranks_and_resumes_on_one_process(tmp_path):
    out = tmp_path / "ddp"
    stdout, (rank0, rank1) = torchrun(tmp_path, out, 2)
    assert stdout.count("starting a new run of 2 steps on 2 processes (ddp)") == 1  # rank 0 alone speaks
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights diverged"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["world_size"] == 2 for m in lines)
    assert all(len(frac) == 2 and abs(sum(frac) - 1) < 1e-5 for m in lines for frac in m["routing"].values())
    assert torch.load(out / "checkpoints" / "step_0000002" / "training_state.pt", weights_only=True)["world_size"] == 2
    from safetensors.torch import load_file

    on_disk = load_file(out / "checkpoints" / "step_0000002" / "model" / "model.safetensors")
    assert all(torch.equal(on_disk[k], rank0[k]) for k in on_disk)

    result = train(tiny(tmp_path, "ddp", max_steps=4, checkpoint_every=2, lr=1e-3, warmup_steps=0))
    assert result.step == 4 and world_sizes(out) == [2, 2, 1, 1]
    assert all(loss == loss for loss in losses(out))


def test_one_process_run_resumes_on_two_with_fsdp_until_sigterm_reaches_one_rank(tmp_path, capsys):
    out = tmp_path / "fsdp"
    train(tiny(tmp_path, "fsdp", max_steps=2, checkpoint_every=2, lr=1e-3, warmup_steps=0))
    assert "starting a new run of 2 steps" in capsys.readouterr().out
    # rank 1 alone gets SIGTERM after step 3: both ranks stop after step 4, which rank 0 checkpoints
    stdout, (rank0, rank1) = torchrun(tmp_path, out, 6, "--distributed", "fsdp", hooks=["--sigterm-at", "1:3"],
                                      exit_code=143)
    assert "resuming from step 2 of 6" in stdout and "saved by 1 process" in stdout
    assert "stopped by SIGTERM at step 4 of 6" in stdout
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000004"
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert world_sizes(out) == [1, 1, 2, 2] and all(loss == loss for loss in losses(out))
    # what rank 0 gathered and wrote is what the shards held
    from safetensors.torch import load_file

    on_disk = load_file(out / "checkpoints" / "step_0000004" / "model" / "model.safetensors")
    assert all(torch.equal(on_disk[k], rank0[k]) for k in on_disk)
    # and what FSDP2 saved (weights, optimizer state by parameter name) resumes on one process
    train(tiny(tmp_path, "fsdp", max_steps=5, checkpoint_every=2, lr=1e-3, warmup_steps=0))
    assert "resuming from step 4 of 5" in capsys.readouterr().out and world_sizes(out) == [1, 1, 2, 2, 1]


def test_optimizer_state_round_trips_by_name_with_a_parameter_that_never_had_a_gradient():
    from thinking_pixel import distributed

    def make():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 3), "unused": torch.nn.Linear(3, 3)})
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = make()
    model["used"](torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = distributed.optimizer_state(model, optimizer, distributed.Runtime())
    assert set(state["state"]) == {"used.weight", "used.bias"}  # keyed by name; the unused branch has none
    model2, optimizer2 = make()
    distributed.load_optimizer_state(model2, optimizer2, state)
    restored, saved = optimizer2.state[model2["used"].weight], optimizer.state[model["used"].weight]
    assert torch.equal(restored["exp_avg"], saved["exp_avg"])
