"""Planners and rollouts: a planner maps the current frame to the next one; a rollout asks it for one frame at a
time from the start frame and judges each move with gymnasium's dynamics."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .maps import check_map, distances_to_goal, find, optimal_actions, step
from .render import cell_contents, decode_action, invalid_reason, parse_frame, render

__all__ = ["OUTCOMES", "evaluate_planner", "oracle_planner"]

OUTCOMES = ("success", "invalid", "hole", "timeout")


def oracle_planner(frame, map=None, *, cell: int = 4):
    """The next frame on a shortest path to the goal (the lowest action id among equally short moves).

    ``map``: the lake, if known; by default it is read from the frame. At the goal, or where no path exists, the
    frame is returned unchanged. The result has the frame's size (the same canvas).
    """
    lake, positions = parse_frame(frame, cell=cell)
    lake = lake if map is None else check_map(map)
    if lake is None or len(positions) != 1:
        raise ValueError("frame must show a valid lake with exactly one agent (or pass map=...)")
    pos = positions[0]
    actions = optimal_actions(lake, pos)
    if not actions:
        return frame
    new_pos, _, _ = step(lake, pos, actions[0])
    canvas = frame.size[0] // cell if hasattr(frame, "size") else np.asarray(frame).shape[1] // cell
    return render(lake, new_pos, cell=cell, canvas=canvas)


def _call(planner, frames: list) -> list:
    if getattr(planner, "batched", False):
        out = list(planner(frames))
        if len(out) != len(frames):
            raise ValueError(f"a batched planner must return one frame per input frame, got {len(out)} for "
                             f"{len(frames)}")
        return out
    return [planner(frame) for frame in frames]


def evaluate_planner(planner, maps, *, max_steps: int | None = None, cell: int = 4, canvas: int | None = None) -> dict:
    """Roll ``planner`` out on each map from its start frame; -> rates and per-episode records.

    planner: ``planner(frame) -> next frame`` (PIL images); with ``planner.batched = True`` it is called once per
    step with the list of frames of every unfinished episode instead. Each move is read with decode_action
    against the previous frame; the environment then renders the true next state as the next input. An episode
    ends on G (success), a hole, an invalid move (decode_action gives None: no move, a jump, a changed map, a
    missing or extra agent) or after ``max_steps`` moves (timeout; default: the number of tiles of the map).

    Returns success_rate, invalid_rate, hole_rate, timeout_rate, invalid_reasons (counts of invalid_reason's
    answers), path_ratio (mean over successes of moves / the
    shortest path's length; 1.0 is optimal, None without successes), num_maps, cell_accuracy (a graded score of
    the proposals: the fraction of canvas cells that read as in the closest shortest-path next frame, averaged over
    every proposal; first_cell_accuracy: over the first proposals only, from the start frames) and ``episodes``:
    one dict per map with outcome, moves, optimal (shortest length) and actions.
    """
    maps = [check_map(m) for m in maps]
    if not maps:
        raise ValueError("maps must be a non-empty list of maps")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be None or an int >= 1, got {max_steps!r}")
    episodes = []
    for lake in maps:
        start = find(lake, "S")
        episodes.append(dict(map=lake, outcome=None, moves=0, optimal=int(distances_to_goal(lake)[start]),
                             actions=[], pos=start, limit=max_steps or len(lake) ** 2, cell_accuracy=[]))
    frame_canvas = canvas or max(len(m) for m in maps)
    frames = {i: render(e["map"], e["pos"], cell=cell, canvas=frame_canvas) for i, e in enumerate(episodes)}
    while frames:
        order = sorted(frames)
        proposals = _call(planner, [frames[i] for i in order])
        for i, proposal in zip(order, proposals):
            episode = episodes[i]
            got = cell_contents(proposal, cell=cell)
            best = [cell_contents(render(episode["map"], step(episode["map"], episode["pos"], a)[0], cell=cell,
                                         canvas=frame_canvas), cell=cell)
                    for a in optimal_actions(episode["map"], episode["pos"])]
            episode["cell_accuracy"].append(max((got == b).mean() for b in best) if best else None)
            action = decode_action(frames[i], proposal, cell=cell)
            if action is None:
                episode["outcome"] = "invalid"
                episode["invalid_reason"] = invalid_reason(frames[i], proposal, cell=cell)
            else:
                episode["pos"], done, reward = step(episode["map"], episode["pos"], action)
                episode["moves"] += 1
                episode["actions"].append(action)
                if done:
                    episode["outcome"] = "success" if reward > 0 else "hole"
                elif episode["moves"] >= episode["limit"]:
                    episode["outcome"] = "timeout"
            if episode["outcome"] is None:
                frames[i] = render(episode["map"], episode["pos"], cell=cell, canvas=frame_canvas)
            else:
                del frames[i]
    counts = Counter(e["outcome"] for e in episodes)
    ratios = [e["moves"] / e["optimal"] for e in episodes if e["outcome"] == "success"]
    result = {f"{o}_rate": counts[o] / len(episodes) for o in OUTCOMES}
    result["invalid_reasons"] = dict(Counter(e["invalid_reason"] for e in episodes if e["outcome"] == "invalid"))
    accuracy = [a for e in episodes for a in e["cell_accuracy"] if a is not None]
    result.update(path_ratio=float(np.mean(ratios)) if ratios else None, num_maps=len(episodes),
                  cell_accuracy=float(np.mean(accuracy)) if accuracy else None,
                  first_cell_accuracy=float(np.mean([e["cell_accuracy"][0] for e in episodes])),
                  episodes=[{k: e.get(k) for k in ("map", "outcome", "invalid_reason", "moves", "optimal", "actions")}
                            for e in episodes])
    return result
