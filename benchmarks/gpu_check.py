"""One command for a maintainer with one CUDA GPU: correctness and speed of the kernels and of the recursion.

    python -m benchmarks.gpu_check [--out gpu_check.json] [--update BENCHMARKS.md] [--quick] [--sections ...]

Sections (``--sections``, comma-separated; all by default, in this order):

    ops        routed_lora, refine_step, gate_top1 on the device against the float64 reference: every precision,
               2, 3 and 5 experts, strided gradients, collapsed routing, batch invariance; eager and compiled
    recursion  one training step of a ThinkingPixelDiT and an apply_recursion diffusers DiT (2, 3, 5 experts):
               gradients on the device against the same step on CPU in float64; eager and compiled
    speed      routed_lora fwd and fwd+bwd (bf16) against dense all-experts, masked loop, sort + segments,
               torch._grouped_mm and the unrouted cuBLAS LoRA floor, at the suite's shapes; CUDA events
    host       host time and device work items per call of routed_lora and refine_step
    train      whole training steps: DiT-XL/2 (M=5, T=5) and SD3-medium-shaped (M=2, T=2) diffusers models,
               rank 128 in blocks 4, 8, 12: frozen base, apply_recursion, dense einsum, masked loop, peft; eager and
               compiled; added time, peak memory, the same function checked
    capture    routed_lora, refine_step and a recursion block fwd+bwd captured in a CUDA graph: replay equals eager

The whole run keeps to ``--budget-s`` (default 420 s, inside the 8 minutes one GPU gets): before each compiled
case, each model and each compiled variant it checks the time left, and what it leaves out is listed in the JSON's
"skipped" (run those sections alone, e.g. ``--sections train``, to get them).
Without a CUDA GPU it says so in one line and exits 2; ``--device cpu --tiny`` runs every section at tiny sizes
on CPU (the plumbing, as tests/test_gpu_check.py does). Exit status 1 if a correctness check failed.
The JSON (``--out``; default gpu_check.json, under $OUT when that is set) holds every number;
``python -m benchmarks.gpu_report`` turns it into BENCHMARKS.md's section (``--update`` here does the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SECTIONS = ("ops", "recursion", "speed", "host", "train", "capture")
SCHEMA = 2


def _cases(args):
    from . import shapes
    from .gpu import recursion_check, train_step

    if args.tiny:
        lora = shapes.LORA_QUICK[:1]
        recursion_size, models = recursion_check.TINY, train_step.TINY
    else:
        lora = shapes.lora_shapes(args.quick)
        recursion_size, models = recursion_check.SIZE, train_step.FULL
    models = [m for m in models if m.kind in args.models]
    return lora, recursion_size, models


def run(args, device) -> dict:
    from .gpu import env, op_speed, ops, recursion_check, train_step

    budget = env.Budget(args.budget_s)
    env.configure_dynamo()
    lora_shapes, recursion_size, models = _cases(args)
    compiled = not args.no_compile
    small = args.quick or args.tiny
    report = dict(schema=SCHEMA, command=" ".join(["python -m benchmarks.gpu_check", *args.argv]),
                  environment=env.versions(device),
                  options=dict(sections=args.sections, quick=args.quick, tiny=args.tiny, compiled=compiled,
                               compile_backend=args.compile_backend, budget_s=args.budget_s))
    timings = {}

    def section(name, fn):
        if name not in args.sections:
            return
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        report[name] = fn()
        timings[name] = time.perf_counter() - start

    section("ops", lambda: ops.check_correctness(device, small, args.compile_backend, compiled, budget))
    section("recursion", lambda: recursion_check.check_recursion(device, recursion_size, args.compile_backend,
                                                                 compiled, budget=budget))
    section("speed", lambda: op_speed.time_ops(device, lora_shapes, rounds=3 if args.tiny else 20))
    section("host", lambda: op_speed.host_overhead(device, rounds=5 if args.tiny else 200))
    section("train", lambda: train_step.run_train_steps(
        device, models, budget=budget, backend=args.compile_backend, compiled=compiled,
        warmup=1 if small else 2, iters=args.iters or (1 if args.tiny else 3 if args.quick else 5)))
    section("capture", lambda: op_speed.capture_check(device))
    report.update(section_seconds=timings, seconds=budget.elapsed(), skipped=budget.skipped)
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    return report


def failures(report: dict) -> list[str]:
    """Every failed check by name: op cases, recursion cases, capture, the train variants' same-function check."""
    failed = [f"ops: {r['case']}" for r in report.get("ops", []) if not r["passed"]]
    failed += [f"recursion: {r['case']}" for r in report.get("recursion", []) if not r["passed"]]
    failed += [f"capture: {r['call']}" for r in report.get("capture", []) if not r["passed"]]
    for case in report.get("train", []):
        check = case.get("function_check")
        if check is not None and not check["passed"]:
            failed.append(f"train: {case['case']} variants compute different functions")
    return failed


def default_out() -> str:
    return os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="the JSON of every result (default gpu_check.json, under $OUT "
                        "when that is set)")
    parser.add_argument("--markdown", default=None, help="the BENCHMARKS.md section (default: the JSON's path "
                        "with .md)")
    parser.add_argument("--update", metavar="MD", help="also put the section into this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--models", default="dit,sd3", help="train section: dit and/or sd3 (default both)")
    parser.add_argument("--quick", action="store_true", help="bf16 op cases at small sizes, the small lora "
                        "shapes, fewer timed steps")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes everywhere (with --device cpu: the "
                        "plumbing on CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile twin")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; 'none' runs the compiled code path uncompiled)")
    parser.add_argument("--iters", type=int, default=None, help="timed training steps per variant (default 5; "
                        "3 with --quick)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget: no unit of work starts that would not fit (default 420 s)")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.models = [m for m in args.models.split(",") if m]
    for name, given, allowed in (("--sections", args.sections, SECTIONS), ("--models", args.models, ("dit", "sd3"))):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {', '.join(allowed)}")
    args.out = args.out or default_out()
    args.markdown = args.markdown or os.path.splitext(args.out)[0] + ".md"
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing checked "
              "(--device cpu --tiny runs the plumbing on CPU)", file=sys.stderr)
        return 2
    from . import gpu_report

    report = run(args, torch.device(args.device))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    section = gpu_report.markdown(report)
    with open(args.markdown, "w") as fh:
        fh.write(section)
    if args.update:
        gpu_report.update_markdown(args.update, section)
    print(section)
    failed = report["failures"]
    print(f"gpu_check: {len(failed)} failed check(s){': ' + '; '.join(failed) if failed else ''}; "
          f"{report['seconds']:.0f} s; wrote {args.out}, {args.markdown}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
