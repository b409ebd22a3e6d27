"""FrozenLake maps and their dynamics, with gymnasium's FrozenLake-v1 rules (``is_slippery=False``).

A map is a tuple of equal-length strings over S (start, frozen), F (frozen), H (hole), G (goal), one string per
row, the start in the top-left corner and the goal in the bottom-right one, as gymnasium's
``generate_random_map``. A position is (row, col). Actions use gymnasium's ids: 0 left, 1 down, 2 right, 3 up;
a move into the border leaves the agent where it is; the episode ends on H (reward 0) or G (reward 1).
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["ACTIONS", "LEFT", "DOWN", "RIGHT", "UP", "check_map", "distances_to_goal", "find", "make_maps",
           "optimal_actions", "shortest_path_length", "step"]

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTIONS = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}  # action id -> (d_row, d_col)
TILES = "SFHG"


def check_map(lake) -> tuple:
    """``lake`` as a tuple of strings, checked to be a square map of S/F/H/G with one S and one G."""
    if isinstance(lake, str) or not hasattr(lake, "__iter__"):
        raise ValueError(f"map must be a sequence of row strings such as ('SF', 'FG'), got {lake!r}")
    lake = tuple(lake)
    size = len(lake)
    if size < 2 or any(not isinstance(row, str) or len(row) != size for row in lake):
        raise ValueError(f"map must be a square of >= 2 row strings of equal length, got {lake!r}")
    flat = "".join(lake)
    if set(flat) - set(TILES) or flat.count("S") != 1 or flat.count("G") != 1:
        raise ValueError(f"map must hold only {TILES!r} with exactly one S and one G, got {lake!r}")
    return lake


def find(lake, tile: str) -> tuple[int, int]:
    """(row, col) of the first ``tile`` in ``lake``."""
    for r, row in enumerate(lake):
        c = row.find(tile)
        if c >= 0:
            return r, c
    raise ValueError(f"no {tile!r} in map {lake!r}")


def step(lake, pos, action: int) -> tuple[tuple[int, int], bool, float]:
    """One deterministic move: -> (new position, terminated, reward), as FrozenLake-v1 with is_slippery=False."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {sorted(ACTIONS)} (left, down, right, up), got {action!r}")
    size = len(lake)
    dr, dc = ACTIONS[action]
    r, c = min(max(pos[0] + dr, 0), size - 1), min(max(pos[1] + dc, 0), size - 1)
    tile = lake[r][c]
    return (r, c), tile in "HG", float(tile == "G")


def distances_to_goal(lake) -> np.ndarray:
    """(size, size) int array: moves from each cell to G over non-hole cells (BFS); -1 where G is unreachable
    (holes included, and G itself is 0)."""
    size = len(lake)
    dist = np.full((size, size), -1, dtype=np.int64)
    goal = find(lake, "G")
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        r, c = queue.popleft()
        for dr, dc in ACTIONS.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < size and 0 <= nc < size and dist[nr, nc] < 0 and lake[nr][nc] != "H":
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


def optimal_actions(lake, pos, dist: np.ndarray | None = None) -> list[int]:
    """The actions (ascending ids) that take ``pos`` one move closer to G; empty at G or where G is unreachable."""
    dist = distances_to_goal(lake) if dist is None else dist
    here = dist[pos]
    if here <= 0:
        return []
    best = []
    for action, (dr, dc) in ACTIONS.items():
        r, c = pos[0] + dr, pos[1] + dc
        if 0 <= r < len(lake) and 0 <= c < len(lake) and dist[r, c] == here - 1:
            best.append(action)
    return best


def shortest_path_length(lake) -> int:
    """Moves from S to G on a shortest path (-1 if there is none)."""
    return int(distances_to_goal(lake)[find(lake, "S")])


def _random_map(rng: np.random.Generator, size: int, p: float) -> tuple:
    board = np.where(rng.random((size, size)) < p, "F", "H")
    board[0, 0], board[-1, -1] = "S", "G"
    return tuple("".join(row) for row in board)


def make_maps(n: int, *, size: int = 4, seed: int, p: float = 0.8, exclude=()) -> list[tuple]:
    """``n`` distinct random solvable ``size`` x ``size`` maps, a pure function of (n, size, seed, p, exclude).

    Each tile is frozen with probability ``p``, else a hole (gymnasium's generate_random_map); S is the top-left
    corner, G the bottom-right one, and a map is kept only if G is reachable from S. ``exclude``: maps never to
    return (e.g. the training maps, to draw held-out ones).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    rng = np.random.default_rng([seed, size])
    seen = {tuple(m) for m in exclude}
    maps = []
    for _ in range(1000 * n + 1000):
        if len(maps) == n:
            return maps
        lake = _random_map(rng, size, p)
        if lake not in seen and shortest_path_length(lake) > 0:
            seen.add(lake)
            maps.append(lake)
    raise ValueError(f"could not find {n} distinct solvable {size}x{size} maps with p={p} (found {len(maps)}); "
                     "ask for fewer maps or a larger size")
