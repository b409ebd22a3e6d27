"""FrozenLakeDataset: (next frame, label, current frame) triples of shortest-path walks, for image-conditioned
diffusion training (``thinking-pixel train --dataset frozenlake``)."""

from __future__ import annotations

import numpy as np

from ...data.base import ImageDataset, to_unit_range
from .maps import distances_to_goal, make_maps, optimal_actions, step
from .render import render

__all__ = ["CELL", "FrozenLakeDataset", "frame_tensor"]

CELL = 4  # pixels per tile; with patch size 4 each tile is one token


def frame_tensor(frame):
    """A frame (PIL image) as a (3, H, W) float32 tensor in [-1, 1]."""
    return to_unit_range(np.asarray(frame).transpose(2, 0, 1).copy())


class FrozenLakeDataset(ImageDataset):
    """One planning step per sample: the frame after a shortest-path move, given the frame before it.

    ``ds[i] -> (next frame (3, S, S), 0, current frame (3, S, S))``, both in [-1, 1], S = ``image_size``: a
    ``map_size`` lake padded to an ``image_size // 4``-tile canvas, so a model trained here can be run on larger
    lakes up to the canvas size. The training lakes are ``make_maps(num_maps, size=map_size, seed=seed)``;
    sample i (a pure function of (seed, i)) takes one of them, an agent cell from which the goal is reachable
    (never the goal), and the oracle's move from there (the lowest action id among the shortest, as
    oracle_planner: one target per input, which a small model learns far faster than a choice among equally
    short moves). One class: the label is always 0.
    """

    class_names = ("frozen lake",)
    num_channels = 3
    cond_channels = 3

    def __init__(self, image_size: int = 16, map_size: int = 4, num_maps: int = 1000, num_samples: int = 50_000,
                 seed: int = 0, p: float = 0.8):
        if image_size % CELL or image_size // CELL < map_size:
            raise ValueError(f"image_size must be a multiple of {CELL} of at least {CELL} * map_size "
                             f"({CELL * map_size}), got {image_size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.image_size, self.map_size, self.num_samples, self.seed = image_size, map_size, num_samples, seed
        self.canvas = image_size // CELL
        self.maps = make_maps(num_maps, size=map_size, seed=seed, p=p)
        self._cells = []  # per map: the agent cells to sample (G reachable, not G) and their distance table
        for lake in self.maps:
            dist = distances_to_goal(lake)
            self._cells.append((list(zip(*np.nonzero(dist > 0))), dist))

    def __len__(self) -> int:
        return self.num_samples

    def transition(self, index: int):
        """Sample ``index`` as (map, position, next position)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        m = int(rng.integers(len(self.maps)))
        cells, dist = self._cells[m]
        pos = tuple(int(v) for v in cells[int(rng.integers(len(cells)))])
        actions = optimal_actions(self.maps[m], pos, dist)
        new_pos, _, _ = step(self.maps[m], pos, actions[0])
        return self.maps[m], pos, new_pos

    def __getitem__(self, index: int):
        lake, pos, new_pos = self.transition(index)
        before = render(lake, pos, cell=CELL, canvas=self.canvas)
        after = render(lake, new_pos, cell=CELL, canvas=self.canvas)
        return frame_tensor(after), 0, frame_tensor(before)
