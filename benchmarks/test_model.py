"""Model-level benchmarks: the recursive block against plain attention, and ThinkingPixelDiT against DiT.

* block: RecursiveAttention (M experts, T latent steps) vs DiT's Attention with the same qkv/proj,
  forward (eval, no_grad) and forward+backward (train mode, every parameter trainable).
* train step: forward, DiT's hybrid loss, backward and AdamW, eager and torch.compile (compiled after
  warm-up, so compile time is excluded; it is recorded in extra_info); also, eager, the CPU training default
  (DiT-N/4, batch 64, M=2, T=2, rank 16: what `thinking-pixel train` runs), with vs without recursion.
* sampling: DDIM images/s (no guidance), eager.

Each recursive row carries the FLOP model's predicted time ratio over its plain row (flop_model.py):
from FLOPs alone, and per-component roofline times at this run's measured ceilings (the bytes term).
Full run: DiT-S/2 with M=5, T=5, one recursive layer (the middle one), rank 32. --quick: DiT-T/2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from . import flop_model

thinking_pixel = pytest.importorskip("thinking_pixel")
from thinking_pixel import DiT, RecursionConfig, ThinkingPixelDiT, dit_config  # noqa: E402
from thinking_pixel.diffusion import GaussianDiffusion, sample  # noqa: E402
from thinking_pixel.models import Attention
from thinking_pixel.recursion import RecursiveAttention  # noqa: E402


@dataclass(frozen=True)
class ModelCase:
    preset: str
    recursion: RecursionConfig
    block_batch: int  # samples per block benchmark
    train_batch: int
    sample_batch: int
    sample_steps: int

    @property
    def label(self) -> str:
        r = self.recursion
        return f"{self.preset} M={r.experts} T={r.steps} R={r.rank}"


FULL = ModelCase("DiT-S/2", RecursionConfig(experts=5, steps=5, rank=32), block_batch=16, train_batch=4,
                 sample_batch=4, sample_steps=5)
QUICK = ModelCase("DiT-T/2", RecursionConfig(experts=5, steps=5, rank=16), block_batch=4, train_batch=2,
                  sample_batch=2, sample_steps=2)
# The CPU training default (`thinking-pixel train` with no arguments: TrainConfig's model and batch), train step only.
CPU_DEFAULT = ModelCase("DiT-N/4", RecursionConfig(experts=2, steps=2, rank=16), block_batch=64, train_batch=64,
                        sample_batch=64, sample_steps=1)
ELEM = 4  # fp32


@pytest.fixture(scope="module")
def case(quick) -> ModelCase:
    return QUICK if quick else FULL


def _prediction(bench, parts_new, parts_base) -> dict:
    """The FLOP model's predicted ratios of the recursive variant over the plain one, at this run's ceilings."""
    c = bench.ceilings
    return {
        "predicted_ratio_flops": flop_model.predicted_ratio(parts_new, parts_base),
        "predicted_ratio_roofline": flop_model.predicted_ratio(parts_new, parts_base, c.gemm_flops["fp32"],
                                                               c.copy_bandwidth),
    }


def make_block(case, variant, device):
    """The block benchmark's module (plain DiT attention or its recursive version) and inputs, seeded.

    Returns (module, x (N, T, D) the adaLN-modulated block input, forward kwargs, the generator for further draws).
    """
    config = dit_config(case.preset)
    d, heads, seq, batch = config.hidden_size, config.num_heads, config.num_patches, case.block_batch
    gen = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    base = Attention(d, heads).to(device)
    r = case.recursion
    if variant == "attention":
        module = base
    else:
        module = RecursiveAttention.from_attention(base, d, experts=r.experts, steps=r.steps, rank=r.rank,
                                                   tau=r.tau).to(device)
        with torch.no_grad():  # trained-looking experts: B away from its zero init
            module.lora.lora_b.normal_(0, 0.02, generator=gen)
    x = torch.randn(batch, seq, d, generator=gen, device=device)  # (N, T, D)
    cond = torch.randn(batch, d, generator=gen, device=device)  # (N, D) timestep + class embedding
    return module, x, ({} if variant == "attention" else {"cond": cond}), gen


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", ["attention", "recursive"])
def test_block(bench, device, case, mode, variant):
    config = dit_config(case.preset)
    d, heads, seq, batch = config.hidden_size, config.num_heads, config.num_patches, case.block_batch
    r = case.recursion
    module, x, kwargs, gen = make_block(case, variant, device)
    backward = mode == "fwd+bwd"
    module.train(backward)
    params = [p for p in module.parameters() if p.requires_grad]
    if backward:
        x.requires_grad_(True)
        grad_out = torch.randn(batch, seq, d, generator=gen, device=device)

        def step():
            return torch.autograd.grad(module(x, **kwargs), [x, *params], grad_out)
    else:
        def step():
            with torch.no_grad():
                return module(x, **kwargs)

    plain = flop_model.attention_costs(batch, seq, d, heads, ELEM)
    parts = plain if variant == "attention" else flop_model.attention_costs(batch, seq, d, heads, ELEM, r)
    if backward:
        plain, parts = (flop_model.train_step_costs(p, 0) for p in (plain, parts))
    info = {} if variant == "attention" else _prediction(bench, parts, plain)
    bench(step, group=f"block {mode} | {case.label} | batch {batch} x {seq} tokens | fp32",
          impl=variant, cost=flop_model.total(parts), dtype=torch.float32, op="block", mode=mode,
          baseline=variant == "attention", **info)


def _model(case, model_name, device):
    """A DiT or ThinkingPixelDiT of the case's preset, seeded, fp32."""
    config = dit_config(case.preset)
    torch.manual_seed(0)
    model = DiT(config) if model_name == "DiT" else ThinkingPixelDiT(config, case.recursion)
    return model.to(device)


