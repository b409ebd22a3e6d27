"""Host time per call of the Triton path on CPU with its launches stubbed out, and device work items per call.

    TRITON_INTERPRET=1 python -m benchmarks.host_overhead [--json out.json] [--rounds 300] [--times-only]

Host time: the Triton backend runs on CPU tensors under the interpreter; every ``Launch`` is replaced by a
no-op, so what is timed is the Python and torch work around the kernels: argument checks, custom-op dispatch,
autograd, and the torch ops of the glue (which on CPU also compute; at this tiny shape a few µs). On a GPU those
torch ops would be asynchronous launches instead, and each Triton launch adds its own launcher's time.
Work items (Triton launches + torch kernels, :mod:`tp_kernels._work_items`) are counted on fake CUDA tensors,
so the path counted is the CUDA one. Shape: 256 tokens, D 128, rank 16, 5 experts, 3 slices (qkv).
``--times-only`` skips the counts (they call the ops' current schemas), so an older tree of the package can be
timed with the same command: ``git archive <commit> tp_kernels | tar -x -C old`` (plus the built
``_cpu_kernels.so`` and this tree's ``tp_kernels/_work_items.py``), then, from outside the repository root (``-m``
puts the working directory first on sys.path), ``PYTHONPATH=old:<repo> python -m benchmarks.host_overhead``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

HOST_SHAPE = dict(tokens=256, d=128, rank=16, experts=5, slices=3)


def calls(device="cpu", dtype=torch.float32):
    """name -> a zero-argument callable doing one call (forward, or forward + backward) at HOST_SHAPE."""
    import tp_kernels

    s = HOST_SHAPE
    g = torch.Generator().manual_seed(0)

    def inputs(grad):
        x = torch.randn(s["tokens"], s["d"], generator=g).to(device, dtype).requires_grad_(grad)
        a = (torch.randn(s["experts"], s["slices"], s["rank"], s["d"], generator=g) / s["d"] ** 0.5)
        b = (torch.randn(s["experts"], s["slices"], s["d"], s["rank"], generator=g) / s["rank"] ** 0.5)
        return x, a.to(device, dtype).requires_grad_(grad), b.to(device, dtype).requires_grad_(grad)

    x, a, b = inputs(False)
    xg, ag, bg = inputs(True)
    idx = torch.randint(0, s["experts"], (s["tokens"],), generator=g).to(device)
    grad_y = torch.randn(s["tokens"], s["slices"] * s["d"], generator=g).to(device, dtype)
    tw = (torch.randn(s["experts"], s["d"], generator=g) * 0.1).to(device, dtype).requires_grad_(True)
    cond = torch.randn(1, s["experts"], generator=g).to(device).requires_grad_(True)
    noise = tp_kernels.gumbel_noise((s["tokens"], s["experts"]), generator=g).to(device)
    ones = torch.ones(s["tokens"], device=device)

    def lora_fwd():
        with torch.no_grad():
            tp_kernels.routed_lora(x, idx, a, b, scale=0.5)

    def lora_fwd_bwd():
        y = tp_kernels.routed_lora(xg, idx, ag, bg, scale=0.5)
        torch.autograd.grad(y, (xg, ag, bg), grad_y)

    def refine_fwd_bwd():
        qkv, _, weight = tp_kernels.refine_step(xg, ag, bg, token_weight=tw, cond_logits=cond, noise=noise, tau=5.0,
                                                scale=0.5)
        torch.autograd.grad((qkv, weight), (xg, ag, bg, tw, cond), (grad_y, ones))

    return {"routed_lora forward (no grad)": lora_fwd, "routed_lora fwd+bwd": lora_fwd_bwd,
            "refine_step fwd+bwd": refine_fwd_bwd}


def work_items():
    """name -> (Triton kernel names, torch op names) per call of :func:`calls`, on fake CUDA tensors."""
    import tp_kernels
    from tp_kernels._work_items import count_work_items, fake_cuda, forward_backward

    s = HOST_SHAPE
    out = {}
    with fake_cuda():
        x = torch.randn(s["tokens"], s["d"], device="cuda")
        a = torch.randn(s["experts"], s["slices"], s["rank"], s["d"], device="cuda")
        b = torch.randn(s["experts"], s["slices"], s["d"], s["rank"], device="cuda")
        idx = torch.zeros(s["tokens"], dtype=torch.int64, device="cuda")
        grad_y = torch.randn(s["tokens"], s["slices"] * s["d"], device="cuda")
        tw, cond = torch.randn(s["experts"], s["d"], device="cuda"), torch.randn(1, s["experts"], device="cuda")
        noise, ones = torch.randn(s["tokens"], s["experts"], device="cuda"), torch.ones(s["tokens"], device="cuda")
        runs = {
            "routed_lora forward (no grad)": lambda: tp_kernels.routed_lora(x, idx, a, b, scale=0.5),
            "routed_lora fwd+bwd": lambda: forward_backward(
                "routed_lora_fwd", (x, idx, a, b, None, 0.5, True), (True, False, True, True, False, False, False),
                (grad_y, None, None, None)),
            "refine_step fwd+bwd": lambda: forward_backward(
                "refine_step_fwd", (x, a, b, tw, cond, noise, None, 5.0, 0.5, 1e-6, True, None, True),
                (True,) * 5 + (False,) * 8, (grad_y, ones) + (None,) * 7),
        }
        for name, run in runs.items():
            with count_work_items(stub=True) as items, torch.no_grad():
                run()
            out[name] = (list(items.triton), list(items.torch))
    return out


def _stub(launch, real):
    """Skip the kernel; a kernel that picks experts leaves expert 0 for every token (empty memory is no routing)."""
    idx = launch.args.get("idx_ptr")
    if idx is not None:
        idx.zero_()


def host_times(rounds: int = 300, warmup: int = 20):
    """name -> per-call host seconds (a list of ``rounds``), Triton backend on CPU, launches stubbed."""
    import tp_kernels
    from tp_kernels._work_items import _launches_replaced

    times = {}
    with tp_kernels.use_backend("triton"), _launches_replaced(_stub):
        for name, fn in calls().items():
            for _ in range(warmup):
                fn()
            times[name] = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--times-only", action="store_true", help="host times without the work-item counts")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("set TRITON_INTERPRET=1: the Triton path runs on CPU tensors only under the interpreter")
    torch.set_num_threads(1)
    counts = {} if args.times_only else work_items()
    results = []
    for name, t in host_times(args.rounds).items():
        triton_kernels, torch_ops = counts.get(name, ([], []))
        results.append(dict(call=name, host_us_median=statistics.median(t) * 1e6, host_us_min=min(t) * 1e6,
                            rounds=len(t), work_items=len(triton_kernels) + len(torch_ops), triton=triton_kernels,
                            torch=torch_ops))
        r = results[-1]
        print(f"{name:30s} host {r['host_us_median']:7.1f} us (min {r['host_us_min']:.1f})  work items "
              f"{r['work_items']:3d} = {len(triton_kernels)} Triton + {len(torch_ops)} torch")
        print("    Triton:", " ".join(triton_kernels))
        print("    torch: ", " ".join(op.removeprefix("aten.") for op in torch_ops))
    if args.json:
        import tp_kernels

        meta = dict(shape=HOST_SHAPE, package=os.path.dirname(tp_kernels.__file__), torch=torch.__version__,
                    python=platform.python_version(), machine=platform.machine(), threads=torch.get_num_threads(),
                    load_average=os.getloadavg())
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
