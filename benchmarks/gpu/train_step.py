"""Whole training steps of diffusers models with the recursion, variant by variant, on the same frozen weights.

A step is forward, MSE loss, backward and torch's fused AdamW over the trainable parameters, bf16 base weights
(the experts and gates in fp32, as apply_recursion keeps them), random weights, seeded inputs. Variants:

    frozen base       no recursion; the input latent requires grad, so the backward runs through every block down
                      to the input. Added time = a variant's step - this step, in the same mode (eager / compiled).
    apply_recursion   thinking_pixel.apply_recursion (tp_kernels.refine_step)
    dense einsum      processors.DenseEinsumProcessor: every expert on every token, mixed by the one-hot gate
    masked loop       processors.MaskedLoopProcessor: a boolean mask per expert
    peft (dense mix)  thinking_pixel.recursion.peft.add_peft_experts(mode="dense"): M peft adapters on
                      to_q / to_k / to_v, mixed by the one-hot gate; all bf16 (its gate computes in the
                      activations' dtype)

Eager, then the base, apply_recursion and dense einsum compiled (env.compiled_blocks: each block compiled). Each
variant is a model of its own, built on the device from the same seed (the same frozen weights), given the same
experts and gates, timed and freed before the next: one model on the device at a time, so peak memory is the
variant's. The gate noise is noise.fixed_noise's (the same on every variant, no near-ties), so:

- same function, exactly: each eager variant's fp32 model (TF32 off) runs one forward at a batch of 2 before going
  to bf16; compared with apply_recursion's (max |diff| / max |apply_recursion's output|);
- same function, as timed: each variant's first bf16 step's output against apply_recursion's eager one (relative
  L2 difference), next to the frozen base's difference from it (what the recursion changes).

Timing: the first call alone (compilation included when compiled), warm-up, then CUDA events around each timed step
(median); peak memory is torch's max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from ..timing import median_seconds
from .env import compiled_blocks, describe, full_fp32, synchronize
from .noise import fixed_noise
from .processors import PROCESSORS
from .recursion_check import no_label_dropout

OURS, BASE, PEFT = "apply_recursion", "frozen base", "peft (dense mix)"
CHECK_TOL = 1e-4  # fp32, TF32 off: the variants differ only in summation order


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    kind: str  # "dit" (DiTTransformer2DModel) | "sd3" (SD3Transformer2DModel)
    heads: int
    head_dim: int
    depth: int
    sample_size: int  # latent side; patch 2
    batch: int
    experts: int
    steps: int
    rank: int
    layers: tuple
    ctx: int = 0  # text tokens (SD3)
    text_dim: int = 0
    pooled_dim: int = 0

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        return (self.sample_size // 2) ** 2

    def describe(self) -> dict:
        return dict(dataclasses.asdict(self), dim=self.dim, image_tokens=self.tokens)


FULL = (
    ModelCase("DiT-XL/2", "dit", 16, 72, 28, 32, 32, experts=5, steps=5, rank=128, layers=(4, 8, 12)),
    ModelCase("SD3-medium", "sd3", 24, 64, 24, 64, 8, experts=2, steps=2, rank=128, layers=(4, 8, 12), ctx=333,
              text_dim=4096, pooled_dim=2048),
)
TINY = (
    ModelCase("DiT tiny", "dit", 2, 16, 5, 8, 2, experts=3, steps=2, rank=8, layers=(1, 3)),
    ModelCase("SD3 tiny", "sd3", 2, 16, 5, 8, 2, experts=2, steps=2, rank=8, layers=(1, 3), ctx=5, text_dim=12,
              pooled_dim=10),
)


def build_base(case: ModelCase, device):
    """The case's diffusers model with random weights (seeded), built on the device, frozen, fp32, train mode."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        if case.kind == "dit":
            model = diffusers.DiTTransformer2DModel(
                num_attention_heads=case.heads, attention_head_dim=case.head_dim, in_channels=4, out_channels=8,
                num_layers=case.depth, sample_size=case.sample_size, patch_size=2, num_embeds_ada_norm=1000)
            no_label_dropout(model)
        else:
            model = diffusers.SD3Transformer2DModel(
                sample_size=case.sample_size, patch_size=2, in_channels=16, num_layers=case.depth,
                attention_head_dim=case.head_dim, num_attention_heads=case.heads, joint_attention_dim=case.text_dim,
                caption_projection_dim=case.dim, pooled_projection_dim=case.pooled_dim, out_channels=16,
                pos_embed_max_size=192)  # SD3-medium's
    return model.to(device).requires_grad_(False).train()


