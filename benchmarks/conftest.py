"""pytest-benchmark setup for the suite: options, the device clock, ceilings, and run metadata.

    pytest benchmarks --benchmark-only [--quick] [--device cuda] [--benchmark-json results.json]

Every benchmark goes through the ``bench`` fixture, which warms the callable up
(so torch.compile's compile time and first-touch allocations are excluded), picks
a round count from a time budget, and records FLOPs, bytes and the roofline floor
in ``extra_info`` for ``python -m benchmarks.report``.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import time

import pytest
import torch

from . import _target
from . import ceilings as ceilings_mod
from .timing import CudaEventTimer, cuda_graph, synchronize

_CEILINGS = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("thinking-pixel benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="small shapes and short rounds: the whole suite in under 2 minutes (CI smoke run)")
    group.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                    help="device for the benchmark tensors (cuda: CUDA-event timing and CUDA graphs)")
    group.addoption("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's choice, one per core)")


def pytest_configure(config):
    if config.getoption("threads") is not None:
        torch.set_num_threads(config.getoption("threads"))
    if config.getoption("device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was given but torch.cuda.is_available() is False")


def pytest_report_header(config):
    return [_target.describe(config.getoption("device"))]


def pytest_sessionstart(session):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.verbosity < 0:  # -q hides the report header: keep this line
        reporter.write_line(_target.describe(session.config.getoption("device")))


def pytest_collection_modifyitems(config, items):
    if config.getoption("device") != "cuda":
        return
    timer = CudaEventTimer()
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=timer))


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return pytestconfig.getoption("quick")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("device"))


@pytest.fixture(scope="session")
def ceilings(pytestconfig, device, quick) -> ceilings_mod.Ceilings:
    """Measured once per pytest run, before the first benchmark that needs a floor."""
    if quick:
        result = ceilings_mod.measure(device, gemm_n=768, copy_mib=32, rounds=5)
    else:
        result = ceilings_mod.measure(device, gemm_n=4096, copy_mib=256, rounds=5)
    pytestconfig.stash[_CEILINGS] = result
    return result


class Bench:
    """Runs one benchmark: ``bench(fn, group=..., impl=..., cost=..., dtype=..., **info)``."""

    def __init__(self, benchmark, device, ceilings, quick):
        self.benchmark = benchmark
        self.device = device
        self.ceilings = ceilings
        self.budget_s = 0.08 if quick else 1.0
        self.min_rounds = 3 if quick else 5
        self.max_rounds = 20 if quick else 400

    def __call__(self, fn, *, group: str, impl: str, cost=None, dtype=None, graphable: bool = True,
                 warmup: int = 2, **info):
        """Time ``fn()`` (no arguments, returns anything) under ``group``; ``cost`` is a flop_model.Cost."""
        self.benchmark.group = group
        elapsed = 0.0
        for _ in range(max(warmup, 1)):  # the last warm-up call's time sizes the run
            start = time.perf_counter()
            fn()
            synchronize(self.device)
            elapsed = time.perf_counter() - start
        target, graphed = fn, False
        if self.device.type == "cuda" and graphable:
            target, graphed = cuda_graph(fn)
        slow = elapsed > self.budget_s  # seconds-long calls (model steps): fewer rounds, no extra warm-up
        rounds = min(self.max_rounds, max(3 if slow else self.min_rounds, math.ceil(self.budget_s / max(elapsed, 1e-7))))
        self.benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0 if slow else 1)
        extra = {"group": group, "impl": impl, "device": str(self.device), "cuda_graph": graphed, **info}
        if dtype is not None:
            extra["dtype"] = str(dtype).replace("torch.", "")
        if cost is not None:
            floor = self.ceilings.floor_seconds(cost.flops, cost.bytes, dtype or torch.float32)
            extra.update(flops=cost.flops, bytes=cost.bytes, floor_s=floor)
            if self.median is not None:
                extra.update(fraction_of_floor=self.median / floor, achieved_flops=cost.flops / self.median)
        self.benchmark.extra_info.update(extra)

    @property
    def median(self):
        """Median seconds of the last run, or None under --benchmark-disable."""
        stats = self.benchmark.stats
        return None if stats is None else stats.stats.median


@pytest.fixture
def bench(benchmark, device, ceilings, quick) -> Bench:
    return Bench(benchmark, device, ceilings, quick)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _extension_isa(ext):
    """The instruction set the compiled CPU extension dispatched to, or None when it is not loaded."""
    lib = ext.library() if hasattr(ext, "library") else None
    return None if lib is None or not hasattr(lib, "tp_isa") else lib.tp_isa().decode()


def pytest_benchmark_update_machine_info(config, machine_info):
    import tp_kernels
    from tp_kernels import _ext

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(config.getoption("device"))
    machine_info["thinking_pixel"] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "quick": config.getoption("quick"),
        "tp_kernels_backend": tp_kernels.resolve_backend(device),
        "cpu_extension": _ext.routed_lora_cpu() is not None,
        "cpu_extension_isa": _extension_isa(_ext),
        "ceilings": config.stash[_CEILINGS].as_dict() if _CEILINGS in config.stash else None,
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["commandline"] = shlex.join(["pytest", *config.invocation_params.args])
