"""Speed of the ops on the device: routed_lora against its peers, host time and device work items per call, and
whether a training step's ops capture in a CUDA graph.

- ``time_ops``: routed_lora forward and forward+backward at the suite's shapes (benchmarks.shapes) against every
  expert on every token (dense), a boolean mask per expert, sort + per-expert segments, ``torch._grouped_mm`` where
  the torch version has it, and one unrouted cuBLAS LoRA (the floor); CUDA events, median of rounds after warm-up.
- ``host_overhead``: per call, the wall time of the Python call alone with the device idle before it (synchronize,
  time the call, synchronize: the kernels run after the clock stops unless the call waits for them), and the device
  work items it queues (kernels, memsets, copies: the profiler's device events; on CPU the top-level ops).
- ``capture_check``: routed_lora and refine_step forward + backward, and a whole recursion block (T steps of
  refine_step and attention) forward + backward, captured in a CUDA graph, replayed on new inputs, and compared with
  an eager call on the same inputs.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from ..host_overhead import HOST_SHAPE
from ..host_overhead import calls as op_calls
from .env import describe, full_fp32, synchronize


def grouped_mm_lora(x, idx, lora_a, lora_b, scale=1.0):
    """torch._grouped_mm per expert segment of the sorted tokens (offsets on device, no host sync)."""
    order = torch.argsort(idx, stable=True)
    offs = torch.cumsum(torch.bincount(idx, minlength=lora_a.shape[0]), 0).to(torch.int32)
    xs = x.index_select(0, order)
    h = torch._grouped_mm(xs, lora_a.transpose(-2, -1), offs=offs)  # (N, R)
    ys = torch._grouped_mm(h, lora_b.transpose(-2, -1), offs=offs) * scale  # (N, D_out)
    return torch.empty_like(ys).index_copy_(0, order, ys)


def speed_impls():
    import tp_kernels

    from .. import peers

    def ours(x, idx, a, b, scale):
        return tp_kernels.routed_lora(x, idx, a, b, scale=scale)

    return {"tp_kernels.routed_lora": ours, "dense (all experts)": peers.dense_mixture,
            "masked loop": peers.mask_loop, "sort + segments": peers.sort_scatter,
            "torch._grouped_mm": grouped_mm_lora, "unrouted cuBLAS LoRA (floor)": peers.unrouted_lora}


def time_ops(device, shapes, dtypes=(torch.bfloat16,), rounds: int = 20) -> list[dict]:
    from ..timing import median_seconds

    results = []
    for shape in shapes:
        n = shape.tokens
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, shape.d, generator=gen).to(dtype).to(device)
            idx = torch.randint(0, shape.experts, (n,), generator=gen).to(device)
            a = (torch.randn(shape.experts, shape.rank, shape.d, generator=gen) / shape.d ** 0.5).to(dtype).to(device)
            b = (torch.randn(shape.experts, shape.d, shape.rank, generator=gen) / shape.rank ** 0.5).to(dtype).to(
                device)
            gy = torch.randn(n, shape.d, generator=gen).to(dtype).to(device)
            for impl, fn in speed_impls().items():
                row = dict(shape=shape.key, tokens=n, d=shape.d, rank=shape.rank, experts=shape.experts,
                           dtype=str(dtype)[6:], impl=impl)
                for mode in ("fwd", "fwd+bwd"):
                    leaves = [t.detach().requires_grad_(mode == "fwd+bwd") for t in (x, a, b)]

                    def step(leaves=leaves, mode=mode, fn=fn):
                        y = fn(leaves[0], idx, leaves[1], leaves[2], 0.5)
                        if mode == "fwd+bwd":
                            y.backward(gy)
                    try:
                        row[mode] = median_seconds(step, device, rounds=rounds, warmup=2)[0]
                    except Exception as err:  # noqa: BLE001 -- e.g. torch._grouped_mm: missing, or needs sm_90
                        row[mode] = None
                        row["unsupported"] = describe(err)
                results.append(row)
    return results


# ---------------------------------------------------------------- host time and work items per call



def _host_inputs(device, dtype, grad):
    s = HOST_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["tokens"], s["d"], generator=g)
    a = torch.randn(s["experts"], s["slices"], s["rank"], s["d"], generator=g) / s["d"] ** 0.5
    b = torch.randn(s["experts"], s["slices"], s["d"], s["rank"], generator=g) / s["rank"] ** 0.5
    x, a, b = (t.to(dtype).to(device).requires_grad_(grad) for t in (x, a, b))
    idx = torch.randint(0, s["experts"], (s["tokens"],), generator=g).to(device)
    return x, idx, a, b


def host_calls(device, dtype=torch.bfloat16):
    """name -> a zero-argument callable making one call (forward, or forward + backward) at HOST_SHAPE: the ops'
    calls of benchmarks.host_overhead, and two plain torch matmuls of one unrouted LoRA of the same output width."""
    s = HOST_SHAPE
    x, _, a, b = _host_inputs(device, dtype, False)
    xg = x.detach().requires_grad_()
    gy = torch.randn(s["tokens"], s["slices"] * s["d"]).to(dtype).to(device)
    a0, b0 = a[0, 0], b[0].flatten(0, 1)  # (R, D), (3D, R)
    a0g, b0g = a0.detach().requires_grad_(), b0.detach().requires_grad_()

    def matmuls_fwd():
        with torch.no_grad():
            (x @ a0.t()) @ b0.t()

    def matmuls_fwd_bwd():
        y = (xg @ a0g.t()) @ b0g.t()
        torch.autograd.grad(y, (xg, a0g, b0g), gy)

    return {**op_calls(device, dtype), "two torch matmuls forward (no grad)": matmuls_fwd,
            "two torch matmuls fwd+bwd": matmuls_fwd_bwd}


def host_seconds(fn, device, rounds: int, warmup: int = 3) -> float:
    """Median wall time of the call alone, the device idle before each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    synchronize(device)
    return statistics.median(times)


