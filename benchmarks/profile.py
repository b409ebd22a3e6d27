"""Where the time goes in the benchmarked model pieces: torch.profiler self-CPU time by op category.

    python -m benchmarks.profile block        # RecursiveAttention (DiT-S/2, M=5, T=5, R=32) fwd vs plain attention
    python -m benchmarks.profile train-step   # ThinkingPixelDiT-S/2 train step, eager: what torch.compile could fuse
    python -m benchmarks.profile routed-lora  # routed_lora fwd and fwd+bwd at T=2048 D=1152 R=16 E=8, fp32 and bf16
    python -m benchmarks.profile finetune     # diffusers DiT-S/2-width fine-tuning step: base, apply_recursion,
                                              # peft masked (M=5, T=5, R=128; test_finetune_diffusers.FULL[0])
    python -m benchmarks.profile grouped-gemm # the fine-tuning step's routed LoRA (R=128, E=5, S=3) in GFLOP/s:
                                              # the CPU extension, the composed-torch path, MKL on pre-grouped
                                              # per-expert GEMMs (the grouped ceiling) and one large GEMM

The shapes are the suite's full-run shapes (test_model.FULL, shapes.py). Categories: GEMM (mm, addmm, bmm),
attention (scaled_dot_product_*), tp_kernels ops (with their autograd nodes), and everything else (elementwise,
norms, copies, optimizer): the part torch.compile can fuse; its share bounds compile's speed-up at 1 / (1 - share).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ._target import describe
from .timing import median_seconds

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


def profile_fn(label: str, fn, reps: int = 5) -> None:
    """Warm up, time, then profile ``fn`` and print self-CPU time per category and the top ops."""
    median = 1e3 * median_seconds(fn, torch.device("cpu"), rounds=reps, warmup=2)[0]
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
    from .test_model import FULL, make_block

    with torch.no_grad():
        for variant in ("attention", "recursive"):
            module, x, kwargs, _ = make_block(FULL, variant, torch.device("cpu"))
            module.eval()
            profile_fn(f"{variant} block fwd ({FULL.label})", lambda: module(x, **kwargs))


def train_step() -> None:
    from .test_model import FULL, make_train_step

    _, step = make_train_step(FULL, "ThinkingPixelDiT", torch.device("cpu"))
    profile_fn(f"train step, eager ({FULL.label}, batch {FULL.train_batch})", step, reps=3)


def routed_lora() -> None:
    import tp_kernels

    from .shapes import lora_shapes
    from .test_routed_lora import make_inputs

    shape = next(s for s in lora_shapes(False) if s.key == "T=2048 D=1152 R=16 E=8")  # the worst fwd+bwd / fwd
    for dtype_name in ("fp32", "bf16"):
        x, idx, a, b, _, grad_y = make_inputs(shape, dtype_name, torch.device("cpu"), True)
        name = f"{shape.key} {dtype_name}"
        profile_fn(f"routed_lora fwd {name}", lambda: tp_kernels.routed_lora(x, idx, a, b), reps=50)
        profile_fn(f"routed_lora fwd+bwd {name}",
                   lambda: torch.autograd.grad(tp_kernels.routed_lora(x, idx, a, b), [x, a, b], grad_y), reps=50)


def finetune() -> None:
    from .test_finetune_diffusers import FULL, build_variants, make_inputs, make_step

    case, cpu = FULL[0], torch.device("cpu")
    variants, _ = build_variants(case, cpu)
    inputs, target = make_inputs(case, cpu)
    for name in ("base", "apply_recursion M=5 T=5", "peft masked M=5 T=5"):
        profile_fn(f"fine-tuning step, {name} ({case.label})", make_step(variants[name], inputs, target), reps=3)


def grouped_gemm() -> None:
    """FLOP rates of the fine-tuning benchmark's routed LoRA: how fast small per-expert GEMMs can run here."""
    from tp_kernels.routed_lora import cpu as extension
    from tp_kernels.routed_lora import torch as composed

    n_exp, n_slice, rank, cpu = 5, 3, 128, torch.device("cpu")
    for n_tok, dim in ((1024, 384), (512, 1152)):  # DiT-S/2 width batch 4, DiT-XL/2 width batch 2 (x 256 tokens)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_tok, dim, generator=g)
        idx = torch.arange(n_tok) % n_exp
        a = torch.randn(n_exp, n_slice, rank, dim, generator=g) / dim**0.5
        b = torch.randn(n_exp, n_slice, dim, rank, generator=g) / rank**0.5
        flops = 2 * n_tok * n_slice * rank * 2 * dim  # shrink + expand, forward

        def rate(fn, work=flops):
            return work / median_seconds(fn, cpu, rounds=20, warmup=2)[0] / 1e9  # GFLOP/s

        line = [f"T={n_tok} D={dim} R={rank} E={n_exp} S={n_slice} fp32, GFLOP/s:"]
        for label, path in (("extension", extension), ("composed torch", composed)):
            y, h, perm, offsets = path.forward(x, idx, a, b, None, 1.0)
            grad_y = torch.randn_like(y)
            line.append(f"{label} fwd {rate(lambda: path.forward(x, idx, a, b, None, 1.0)):.0f}")
            line.append(f"bwd {rate(lambda: path.backward(grad_y, x, idx, a, b, None, h, perm, offsets, 1.0, True, True, False), 2 * flops):.0f}")
        xs = [x[idx == e].contiguous() for e in range(n_exp)]  # pre-grouped: no gather, no scatter
        a2 = [a[e].reshape(n_slice * rank, dim) for e in range(n_exp)]

        def grouped():
            for e in range(n_exp):
                h = (xs[e] @ a2[e].t()).view(-1, n_slice, rank)
                for s in range(n_slice):
                    h[:, s] @ b[e, s].t()

        line.append(f"MKL pre-grouped fwd {rate(grouped):.0f}")
        line.append(f"one (T x D) @ (D x S*R) GEMM {rate(lambda: x @ a2[0].t(), 2 * n_tok * dim * n_slice * rank):.0f}")
        print(" | ".join(line))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("block", "train-step", "routed-lora", "finetune", "grouped-gemm"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(describe("cpu"), flush=True)
    {"block": block, "train-step": train_step, "routed-lora": routed_lora, "finetune": finetune,
     "grouped-gemm": grouped_gemm}[args.what]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
