"""Frames of the lake and the agent, and reading them back: the planner's whole interface is pixels.

A frame is an RGB image of ``cell`` x ``cell`` pixels per tile (default 4, so a 4x4 lake is 16x16 px), each cell
filled with its tile's colour. The agent fills its whole cell, in a colour that also names the tile under it
(agent on F, S, G or H), so the agent is a large target for a small model and the map stays readable. A frame may
be padded to a larger square ``canvas`` (in cells) with the "outside" colour, which lets one model see lakes of
several sizes. Reading a frame classifies each cell's mean colour to the nearest palette colour, so generated
frames close to a rendered one read back the same.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .maps import ACTIONS, check_map

__all__ = ["PALETTE", "cell_contents", "decode_action", "frame_array", "invalid_reason", "parse_frame", "render"]

PALETTE = {  # what fills a cell -> RGB: a tile, "outside" the lake, or the agent standing on a tile
    "outside": (0, 0, 0),
    "F": (190, 225, 255),
    "S": (120, 200, 120),
    "H": (30, 40, 110),
    "G": (250, 200, 30),
    "agent on F": (230, 30, 30),
    "agent on S": (235, 120, 20),
    "agent on G": (200, 40, 200),
    "agent on H": (120, 15, 15),
}
_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[k] for k in _NAMES], dtype=np.float32)  # (9, 3)


def _check_cell(cell) -> int:
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f"cell must be an int >= 1 (pixels per tile), got {cell!r}")
    return cell


def render(lake, pos, *, cell: int = 4, canvas: int | None = None) -> Image.Image:
    """The lake with the agent at ``pos`` = (row, col): an RGB PIL image of (canvas or size) * cell pixels a side."""
    lake = check_map(lake)
    size = len(lake)
    cell = _check_cell(cell)
    canvas = size if canvas is None else canvas
    if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < size:
        raise ValueError(f"canvas must be an int >= the map size ({size}), got {canvas!r}")
    if len(pos) != 2 or not all(0 <= p < size for p in pos):
        raise ValueError(f"pos must be (row, col) inside the {size}x{size} map, got {pos!r}")
    cells = np.zeros((canvas, canvas, 3), dtype=np.uint8)  # "outside" is black
    cells[:size, :size] = [[PALETTE[t] for t in row] for row in lake]
    cells[pos[0], pos[1]] = PALETTE[f"agent on {lake[pos[0]][pos[1]]}"]
    return Image.fromarray(cells.repeat(cell, axis=0).repeat(cell, axis=1), "RGB")


def frame_array(frame) -> np.ndarray:
    """A frame (PIL image, or (H, W, 3) uint8 array) as an (H, W, 3) float32 array."""
    array = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"frame must be an RGB image or an (H, W, 3) array, got shape {array.shape}")
    return array.astype(np.float32)


def _nearest(colours: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(..., 3) mean colours -> (...) index of the nearest palette row."""
    return ((colours[..., None, :] - palette) ** 2).sum(-1).argmin(-1)


def cell_contents(frame, *, cell: int = 4) -> np.ndarray:
    """(n, n) array of palette names: what each cell of the frame reads as (nearest palette colour of its mean)."""
    cell = _check_cell(cell)
    pixels = frame_array(frame)
    height, width = pixels.shape[:2]
    if height != width or height % cell:
        raise ValueError(f"frame must be square with a side divisible by cell={cell}, got {width}x{height}")
    n = height // cell
    means = pixels.reshape(n, cell, n, cell, 3).mean(axis=(1, 3))  # (n, n, 3)
    return np.array(_NAMES)[((means[:, :, None, :] - _RGB) ** 2).sum(-1).argmin(-1)]


def parse_frame(frame, *, cell: int = 4):
    """Read a frame back: -> (map tuple of strings or None, agent positions as a list of (row, col)).

    The map is None when the tiles do not form a lake (outside colour inside it, not a square in the top-left
    corner, not exactly one S and one G). Every cell that reads as an agent counts as one position.
    """
    names = cell_contents(frame, cell=cell)  # (n, n)
    positions = [(int(r), int(c)) for r, c in zip(*np.nonzero(np.char.startswith(names, "agent")))]
    tiles = np.vectorize(lambda name: name[-1] if name.startswith("agent") else name)(names)  # the tile under each agent cell
    inside = tiles != "outside"
    size = int(inside[0].sum())
    lake = None
    if size >= 2 and inside[:size, :size].all() and inside.sum() == size * size:
        lake = tuple("".join(row) for row in tiles[:size, :size])
        flat = "".join(lake)
        if flat.count("S") != 1 or flat.count("G") != 1:
            lake = None
    return lake, positions


def decode_action(frame_a, frame_b, *, cell: int = 4) -> int | None:
    """The gymnasium action id (0 left, 1 down, 2 right, 3 up) that turns ``frame_a`` into ``frame_b``.

    None unless both frames show the same valid lake with exactly one agent each, and the agent moved by exactly
    one cell in one of the four directions (a diagonal jump, a teleport, no move or a changed map give None).
    """
    lake_a, pos_a = parse_frame(frame_a, cell=cell)
    lake_b, pos_b = parse_frame(frame_b, cell=cell)
    if lake_a is None or lake_a != lake_b or len(pos_a) != 1 or len(pos_b) != 1:
        return None
    (ra, ca), (rb, cb) = pos_a[0], pos_b[0]
    for action, (dr, dc) in ACTIONS.items():
        if (rb - ra, cb - ca) == (dr, dc):
            return action
    return None


def invalid_reason(frame_a, frame_b, *, cell: int = 4) -> str | None:
    """Why ``frame_b`` is not one legal move from ``frame_a`` (None if it is): "map changed", "no agent",
    "2 agent cells" (or more), "no move", "diagonal" (one cell diagonally) or "jump" (farther)."""
    if decode_action(frame_a, frame_b, cell=cell) is not None:
        return None
    lake_a, pos_a = parse_frame(frame_a, cell=cell)
    lake_b, pos_b = parse_frame(frame_b, cell=cell)
    if lake_a is None or len(pos_a) != 1:
        raise ValueError("frame_a must show a valid lake with one agent")
    if lake_b != lake_a:
        return "map changed"
    if len(pos_b) != 1:
        return "no agent" if not pos_b else f"{len(pos_b)} agent cells"
    dr, dc = abs(pos_b[0][0] - pos_a[0][0]), abs(pos_b[0][1] - pos_a[0][1])
    return "no move" if dr + dc == 0 else "diagonal" if dr == dc == 1 else "jump"
