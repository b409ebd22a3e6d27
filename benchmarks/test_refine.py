"""One recursive refinement step: tp_kernels.refine_step (fused) against the unfused module sequence.

The unfused sequence computes the same step one op at a time: LayerNorm, the gate's token
Linear + conditioning logits, tp_kernels.gate_top1, tp_kernels.routed_lora with the gate weight, and the
base added as a separate pass. Both get identical inputs (the conditioning logits precomputed for both);
outputs are checked equal before timing. Steps: "intermediate" (LoRA only) and "final" (plus the base).
Modes: fwd (eval: no_grad, no noise) and fwd+bwd (training: Gumbel noise, grads for every input).
Full run: DiT-S/2 block shape (D=384, batch 16 x 256 tokens, M=5, R=32); --quick: a small one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import tp_kernels

from . import flop_model
from .shapes import DTYPES, LoraShape


@dataclass(frozen=True)
class RefineShape(LoraShape):
    """A refinement step's problem: a routed-LoRA shape (``experts`` = M), keyed by the block it stands for."""

    @property
    def key(self) -> str:
        return f"{self.label}: {self.batch} x {self.seq} tokens D={self.d} R={self.rank} M={self.experts}"


FULL = RefineShape("DiT-S/2 block", 16, 256, 384, 32, 5)
QUICK = RefineShape("quick", 4, 64, 128, 16, 5)
TAU, SCALE = 5.0, 1.0
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


@pytest.fixture(scope="module")
def shape(quick) -> RefineShape:
    return QUICK if quick else FULL


@functools.lru_cache(maxsize=1)
def make_inputs(shape, dtype_name, device, backward, final):
    """Seeded inputs, identical for every impl: dict of the refine_step arguments plus grad_qkv."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[dtype_name]
    b, t, d, r, e = shape.batch, shape.seq, shape.d, shape.rank, shape.experts

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=gen, device=device) * std).to(dtype)

    inputs = dict(
        state=randn(b, t, d),  # (N, T, D) the step's input a
        lora_a=randn(e, 3, r, d, std=d ** -0.5),
        lora_b=randn(e, 3, d, r, std=0.02),  # trained-looking experts: B away from its zero init
        token_weight=randn(e, d, std=0.02),
        cond_logits=torch.randn(b, 1, e, generator=gen, device=device),  # biases + cond_proj(SiLU(cond))
        noise=tp_kernels.gumbel_noise((b, t, e), generator=gen, device=device) if backward else None,
        base=randn(b, t, 3 * d) if final else None,  # W^ x~ at the final step
    )
    inputs["grad_qkv"] = randn(b, t, 3 * d)
    if backward:
        for name in ("state", "lora_a", "lora_b", "token_weight", "cond_logits", "base"):
            if inputs[name] is not None:
                inputs[name].requires_grad_(True)
    return inputs


def fused(state, lora_a, lora_b, token_weight, cond_logits, noise, base):
    qkv, _, _ = tp_kernels.refine_step(state, lora_a, lora_b, token_weight=token_weight, cond_logits=cond_logits,
                                       tau=TAU, noise=noise, scale=SCALE, base=base)
    return qkv


def unfused(state, lora_a, lora_b, token_weight, cond_logits, noise, base):
    h = F.layer_norm(state, (state.shape[-1],), eps=1e-6)  # (N, T, D)
    logits = F.linear(h, token_weight) + cond_logits  # (N, T, M)
    idx, weight = tp_kernels.gate_top1(logits, tau=TAU, noise=noise)
    qkv = tp_kernels.routed_lora(h, idx, lora_a, lora_b, scale=SCALE, gate=weight.to(h.dtype))  # (N, T, 3D)
    return qkv if base is None else qkv + base


IMPLS = {"ours": fused, "unfused": unfused}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("step_kind", ["intermediate", "final"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_refine_step(bench, device, shape, mode, dtype_name, step_kind, impl):
    backward = mode == "fwd+bwd"
    inputs = make_inputs(shape, dtype_name, device, backward, step_kind == "final")
    args = {k: v for k, v in inputs.items() if k != "grad_qkv"}
    forward = functools.partial(IMPLS[impl], **args)
    if impl != "ours":
        tol = TOLERANCE[dtype_name]
        with torch.no_grad():
            torch.testing.assert_close(forward().float(), fused(**args).float(), rtol=tol, atol=tol)

    if backward:
        leaves = [v for v in args.values() if v is not None and v.requires_grad]

        def step():
            return torch.autograd.grad(forward(), leaves, inputs["grad_qkv"])
    else:
        def step():
            with torch.no_grad():
                return forward()

    dtype = DTYPES[dtype_name]
    cost = flop_model.refine_step(shape.tokens, shape.d, shape.rank, shape.experts, dtype.itemsize,
                                  base=step_kind == "final", backward=backward)
    bench(step, group=f"refine_step {mode} | {step_kind} step | {shape.key} | {dtype_name}", impl=impl, cost=cost,
          dtype=dtype, op="refine_step", mode=mode, baseline=impl == "unfused", shape=shape.as_dict())
