"""tp_kernels.layer_norm (no affine, fp32 statistics) against the two ways to get it from torch, on the tokens a
recursion step normalises.

"ours": the CPU kernel (one read of x, one write of y, whatever the dtype). "upcast": torch's LayerNorm on x cast to
fp32, cast back (what refine_step ran before the kernel; the composed path on other devices). "torch": torch's
LayerNorm in x's own dtype, which for bf16 keeps its statistics in bf16 (less accurate: tests/test_layer_norm.py),
a speed reference only. fwd runs under no_grad; fwd+bwd differentiates into x.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import tp_kernels
from tp_kernels.layer_norm.torch import layer_norm_composed

from . import flop_model
from .shapes import DTYPES

EPS = 1e-6


@dataclass(frozen=True)
class NormShape:
    label: str
    tokens: int
    dim: int

    @property
    def key(self) -> str:
        return f"{self.label}: T={self.tokens} D={self.dim}"


FULL = [NormShape("DiT-S/2 block", 16 * 256, 384), NormShape("DiT-XL/2 width", 2 * 256, 1152),
        NormShape("DiT-N/4 default", 64 * 16, 128)]
QUICK = [NormShape("quick", 256, 128)]
IMPLS = {
    "ours": lambda x: tp_kernels.layer_norm(x, EPS),
    "upcast": lambda x: layer_norm_composed(x, EPS),
    "torch": lambda x: F.layer_norm(x, (x.shape[-1],), eps=EPS),
}


def pytest_generate_tests(metafunc):
    if "norm_shape" in metafunc.fixturenames:
        shapes = QUICK if metafunc.config.getoption("quick") else FULL
        metafunc.parametrize("norm_shape", shapes, ids=[s.label.replace(" ", "-") for s in shapes])


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_layer_norm(bench, device, norm_shape, dtype_name, mode, impl):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(norm_shape.tokens, norm_shape.dim, generator=g, device=device) + 2).to(dtype)
    grad = torch.randn(x.shape, generator=g, device=device).to(dtype)
    fn = IMPLS[impl]
    with torch.no_grad():
        torch.testing.assert_close(fn(x), IMPLS["upcast"](x), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                   atol=2e-2 if dtype != torch.float32 else 1e-5)
    if mode == "fwd+bwd":
        x.requires_grad_()

        def step():
            return torch.autograd.grad(fn(x), x, grad)
    else:
        def step():
            with torch.no_grad():
                return fn(x)

    cost = flop_model.layer_norm(norm_shape.tokens, norm_shape.dim, dtype.itemsize)
    if mode == "fwd+bwd":
        cost = cost * 2  # reads x and dy, writes dx, a few FLOPs per element more
    bench(step, group=f"layer_norm {mode} | {norm_shape.key} | {dtype_name}", impl=impl, cost=cost, dtype=dtype,
          op="layer_norm", mode=mode, shape=norm_shape.__dict__)
