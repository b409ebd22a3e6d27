"""The JSON of ``python -m benchmarks.gpu_check`` as a BENCHMARKS.md section.

    python -m benchmarks.gpu_report gpu_check.json [--output gpu_check.md] [--update BENCHMARKS.md]

``--update`` puts the section into the file in place of an earlier one (the rest of the file is left alone).
"""

from __future__ import annotations

import argparse
import json
import sys

SECTION = "## GPU check (python -m benchmarks.gpu_check)"
OP_IMPLS = ("tp_kernels.routed_lora", "dense (all experts)", "masked loop", "sort + segments", "torch._grouped_mm",
            "unrouted cuBLAS LoRA (floor)")
FLOOR = OP_IMPLS[-1]


def _ms(v):
    return "–" if v is None else f"{v * 1e3:.2f}"


def _sci(v):
    return "–" if v is None else f"{v:.1e}"


def _result(row):
    if row.get("error"):
        return f"FAIL ({row['error']})"
    return "pass" if row.get("passed") else "FAIL"


def _environment(report):
    env = report["environment"]
    parts = [env.get("gpu") or f"{env.get('device')} (no GPU)"]
    if env.get("driver") or env.get("cuda_driver_api"):
        parts.append(f"driver {env.get('driver')} (CUDA {env.get('cuda_driver_api')})")
    parts += [f"CUDA runtime {env.get('cuda_runtime')}", f"torch {env.get('torch')}", f"Triton {env.get('triton')}",
              f"diffusers {env.get('diffusers')}", f"{report['seconds']:.0f} s"]
    return " · ".join(parts)


HOST_TARGETS = {"routed_lora forward (no grad)": (80, 3), "routed_lora fwd+bwd": (300, 8),
                "refine_step fwd+bwd": (400, 12)}  # call: (host µs, device work items) at most


def targets(report: dict) -> list[tuple]:
    """[(target, measured, met: bool)] for the speed targets the run measured (GPU runs: device work items are
    counted only there)."""
    rows = []
    by_shape = {}
    for r in report.get("speed", []):
        if r["dtype"] == "bfloat16":
            by_shape.setdefault(r["shape"], {})[r["impl"]] = r.get("fwd+bwd")
    for shape, t in by_shape.items():
        ours, floor, grouped = t.get(OP_IMPLS[0]), t.get(FLOOR), t.get("torch._grouped_mm")
        if ours and floor:
            rows.append((f"routed_lora fwd+bwd {shape}: <= 1.5x the unrouted floor", f"{ours / floor:.2f}x",
                         ours <= 1.5 * floor))
        if ours and grouped:
            rows.append((f"routed_lora fwd+bwd {shape}: faster than torch._grouped_mm",
                         f"{ours * 1e3:.2f} vs {grouped * 1e3:.2f} ms", ours < grouped))
    on_gpu = report["environment"].get("gpu") is not None
    for r in report.get("host", []):
        if r["call"] in HOST_TARGETS and r.get("host_us") is not None:
            host, items = HOST_TARGETS[r["call"]]
            rows.append((f"{r['call']}: host time <= {host} µs", f"{r['host_us']:.0f} µs", r["host_us"] <= host))
            if on_gpu and r.get("work_items") is not None:
                rows.append((f"{r['call']}: device work items <= {items}", f"{r['work_items']:g}",
                             r["work_items"] <= items))
    for case in report.get("train", []):
        by = {(v["variant"], v["compiled"]): v for v in case.get("variants", []) if "error" not in v}
        for compiled in (False, True):
            ours, dense = by.get(("apply_recursion", compiled)), by.get(("dense einsum", compiled))
            if not (ours and dense):
                continue
            mode = "compiled" if compiled else "eager"
            if ours.get("added_s") is not None and dense.get("added_s"):
                rows.append((f"{case['case']} {mode}: added time <= 0.5x the dense processor's",
                             f"{ours['added_s'] / dense['added_s']:.2f}x", ours["added_s"] <= 0.5 * dense["added_s"]))
            if ours.get("peak_gib") is not None and dense.get("peak_gib") is not None:
                rows.append((f"{case['case']} {mode}: peak memory <= the dense processor's",
                             f"{ours['peak_gib']:.1f} vs {dense['peak_gib']:.1f} GiB",
                             ours["peak_gib"] <= dense["peak_gib"]))
    return rows


