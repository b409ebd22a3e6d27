"""Routing and recursion analysis: statistics (:mod:`.statistics`), model probes (:mod:`.probes`) and figures
(:mod:`.plots`). The ``thinking-pixel analyze`` command that runs them on checkpoints is :mod:`thinking_pixel.analyze`."""

from .plots import plot_decoded, plot_expert_positions, plot_expert_usage, plot_trajectories
from .probes import collect_routing, decode_steps, recursion_states
from .statistics import mutual_information, routing_statistics

__all__ = ["collect_routing", "decode_steps", "mutual_information", "plot_decoded", "plot_expert_positions",
           "plot_expert_usage", "plot_trajectories", "recursion_states", "routing_statistics"]
