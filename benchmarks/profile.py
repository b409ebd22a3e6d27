"""Where the time goes in the benchmarked model pieces: torch.profiler self-CPU time by op category.

    python -m benchmarks.profile block        # RecursiveAttention (DiT-S/2, M=5, T=5, R=32) fwd vs plain attention
    python -m benchmarks.profile train-step   # ThinkingPixelDiT-S/2 train step, eager: what torch.compile could fuse
    python -m benchmarks.profile routed-lora  # routed_lora fwd and fwd+bwd at T=2048 D=1152 R=16 E=8, fp32 and bf16

The shapes are the suite's full-run shapes (test_model.FULL, shapes.py). Categories: GEMM (mm, addmm, bmm),
attention (scaled_dot_product_*), tp_kernels ops (with their autograd nodes), and everything else (elementwise,
norms, copies, optimizer): the part torch.compile can fuse; its share bounds compile's speed-up at 1 / (1 - share).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

CATEGORIES = (
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("aten::_scaled_dot_product",)),
)


def _category(name: str) -> str:
    # the CPU extension is called through ctypes, so its time is the self time of the op or autograd node calling it
    if "tp_kernels" in name:
        return "tp_kernels"
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "other (fusable)"


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def profile_fn(label: str, fn, reps: int = 5) -> None:
    """Warm up, time, then profile ``fn`` and print self-CPU time per category and the top ops."""
    for _ in range(2):
        fn()
    median = _median_ms(fn, reps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    by_category, by_op = defaultdict(float), {}
    for event in prof.key_averages():
        by_category[_category(event.key)] += event.self_cpu_time_total
        by_op[event.key] = event.self_cpu_time_total
    total = sum(by_category.values())
    print(f"\n{label}: median {median:.2f} ms over {reps} runs ({torch.get_num_threads()} threads)")
    for category, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {category:<16} {100 * us / total:5.1f}%  {us / reps / 1e3:8.2f} ms per call")
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:6]
    print("  top ops: " + ", ".join(f"{name} {100 * us / total:.0f}%" for name, us in top))


def block() -> None:
    from thinking_pixel import dit_config
    from thinking_pixel.modules import Attention, RecursiveAttention

    from .test_model import FULL

    config, r = dit_config(FULL.preset), FULL.recursion
    torch.manual_seed(0)
    plain = Attention(config.hidden_size, config.num_heads).eval()
    recursive = RecursiveAttention.from_attention(plain, config.hidden_size, experts=r.experts, steps=r.steps,
                                                  rank=r.rank, tau=r.tau).eval()
    with torch.no_grad():
        recursive.lora.lora_b.normal_(0, 0.02)
    x = torch.randn(FULL.block_batch, config.num_patches, config.hidden_size)  # (N, T, D)
    cond = torch.randn(FULL.block_batch, config.hidden_size)  # (N, D)
    with torch.no_grad():
        profile_fn("plain attention fwd", lambda: plain(x))
        profile_fn(f"recursive block fwd ({FULL.label})", lambda: recursive(x, cond=cond))


def train_step() -> None:
    from thinking_pixel import ThinkingPixelDiT, dit_config
    from thinking_pixel.diffusion import GaussianDiffusion

    from .test_model import FULL

    config = dit_config(FULL.preset)
    torch.manual_seed(0)
    model = ThinkingPixelDiT(config, FULL.recursion).train()
    batch = FULL.train_batch
    x0 = torch.randn(batch, config.in_channels, config.input_size, config.input_size)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, config.num_classes, (batch,))
    diffusion = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x0, t, {"y": y}, noise)["loss"].mean().backward()
        opt.step()

    profile_fn(f"train step, eager ({FULL.label}, batch {batch})", step, reps=3)


def routed_lora() -> None:
    import tp_kernels

    tokens, d, rank, n_exp = 2048, 1152, 16, 8
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, d, generator=gen).to(dtype).requires_grad_()
        a = (torch.randn(n_exp, rank, d, generator=gen) / d**0.5).to(dtype).requires_grad_()
        b = (torch.randn(n_exp, d, rank, generator=gen) * 0.02).to(dtype).requires_grad_()
        idx = torch.randint(0, n_exp, (tokens,), generator=gen)
        grad_y = torch.randn(tokens, d, generator=gen).to(dtype)
        name = f"T={tokens} D={d} R={rank} E={n_exp} {str(dtype).replace('torch.', '')}"
        profile_fn(f"routed_lora fwd {name}", lambda: tp_kernels.routed_lora(x, idx, a, b), reps=50)
        profile_fn(f"routed_lora fwd+bwd {name}",
                   lambda: torch.autograd.grad(tp_kernels.routed_lora(x, idx, a, b), [x, a, b], grad_y), reps=50)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("block", "train-step", "routed-lora"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    {"block": block, "train-step": train_step, "routed-lora": routed_lora}[args.what]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
