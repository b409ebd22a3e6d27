"""Runs ``thinking-pixel train`` in a subprocess for the crash-safety and torchrun tests, with two test-only hooks.

    python tests/train_driver.py [--kill-at POINT:STEP] [--dump-weights DIR] -- train ARGS...

--kill-at: SIGKILL this process inside the checkpoint write of step STEP: ``files`` (every file of the step
  directory written and fsynced, not yet renamed into place) or ``latest`` (the step directory in place, the
  new ``latest`` written to its temporary file, not yet renamed over the old one).
--sigterm-at RANK:STEP: rank RANK sends itself SIGTERM once the metrics of step STEP are flushed (the other
  ranks get no signal: they must still stop at the same step).
--dump-weights: after training, every rank writes the weights it holds (full tensors) to DIR/rank<r>.pt.
"""

import argparse
import os
import signal
import sys
from pathlib import Path


def _kill_inside_checkpoint(point: str, step: int) -> None:
    from thinking_pixel import _fileio, _run_dir

    name = f"step_{step:07d}"
    if point == "files":
        original = _run_dir.fsync_tree

        def fsync_tree(root):
            original(root)
            if Path(root).name.startswith(f".tmp-{name}-"):
                os.kill(os.getpid(), signal.SIGKILL)

        _run_dir.fsync_tree = fsync_tree
    elif point == "latest":
        original = _fileio.os.replace

        def replace(src, dst):
            if Path(dst).name == "latest" and name in Path(src).read_text():
                os.kill(os.getpid(), signal.SIGKILL)
            original(src, dst)

        _fileio.os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def _sigterm_after(rank: int, step: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    from thinking_pixel import _train_log

    original = _train_log.StepLog.flush

    def flush(self, requests=(False, False)):
        result = original(self, requests)
        if any(line["step"] == step for line in result[0]):
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    _train_log.StepLog.flush = flush


def _capture_model():
    from thinking_pixel import distributed

    captured = {}
    original = distributed.wrap_model

    def wrap_model(model, runtime, strategy="ddp"):
        captured["model"] = model
        return original(model, runtime, strategy)

    distributed.wrap_model = wrap_model
    return captured


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--sigterm-at", default=None)
    parser.add_argument("--dump-weights", default=None)
    args, rest = parser.parse_known_args()
    argv = rest[1:] if rest[:1] == ["--"] else rest
    if args.kill_at:
        point, step = args.kill_at.split(":")
        _kill_inside_checkpoint(point, int(step))
    if args.sigterm_at:
        rank, step = args.sigterm_at.split(":")
        _sigterm_after(int(rank), int(step))
    captured = _capture_model() if args.dump_weights else None
    if args.dump_weights and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # kept open after training, to gather FSDP2 shards below
    from thinking_pixel import cli

    code = cli.main(argv)
    if captured is not None:
        import torch

        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                 for k, v in captured["model"].state_dict().items()}
        torch.save(state, Path(args.dump_weights) / f"rank{os.environ.get('RANK', '0')}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main())
