"""One command for a maintainer with one CUDA GPU: the kernels' correctness and speed on real hardware.

    python -m benchmarks.gpu_check [--json gpu_check.json] [--markdown gpu_check.md] [--update BENCHMARKS.md]

1. Correctness: every Triton kernel on CUDA against the float64 reference -- routed_lora, gate_top1 and
   refine_step forward and gradients, in bf16, fp16 and fp32 under both of torch's fp32 matmul settings (TF32
   allowed: "tf32"; torch's default: 3xTF32), at multi-tile shapes with rank 128, with strided upstream
   gradients and a loss on the gate weight, routing collapsed onto one expert (several weight-gradient
   chunks), and batch invariance (a token's outputs and input gradient bit-identical in any batch).
2. Speed: routed_lora forward and forward+backward at the benchmark suite's shapes against its peers -- every
   expert on every token (dense), a boolean mask per expert, sort + per-expert segments, ``torch._grouped_mm``
   where the GPU supports it, and one unrouted cuBLAS LoRA (the floor) -- and refine_step, timed with CUDA
   events (median of rounds after a warm-up).
3. A JSON of everything and a markdown section; ``--update`` puts the section into BENCHMARKS.md in place of
   an earlier one (the rest of the file is left alone).

No network, a few minutes on one GPU (the budget is 8). Without a CUDA GPU it says so in one line and exits 2.
Everything but the GPU itself is tested on CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

from tp_kernels._aot import allow_tf32

SECTION = "## GPU check (python -m benchmarks.gpu_check)"
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
TF32_TOL = 3e-3  # TF32 keeps 10 mantissa bits


@dataclasses.dataclass
class Case:
    name: str
    op: str  # "routed_lora" | "refine_step" | "gate_top1"
    dtype: torch.dtype
    tf32: bool = False
    tokens: int = 300
    d_in: int = 136
    d_out: int = 140
    rank: int = 128
    experts: int = 3
    slices: int = 3
    collapsed: bool = False  # every token but a few on one expert
    strided: bool = True  # non-contiguous d qkv, stride-0 d gate weight


def correctness_cases(quick: bool = False) -> list[Case]:
    cases = []
    for op in ("routed_lora", "refine_step"):
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                            (torch.float32, True)):
            cases.append(Case(f"{op} {str(dtype)[6:]}{' tf32' if tf32 else ''}", op, dtype, tf32))
        cases.append(Case(f"{op} collapsed routing, 3 weight-gradient chunks", op, torch.float32,
                          tokens=1300, d_in=64, d_out=48, rank=16, collapsed=True))
    cases.append(Case("gate_top1 fp32", "gate_top1", torch.float32, tokens=5000, experts=5))
    if quick:  # one low-precision case per op at small sizes
        cases = [dataclasses.replace(c, tokens=min(c.tokens, 120), d_in=40, d_out=36, rank=16) for c in cases
                 if c.dtype == torch.bfloat16 or c.op == "gate_top1"]
    return cases


def _rel_err(got, want):
    if want.numel() == 0:
        return 0.0
    return ((got.double().cpu() - want.double().cpu()).abs().max() / max(1.0, want.abs().max().item())).item()


def _inputs(case: Case, gen: torch.Generator):
    n, e, s, r = case.tokens, case.experts, case.slices, case.rank
    x = torch.randn(n, case.d_in, generator=gen) * 1.5 + 0.5
    a = torch.randn(e, s, r, case.d_in, generator=gen) / case.d_in ** 0.5
    b = torch.randn(e, s, case.d_out, r, generator=gen) / r ** 0.5
    idx = torch.randint(0, e, (n,), generator=gen)
    if case.collapsed:
        idx = torch.where(torch.rand(n, generator=gen) < 0.98, 1, idx)
    return x, a, b, idx


def _upstream(shape, weight_shape, dtype, gen, strided):
    """d loss / d output (every other column of a wider tensor if strided) and d loss / d gate (stride 0)."""
    if not strided:
        return torch.randn(shape, generator=gen).to(dtype), torch.randn(weight_shape, generator=gen)
    wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2]
    return wide, torch.randn((), generator=gen).expand(weight_shape)


def _leaf(t, device):
    """A fresh leaf copy of t on device (``.to`` alone would alias t on CPU, and the reference reads t)."""
    return t.detach().to(device, copy=True).requires_grad_()


def run_routed_lora(case: Case, device, gen):
    """(outputs and grads on ``device``, the same from the float64 reference on CPU) as dicts of tensors."""
    import tp_kernels
    from tp_kernels.routed_lora.reference import routed_lora_backward_reference, routed_lora_reference

    x, a, b, idx = _inputs(case, gen)
    gate = torch.rand(case.tokens, generator=gen) + 0.5
    x, a, b, gate = (t.to(case.dtype) for t in (x, a, b, gate))
    gy, _ = _upstream((case.tokens, case.slices * case.d_out), (case.tokens,), case.dtype, gen, case.strided)
    leaves = [_leaf(t, device) for t in (x, a, b, gate)]
    y = tp_kernels.routed_lora(leaves[0], idx.to(device), leaves[1], leaves[2], scale=0.5, gate=leaves[3])
    y.backward(gy.to(device))
    got = dict(y=y.detach(), dx=leaves[0].grad, da=leaves[1].grad, db=leaves[2].grad, dgate=leaves[3].grad)
    d = torch.float64
    want_y = routed_lora_reference(x.to(d), idx, a.to(d), b.to(d), gate.to(d), 0.5)
    dx, da, db, dg = routed_lora_backward_reference(gy.to(d), x.to(d), idx, a.to(d), b.to(d), gate.to(d), 0.5)
    return got, dict(y=want_y, dx=dx, da=da, db=db, dgate=dg)


def run_refine_step(case: Case, device, gen):
    import tp_kernels
    from tp_kernels.refine.reference import refine_step_reference

    x, a, b, _ = _inputs(case, gen)
    tw = torch.randn(case.experts, case.d_in, generator=gen) * 0.5
    cond = torch.randn(case.tokens, case.experts, generator=gen)
    if case.collapsed:
        cond[:, 1] += 100.0
    noise = tp_kernels.gumbel_noise((case.tokens, case.experts), generator=gen)
    base = torch.randn(case.tokens, case.slices * case.d_out, generator=gen)
    x, a, b, tw, base = (t.to(case.dtype) for t in (x, a, b, tw, base))
    gq, gw = _upstream((case.tokens, case.slices * case.d_out), (case.tokens,), case.dtype, gen, case.strided)
    leaves = [_leaf(t, device) for t in (x, a, b, tw, cond, base)]
    qkv, idx, weight = tp_kernels.refine_step(leaves[0], leaves[1], leaves[2], token_weight=leaves[3],
                                              cond_logits=leaves[4], noise=noise.to(device), base=leaves[5], tau=5.0,
                                              scale=0.5)
    torch.autograd.backward([qkv, weight], [gq.to(device), gw.to(device)])
    got = dict(qkv=qkv.detach(), **{f"d{k}": leaf.grad for k, leaf in zip(("state", "a", "b", "tw", "cond", "base"),
                                                                          leaves)})
    d = torch.float64
    ref = [t.detach().to(d).requires_grad_() for t in (x, a, b, tw, cond, base)]
    # at the routing the op chose: a near-tie at low precision may go either way
    want_qkv, _, want_w = refine_step_reference(ref[0], ref[1], ref[2], ref[3], ref[4], 5.0, noise.to(d), 0.5,
                                                ref[5], 1e-6, idx.cpu())
    torch.autograd.backward([want_qkv, want_w], [gq.to(d), gw.to(d)])
    want = dict(qkv=want_qkv.detach(), **{f"d{k}": leaf.grad for k, leaf in
                                           zip(("state", "a", "b", "tw", "cond", "base"), ref)})
    return got, want


def run_gate_top1(case: Case, device, gen):
    import tp_kernels
    from tp_kernels.gate.reference import gate_top1_reference

    logits = torch.randn(case.tokens, case.experts, generator=gen) * 3
    noise = tp_kernels.gumbel_noise(logits.shape, generator=gen)
    gw = torch.randn(case.tokens, generator=gen)
    leaf = _leaf(logits, device)
    idx, gate = tp_kernels.gate_top1(leaf, tau=5.0, noise=noise.to(device))
    gate.backward(gw.to(device))
    ref = logits.double().requires_grad_()
    want_idx, want_gate = gate_top1_reference(ref, noise.double(), 5.0)
    want_gate.backward(gw.double())
    return dict(idx=idx.double(), gate=gate.detach(), dlogits=leaf.grad), dict(idx=want_idx.double(),
                                                                              gate=want_gate.detach(),
                                                                              dlogits=ref.grad)


RUNNERS = {"routed_lora": run_routed_lora, "refine_step": run_refine_step, "gate_top1": run_gate_top1}


def batch_invariant(case: Case, device) -> bool:
    """routed_lora / refine_step on all tokens and on subsets: a token's outputs and input grad are the same bits."""
    import tp_kernels

    gen = torch.Generator().manual_seed(7)
    x, a, b, idx = (t.to(device) for t in _inputs(case, gen))
    x, a, b = (t.to(case.dtype) for t in (x, a, b))
    gy = torch.randn(case.tokens, case.slices * case.d_out, generator=gen).to(case.dtype).to(device)

    def run(rows):
        xs = x[rows].clone().requires_grad_()
        if case.op == "routed_lora":
            out = tp_kernels.routed_lora(xs, idx[rows], a, b, scale=0.5)
        else:
            out = tp_kernels.refine_step(xs, a, b, tau=5.0, scale=0.5)[0]
        out.backward(gy[rows])
        return out.detach(), xs.grad

    full = run(torch.arange(case.tokens, device=device))
    for rows in (torch.arange(3, case.tokens, 7), torch.tensor([17]), torch.arange(case.tokens).flip(0)):
        rows = rows.to(device)
        if not all(torch.equal(got, want[rows]) for got, want in zip(run(rows), full)):
            return False
    return True


