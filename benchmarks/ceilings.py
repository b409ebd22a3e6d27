"""Machine ceilings, measured in the same run as the benchmarks they put in scale.

* GEMM FLOP/s for fp32 and bf16: a square ``n x n @ n x n`` matmul, ``2 n^3`` FLOPs.
* Copy bandwidth: ``dst.copy_(src)`` of a buffer much larger than the caches,
  counting bytes read plus bytes written.

A benchmark's floor is its roofline time: ``max(flops / gemm_ceiling(dtype), bytes / copy_bandwidth)``.
``fraction of floor`` in the report is measured time / floor (1.0 would be the machine's limit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .timing import median_seconds

GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Ceilings:
    device: str
    gemm_n: int
    gemm_flops: dict  # dtype name -> FLOP/s (median round)
    copy_bytes: int  # bytes moved per copy (read + write)
    copy_bandwidth: float  # bytes/s (median round)
    rounds: int

    def floor_seconds(self, flops: float, nbytes: float, dtype: torch.dtype) -> float:
        """Roofline time of work with ``flops`` FLOPs and ``nbytes`` bytes of traffic in ``dtype``."""
        peak = self.gemm_flops[dtype_name(dtype)]
        return max(flops / peak, nbytes / self.copy_bandwidth)

    def as_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in GEMM_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no GEMM ceiling is measured for dtype {dtype}; expected one of {list(GEMM_DTYPES)}")


def measure(device: torch.device, *, gemm_n: int, copy_mib: int, rounds: int) -> Ceilings:
    """Time the ceiling kernels on ``device`` (median of ``rounds`` after one warm-up)."""
    gen = torch.Generator(device=device).manual_seed(0)
    flops = {}
    for name, dtype in GEMM_DTYPES.items():
        a = torch.randn(gemm_n, gemm_n, generator=gen, device=device).to(dtype)
        b = torch.randn(gemm_n, gemm_n, generator=gen, device=device).to(dtype)
        out = torch.empty(gemm_n, gemm_n, device=device, dtype=dtype)
        median, _ = median_seconds(lambda: torch.mm(a, b, out=out), device, rounds=rounds)
        flops[name] = 2 * gemm_n**3 / median
        del a, b, out
    numel = copy_mib * 2**20 // 4
    src = torch.randn(numel, generator=gen, device=device)
    dst = torch.empty_like(src)
    median, _ = median_seconds(lambda: dst.copy_(src), device, rounds=rounds)
    copy_bytes = 2 * numel * 4
    return Ceilings(str(device), gemm_n, flops, copy_bytes, copy_bytes / median, rounds)