def _model_parts(case, model_name, batch):
    config = dit_config(case.preset)
    recursion = case.recursion if model_name == "ThinkingPixelDiT" else None
    return flop_model.dit_costs(config, batch, ELEM, recursion)


def make_train_step(case, model_name, device, compiled=False):
    """(model, step): ``step()`` is one optimisation step (forward, DiT's hybrid loss, backward, AdamW) of the
    case's model on fixed seeded data; with ``compiled`` the model runs under torch.compile."""
    model = _model(case, model_name, device).train()
    config = model.config
    batch = case.train_batch
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, config.in_channels, config.input_size, config.input_size)
    x0 = torch.randn(shape, generator=gen, device=device)
    noise = torch.randn(shape, generator=gen, device=device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    y = torch.randint(0, config.num_classes, (batch,), generator=gen, device=device)
    diffusion = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = diffusion.training_losses(forward, x0, t, {"y": y}, noise)["loss"].mean()
        loss.backward()
        opt.step()

    return model, step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("model_name", ["DiT", "ThinkingPixelDiT"])
@pytest.mark.parametrize("which", ["suite", "cpu-default"])
def test_train_step(bench, device, case, quick, which, model_name, compiled):
    if which == "cpu-default":
        if compiled:
            pytest.skip("the CPU default preset is timed eager only (as `thinking-pixel train` runs it)")
        case = CPU_DEFAULT
    elif compiled and quick:
        pytest.skip("torch.compile of a train step takes minutes on 2 CPU cores: full run only")
    model, step = make_train_step(case, model_name, device, compiled)
    batch = case.train_batch
    start = time.perf_counter()
    step()  # compiles when compiled
    first_call_s = time.perf_counter() - start

    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = flop_model.train_step_costs(_model_parts(case, model_name, batch), num_params)
    info = {"first_call_s": first_call_s, "compiled": compiled, "model": model_name, "case": which}
    if model_name == "ThinkingPixelDiT":
        plain_params = num_params - sum(p.numel() for p in model.expert_parameters())
        plain = flop_model.train_step_costs(_model_parts(case, "DiT", batch), plain_params)
        info.update(_prediction(bench, parts, plain))
    impl = f"{model_name} {'compiled' if compiled else 'eager'}"
    bench(step, group=f"train step | {case.label} | batch {batch} | fp32", impl=impl,
          cost=flop_model.total(parts), dtype=torch.float32, op="train_step", mode="train", warmup=1,
          baseline=impl == "DiT eager", **info)


@pytest.mark.parametrize("model_name", ["DiT", "ThinkingPixelDiT"])
def test_sampling(bench, device, case, model_name):
    model = _model(case, model_name, device).eval()
    config = model.config
    batch, steps = case.sample_batch, case.sample_steps
    labels = torch.arange(batch, device=device) % config.num_classes
    shape = (config.in_channels, config.input_size, config.input_size)

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        return sample(model, labels, shape, sampler="ddim", num_steps=steps, generator=gen)

    parts = _model_parts(case, model_name, batch)
    info = {}
    if model_name == "ThinkingPixelDiT":
        info.update(_prediction(bench, [(n, steps * c) for n, c in parts],
                                [(n, steps * c) for n, c in _model_parts(case, "DiT", batch)]))
    bench(run, group=f"sampling | {case.label} | ddim {steps} steps, batch {batch} | fp32", impl=model_name,
          cost=steps * flop_model.total(parts), dtype=torch.float32, op="sampling", mode="eval", warmup=1,
          baseline=model_name == "DiT", images=batch, model=model_name, **info)
    if bench.median is not None:
        bench.benchmark.extra_info["images_per_s"] = batch / bench.median
