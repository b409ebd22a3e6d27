"""Gate noise that is the same numbers on every device and leaves no near-ties, so two runs route alike.

The recursion draws its gate's Gumbel noise with ``tp_kernels.gumbel_noise(shape, device=...)``, i.e. from the
device's own generator: CUDA's Philox stream and the CPU's generator give different numbers for the same seed. And
even with equal noise, Gumbel samples put two experts' scores within 1e-6 of each other for a few tokens in 10^5,
where fp32 and float64 (or two correct summation orders) may pick different experts and the gradients then differ
for a reason that is no bug. Inside :func:`fixed_noise` that function is replaced by :func:`decisive_noise`: per
token, one expert chosen by a hash gets ``+margin`` and the others a hashed value in (-1, 0); exact int64
arithmetic on the device, so the numbers do not depend on the device, the model's dtype or torch.compile (it traces
into the graph). The winner leads by at least ``margin - 1`` before the logits (a few units at most), so no
implementation's rounding can flip it, while the gate's softmax at tau = 5 stays far from saturated (its gradient is
part of what the checks compare).
"""

from __future__ import annotations

import contextlib
import math

import torch

import tp_kernels

_MASK = (1 << 31) - 1  # 31-bit state: x * 1103515245 stays below 2^62, no int64 overflow on any device
MARGIN = 8.0


def _hash(x):
    """int64 (any values) -> pseudo-random int64 in [0, 2^31), the same on every device."""
    x = x & _MASK
    for _ in range(3):  # LCG rounds with an xorshift: neighbouring indices decorrelate
        x = (x * 1103515245 + 12345) & _MASK
        x = x ^ (x >> 13)
    return x


def decisive_noise(shape, *, generator=None, device=None, dtype=torch.float32, seed: int = 0,
                   margin: float = MARGIN):
    """Noise of ``shape`` (..., E): per row, expert ``hash(row) % E`` gets ``margin``, the others a hashed value in
    (-1, 0). ``generator`` is accepted for gumbel_noise's signature and ignored."""
    n_exp = shape[-1]
    flat = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    row, col = flat // n_exp, flat % n_exp
    winner = _hash(row * 2 + 1 + seed * 40503) % n_exp
    loser = -(_hash(flat * 2 + seed * 40503).to(torch.float64) + 0.5) * 2.0 ** -31  # (-1, 0)
    return torch.where(col == winner, margin, loser).to(dtype).reshape(shape)


class NoiseCounter:
    """How many times the recursion asked for noise (eager calls; a compiled graph calls inside the graph)."""

    def __init__(self):
        self.calls = 0
        self.shapes = []


@contextlib.contextmanager
def fixed_noise(seed: int = 0):
    """``tp_kernels.gumbel_noise`` replaced by :func:`decisive_noise` inside the block; yields a NoiseCounter, so a
    check can tell that the recursion drew its noise there (a zero count means its noise came from elsewhere and a
    device comparison would not be like for like)."""
    counter = NoiseCounter()
    original = tp_kernels.gumbel_noise

    def noise(shape, *, generator=None, device=None, dtype=torch.float32):
        if not torch.compiler.is_compiling():
            counter.calls += 1
            counter.shapes.append(tuple(shape))
        return decisive_noise(shape, device=device, dtype=dtype, seed=seed)

    tp_kernels.gumbel_noise = noise
    try:
        yield counter
    finally:
        tp_kernels.gumbel_noise = original
