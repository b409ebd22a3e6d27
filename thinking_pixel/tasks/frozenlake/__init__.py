"""FrozenLake as a visual planning task (the paper's case study): maps, frames, action decoding, planners.

Dynamics follow gymnasium's FrozenLake-v1 with ``is_slippery=False`` (tests check them against gymnasium).
The diffusion planner lives in :mod:`.planner` and its training data in :mod:`thinking_pixel.tasks.frozenlake.data`
(they import torch; this package's top level does not).
"""

from .maps import ACTIONS, DOWN, LEFT, RIGHT, UP, distances_to_goal, make_maps, optimal_actions, \
    shortest_path_length, step
from .render import PALETTE, decode_action, invalid_reason, parse_frame, render
from .rollout import OUTCOMES, evaluate_planner, oracle_planner

__all__ = ["ACTIONS", "DOWN", "LEFT", "OUTCOMES", "PALETTE", "RIGHT", "UP", "decode_action", "distances_to_goal",
           "evaluate_planner", "invalid_reason", "make_maps", "optimal_actions", "oracle_planner", "parse_frame", "render",
           "shortest_path_length", "step"]