def _targets(report):
    rows = targets(report)
    if not rows:
        return []
    lines = ["### Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'met' if met else 'missed'} |" for name, value, met in rows]
    return lines


def _ops(rows):
    lines = ["### The ops against the float64 reference", "",
             "Max |error| / max(1, max |reference|) per output; eager cases also check batch invariance.", "",
             "| case | compiled | errors | batch invariant | tolerance | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        invariant = "–" if r["batch_invariant"] is None else r["batch_invariant"]
        lines.append(f"| {r['case'].replace(', compiled', '')} | {'yes' if r['compiled'] else 'no'} | {errors} | "
                     f"{invariant} | {r['tolerance'] if r['tolerance'] is not None else '–'} | {_result(r)} |")
    return lines


def _recursion(rows):
    lines = ["### The recursion end to end: one training step on the device (fp32) against CPU float64", "",
             "Max |error| / max |reference| over the output, the loss and every gradient (experts, gates, input); "
             "routing flips: tokens routed differently from the reference, of all routed tokens.", "",
             "| model | M | T | compiled | worst tensor | max error | routing flips | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flips = "–" if r.get("routing_flips") is None else f"{r['routing_flips']} / {r['routed_tokens']}"
        lines.append(f"| {r['model']} | {r['experts']} | {r['steps']} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r.get('worst', '–')} | {_sci(r.get('max_error'))} | {flips} | {_result(r)} |")
    return lines


def _speed(rows, clock):
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["shape"], r["dtype"]), {})[r["impl"]] = r
    lines = [f"### routed_lora forward + backward, ms ({clock}, median)", "",
             "| shape | dtype | " + " | ".join(OP_IMPLS) + " | tp_kernels / floor |",
             "|---|---|" + "---|" * (len(OP_IMPLS) + 1)]
    for (shape, dtype), impls in by_shape.items():
        cells = [_ms(impls.get(name, {}).get("fwd+bwd")) for name in OP_IMPLS]
        ours, floor = (impls.get(name, {}).get("fwd+bwd") for name in (OP_IMPLS[0], FLOOR))
        ratio = f"{ours / floor:.2f}x" if ours and floor else "–"
        lines.append(f"| {shape} | {dtype} | " + " | ".join(cells) + f" | {ratio} |")
    unsupported = sorted({f"{r['impl']}: {r['unsupported']}" for r in rows if r.get("unsupported")})
    lines += [""] + [f"- not run: {u}" for u in unsupported] if unsupported else []
    lines += ["", "Forward alone, ms:", "", "| shape | dtype | " + " | ".join(OP_IMPLS) + " |",
              "|---|---|" + "---|" * len(OP_IMPLS)]
    for (shape, dtype), impls in by_shape.items():
        lines.append(f"| {shape} | {dtype} | " + " | ".join(_ms(impls.get(n, {}).get("fwd")) for n in OP_IMPLS) + " |")
    return lines


def _host(rows):
    shape = rows[0]["shape"] if rows else {}
    lines = [f"### Host time and device work items per call ({shape.get('tokens')} tokens, D {shape.get('d')}, "
             f"rank {shape.get('rank')}, {shape.get('experts')} experts, {shape.get('slices')} slices, bf16)", "",
             "Host: the wall time of the call alone, the device idle before it (median). Work items: "
             f"{rows[0]['items_counted'] if rows else ''}, per call.", "",
             "| call | host µs | work items |", "|---|---|---|"]
    for r in rows:
        host = f"{r['host_us']:.0f}" if r.get("host_us") is not None else f"error: {r.get('error')}"
        items = "–" if r.get("work_items") is None else f"{r['work_items']:g}"
        lines.append(f"| {r['call']} | {host} | {items} |")
    return lines


