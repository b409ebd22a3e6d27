"""Summarise a FrozenLake run directory (experiments/frozenlake/run.py) and the shapes halting curve.

    python experiments/frozenlake/make_table.py runs/frozenlake --shapes runs/halting_shapes \
        --copy-to experiments/results/frozenlake --insert-into RESULTS.md

Writes OUT/results.md (the tables), OUT/halting_curves.png (quality against the mean recursion steps), and with
--copy-to the evaluation JSONs (without per-episode records), commands and figures; with --insert-into it
replaces the text between ``<!-- frozenlake:begin -->`` and ``<!-- frozenlake:end -->`` in that file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from thinking_pixel.recursion.layers import DEFAULT_THRESHOLDS

RATES = ("success_rate", "invalid_rate", "hole_rate", "timeout_rate")


def _mean_std(values, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _reasons(rows) -> str:
    total = defaultdict(int)
    for row in rows:
        for reason, n in row.get("invalid_reasons", {}).items():
            total[reason] += n
    return ", ".join(f"{reason} {n}" for reason, n in sorted(total.items(), key=lambda kv: -kv[1])) or "–"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def main_table(out: Path) -> tuple[str, dict]:
    by_variant = defaultdict(list)
    for path in sorted((out / "eval").glob("*.json")):
        variant = re.sub(r"_s\d+$", "", path.stem)
        by_variant[variant].append(_load(path))
    order = [v for v in ("base", "dit_continued", "tp_M2_T2", "tp_M2_T5", "ponder_M2_T5") if v in by_variant]
    order += [v for v in sorted(by_variant) if v not in order]
    lines = ["| variant | map size | seeds | success | invalid move | hole | timeout | path / shortest | cell accuracy "
             "(all moves) | cell accuracy (first move) | invalid moves by kind (all seeds) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in order:
        results = by_variant[variant]
        for size in sorted(results[0]["sizes"], key=int):
            rows = [r["sizes"][size] for r in results if size in r["sizes"]]
            cells = [_mean_std([row[k] for row in rows]) for k in RATES]
            lines.append(f"| {variant} | {size}x{size}{' (held-out)' if size == '4' else ' (larger)'} | "
                         f"{len(rows)} | " + " | ".join(cells) + f" | {_mean_std([row['path_ratio'] for row in rows])} | "
                         f"{_mean_std([row.get('cell_accuracy') for row in rows], 3)} | "
                         f"{_mean_std([row.get('first_cell_accuracy') for row in rows], 3)} | "
                         f"{_reasons(rows)} |")
    return "\n".join(lines), by_variant


def halting_points(out: Path) -> dict:
    """{run: [(rule, size, success, mean steps, first-move cell accuracy)]}: the un-halted evaluation and every
    halting one."""
    points = defaultdict(list)
    halted_runs = {re.match(r"(.+_s\d+)_(delta|learned)_", path.stem).group(1) for path in (out / "halting").glob("*.json")}
    for run in sorted(halted_runs):
        data = _load(out / "eval" / f"{run}.json")
        rec = data["recursion"]
        rule = "as trained: none" if rec["halting"] == "none" else \
            f"as trained: {rec['halting']} {rec['halt_threshold'] or DEFAULT_THRESHOLDS[rec['halting']]}"
        for size, r in data["sizes"].items():
            points[run].append((rule, size, r["success_rate"], r["mean_recursion_steps"],
                                r.get("first_cell_accuracy")))
    for path in sorted((out / "halting").glob("*.json")):
        run, mode, threshold = re.match(r"(.+_s\d+)_(delta|learned)_(.+)$", path.stem).groups()
        for size, r in _load(path)["sizes"].items():
            points[run].append((f"{mode} {threshold}", size, r["success_rate"], r["mean_recursion_steps"],
                                r.get("first_cell_accuracy")))
    return points


def halting_table(points: dict) -> str:
    lines = ["| run | rule | mean steps (4x4) | success 4x4 | first-move cell acc. 4x4 | mean steps (5x5) | "
             "success 5x5 | first-move cell acc. 5x5 |", "|---|---|---|---|---|---|---|---|"]
    for run, rows in points.items():
        rules = list(dict.fromkeys(rule for rule, *_ in rows))
        for rule in rules:
            cells = {size: (s, m, a) for r, size, s, m, a in rows if r == rule}

            def fmt(size):
                if size not in cells:
                    return "– | – | –"
                s, m, a = cells[size]
                return f"{m:.2f} | {s:.2f} | {'–' if a is None else f'{a:.3f}'}"
            lines.append(f"| {run} | {rule} | {fmt('4')} | {fmt('5')} |")
    return "\n".join(lines)


def shapes_table(curve: dict) -> str:
    lines = ["| model | rule | mean steps | held-out eps MSE | forward ms (batch 64) |", "|---|---|---|---|---|"]
    for run, r in curve["runs"].items():
        for p in r["points"]:
            lines.append(f"| {run} | {p['rule']['name']} | {p['mean_steps']:.2f} | {p['mse']:.5f} | "
                         f"{p['forward_seconds_b64'] * 1e3:.1f} |")
    return "\n".join(lines)


def plot_curves(points: dict, curve: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if curve else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    for run, rows in points.items():
        for family, marker in (("delta", "o"), ("learned", "s"), ("as trained", "*")):
            sel = sorted((m, a) for r, size, s, m, a in rows
                         if r.startswith(family) and size == "4" and m is not None and a is not None)
            if sel:
                ax.plot(*zip(*sel), marker=marker, label=f"{run} {family}", alpha=0.8)
    ax.set_xlabel("mean recursion steps per token")
    ax.set_ylabel("first-move cell accuracy, held-out 4x4")
    ax.set_title("FrozenLake planner: quality vs recursion steps", fontsize=9)
    ax.legend(fontsize=6)
    if curve:
        ax = axes[0, 1]
        for run, r in curve["runs"].items():
            for family, marker in (("fixed", "*"), ("learned", "s"), ("delta", "o")):
                sel = sorted((p["mean_steps"], p["mse"]) for p in r["points"] if p["rule"]["name"].startswith(family))
                if sel:
                    ax.plot(*zip(*sel), marker=marker, label=f"{run} {family}")
        ax.set_xlabel("mean recursion steps per token")
        ax.set_ylabel("held-out denoising MSE (lower is better)")
        ax.set_title("shapes (M=2, T=5): quality vs steps", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shapes", type=Path, default=None, help="experiments/halting/shapes.py output dir")
    p.add_argument("--copy-to", type=Path, default=None)
    p.add_argument("--insert-into", type=Path, default=None)
    args = p.parse_args(argv)
    table, _ = main_table(args.out)
    points = halting_points(args.out)
    curve = _load(args.shapes / "curve.json") if args.shapes and (args.shapes / "curve.json").exists() else None
    plot_curves(points, curve, args.out / "halting_curves.png")
    timing = args.out / "halting_timing.json"
    parts = ["### Rollouts on held-out maps (mean ± std over seeds)", "", table, "",
             "### Per-token halting on the T=5 planners (success and mean recursion steps, seed 0)", "",
             halting_table(points), ""]
    if timing.exists():
        parts += ["### Forward-pass wall-clock per rule (ms, median of 7, batch 64, 1 thread, shared machine)", "",
                  "", ""]
        t = _load(timing)
        rules = list(dict.fromkeys(rule for per_run in t.values() for rule in per_run))
        parts[-2] = ("| rule | " + " | ".join(t) + " |\n|---|" + "---|" * len(t) + "\n" + "\n".join(
            f"| {rule} | " + " | ".join(f"{t[run][rule] * 1e3:.0f}" if rule in t[run] else "–" for run in t) + " |"
            for rule in rules))
    if curve:
        parts += ["### Shapes: held-out denoising error against mean recursion steps", "", shapes_table(curve), ""]
    text = "\n".join(parts)
    (args.out / "results.md").write_text(text)
    print(text)
    if args.copy_to:
        dest = args.copy_to
        (dest / "eval").mkdir(parents=True, exist_ok=True)
        (dest / "halting").mkdir(parents=True, exist_ok=True)
        for sub in ("eval", "halting"):
            for path in (args.out / sub).glob("*.json"):
                data = _load(path)
                for r in data["sizes"].values():
                    r.pop("episodes", None)
                (dest / sub / path.name).write_text(json.dumps(data, indent=1) + "\n")
        for name in ("commands.sh", "halting_curves.png", "results.md", "halting_timing.json"):
            if (args.out / name).exists():
                shutil.copy(args.out / name, dest / name)
        for png in (args.out / "figures").glob("*.png"):
            shutil.copy(png, dest / png.name)
        if args.shapes:
            for name in ("curve.json", "commands.sh"):
                if (args.shapes / name).exists():
                    shutil.copy(args.shapes / name, dest / f"shapes_{name}")
    if args.insert_into:
        doc = args.insert_into.read_text()
        begin, end = "<!-- frozenlake:begin -->", "<!-- frozenlake:end -->"
        if begin not in doc:
            raise SystemExit(f"{args.insert_into} has no {begin} marker")
        doc = doc[: doc.index(begin) + len(begin)] + "\n" + text + "\n" + doc[doc.index(end):]
        args.insert_into.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
