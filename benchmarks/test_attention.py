"""tp_kernels.joint_attention (inference: forward; training: forward + backward) against torch's
scaled_dot_product_attention on the same fused projections, at the recursion's attention shapes of the diffusers
fine-tuning benchmark.

"ours" is what a recursion step runs on CPU with the extension built: the kernel reading the heads out of qkv
(N, T, 3D) and the context rows in place, one (batch, head)'s score block at a time in cache, the backward
rebuilding the softmax from its logsumexp. "sdpa" is the composed path: split heads, concatenate the context's
keys and values, torch's (flash) attention, merge heads. Both get the same inputs, and their outputs are checked
to agree first.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tp_kernels
from tp_kernels.joint_attention.torch import joint_attention_composed

from . import flop_model


@dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    tokens: int
    heads: int
    head_dim: int
    ctx: int = 0

    @property
    def key(self) -> str:
        text = f" + {self.ctx} text keys" if self.ctx else ""
        return f"{self.name}: N={self.batch} T={self.tokens}{text} H={self.heads} Dh={self.head_dim}"


FULL = [AttentionShape("DiT-S/2 width", 4, 256, 6, 64), AttentionShape("DiT-XL/2 width", 2, 256, 16, 72),
        AttentionShape("SD3 small", 2, 256, 6, 64, ctx=77)]
QUICK = [AttentionShape("tiny", 2, 64, 2, 32), AttentionShape("tiny joint", 2, 64, 2, 32, ctx=16)]


def pytest_generate_tests(metafunc):
    if "attention_shape" in metafunc.fixturenames:
        shapes = QUICK if metafunc.config.getoption("quick") else FULL
        metafunc.parametrize("attention_shape", shapes, ids=[s.name.replace(" ", "-") for s in shapes])


def _impl(name):
    if name == "ours":
        return lambda qkv, heads, k, v: tp_kernels.joint_attention(qkv, heads, None, k, v)
    return lambda qkv, heads, k, v: joint_attention_composed(qkv, heads, None, k, v)


@pytest.mark.parametrize("impl", ["ours", "sdpa"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_joint_attention(bench, device, attention_shape, mode, impl):
    if device.type != "cpu":
        pytest.skip("the kernel is the CPU path; on GPU both names run torch's attention")
    s = attention_shape
    g = torch.Generator().manual_seed(0)
    dim = s.heads * s.head_dim
    qkv = torch.randn(s.batch, s.tokens, 3 * dim, generator=g).requires_grad_(mode == "fwd+bwd")
    k = torch.randn(s.batch, s.ctx, dim, generator=g) if s.ctx else None
    v = torch.randn(s.batch, s.ctx, dim, generator=g) if s.ctx else None
    grad_out = torch.randn(s.batch, s.tokens, dim, generator=g)
    fn = _impl(impl)
    torch.testing.assert_close(fn(qkv, s.heads, k, v), _impl("sdpa" if impl == "ours" else "ours")(qkv, s.heads, k, v),
                               rtol=1e-4, atol=1e-5)

    if mode == "fwd+bwd":
        def step():
            return torch.autograd.grad(fn(qkv, s.heads, k, v), qkv, grad_out)
    else:  # inference, as sampling runs it
        def step():
            with torch.no_grad():
                return fn(qkv, s.heads, k, v)

    cost = flop_model.sdpa(s.batch, s.tokens, dim, s.heads, 4, kv_seq=s.tokens + s.ctx)
    if mode == "fwd+bwd":
        cost = (1 + flop_model.ATTENTION_BACKWARD) * cost
    bench(step, group=f"joint_attention {mode} | {s.key} | float32", impl=impl, cost=cost, dtype=torch.float32,
          op="joint_attention", mode=mode, shape=s.__dict__)