def make_inputs(case: ModelCase, device, dtype, batch=None):
    """(forward kwargs, target), seeded on CPU."""
    g = torch.Generator().manual_seed(1)
    n, s = batch or case.batch, case.sample_size
    channels = 4 if case.kind == "dit" else 16
    x = torch.randn(n, channels, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    if case.kind == "dit":
        inputs = dict(hidden_states=x, timestep=t, class_labels=torch.randint(0, 1000, (n,), generator=g))
        target = torch.randn(n, 8, s, s, generator=g)
    else:
        inputs = dict(hidden_states=x, timestep=t, encoder_hidden_states=torch.randn(n, case.ctx, case.text_dim,
                                                                                      generator=g),
                      pooled_projections=torch.randn(n, case.pooled_dim, generator=g))
        target = torch.randn_like(x)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    return inputs, target.to(device, dtype)


def recursion_of(case: ModelCase):
    from thinking_pixel import RecursionConfig

    return RecursionConfig(layers=case.layers, experts=case.experts, steps=case.steps, rank=case.rank)


def _recursions(model):
    """The recursion modules (processors) of a model, in block order."""
    from thinking_pixel.recursion.layers import LatentRecursion

    return [m for m in model.modules() if isinstance(m, LatentRecursion)]


def expert_state(case: ModelCase, device) -> list:
    """The experts and gates every variant starts from: apply_recursion's init (seeded), every LoRA B moved off zero
    so that the recursion changes the output by several %; one state dict per recursive block, on CPU."""
    from thinking_pixel import apply_recursion

    model = apply_recursion(build_base(case, device), recursion_of(case))
    g = torch.Generator().manual_seed(3)
    state = []
    for proc in _recursions(model):
        with torch.no_grad():
            proc.lora.lora_b.copy_(torch.randn(proc.lora.lora_b.shape, generator=g) * 0.2)
        state.append({k: v.detach().cpu().clone() for k, v in proc.state_dict().items()})
    return state


def _with_experts(model, state):
    procs = _recursions(model)
    if len(procs) != len(state):
        raise RuntimeError(f"expected {len(state)} recursive blocks, found {len(procs)}")
    for proc, sd in zip(procs, state):
        proc.load_state_dict(sd)
    return model


def build_variant(case: ModelCase, device, name: str, state: list):
    """Variant ``name``'s model on the device in fp32: the seeded base with that variant's recursion."""
    from thinking_pixel import apply_recursion
    from thinking_pixel.recursion.diffusers import install_processors
    from thinking_pixel.recursion.peft import add_peft_experts, copy_experts_to_peft

    model = build_base(case, device)
    if name == BASE:
        return model
    if name == OURS:
        return _with_experts(apply_recursion(model, recursion_of(case)), state)
    if name == PEFT:  # its experts come from an apply_recursion model with the same state
        source = _with_experts(apply_recursion(build_base(case, device), recursion_of(case)), state)
        return copy_experts_to_peft(source, add_peft_experts(model, recursion_of(case), mode="dense"))
    return _with_experts(install_processors(model, recursion_of(case), PROCESSORS[name]), state)


def to_dtype(model, name: str, dtype):
    """The model in ``dtype`` for timing: the frozen base, with the recursion's experts and gates back in fp32 as
    apply_recursion keeps them under a low-precision model; the peft variant entirely. (nn.Module's ``to``:
    diffusers' own warns that from_pretrained(torch_dtype=) is the way, which a random-weight model has not.)"""
    torch.nn.Module.to(model, dtype)
    if name != PEFT:
        for module in _recursions(model):
            module.float()
    return model


def forward(model, inputs):
    return model(**inputs).sample


def make_step(model, inputs, target, input_grad: bool):
    """One training step -> its output (detached). AdamW (fused on CUDA) over whatever requires grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = target.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=fused) if params else None

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        kwargs = dict(inputs, hidden_states=inputs["hidden_states"].detach().requires_grad_(input_grad))
        out = forward(model, kwargs)
        (out.float() - target.float()).square().mean().backward()
        if opt is not None:
            opt.step()
        return out.detach()

    return step


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_forward(model, case: ModelCase, device, batch: int = 2):
    """One train-mode forward in fp32 with TF32 off at a small batch: the output the same-function check compares."""
    inputs, _ = make_inputs(case, device, torch.float32, batch=min(batch, case.batch))
    with torch.no_grad(), full_fp32():
        return forward(model, inputs).double().cpu()


def function_check(outputs: dict) -> dict:
    """{variant: check_forward output} -> max |out - apply_recursion's| / max |apply_recursion's| per variant (the
    frozen base's too: the scale of what the recursion changes) and whether the variants keep to CHECK_TOL."""
    want = outputs[OURS]
    scale = want.abs().max().item()
    diffs = {name: (out - want).abs().max().item() / scale for name, out in outputs.items() if name != OURS}
    return dict(batch=want.shape[0], tolerance=CHECK_TOL, max_rel_diff=diffs,
                passed=all(v <= CHECK_TOL for k, v in diffs.items() if k != BASE))


def measure(step, device, warmup: int, iters: int) -> dict:
    """First call (wall), warm-up, then ``iters`` timed steps: median and min (s), peak memory (GiB, CUDA)."""
    start = time.perf_counter()
    first = step()
    synchronize(device)
    row = dict(first_call_s=time.perf_counter() - start)
    for _ in range(max(warmup - 1, 0)):
        step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    row["step_s"], row["step_min_s"] = median_seconds(step, device, rounds=iters, warmup=0)
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return row, first


def _plan(compiled: bool):
    """[(variant, compiled)] in run order: every variant eagerly, then the compiled ones."""
    eager = [(BASE, False), (OURS, False), *((name, False) for name in PROCESSORS), (PEFT, False)]
    return eager + ([(BASE, True), (OURS, True), ("dense einsum", True)] if compiled else [])


def run_model_case(case: ModelCase, device, *, backend="inductor", compiled=True, warmup=2, iters=5,
                   dtype=torch.bfloat16, budget=None) -> dict:
    """The case's variants: {"case", "function_check", "variants": [row per variant], "skipped": [...]}."""
    result = dict(case=case.name, config=case.describe(), dtype=str(dtype)[6:], warmup=warmup, iters=iters,
                  compile_backend=backend if compiled else None, variants=[], skipped=[])
    checked, outputs = {}, {}
    with fixed_noise(seed=5):
        state = expert_state(case, device)
        inputs, target = make_inputs(case, device, dtype)
        for name, comp in _plan(compiled):
            label = f"{name}{', compiled' if comp else ''}"
            if comp and budget is not None and not budget.allows(f"{case.name} {label}", need=75):
                result["skipped"].append(label)
                continue
            row = dict(variant=name, compiled=comp)
            try:
                model = build_variant(case, device, name, state)
                if not comp:
                    checked[name] = check_forward(model, case, device)
                step = make_step(to_dtype(model, name, dtype), inputs, target, input_grad=name == BASE)
                with compiled_blocks(model, backend) if comp else contextlib.nullcontext():
                    timing, outputs[label] = measure(step, device, warmup, iters)
                row.update(timing)
            except Exception as err:  # noqa: BLE001 -- e.g. out of memory: recorded, the other variants still run
                row["error"] = describe(err)
            finally:
                model = step = None  # freed before the next variant is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["variants"].append(row)
    if OURS in checked:
        result["function_check"] = function_check(checked)
    reference = outputs.get(OURS)
    for row in result["variants"]:
        label = f"{row['variant']}{', compiled' if row['compiled'] else ''}"
        if reference is not None and label in outputs:
            row["output_rel_l2_vs_apply_recursion"] = rel_l2(outputs[label], reference)
    _added_times(result["variants"])
    return result


def _added_times(rows):
    """added_s = step - the frozen base's step in the same mode (absent where that base did not run)."""
    base = {row["compiled"]: row.get("step_s") for row in rows if row["variant"] == BASE}
    for row in rows:
        if row["variant"] != BASE and row.get("step_s") is not None and base.get(row["compiled"]) is not None:
            row["added_s"] = row["step_s"] - base[row["compiled"]]


def run_train_steps(device, cases, *, budget=None, **kwargs) -> list[dict]:
    results = []
    for case in cases:
        if budget is not None and not budget.allows(f"training steps of {case.name}", need=90):
            results.append(dict(case=case.name, config=case.describe(), skipped_all=True, variants=[]))
            continue
        try:
            results.append(run_model_case(case, device, budget=budget, **kwargs))
        except Exception as err:  # noqa: BLE001 -- a case that cannot be built is reported, the next one runs
            results.append(dict(case=case.name, config=case.describe(), error=describe(err), variants=[]))
    return results
