"""Class accuracy and placement of one shapes checkpoint under several sampler settings (RESULTS.md, appendix).

    python experiments/shapes_sampler_sweep.py RUN_OR_STEP_DIR PER_CLASS '{}' '{"cfg_scale": 2.0}' \
        '{"sampler": "ddim", "num_steps": 50}' '{"cfg_interval": [0, 500]}'

Each JSON argument overrides the sample command's defaults (DDPM, 100 steps, CFG 4); PER_CLASS samples of each
class are drawn with seed 0 and read by the same detector as ``thinking-pixel evaluate --metric accuracy``.
One JSON line per setting on stdout.
"""

import json
import sys
import time

import torch

from thinking_pixel import _run_dir as ckpt
from thinking_pixel.checkpoints import load_model_dir
from thinking_pixel.data import ShapesDataset
from thinking_pixel.metrics import to_uint8
from thinking_pixel.metrics.accuracy import class_accuracy, main_objects, placement
from thinking_pixel.sample import generate


def main(argv: list[str]) -> None:
    path, per_class = argv[0], int(argv[1])
    model = load_model_dir(ckpt.resolve_weights_dir(path, ema=True)).eval()
    data = ShapesDataset(image_size=model.config.input_size)
    parts = [data.label_parts(y) for y in range(data.num_classes)]
    labels = torch.arange(data.num_classes).repeat_interleave(per_class).tolist()
    for text in argv[2:]:
        setting = {"sampler": "ddpm", "num_steps": 100, "cfg_scale": 4.0, **json.loads(text)}
        if "cfg_interval" in setting:
            setting["cfg_interval"] = tuple(setting["cfg_interval"])
        started = time.time()
        images = to_uint8(generate(model, list(range(data.num_classes)), per_class, seed=0, batch_size=256, **setting))
        found = main_objects(images)
        acc = class_accuracy(found, labels, parts, list(data.class_names))
        spread = placement(found, model.config.input_size)
        print(json.dumps({"checkpoint": path, **setting, "accuracy": acc["accuracy"],
                          "shape_accuracy": acc["shape_accuracy"], "color_accuracy": acc["color_accuracy"],
                          "x_std": round(spread.get("x_std", 0.0), 3), "size_mean": round(spread.get("size_mean", 0.0), 3),
                          "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
