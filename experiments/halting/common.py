"""Shared by the halting experiments: applying a rule to a model, and timing rules against each other."""

from __future__ import annotations

import time

import torch


def apply_rule(model, rule: dict, steps: int) -> None:
    model.set_halting(rule["mode"], rule.get("threshold"))
    for _, attn in model.recursive_attentions():
        attn.steps = rule.get("steps", steps)


@torch.no_grad()
def time_rules(model, rule_list, steps, batch, repeats=7, **model_kwargs) -> dict:
    """Median forward time (s) of each rule on batch (x, t, y), the rules interleaved so machine load hits them
    alike."""
    x, t, y = batch
    times = {r["name"]: [] for r in rule_list}
    for _ in range(repeats):
        for r in rule_list:
            apply_rule(model, r, steps)
            start = time.perf_counter()
            model(x, t, y, **model_kwargs)
            times[r["name"]].append(time.perf_counter() - start)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}
