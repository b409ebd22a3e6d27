"""Tables from the outputs of experiments/run.py (no number is typed by hand).

    python experiments/make_table.py runs/exp_smoke --output runs/exp_smoke/results.md
    python experiments/make_table.py runs/exp_medium --insert-into RESULTS.md --marker medium \
        --copy-to experiments/results/medium

Reads OUT/settings.txt, OUT/eval/*.json (thinking-pixel evaluate) and OUT/analysis_*/routing_stats.json
(thinking-pixel analyze). Spread is the sample standard deviation over seeds (n - 1); "n" is the number of seeds.
With --insert-into, the text between ``<!-- BEGIN GENERATED: MARKER -->`` and ``<!-- END GENERATED: MARKER -->``
in that file is replaced (the markers are appended if missing).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

MAIN = [("real_train", "real training images (the FID floor at this sample count)"),
        ("base", "base DiT (starting point, no fine-tuning)"),
        ("dit_continued", "DiT, continued training (all weights)"),
        ("lora_M1_T1", "plain LoRA (M=1, T=1, base frozen)"),
        ("tp_M2_T2", "ThinkingPixel M=2, T=2 (base frozen)"),
        ("tp_M5_T5", "ThinkingPixel M=5, T=5 (base frozen)")]


def _load_evals(out: Path) -> dict:
    """{variant: {seed: result}}; the base has seed None."""
    evals = {}
    for path in sorted((out / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        m = re.fullmatch(r"(.+)_s(\d+)", path.stem)
        variant, seed = (m.group(1), int(m.group(2))) if m else (path.stem, None)
        evals.setdefault(variant, {})[seed] = result
    return evals


def _mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _cell(runs: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return _mean_std([r[key] * scale for r in runs.values() if key in r], fmt)


def _row(name: str, label: str, runs: dict) -> str:
    seeds = sorted(s for s in runs if s is not None)
    per_seed = ", ".join(f"{runs[s]['fid']:.2f}" for s in seeds) if seeds else f"{runs[None]['fid']:.2f}"
    return (f"| {label} | `{name}` | {len(runs)} | {_cell(runs, 'fid', '.2f')} | "
            f"{_cell(runs, 'kid_mean', '.2f', 1e3)} | {_cell(runs, 'precision', '.3f')} | "
            f"{_cell(runs, 'recall', '.3f')} | {per_seed} |")


def render(out: Path) -> str:
    evals = _load_evals(out)
    settings = (out / "settings.txt").read_text().split() if (out / "settings.txt").is_file() else []
    first = next((r for v in evals.values() for r in v.values() if "sampler" in r), None)
    lines = []
    if settings:
        lines.append("Settings (`settings.txt`): " + ", ".join(f"`{s}`" for s in settings) + ".")
    if first is not None:
        lines.append(f"FID/KID: {first['num_generated']} generated vs {first['num_reference']} real "
                     f"{first['dataset']}/{first['split']} images at {first['image_size']}px, "
                     f"{first['sampler']} {first['num_steps']} steps, cfg {first['cfg_scale']}, "
                     f"KID subset size {first.get('kid_subset_size')}, extractor `{first['extractor']}`; "
                     "precision / recall: k=3 nearest-neighbour manifolds on the same features. "
                     "IS: not available offline (no logits in the bundled InceptionV3).")
    lines += ["", "### Fine-tuning from the same base, same steps", "",
              "| model | run | n | FID (mean ± sd) | KID ×10³ (mean ± sd) | precision | recall | FID per seed |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, label, evals[name]) for name, label in MAIN if name in evals]

    grid = {(m, t): evals.get("lora_M1_T1" if (m, t) == (1, 1) else f"tp_M{m}_T{t}", {})
            for m in (1, 2, 5) for t in (1, 2, 5)}
    if any(len(v) for k, v in grid.items() if k not in ((1, 1), (2, 2), (5, 5))):
        lines += ["", "### Ablation: experts M × latent steps T (FID, mean over the seeds run; n in brackets)", "",
                  "| M \\ T | T=1 | T=2 | T=5 |", "|---|---|---|---|"]
        for m in (1, 2, 5):
            cells = []
            for t in (1, 2, 5):
                runs = grid[(m, t)]
                cells.append(f"{_cell(runs, 'fid', '.2f')} (n={len(runs)})" if runs else "—")
            lines.append(f"| M={m} | " + " | ".join(cells) + " |")

    gate = {name: evals[name] for name in ("tp_M2_T2", "gate_tokens_M2_T2") if name in evals}
    routing = {}
    for path in sorted(out.glob("analysis_*/routing_stats.json")):
        for label, stats in json.loads(path.read_text()).items():
            routing[(path.parent.name, label)] = stats
    if routing:
        lines += ["", "### Routing specialisation (pooled over recursive layers and steps; bits)", "",
                  "| analysis | gate / model | M | T | H(E) | max H | I(E; timestep) | I(E; class) | "
                  "I(E; position) | NMI timestep | NMI class |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (folder, label), st in routing.items():
            p, rec = st["pooled"], st["recursion"]
            lines.append(f"| {folder} | {label} | {rec['experts']} | {rec['steps']} | {p['entropy_bits']:.3f} | "
                         f"{p['max_entropy_bits']:.3f} | {p['mi_timestep_bits']:.4f} | {p['mi_class_bits']:.4f} | "
                         f"{p['mi_position_bits']:.4f} | {p['nmi_timestep']:.3f} | {p['nmi_class']:.3f} |")
    if len(gate) == 2:
        lines += ["", "### Gate inputs (M=2, T=2): FID / KID", "",
                  "| gate sees | n | FID | KID ×10³ |", "|---|---|---|---|"]
        for name, label in (("tp_M2_T2", "tokens + timestep + class"), ("gate_tokens_M2_T2", "tokens only")):
            runs = gate[name]
            lines.append(f"| {label} | {len(runs)} | {_cell(runs, 'fid', '.2f')} | {_cell(runs, 'kid_mean', '.2f', 1e3)} |")
    return "\n".join(lines) + "\n"


def insert(path: Path, marker: str, text: str) -> None:
    begin, end = f"<!-- BEGIN GENERATED: {marker} -->", f"<!-- END GENERATED: {marker} -->"
    doc = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{text}{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def copy_sources(out: Path, dest: Path) -> None:
    """Copy what the tables are made from (small files only: no checkpoints, no sample chunks) to ``dest``."""
    patterns = ["settings.txt", "commands.sh", "eval/*.json", "analysis_*/*.json", "analysis_*/*.png"]
    for pattern in patterns:
        for src in out.glob(pattern):
            target = dest / src.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output root of experiments/run.py")
    parser.add_argument("--output", default=None, help="write the markdown here (default: stdout)")
    parser.add_argument("--insert-into", default=None, help="a markdown file to update between markers")
    parser.add_argument("--marker", default="results", help="marker name for --insert-into")
    parser.add_argument("--copy-to", default=None, help="also copy the source files of the tables to this directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not (out / "eval").is_dir():
        parser.error(f"{out / 'eval'} does not exist: run the evaluate stage of experiments/run.py first")
    text = render(out)
    if args.output:
        Path(args.output).write_text(text)
    if args.insert_into:
        insert(Path(args.insert_into), args.marker, text)
    if args.copy_to:
        copy_sources(out, Path(args.copy_to))
    if not args.output and not args.insert_into:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
