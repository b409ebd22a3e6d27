"""Where a shapes model puts its objects, by object size, against the data (RESULTS.md "Where the objects sit").

    python experiments/placement_by_size.py ACC.json [ACC2.json ...]

Each ACC.json is a `thinking-pixel evaluate --metric accuracy` result; its samples are read back from its
``samples_dir`` (chunk files), detected again, and binned by size (sqrt(area) / side). The data's centres are
uniform in [r, 1 - r] for radius r, so a smaller object has more room: the spread of x to compare is the one
within a size bin. The data side is the evaluator's: PLACEMENT_DATA_IMAGES training images, dataset seed 0 (the
default run's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from thinking_pixel.datasets import make_dataset
from thinking_pixel.evaluate import PLACEMENT_DATA_IMAGES
from thinking_pixel.metrics.accuracy import main_objects, object_coordinates

BINS = ((0.40, 0.50), (0.50, 0.55), (0.55, 0.60), (0.60, 0.70))


def coordinates(objects, side):
    """(x, size) arrays of the detected objects, as fractions of the side."""
    coords = object_coordinates(objects, side)
    return coords["x"], coords["size"]


def row(name, x, size, data_x, data_size):
    cells = []
    for lo, hi in BINS:
        ours, theirs = (size >= lo) & (size < hi), (data_size >= lo) & (data_size < hi)
        cells.append(f"{ours.sum()} / {x[ours].std():.3f} / {data_x[theirs].std():.3f}")
    return f"| {name} | {x.std():.3f} | {size.mean():.3f} | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    args = p.parse_args(argv)
    side = None
    data_x = data_size = None
    print("| evaluation | x std | size mean | " + " | ".join(f"size [{lo:.2f}, {hi:.2f}): n / x std / data x std"
                                                     for lo, hi in BINS) + " |")
    print("|---|---|---|" + "---|" * len(BINS))
    for path in args.results:
        result = json.loads(path.read_text())
        if side != result["image_size"]:
            side = result["image_size"]
            data = make_dataset("shapes", image_size=side, seed=0)
            data_x, data_size = coordinates(main_objects([data.render(i)[0] for i in range(PLACEMENT_DATA_IMAGES)]), side)
            print(f"| data ({PLACEMENT_DATA_IMAGES} images) | {data_x.std():.3f} | {data_size.mean():.3f} |" + " |" * len(BINS))
        chunks = sorted(Path(result["samples_dir"]).glob("chunk_*.pt"))
        if not chunks:
            raise FileNotFoundError(f"{path}: no sample chunks in {result['samples_dir']}")
        images = torch.cat([torch.load(c, weights_only=True)["images"] for c in chunks])
        x, size = coordinates(main_objects(list(images.numpy())), side)
        print(row(path.stem, x, size, data_x, data_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
