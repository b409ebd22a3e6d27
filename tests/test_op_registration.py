"""torch.library plumbing: opcheck on every op, and torch.compile(fullgraph=True) through both ops."""

import pytest
import torch

import tp_kernels
from tp_kernels.gate_top1.op import gate_top1_fwd
from tp_kernels.routed_lora.op import routed_lora_bwd, routed_lora_fwd


def _lora_args(n=24, d_in=16, d_out=12, rank=4, n_exp=3, n_slice=3, gate=True, grad=True):
    x = torch.randn(n, d_in, requires_grad=grad)
    idx = torch.randint(0, n_exp, (n,))
    a = torch.randn(n_exp, n_slice, rank, d_in, requires_grad=grad)
    b = torch.randn(n_exp, n_slice, d_out, rank, requires_grad=grad)
    g = torch.rand(n, requires_grad=grad) if gate else None
    return x, idx, a, b, g


@pytest.mark.parametrize("use_gate", [False, True])
def test_opcheck_routed_lora_fwd(use_gate):
    x, idx, a, b, g = _lora_args(gate=use_gate)
    torch.library.opcheck(routed_lora_fwd, (x, idx, a, b, g, 0.5))


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False)])
def test_opcheck_routed_lora_bwd(needs):
    x, idx, a, b, g = _lora_args(grad=False)
    y, h, perm, offsets = routed_lora_fwd(x, idx, a, b, g, 0.5)
    torch.library.opcheck(routed_lora_bwd, (torch.randn_like(y), x, idx, a, b, g, h, perm, offsets, 0.5, *needs))


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("with_noise", [True, False])
def test_opcheck_gate(hard, with_noise):
    logits = torch.randn(17, 5, requires_grad=True)
    noise = tp_kernels.gumbel_noise(logits.shape) if with_noise else None
    torch.library.opcheck(gate_top1_fwd, (logits, noise, 5.0, hard))


class RoutedQKV(torch.nn.Module):
    """The smallest user of both ops: a router picks a LoRA expert per token for a fused QKV."""

    def __init__(self, dim=16, rank=4, n_exp=3):
        super().__init__()
        self.router = torch.nn.Linear(dim, n_exp)
        self.lora_a = torch.nn.Parameter(torch.randn(n_exp, 3, rank, dim) / dim**0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(n_exp, 3, dim, rank) / rank**0.5)

    def forward(self, x, noise):
        idx, gate = tp_kernels.gate_top1(self.router(x), tau=5.0, noise=noise)
        return tp_kernels.routed_lora(x, idx, self.lora_a, self.lora_b, gate=gate, scale=0.5)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    module = RoutedQKV()
    x = torch.randn(2, 10, 16, requires_grad=True)
    noise = tp_kernels.gumbel_noise((2, 10, 3), generator=torch.Generator().manual_seed(0))
    y_eager = module(x, noise)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x, *module.parameters()])
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    y = compiled(x, noise)
    grads = torch.autograd.grad(y.square().sum(), [x, *module.parameters()])
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[1:3]), "the router must receive the straight-through gradient"
