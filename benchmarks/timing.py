"""Clocks for the suite: the host clock for CPU tensors, CUDA events (and CUDA graphs) for CUDA tensors.

pytest-benchmark times a round as ``timer()`` before and after the call. On CUDA a
host clock would time the kernel launches, not the kernels, so :class:`CudaEventTimer`
records an event on the current stream and waits for it: the difference of two
readings is GPU time between the two events.
"""

from __future__ import annotations

import statistics
import time

import torch


class CudaEventTimer:
    """A pytest-benchmark timer on the GPU clock: seconds since the first reading, as CUDA events measure them."""

    def __init__(self):
        self._origin = None

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._origin is None:
            self._origin = event
        return self._origin.elapsed_time(event) / 1e3  # elapsed_time is in ms

    def __repr__(self):
        return "CudaEventTimer"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_graph(fn, warmup: int = 3):
    """``fn`` captured in a CUDA graph: returns (replay, True), or (fn, False) when capture fails.

    Warm-up runs on a side stream first, as capture requires (allocator pools, cuBLAS workspaces).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # a host sync or an uncapturable op inside fn: time it eagerly instead
        torch.cuda.synchronize()
        return fn, False
    return graph.replay, True


def median_seconds(fn, device: torch.device, *, rounds: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) seconds of ``fn()`` over ``rounds`` timed calls, on the device's clock."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timer = CudaEventTimer() if device.type == "cuda" else time.perf_counter
    times = []
    for _ in range(rounds):
        start = timer()
        fn()
        synchronize(device)
        times.append(timer() - start)
    return statistics.median(times), min(times)