def check_correctness(device, quick: bool = False) -> list[dict]:
    """Every case: max relative error per output (over max(1, max |reference|)) and pass/fail."""
    results = []
    for case in correctness_cases(quick):
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        with allow_tf32(case.tf32):  # the fp32 precision the kernels follow
            got, want = RUNNERS[case.op](case, device, gen)
            invariant = batch_invariant(case, device) if case.op != "gate_top1" else True
        tol = TF32_TOL if case.tf32 else TOL[case.dtype]
        errors = {k: _rel_err(got[k], want[k]) for k in want if want[k] is not None}
        if case.op == "gate_top1":
            errors["idx"] = float((got["idx"].cpu() != want["idx"]).sum())  # mismatched experts
        ok = all(v <= (0 if k == "idx" else tol) for k, v in errors.items()) and invariant
        results.append(dict(case=case.name, dtype=str(case.dtype)[6:], tf32=case.tf32, tolerance=tol,
                            errors=errors, batch_invariant=invariant, passed=bool(ok),
                            seconds=time.perf_counter() - start))
    return results


# ---------------------------------------------------------------- speed


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

    from . import peers

    def ours(x, idx, a, b, scale):
        return tp_kernels.routed_lora(x, idx, a, b, scale=scale)

    return {"tp_kernels.routed_lora": ours, "dense (all experts)": peers.dense_mixture,
            "masked loop": peers.mask_loop, "sort + segments": peers.sort_scatter,
            "torch._grouped_mm": grouped_mm_lora, "unrouted cuBLAS LoRA (floor)": peers.unrouted_lora}