def _train(case):
    config = case["config"]
    text = f" + {config['ctx']} text" if config.get("ctx") else ""
    lines = [f"### Training step: {case['case']} ({config['depth']} blocks, width {config['dim']}, batch "
             f"{config['batch']} x {config['image_tokens']} tokens{text}; M={config['experts']}, T={config['steps']}, "
             f"rank {config['rank']} in blocks {', '.join(map(str, config['layers']))})", ""]
    if case.get("error") or case.get("skipped_all"):
        return lines + [f"Not run: {case.get('error') or 'out of time budget'}"]
    lines += [f"Whole step: forward, MSE, backward, AdamW (fused on CUDA); {case['dtype']} base weights; median of "
              f"{case['iters']} after {case['warmup']} warm-up. Added = step - the frozen base's step in the same "
              "mode (the base's backward runs to the input through every block).", "",
              "| variant | mode | step ms | added ms | added / dense einsum's | peak GiB | output vs apply_recursion "
              "(rel. L2) | first call s |", "|---|---|---|---|---|---|---|---|"]
    rows = case["variants"]
    dense = {r["compiled"]: r.get("added_s") for r in rows if r["variant"] == "dense einsum"}
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        if r.get("error"):
            lines.append(f"| {r['variant']} | {mode} | error: {r['error']} | | | | | |")
            continue
        added, ref = r.get("added_s"), dense.get(r["compiled"])
        ratio = f"{added / ref:.2f}" if added is not None and ref else "–"
        peak = "–" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['variant']} | {mode} | {_ms(r.get('step_s'))} | {_ms(added)} | {ratio} | {peak} | "
                     f"{_sci(r.get('output_rel_l2_vs_apply_recursion'))} | {r['first_call_s']:.1f} |")
    check = case.get("function_check")
    if check:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in check["max_rel_diff"].items())
        lines += ["", f"Same function (fp32, TF32 off, batch {check['batch']}, max |diff| / max |apply_recursion's "
                  f"output|): {diffs}; tolerance {check['tolerance']:g} (the frozen base's shows what the recursion "
                  f"changes): {'pass' if check['passed'] else 'FAIL'}."]
    if case.get("skipped"):
        lines += ["", f"Left out (time budget): {', '.join(case['skipped'])}."]
    return lines


def _capture(rows):
    lines = ["### CUDA-graph capture: forward + backward captured, replayed on new inputs, against eager (fp32)", "",
             "| call | captured | max error | bitwise | result |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['call']} | {r.get('captured')} | {_sci(r.get('max_error'))} | {r.get('bitwise', '–')} | "
                     f"{_result(r)} |")
    return lines


def markdown(report: dict) -> str:
    lines = [SECTION, "", _environment(report) + ".", "", f"`{report['command']}`", ""]
    failed = report.get("failures", [])
    lines += [f"**{len(failed)} failed check(s)**: " + "; ".join(failed) if failed else "Every check passed.", ""]
    target_lines = _targets(report)
    lines += target_lines + ([""] if target_lines else [])
    clock = "CUDA events" if report["environment"].get("gpu") else "host clock"
    for key, render in (("ops", _ops), ("recursion", _recursion), ("speed", lambda rows: _speed(rows, clock)),
                        ("host", _host), ("capture", _capture)):
        if report.get(key):
            lines += render(report[key]) + [""]
    for case in report.get("train", []):
        lines += _train(case) + [""]
    if report.get("skipped"):
        lines += ["Left out to keep the time budget: " + "; ".join(report["skipped"]) + ".", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def update_markdown(path: str, section: str) -> None:
    """Put ``section`` into the markdown file at ``path``: in place of an earlier one, else at the end."""
    from .report import replace_section

    replace_section(path, SECTION, section)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the JSON written by python -m benchmarks.gpu_check")
    parser.add_argument("--output", "-o", help="write the section here (default: stdout)")
    parser.add_argument("--update", metavar="MD", help="put the section into this file (e.g. BENCHMARKS.md)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.results) as fh:
        section = markdown(json.load(fh))
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(section)
    if args.update:
        update_markdown(args.update, section)
    if not (args.output or args.update):
        print(section, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
