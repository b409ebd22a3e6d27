"""grids/NAME.png (+ NAME.txt captions): 2 seen prompts per tag x 4 images from an evaluation's stored samples.
usage: python runs/grid.py RESULT_JSON SAMPLES_DIR OUT_PREFIX"""
import json
import sys
from pathlib import Path

import torch

from thinking_pixel.sample import save_grid

result, samples, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
r = json.loads(result.read_text())
per, ppt = r["images_per_prompt"], r["prompts_per_tag"]
images = torch.cat([torch.load(c, weights_only=True)["images"] for c in sorted(samples.glob("chunk_*.pt"))])
details = [json.loads(line) for line in result.with_name(result.stem + "_details.jsonl").read_text().splitlines()]
prompts = [t * ppt + k for t in range(6) for k in (0, 1)]  # seen prompts are grouped by tag
rows = [p * per + j for p in prompts for j in range(per)]
out.parent.mkdir(parents=True, exist_ok=True)
save_grid(images[rows].float() / 127.5 - 1, out.with_suffix(".png"), ncol=per, scale=3)
out.with_suffix(".txt").write_text("".join(
    f"{details[p * per]['caption']}: {sum(details[p * per + j]['correct'] for j in range(per))}/{per} correct\n"
    for p in prompts))
