"""End-to-end fine-tuning step of diffusers models: thinking_pixel.apply_recursion against diffusers + peft.

A step is forward, MSE loss, backward and AdamW (torch's fused implementation) over the trainable parameters, fp32,
base weights frozen. Variants of one case (the same diffusers model, the same inputs):

    base            the frozen model; the recursive blocks' Q/K/V outputs marked as needing a gradient, so its
                    backward runs the same path as a wrapped model's down to them (and it has nothing to update)
    apply_recursion thinking_pixel.apply_recursion: the fused routed experts (tp_kernels.refine_step)
    peft dense      thinking_pixel.recursion.peft.add_peft_experts(mode="dense"): M peft LoRA adapters on
                    to_q / to_k / to_v, every expert on every token, mixed by the one-hot gate
    peft masked     the same with a boolean mask per expert (each token through its own expert only)
    DiT base / DiT apply_recursion (DiT cases): dit_from_diffusers of the same model, our fused-qkv DiT

The peft variants get the experts and gates of the apply_recursion model (copy_experts_to_peft); before timing,
one forward of each in train mode with the same seed must agree with it (max |difference| is recorded).

The machine is shared, so the variants are timed interleaved: each round runs every variant once, in an order
rotated every round, and the recursion's *added time* is the median over rounds of (variant - base) measured in the
same round. pytest-benchmark's own row is the round (all variants); the per-variant times are in extra_info, which
``python -m benchmarks.report`` turns into BENCHMARKS.md's fine-tuning section. The FLOP model (flop_model.py)
predicts each added time as the added FLOPs (recursion_costs, backward 2x, attention's 2.5x, AdamW, and the dX of the
frozen Q/K/V projections in the blocks after the first) run at the base step's measured FLOP rate. The base's FLOPs
count what it runs: its forward and a dX-only backward (its weights get no gradient) that stops at its Q/K/V outputs
(flop_model.qkv_leaf_backward).

Full run: diffusers DiT at DiT-S/2 and DiT-XL/2 widths (2 blocks, both recursive, 256 tokens) and a small SD3
(2 joint blocks, 256 image + 77 text tokens), with M=5 T=5 and M=2 T=2 at rank 128. --quick: small widths, rank 16.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import pytest
import torch

from . import flop_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from thinking_pixel import RecursionConfig, apply_recursion  # noqa: E402
from thinking_pixel.models import DiT, dit_from_diffusers  # noqa: E402
from thinking_pixel.recursion.peft import add_peft_experts, copy_experts_to_peft  # noqa: E402

ELEM = 4  # fp32


@dataclass(frozen=True)
class FinetuneCase:
    kind: str  # "dit" (DiTTransformer2DModel) or "sd3" (SD3Transformer2DModel)
    width_name: str
    heads: int
    head_dim: int
    depth: int
    sample_size: int  # latent side; patch 2
    batch: int
    recursions: tuple
    rounds: int
    ctx: int = 0  # text tokens (SD3)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def seq(self) -> int:
        return (self.sample_size // 2) ** 2

    @property
    def label(self) -> str:
        text = f" + {self.ctx} text" if self.ctx else ""
        name = dict(dit="DiT", sd3="SD3")[self.kind]
        return (f"{name} {self.width_name} width (D={self.dim}, {self.depth} blocks, all recursive) | "
                f"batch {self.batch} x {self.seq} tokens{text}")


def _recursions(rank):
    return (RecursionConfig(experts=5, steps=5, rank=rank), RecursionConfig(experts=2, steps=2, rank=rank))


FULL = [
    FinetuneCase("dit", "DiT-S/2", 6, 64, 2, 32, 4, _recursions(128), rounds=7),
    FinetuneCase("dit", "DiT-XL/2", 16, 72, 2, 32, 2, _recursions(128), rounds=4),
    FinetuneCase("sd3", "small", 6, 64, 2, 32, 2, _recursions(128), rounds=5, ctx=77),
]
QUICK = [
    FinetuneCase("dit", "tiny", 2, 32, 2, 16, 2, _recursions(16), rounds=2),
    FinetuneCase("sd3", "tiny", 2, 32, 2, 16, 2, _recursions(16), rounds=2, ctx=16),
]
SD3_TEXT_DIM, SD3_POOLED_DIM = 256, 256


def build_base(case: FinetuneCase):
    """The case's diffusers model (seeded init; DiT blocks share block 0's embedders, as converted checkpoints do)."""
    torch.manual_seed(0)
    if case.kind == "dit":
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=case.heads, attention_head_dim=case.head_dim, in_channels=4, out_channels=8,
            num_layers=case.depth, sample_size=case.sample_size, patch_size=2, num_embeds_ada_norm=1000)
        with torch.no_grad():
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    else:
        model = diffusers.SD3Transformer2DModel(
            sample_size=case.sample_size, patch_size=2, in_channels=16, num_layers=case.depth,
            attention_head_dim=case.head_dim, num_attention_heads=case.heads, joint_attention_dim=SD3_TEXT_DIM,
            caption_projection_dim=case.dim, pooled_projection_dim=SD3_POOLED_DIM, out_channels=16,
            pos_embed_max_size=case.sample_size)
    return model.requires_grad_(False).train()


def make_inputs(case: FinetuneCase, device):
    """(model inputs for diffusers, target) seeded."""
    g = torch.Generator(device=device).manual_seed(1)
    channels = 4 if case.kind == "dit" else 16
    x = torch.randn(case.batch, channels, case.sample_size, case.sample_size, generator=g, device=device)
    t = torch.randint(0, 1000, (case.batch,), generator=g, device=device)
    if case.kind == "dit":
        inputs = dict(hidden_states=x, timestep=t, class_labels=torch.randint(0, 1000, (case.batch,), generator=g,
                                                                             device=device))
        target = torch.randn(case.batch, 8, case.sample_size, case.sample_size, generator=g, device=device)
    else:
        inputs = dict(hidden_states=x, timestep=t,
                      encoder_hidden_states=torch.randn(case.batch, case.ctx, SD3_TEXT_DIM, generator=g, device=device),
                      pooled_projections=torch.randn(case.batch, SD3_POOLED_DIM, generator=g, device=device))
        target = torch.randn_like(x)
    return inputs, target


def _require_grad_from(modules):
    """Forward hooks making these modules' outputs leaves that need a gradient (the frozen base's backward path)."""
    for module in modules:
        module.register_forward_hook(lambda m, args, out: out.detach().requires_grad_())


def _qkv_modules(model, layers):
    if isinstance(model, DiT):
        return [model.blocks[i].attn.qkv for i in layers]
    blocks = model.transformer_blocks
    attn = [blocks[i].attn1 if hasattr(blocks[i], "attn1") else blocks[i].attn for i in layers]  # DiT / SD3
    return [getattr(a, p) for a in attn for p in ("to_q", "to_k", "to_v")]


def _forward(model, inputs):
    if isinstance(model, DiT):
        return model(inputs["hidden_states"], inputs["timestep"], inputs["class_labels"])
    return model(**inputs).sample


def make_step(model, inputs, target):
    """One fine-tuning step (forward, MSE, backward, AdamW over whatever requires grad)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True) if params else None

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = (_forward(model, inputs) - target).square().mean()
        loss.backward()
        if opt is not None:
            opt.step()

    return step