def time_speed(device, quick: bool = False, rounds: int = 20) -> list[dict]:
    from .shapes import lora_shapes
    from .timing import median_seconds

    results = []
    for shape in lora_shapes(quick):
        n = shape.batch * shape.seq
        for dtype in (torch.bfloat16, torch.float32):
            gen = torch.Generator().manual_seed(0)
            x = (torch.randn(n, shape.d, generator=gen)).to(dtype).to(device)
            idx = torch.randint(0, shape.experts, (n,), generator=gen).to(device)
            a = (torch.randn(shape.experts, shape.rank, shape.d, generator=gen) / shape.d ** 0.5).to(dtype).to(device)
            b = (torch.randn(shape.experts, shape.d, shape.rank, generator=gen) / shape.rank ** 0.5).to(dtype).to(
                device)
            gy = torch.randn(n, shape.d, generator=gen).to(dtype).to(device)
            for impl, fn in speed_impls().items():
                row = dict(shape=shape.key, tokens=n, dtype=str(dtype)[6:], impl=impl)
                for mode in ("fwd", "fwd+bwd"):
                    leaves = [t.detach().requires_grad_(mode == "fwd+bwd") for t in (x, a, b)]

                    def step(leaves=leaves, mode=mode, fn=fn):
                        y = fn(leaves[0], idx, leaves[1], leaves[2], 0.5)
                        if mode == "fwd+bwd":
                            y.backward(gy)
                    try:
                        median, best = median_seconds(step, device, rounds=rounds, warmup=2)
                        row[mode] = median
                    except Exception as err:  # e.g. torch._grouped_mm needs sm_90 and bf16
                        row[mode] = None
                        row["unsupported"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                results.append(row)
    return results


# ---------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [SECTION, "", f"{report['device']} · torch {report['torch']} · triton {report['triton']} · "
             f"{report['seconds']:.0f} s. Correctness: max |error| / max(1, max |float64 reference|) per output; "
             "timings: CUDA events, median of rounds.", "",
             "| case | errors | batch invariant | tolerance | result |", "|---|---|---|---|---|"]
    for r in report["correctness"]:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        lines.append(f"| {r['case']} | {errors} | {r['batch_invariant']} | {r['tolerance']:g} | "
                     f"{'pass' if r['passed'] else 'FAIL'} |")
    lines += ["", "| shape | dtype | implementation | fwd | fwd+bwd | vs tp_kernels (fwd+bwd) |", "|---|---|---|---|---|---|"]
    ours = {(r["shape"], r["dtype"]): r.get("fwd+bwd") for r in report["speed"] if r["impl"] == "tp_kernels.routed_lora"}
    for r in report["speed"]:
        def ms(v):
            return "n/a" if v is None else f"{v * 1e3:.3f} ms"
        base, mine = ours.get((r["shape"], r["dtype"])), r.get("fwd+bwd")
        ratio = "-" if not base or not mine else f"{mine / base:.2f}x"
        note = f" ({r['unsupported']})" if r.get("unsupported") else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['impl']}{note} | {ms(r.get('fwd'))} | {ms(mine)} | {ratio} |")
    return "\n".join(lines) + "\n"


def update_markdown(path: str, section: str) -> None:
    """Put ``section`` into the markdown file at ``path``: in place of an earlier one, else at the end."""
    from .report import replace_section

    replace_section(path, SECTION, section)


def run(device, quick: bool = False) -> dict:
    import triton

    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    report = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    report["correctness"] = check_correctness(device, quick)
    report["speed"] = time_speed(device, quick)
    report["seconds"] = time.perf_counter() - start
    report["passed"] = all(r["passed"] for r in report["correctness"])
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="gpu_check.json", help="where to write the full results")
    parser.add_argument("--markdown", default="gpu_check.md", help="where to write the markdown section")
    parser.add_argument("--update", metavar="MD", help="also put the section into this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="bf16 cases and the small shapes only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing checked",
              file=sys.stderr)
        return 2
    report = run(torch.device("cuda"), args.quick)
    section = markdown(report)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    with open(args.markdown, "w") as fh:
        fh.write(section)
    if args.update:
        update_markdown(args.update, section)
    print(section)
    failed = [r["case"] for r in report["correctness"] if not r["passed"]]
    print(f"gpu_check: {len(report['correctness']) - len(failed)}/{len(report['correctness'])} cases passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {args.json}, {args.markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
