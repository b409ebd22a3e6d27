"""Gumbel noise that is the same numbers on every device, so a CUDA step and a CPU step route alike.

The recursion draws its gate's noise with ``tp_kernels.gumbel_noise(shape, device=...)``, i.e. from the device's
own generator: CUDA's Philox stream and the CPU's Mersenne twister give different numbers for the same seed. Inside
:func:`fixed_noise` that function is replaced by :func:`hashed_gumbel`, a pure function of the element index and a
seed computed with exact int64 arithmetic on the device (then two float64 logs), so the numbers do not depend on the
device, the dtype of the model or torch.compile (it traces into the graph; no generator object to break it).
"""

from __future__ import annotations

import contextlib
import math

import torch

import tp_kernels

_MASK = (1 << 31) - 1  # 31-bit state: x * 1103515245 stays below 2^62, no int64 overflow on any device


def hashed_gumbel(shape, *, generator=None, device=None, dtype=torch.float32, seed: int = 0):
    """Gumbel(0, 1) samples of ``shape``: element i is a fixed function of (i, seed). ``generator`` is accepted for
    gumbel_noise's signature and ignored."""
    x = (torch.arange(math.prod(shape), device=device, dtype=torch.int64) + seed * 40503) & _MASK
    for _ in range(3):  # LCG rounds with an xorshift: neighbouring indices decorrelate
        x = (x * 1103515245 + 12345) & _MASK
        x = x ^ (x >> 13)
    u = (x.to(torch.float64) + 0.5) * 2.0 ** -31  # (0, 1)
    return (-(-u.log()).log()).to(dtype).reshape(shape)


class NoiseCounter:
    """How many times the recursion asked for noise (eager calls; a compiled graph calls inside the graph)."""

    def __init__(self):
        self.calls = 0


@contextlib.contextmanager
def fixed_noise(seed: int = 0):
    """``tp_kernels.gumbel_noise`` replaced by :func:`hashed_gumbel` inside the block; yields a NoiseCounter, so a
    check can tell that the recursion drew its noise there (a zero count means its noise came from elsewhere and a
    device comparison would not be like for like)."""
    counter = NoiseCounter()
    original = tp_kernels.gumbel_noise

    def gumbel(shape, *, generator=None, device=None, dtype=torch.float32):
        if not torch.compiler.is_compiling():
            counter.calls += 1
        return hashed_gumbel(shape, device=device, dtype=dtype, seed=seed)

    tp_kernels.gumbel_noise = gumbel
    try:
        yield counter
    finally:
        tp_kernels.gumbel_noise = original