def _perturb_experts(model, seed):
    """Trained-looking experts: every LoRA B moved off zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_variants(case: FinetuneCase, device):
    """{variant name: model}, the per-variant added-FLOP parts, and the max |output difference| of the peft
    variants from apply_recursion's (train mode, same seed)."""
    base = build_base(case).to(device)
    inputs, _ = make_inputs(case, device)
    layers = tuple(range(case.depth))
    variants = {"base": copy.deepcopy(base)}
    _require_grad_from(_qkv_modules(variants["base"], layers))
    agreement = {}
    for r, recursion in enumerate(case.recursions):
        recursion = RecursionConfig(**{**recursion.to_dict(), "layers": layers})
        tag = f"M={recursion.experts} T={recursion.steps}"
        ours = apply_recursion(copy.deepcopy(base), recursion).train()
        _perturb_experts(ours, seed=r)
        variants[f"apply_recursion {tag}"] = ours
        for mode in ("dense", "masked"):
            peft_model = copy_experts_to_peft(ours, add_peft_experts(copy.deepcopy(base), recursion, mode=mode))
            variants[f"peft {mode} {tag}"] = peft_model.train()
            with torch.no_grad():
                torch.manual_seed(7)
                want = _forward(ours, inputs)
                torch.manual_seed(7)
                got = _forward(peft_model, inputs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            agreement[f"peft {mode} {tag}"] = (got - want).abs().max().item()
    if case.kind == "dit":
        dit = dit_from_diffusers(base).to(device).requires_grad_(False).train()
        variants["DiT base"] = copy.deepcopy(dit)
        _require_grad_from(_qkv_modules(variants["DiT base"], layers))
        recursion = RecursionConfig(**{**case.recursions[0].to_dict(), "layers": layers})
        dit_ours = apply_recursion(dit, recursion).train()
        _perturb_experts(dit_ours, seed=0)
        variants[f"DiT apply_recursion M={recursion.experts} T={recursion.steps}"] = dit_ours
    return variants, agreement


def flop_parts(case: FinetuneCase):
    """The base step's FLOP-model parts and, per recursion tag and experts impl, the added train-step parts."""
    if case.kind == "dit":
        from thinking_pixel import DiTConfig

        config = DiTConfig(input_size=case.sample_size, patch_size=2, in_channels=4, hidden_size=case.dim,
                           depth=case.depth, num_heads=case.heads)
        forward = flop_model.dit_costs(config, case.batch, ELEM)
    else:
        forward = flop_model.mmdit_costs(case.batch, case.seq, case.ctx, case.dim, case.heads, case.depth, ELEM,
                                         patch_in=16 * 4, patch_out=16 * 4, joint_dim=SD3_TEXT_DIM,
                                         pooled_dim=SD3_POOLED_DIM)
    # what the base runs: a dX-only backward, none through its Q/K/V projections (their outputs are leaves)
    base = [(f"fwd {name}", cost) for name, cost in forward] + flop_model.qkv_leaf_backward(forward)
    # The input x~ of a recursive block needs a gradient wherever it depends on an earlier block's experts: in the
    # blocks after the first, the frozen Q/K/V projection of x~ (the last step's base) runs its dX; in the first,
    # the first step (whose state is x~) computes no dX through its experts and gate.
    n_tok = case.batch * case.seq
    base_qkv_dx = (case.depth - 1) * flop_model.linear(n_tok, case.dim, 3 * case.dim, ELEM, bias=False)
    # SD3's last block discards its text output, so a wrapped one computes no text queries (diffusers' does): their
    # projection and their rows of the attention, forward and backward
    text_queries = flop_model.Cost(0, 0) if not case.ctx else (
        2 * flop_model.linear(case.batch * case.ctx, case.dim, case.dim, ELEM)  # forward, dX
        + 3 * flop_model.sdpa(case.batch, case.ctx, case.dim, case.heads, ELEM, kv_seq=case.seq + case.ctx))
    added = {}
    for recursion in case.recursions:
        tag = f"M={recursion.experts} T={recursion.steps}"
        params = case.depth * flop_model.recursion_parameters(case.dim, recursion)
        first_step_dx = flop_model.Cost(2 * n_tok * 3 * recursion.rank * case.dim
                                        + 2 * n_tok * case.dim * recursion.experts, 0)
        for impl in ("ours", "dense", "masked"):
            layer = flop_model.recursion_costs(case.batch, case.seq, case.dim, case.heads, ELEM, recursion,
                                               ctx=case.ctx, experts_impl=impl)
            experts_dx = first_step_dx * (recursion.experts if impl == "dense" else 1)
            added[(tag, impl)] = (flop_model.train_step_costs([(n, case.depth * c) for n, c in layer], params)
                                  + [("bwd base qkv dX (blocks after the first)", base_qkv_dx),
                                     ("bwd no experts' and gate dX at the first block's first step", -1 * experts_dx),
                                     ("no text queries in the last block (fwd + bwd)", -1 * text_queries)])
    return base, added


@pytest.fixture(scope="module", params=range(3), ids=lambda i: ["dit-small", "dit-large", "sd3"][i])
def case(request, quick):
    cases = QUICK if quick else FULL
    if request.param >= len(cases):
        pytest.skip("not in --quick")
    return cases[request.param]


def test_finetune_step(benchmark, device, case):
    variants, agreement = build_variants(case, device)
    inputs, target = make_inputs(case, device)
    steps = {name: make_step(model, inputs, target) for name, model in variants.items()}
    for step in steps.values():  # warm-up: first-touch allocations, the extension's thread pool
        step()
    names = list(steps)
    times = {name: [] for name in names}
    rounds_done = []

    def one_round():
        k = len(rounds_done)
        for name in names[k % len(names):] + names[:k % len(names)]:  # rotated order
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
        rounds_done.append(k)

    load_before = os.getloadavg()
    benchmark.group = f"finetune step | {case.label} | fp32"
    benchmark.pedantic(one_round, rounds=case.rounds, iterations=1, warmup_rounds=0)
    base_parts, added = flop_parts(case)
    benchmark.extra_info.update(
        op="finetune_step", impl="round (every variant once)", case=case.label, kind=case.kind, dim=case.dim,
        seq=case.seq, ctx=case.ctx, batch=case.batch, depth=case.depth, rank=case.recursions[0].rank,
        times=times, output_agreement=agreement, load_avg_before=load_before, load_avg_after=os.getloadavg(),
        torch_threads=torch.get_num_threads(),
        flops_base_step=flop_model.total(base_parts).flops,
        flops_added={f"{tag} {impl}": flop_model.total(parts).flops for (tag, impl), parts in added.items()},
    )