def work_items(fn, device, calls: int = 5) -> tuple[float, dict]:
    """(items per call, {name: count per call}): device events (kernels, memsets, copies) on CUDA, the top-level
    profiler events on CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # first-call work (compilation, caches) outside the count
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    if device.type == "cuda":
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        events = [e for e in prof.events() if e.cpu_parent is None]
    names = Counter(e.name for e in events)
    return len(events) / calls, {k: v / calls for k, v in names.most_common()}


def host_overhead(device, rounds: int = 200) -> list[dict]:
    results = []
    for name, fn in host_calls(device).items():
        row = dict(call=name, shape=HOST_SHAPE, dtype="bfloat16",
                   items_counted="device events" if device.type == "cuda" else "top-level profiler events (CPU)")
        try:
            row["host_us"] = host_seconds(fn, device, rounds) * 1e6
            row["work_items"], row["work_item_names"] = work_items(fn, device)
        except Exception as err:  # noqa: BLE001 -- recorded
            row["error"] = describe(err)
        results.append(row)
    return results


# ---------------------------------------------------------------- CUDA-graph capture

CAPTURE_TOL = 1e-5  # fp32, TF32 off: replay and eager run the same kernels; atomics may reorder a sum


def _capture_calls(device):
    """name -> (make_inputs(seed) -> tuple of tensors, fn(*inputs) -> tuple of outputs and gradients)."""
    import tp_kernels

    s = HOST_SHAPE

    def lora_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x, idx, a, b = _host_inputs(device, torch.float32, False)
        return (torch.randn(x.shape, generator=g).to(device), torch.randint(0, s["experts"], idx.shape,
                                                                            generator=g).to(device),
                a, b, torch.randn(s["tokens"], s["slices"] * s["d"], generator=g).to(device))

    def lora(x, idx, a, b, gy):
        leaves = [t.detach().requires_grad_() for t in (x, a, b)]
        y = tp_kernels.routed_lora(leaves[0], idx, leaves[1], leaves[2], scale=0.5)
        return (y, *torch.autograd.grad(y, leaves, gy))

    def refine_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x, _, a, b = _host_inputs(device, torch.float32, False)
        return (torch.randn(x.shape, generator=g).to(device), a, b,
                (torch.randn(s["experts"], s["d"], generator=g) * 0.1).to(device),
                torch.randn(s["tokens"], s["experts"], generator=g).to(device),
                tp_kernels.gumbel_noise((s["tokens"], s["experts"]), generator=g).to(device),
                torch.randn(s["tokens"], s["slices"] * s["d"], generator=g).to(device))

    def refine(x, a, b, tw, cond, noise, gy):
        leaves = [t.detach().requires_grad_() for t in (x, a, b, tw, cond)]
        qkv, idx, weight = tp_kernels.refine_step(*leaves[:3], token_weight=leaves[3], cond_logits=leaves[4],
                                                  noise=noise, tau=5.0, scale=0.5)
        return (qkv, idx, *torch.autograd.grad((qkv, weight), leaves, (gy, torch.ones_like(weight))))

    from thinking_pixel.models import Attention
    from thinking_pixel.recursion import RecursiveAttention

    # eval mode: no Gumbel noise, so replay and eager pick the same experts (in training the noise comes from torch's
    # generator, whose draws a CUDA graph replays with fresh offsets)
    block = RecursiveAttention.from_attention(Attention(s["d"], 4), experts=s["experts"], steps=3,
                                              rank=s["rank"]).to(device).eval()
    with torch.no_grad():
        block.lora.lora_b.normal_(std=0.1, generator=torch.Generator(device).manual_seed(0))  # experts away from 0
    params = [p for _, p in block.recursion_parameters()]

    def block_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(2, s["tokens"] // 2, s["d"], generator=g).to(device),
                torch.randn(2, s["d"], generator=g).to(device),
                torch.randn(2, s["tokens"] // 2, s["d"], generator=g).to(device))

    def recursion_block(x, cond, gy):
        x = x.detach().requires_grad_()
        out = block(x, cond)
        return (out, *torch.autograd.grad(out, [x, *params], gy))

    return {"routed_lora fwd+bwd": (lora_inputs, lora), "refine_step fwd+bwd": (refine_inputs, refine),
            "recursion block fwd+bwd (T = 3)": (block_inputs, recursion_block)}


def _graphed(fn, static, device):
    """(replay() -> outputs, captured): fn on the static inputs captured in a CUDA graph (warm-up on a side stream
    first, as capture requires); on CPU, no graph: replay calls fn eagerly, so everything around it still runs."""
    if device.type != "cuda":
        return (lambda: fn(*static)), False
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)

    def replay():
        graph.replay()
        return outputs
    return replay, True


def capture_check(device) -> list[dict]:
    results = []
    with full_fp32():
        for name, (make_inputs, fn) in _capture_calls(device).items():
            row = dict(call=name, dtype="float32", tolerance=CAPTURE_TOL)
            try:
                static = make_inputs(0)
                replay, row["captured"] = _graphed(fn, static, device)
                fresh = make_inputs(1)
                for dst, src in zip(static, fresh):  # new data into the captured inputs
                    dst.copy_(src)
                got = [t.clone() for t in replay()]
                synchronize(device)
                want = fn(*fresh)
                errors = [((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
                          for g, w in zip(got, want)]
                row.update(max_error=max(errors), bitwise=all(torch.equal(g, w) for g, w in zip(got, want)),
                           passed=bool(max(errors) <= CAPTURE_TOL))
            except Exception as err:  # noqa: BLE001 -- a host sync inside the op fails the capture: report it
                row.update(captured=False, passed=False, error=describe(err))
            results.append(row)
    return results
