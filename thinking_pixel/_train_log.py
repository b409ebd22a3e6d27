"""Training metrics kept on the device and written every few steps, and the routing counts behind them.

Reading a CUDA tensor's value (``.item()``) waits for the GPU; doing it for every metric of every step stalls the
pipeline. :class:`StepLog` keeps each step's values as device tensors and reads them all at once when flushed
(every step on CPU, where reading is free; every ``log_every`` steps on CUDA), summed over ranks with a single
all-reduce that also carries each rank's requests to checkpoint or stop, so every rank takes the same decision
at the same step. It still writes one ``metrics.jsonl`` line per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections import deque

import torch

from . import distributed
from ._run_dir import CheckpointError

__all__ = ["RoutingCounts", "SlowdownHint", "StepLog"]

class RoutingCounts:
    """Tokens routed to each expert, per recursive layer, summed over recursion steps: (L, M) on the device.

    Collected through RecursiveAttention's ``recorder`` hook with a scatter-add (no host sync; ``bincount``
    would read the largest index back). Does nothing for a model without recursion.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        pairs = model.recursive_attentions() if hasattr(model, "recursive_attentions") else []
        self.layers = [layer for layer, _ in pairs]
        self.attentions = [attn for _, attn in pairs]
        self.experts = self.attentions[0].lora.num_experts if self.layers else 0
        self.counts = torch.zeros(len(self.layers), self.experts, device=device)  # (L, M)

    @contextlib.contextmanager
    def recording(self):
        for i, attn in enumerate(self.attentions):
            attn.recorder = lambda step, idx, state, i=i: self.counts[i].scatter_add_(
                0, idx.reshape(-1), torch.ones(idx.numel(), device=idx.device))
        try:
            yield self
        finally:
            for attn in self.attentions:
                attn.recorder = None

    def take(self) -> torch.Tensor:
        """This step's counts (L, M), and reset."""
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        return counts

    def as_fractions(self, counts: list) -> dict:
        """{"layer_<i>": [fraction of tokens per expert]} from host-side counts (L, M)."""
        return {f"layer_{layer}": [round(c / max(sum(row), 1.0), 6) for c in row]
                for layer, row in zip(self.layers, counts)}


class StepLog:
    """Per-step metrics on the device until :meth:`flush`; rank 0 appends them to ``path``, one line per step."""

    def __init__(self, path, runtime: distributed.Runtime, routing: RoutingCounts, every: int):
        self.path, self.runtime, self.routing, self.every = path, runtime, routing, every
        self.pending: list[tuple[int, float, torch.Tensor]] = []
        self.terms: list[str] | None = None  # the loss terms' names, "loss" first, fixed by the first step
        self.file = open(path, "a") if runtime.is_main else None  # noqa: SIM115 (closed by close())
        self.last_time = time.perf_counter()

    def add(self, step: int, lr: float, terms: dict, grad_norm: torch.Tensor) -> None:
        """Record step ``step`` (no host sync): every loss term's batch mean (per-rank means, averaged over ranks
        when flushed), the grad norm and the routing counts."""
        if self.terms is None:
            self.terms = ["loss", *(k for k in terms if k != "loss")]
        values = [terms[k].detach().float().mean() for k in self.terms]
        values.append(distributed.replicated(grad_norm).detach().float())
        values = torch.cat([torch.stack(values), self.routing.take().flatten()])
        self.pending.append((step, lr, values))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def flush(self, requests=(False, False)) -> tuple[list[dict], tuple[bool, ...]]:
        """Read, reduce and write the pending steps; returns their metrics lines and, for each of ``requests``
        (this rank's booleans), whether any rank asked for it. One all-reduce and one host sync."""
        if not self.pending:
            return [], tuple(requests)
        rt = self.runtime
        stacked = torch.stack([v for _, _, v in self.pending])  # (S, terms + grad norm + L * M)
        n_terms = len(self.terms)
        stacked[:, :n_terms] /= rt.world_size  # summed below: the mean over ranks
        if rt.world_size > 1:
            stacked[:, n_terms] /= rt.world_size  # the grad norm is the same on every rank
        flags = torch.tensor([float(r) for r in requests], device=stacked.device)
        packed = distributed.all_reduce_sum(torch.cat([stacked.flatten(), flags]), rt).tolist()  # the sync
        rows, flags = packed[:stacked.numel()], packed[stacked.numel():]
        width = stacked.shape[1]
        now = time.perf_counter()
        it_s = len(self.pending) / max(now - self.last_time, 1e-9)
        self.last_time = now
        lines = []
        for i, (step, lr, _) in enumerate(self.pending):
            row = rows[i * width:(i + 1) * width]
            metrics = {"step": step, **dict(zip(self.terms, row[:n_terms])), "grad_norm": row[n_terms], "lr": lr,
                       "it_s": it_s, "world_size": rt.world_size}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss became {metrics['loss']} at step {step}; "
                                         "try a lower lr or --grad-clip")
            if self.routing.layers:
                m = self.routing.experts
                counts = [row[n_terms + 1 + j * m: n_terms + 1 + (j + 1) * m] for j in range(len(self.routing.layers))]
                metrics["routing"] = self.routing.as_fractions(counts)
            lines.append(metrics)
        self.pending.clear()
        if self.file is not None:
            try:
                self.file.write("".join(json.dumps(m) + "\n" for m in lines))
                self.file.flush()
            except OSError as e:
                raise CheckpointError(f"cannot write {self.path}: {e.strerror or e}") from None
        return lines, tuple(f > 0 for f in flags)

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint claims the steps they describe)."""
        if self.file is not None:
            try:
                os.fsync(self.file.fileno())
            except OSError as e:
                raise CheckpointError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class SlowdownHint:
    """Says once when CPU steps with several threads run ``factor`` times slower than the run's best so far.

    Steps are compared by the median rate of ``window`` consecutive ones. The usual cause is another process on
    the cores: each parallel region then waits for the thread that lost its core, and one thread per process
    keeps most of the speed (benchmarks/cli_timing.py contention). The hint names the remedy; the thread count is
    not changed under the run, since it can change how sums are rounded.
    """

    def __init__(self, threads: int, say, window: int = 20, factor: float = 3.0):
        self.threads, self.say, self.factor = threads, say, factor
        self.rates = deque(maxlen=window)
        self.best = 0.0
        self.done = threads <= 1

    def add(self, it_s: float) -> None:
        if self.done:
            return
        self.rates.append(it_s)
        if len(self.rates) < self.rates.maxlen:
            return
        rate = statistics.median(self.rates)
        self.best = max(self.best, rate)
        if rate * self.factor < self.best:
            self.done = True
            self.say(f"steps slowed from {self.best:.1f} to {rate:.1f} it/s on {self.threads} threads: another "
                     "process is probably using the cores. One thread is often faster then: stop with Ctrl-C (it "
                     "checkpoints) and rerun the same command with --threads 1, which resumes the run.")
