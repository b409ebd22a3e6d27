"""Wall-clock behaviour of the ``thinking-pixel`` command line, measured end to end in subprocesses.

    python -m benchmarks.cli_timing contention --output benchmarks/results/cli/contention.json
    python -m benchmarks.cli_timing errors --output benchmarks/results/cli/errors.json
    python -m benchmarks.cli_timing grid --output benchmarks/results/cli/grid.json

- ``contention``: training speed of ``thinking-pixel train`` (the default preset) beside a competing process,
  ``python -c 'while True: pass'`` (one core, bounded by ``timeout``), for each thread setting and OpenMP wait
  policy. Each run is killed after ``--seconds``; its rate is the steps after the first ``--skip`` over their
  summed step times (``metrics.jsonl``'s ``it_s`` is per step on CPU).
- ``errors``: seconds until a missing checkpoint or dataset is reported (the process exits 1).
- ``grid``: seconds of a 5-step default run with and without the final sample grid.

Every result file records the command, the machine's load average and the other busy processes, since the
numbers depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "thinking_pixel"]
BUSY = [sys.executable, "-c", "while True: pass"]
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def _machine() -> dict:
    """Load average and the processes using CPU now (other jobs change every number here)."""
    top = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    busy = [line.strip()[:160] for line in top.splitlines()[1:] if float(line.split()[0]) >= 10.0]
    return {"loadavg": os.getloadavg(), "cpus": os.cpu_count(), "busy_processes": busy}


def _env(overrides: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env.update(overrides)
    return env


def train_rate(seconds: float, threads: int | None, env: dict, skip: int) -> dict:
    """Steps per second of the default ``thinking-pixel train`` over ``seconds`` (killed then)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*CLI, "train", "--output-dir", tmp, "--no-sample-grid", "--no-progress",
               "--checkpoint-every", "100000", "--checkpoint-minutes", "0"]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        subprocess.run(["timeout", "-s", "KILL", str(seconds), *cmd], env=_env(env), cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines() if (Path(tmp) / "metrics.jsonl").is_file() else []
    rates = [json.loads(line)["it_s"] for line in lines if line.strip().endswith("}")]
    kept = rates[skip:]
    return {"steps": len(rates), "it_s": len(kept) / sum(1 / r for r in kept) if kept else None,
            "median_it_s": statistics.median(kept) if kept else None,
            "slowest_step_s": max(1 / r for r in kept) if kept else None}


def contention(args) -> dict:
    runs = []
    for policy in args.policies:
        env = {} if policy == "unset" else dict(item.split("=", 1) for item in policy.split(","))
        for threads in args.threads:
            # its own process group, so that killing the group also ends the loop under ``timeout``
            busy = subprocess.Popen(["timeout", str(args.seconds + 5), *BUSY], process_group=0) \
                if args.busy else None
            try:
                before = _machine()
                result = train_rate(args.seconds, None if threads == 0 else threads, env, args.skip)
            finally:
                if busy is not None:
                    os.killpg(busy.pid, signal.SIGKILL)
                    busy.wait()
            runs.append({"omp_env": policy, "threads": "default" if threads == 0 else threads,
                         "competing_busy_loop": args.busy, **result, "machine_at_start": before})
            print(json.dumps(runs[-1]), flush=True)
    return {"runs": runs}


ERROR_CASES = {
    "sample --checkpoint missing": ["sample", "--checkpoint", "/nonexistent/run"],
    "evaluate --checkpoint missing": ["evaluate", "--checkpoint", "/nonexistent/run", "--output", "{tmp}/e.json"],
    "analyze --checkpoint missing": ["analyze", "--checkpoint", "/nonexistent/run", "--output-dir", "{tmp}/a"],
    "train --data-dir missing": ["train", "--dataset", "folder", "--data-dir", "/nonexistent/data",
                                 "--output-dir", "{tmp}/t"],
    "train --finetune-from missing": ["train", "--finetune-from", "/nonexistent/run", "--output-dir", "{tmp}/f"],
}


def errors(args) -> dict:
    runs = []
    for name, argv in ERROR_CASES.items():
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                done = subprocess.run([*CLI, *(a.format(tmp=tmp) for a in argv)], cwd=ROOT, capture_output=True,
                                      text=True)
                times.append(time.perf_counter() - start)
        runs.append({"case": name, "seconds": times, "exit_code": done.returncode,
                     "stderr": done.stderr.strip().splitlines()[-1:]})
        print(json.dumps(runs[-1]), flush=True)
    return {"runs": runs, "machine_at_end": _machine()}


def grid(args) -> dict:
    runs = []
    for label, extra in (("with grid", []), ("--no-sample-grid", ["--no-sample-grid"])):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([*CLI, "train", "--output-dir", tmp, "--max-steps", "5", "--no-progress", *extra],
                           cwd=ROOT, capture_output=True, check=True)
            runs.append({"case": label, "seconds": time.perf_counter() - start, "machine_at_end": _machine()})
        print(json.dumps(runs[-1]), flush=True)
    return {"runs": runs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("contention", allow_abbrev=False)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the rate (warm-up)")
    p.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0: the command's default")
    p.add_argument("--policies", nargs="+", default=["unset", "OMP_WAIT_POLICY=PASSIVE"],
                   help="OpenMP environment per variant: 'unset' or NAME=VALUE[,NAME=VALUE]")
    p.add_argument("--no-busy", dest="busy", action="store_false", help="no competing busy loop")
    p = sub.add_parser("errors", allow_abbrev=False)
    p.add_argument("--repeats", type=int, default=3)
    sub.add_parser("grid", allow_abbrev=False)
    for p in sub.choices.values():
        p.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    result = {"errors": errors, "contention": contention, "grid": grid}[args.what](args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {"command": " ".join(["python -m benchmarks.cli_timing", *(argv or sys.argv[1:])]),
              "commit": commit.stdout.strip(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
