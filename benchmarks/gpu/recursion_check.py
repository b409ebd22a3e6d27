"""The recursion end to end: one training step on the device against the same step on CPU in float64.

Two models a user trains: a ``ThinkingPixelDiT`` (our DiT with the recursion) and a diffusers
``DiTTransformer2DModel`` wrapped by ``apply_recursion``; 2, 3 and 5 experts; the recursion in two of three blocks,
so the second's gradients flow back through the first. Every weight is moved off its init (the experts' B too, so
the recursion changes the output). The device copy runs in fp32 with TF32 off (matmuls and convolutions), eagerly
and with its blocks compiled; the reference is a float64 copy on CPU. The step is forward, MSE loss and backward;
compared are the output, the loss, the gradient of every trainable tensor (experts, gates) and of the input latent.

Like for like: both copies get the same gate noise (noise.fixed_noise: no near-ties, so fp32 and float64 route
alike) and no label dropout; the routing of every step is recorded in the eager run and its disagreements with the
reference are counted (a flip would change that token's gradient; the count is reported beside the errors).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from .env import compiled_blocks, describe, full_fp32
from .noise import fixed_noise

TOL = 1e-3  # max |device - float64| / max |float64| per tensor; the bug class this guards against reads 0.4


@dataclasses.dataclass(frozen=True)
class RecursionCase:
    kind: str  # "ThinkingPixelDiT" | "diffusers DiT + apply_recursion"
    experts: int
    steps: int = 3
    compiled: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}, M={self.experts} T={self.steps}{', compiled' if self.compiled else ''}"


KINDS = ("ThinkingPixelDiT", "diffusers DiT + apply_recursion")
SIZE = dict(input_size=16, hidden=64, heads=4, depth=3, layers=(0, 2), rank=16, batch=4, classes=10)  # 256 tokens
TINY = dict(SIZE, input_size=8, hidden=32, heads=2, rank=8, batch=2)


def recursion_cases(compiled: bool = True, experts=(2, 3, 5)) -> list[RecursionCase]:
    cases = [RecursionCase(kind, m) for kind in KINDS for m in experts]
    return cases + ([dataclasses.replace(c, compiled=True) for c in cases] if compiled else [])


def build_model(case: RecursionCase, size: dict, seed: int = 0):
    """The case's model on CPU in fp32, every parameter perturbed (seeded), in train mode, no label dropout."""
    from thinking_pixel import DiT, DiTConfig, RecursionConfig, apply_recursion

    torch.manual_seed(seed)
    recursion = RecursionConfig(layers=size["layers"], experts=case.experts, steps=case.steps, rank=size["rank"])
    if case.kind == KINDS[0]:
        model = DiT(DiTConfig(input_size=size["input_size"], patch_size=2, in_channels=4, hidden_size=size["hidden"],
                              depth=size["depth"], num_heads=size["heads"], num_classes=size["classes"],
                              class_dropout_prob=0.0))
    else:
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(num_attention_heads=size["heads"],
                                      attention_head_dim=size["hidden"] // size["heads"], in_channels=4,
                                      out_channels=8, num_layers=size["depth"], sample_size=size["input_size"],
                                      patch_size=2, num_embeds_ada_norm=size["classes"])
        no_label_dropout(model)
    model = apply_recursion(model, recursion)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def no_label_dropout(model):
    """diffusers' DiT drops class labels at random in training (on the device's generator): off, for comparisons."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def make_inputs(size: dict, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    n, s = size["batch"], size["input_size"]
    x = torch.randn(n, 4, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, size["classes"], (n,), generator=g)
    return x, t, y, torch.randn(n, 8, s, s, generator=g)


def forward(model, x, t, y):
    from thinking_pixel import DiT

    return model(x, t, y) if isinstance(model, DiT) else model(hidden_states=x, timestep=t, class_labels=y).sample


def _recursions(model):
    from thinking_pixel.recursion.layers import LatentRecursion

    return [m for m in model.modules() if isinstance(m, LatentRecursion)]


def train_step(model, inputs, record: bool):
    """forward, MSE, backward -> ({name: tensor} of output, loss and gradients on CPU in float64, routing list)."""
    x, t, y, target = inputs
    x = x.detach().clone().requires_grad_()
    routing = []
    for module in _recursions(model):
        module.recorder = (lambda step, idx, state: routing.append(idx.detach().cpu())) if record else None
    try:
        out = forward(model, x, t, y)
        loss = (out - target).square().mean()
        loss.backward()
    finally:
        for module in _recursions(model):
            module.recorder = None
    result = {"output": out.detach(), "loss": loss.detach(), "d input": x.grad}
    result.update({f"d {name.replace('_orig_mod.', '')}": p.grad  # the same names with compiled blocks
                   for name, p in model.named_parameters() if p.requires_grad})
    return {k: v.detach().double().cpu() for k, v in result.items()}, routing


def relative_errors(got: dict, want: dict) -> dict:
    """max |got - want| / max |want| per tensor (absolute where the reference is all zeros)."""
    errors = {}
    for name, ref in want.items():
        scale = ref.abs().max().item()
        errors[name] = (got[name] - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    return errors


def run_case(case: RecursionCase, device, size: dict, backend: str) -> dict:
    model = build_model(case, size)
    inputs = make_inputs(size)
    with fixed_noise() as noise:
        want, want_routing = train_step(copy.deepcopy(model).double(), [t.double() if t.is_floating_point() else t
                                                                          for t in inputs], record=True)
        drawn = noise.calls
        on_device = copy.deepcopy(model).to(device)
        device_inputs = [t.to(device) for t in inputs]
        with full_fp32():
            if case.compiled:
                with compiled_blocks(on_device, backend):
                    got, routing = train_step(on_device, device_inputs, record=False)
            else:
                got, routing = train_step(on_device, device_inputs, record=True)
    errors = relative_errors(got, want)
    flips = (sum(int((a != b).sum()) for a, b in zip(routing, want_routing)) if routing else None)
    worst = max(errors, key=errors.get)
    return dict(noise_calls=drawn, errors=errors, worst=worst, max_error=errors[worst], tolerance=TOL,
                routing_flips=flips, routed_tokens=sum(r.numel() for r in want_routing),
                passed=bool(drawn > 0 and errors[worst] <= TOL))


def check_recursion(device, size: dict = SIZE, backend: str = "inductor", compiled: bool = True,
                    experts=(2, 3, 5), budget=None) -> list[dict]:
    """Every case's errors and pass/fail; a compiled case runs only while ``budget`` has time for it."""
    results = []
    for case in recursion_cases(compiled, experts):
        if case.compiled and budget is not None and not budget.allows(f"recursion: {case.name}", need=30):
            continue
        start = time.perf_counter()
        row = dict(case=case.name, model=case.kind, experts=case.experts, steps=case.steps, compiled=case.compiled)
        try:
            row.update(run_case(case, device, size, backend))
        except Exception as err:  # noqa: BLE001 -- recorded as the case's failure
            row.update(passed=False, error=describe(err))
        row["seconds"] = time.perf_counter() - start
        results.append(row)
    return results
