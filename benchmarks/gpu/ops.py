"""The ops on the device against the float64 reference on CPU: routed_lora, refine_step and gate_top1 forward and
gradients, eager and under torch.compile.

Every case runs bf16, fp16 and fp32 under both of torch's fp32 matmul settings (TF32 allowed: "tf32"; torch's
default: 3xTF32) at 3 experts, and bf16 and fp32 at 2 and 5 experts (the gate's padded width BLOCK_E is 2, 4 and 8:
a miscompiled reduction over experts shows at some widths only), at multi-tile shapes with rank 128, with strided
upstream gradients and a loss on the gate weight, and with routing collapsed onto one expert (several
weight-gradient chunks). Eager cases also check batch invariance (a token's outputs and input gradient are the
same bits in any batch). Each compiled case is its eager twin with the op call inside ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from tp_kernels._aot import allow_tf32

from .env import compile_fn, describe

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
TF32_TOL = 3e-3  # TF32 keeps 10 mantissa bits
PRECISIONS = ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True))


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
    compiled: bool = False


def _label(dtype, tf32):
    return f"{str(dtype)[6:]}{' tf32' if tf32 else ''}"


def correctness_cases(quick: bool = False, compiled: bool = True) -> list[Case]:
    """The eager cases, then (``compiled``) the same cases compiled."""
    cases = []
    for op in ("routed_lora", "refine_step"):
        for dtype, tf32 in PRECISIONS:
            cases.append(Case(f"{op} {_label(dtype, tf32)} E=3", op, dtype, tf32))
        for experts in (2, 5):
            for dtype in (torch.bfloat16, torch.float32):
                cases.append(Case(f"{op} {_label(dtype, False)} E={experts}", op, dtype, experts=experts))
        cases.append(Case(f"{op} collapsed routing, 3 weight-gradient chunks", op, torch.float32,
                          tokens=1300, d_in=64, d_out=48, rank=16, collapsed=True))
    for experts in (2, 3, 5):
        cases.append(Case(f"gate_top1 fp32 E={experts}", "gate_top1", torch.float32, tokens=5000, experts=experts))
    if quick:  # the low-precision cases at every expert count, small sizes
        cases = [dataclasses.replace(c, tokens=min(c.tokens, 120), d_in=40, d_out=36, rank=16) for c in cases
                 if c.dtype == torch.bfloat16 or c.op == "gate_top1"]
    if compiled:
        cases += [dataclasses.replace(c, name=f"{c.name}, compiled", compiled=True) for c in cases]
    return cases


def rel_err(got, want):
    """max |got - want| / max(1, max |want|), on CPU in float64."""
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


def run_routed_lora(case: Case, device, gen, wrap):
    """(outputs and grads on ``device``, the same from the float64 reference on CPU) as dicts of tensors."""
    import tp_kernels
    from tp_kernels.routed_lora.reference import routed_lora_backward_reference, routed_lora_reference

    x, a, b, idx = _inputs(case, gen)
    gate = torch.rand(case.tokens, generator=gen) + 0.5
    x, a, b, gate = (t.to(case.dtype) for t in (x, a, b, gate))
    gy, _ = _upstream((case.tokens, case.slices * case.d_out), (case.tokens,), case.dtype, gen, case.strided)
    leaves = [_leaf(t, device) for t in (x, a, b, gate)]

    def call(x, idx, a, b, gate):
        return tp_kernels.routed_lora(x, idx, a, b, scale=0.5, gate=gate)

    y = wrap(call)(leaves[0], idx.to(device), leaves[1], leaves[2], leaves[3])
    y.backward(gy.to(device))
    got = dict(y=y.detach(), dx=leaves[0].grad, da=leaves[1].grad, db=leaves[2].grad, dgate=leaves[3].grad)
    d = torch.float64
    want_y = routed_lora_reference(x.to(d), idx, a.to(d), b.to(d), gate.to(d), 0.5)
    dx, da, db, dg = routed_lora_backward_reference(gy.to(d), x.to(d), idx, a.to(d), b.to(d), gate.to(d), 0.5)
    return got, dict(y=want_y, dx=dx, da=da, db=db, dgate=dg)


def run_refine_step(case: Case, device, gen, wrap):
    import tp_kernels
    from tp_kernels.refine_step.reference import refine_step_reference

    names = ("state", "a", "b", "tw", "cond", "base")
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

    def call(x, a, b, tw, cond, base, noise):
        return tp_kernels.refine_step(x, a, b, token_weight=tw, cond_logits=cond, noise=noise, base=base, tau=5.0,
                                      scale=0.5)

    qkv, idx, weight = wrap(call)(*leaves, noise.to(device))
    torch.autograd.backward([qkv, weight], [gq.to(device), gw.to(device)])
    got = dict(qkv=qkv.detach(), **{f"d{k}": leaf.grad for k, leaf in zip(names, leaves)})
    d = torch.float64
    ref = [t.detach().to(d).requires_grad_() for t in (x, a, b, tw, cond, base)]
    # at the routing the op chose: a near-tie at low precision may go either way
    want_qkv, _, want_w = refine_step_reference(ref[0], ref[1], ref[2], ref[3], ref[4], 5.0, noise.to(d), 0.5,
                                                ref[5], 1e-6, idx.cpu())
    torch.autograd.backward([want_qkv, want_w], [gq.to(d), gw.to(d)])
    want = dict(qkv=want_qkv.detach(), **{f"d{k}": leaf.grad for k, leaf in zip(names, ref)})
    return got, want


def run_gate_top1(case: Case, device, gen, wrap):
    import tp_kernels
    from tp_kernels.gate_top1.reference import gate_top1_reference

    logits = torch.randn(case.tokens, case.experts, generator=gen) * 3
    noise = tp_kernels.gumbel_noise(logits.shape, generator=gen)
    gw = torch.randn(case.tokens, generator=gen)
    leaf = _leaf(logits, device)

    def call(logits, noise):
        return tp_kernels.gate_top1(logits, tau=5.0, noise=noise)

    idx, gate = wrap(call)(leaf, noise.to(device))
    gate.backward(gw.to(device))
    ref = logits.double().requires_grad_()
    want_idx, want_gate = gate_top1_reference(ref, noise.double(), 5.0)
    want_gate.backward(gw.double())
    return (dict(idx=idx.double(), gate=gate.detach(), dlogits=leaf.grad),
            dict(idx=want_idx.double(), gate=want_gate.detach(), dlogits=ref.grad))


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


def _run_case(case: Case, device, backend: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    if case.compiled:
        torch._dynamo.reset()  # each case compiles afresh: no entry of an earlier case's shapes is reused

    def wrap(fn):
        return compile_fn(fn, backend) if case.compiled else fn

    with allow_tf32(case.tf32):  # the fp32 precision the kernels follow
        got, want = RUNNERS[case.op](case, device, gen, wrap)
        invariant = batch_invariant(case, device) if case.op != "gate_top1" and not case.compiled else None
    tol = TF32_TOL if case.tf32 else TOL[case.dtype]
    errors = {k: rel_err(got[k], want[k]) for k in want if want[k] is not None}
    if case.op == "gate_top1":
        errors["idx"] = float((got["idx"].cpu() != want["idx"]).sum())  # mismatched experts
    ok = all(v <= (0 if k == "idx" else tol) for k, v in errors.items()) and invariant is not False
    return dict(tolerance=tol, errors=errors, batch_invariant=invariant, passed=bool(ok))


def check_correctness(device, quick: bool = False, backend: str = "inductor", compiled: bool = True,
                      budget=None) -> list[dict]:
    """Every case: max relative error per output (over max(1, max |reference|)) and pass/fail. A case that raises
    fails with the error recorded (an op that does not compile is a failure to report, not a crash). A compiled
    case runs only while ``budget`` (env.Budget) has time for it."""
    results = []
    for case in correctness_cases(quick, compiled):
        if case.compiled and budget is not None and not budget.allows(f"ops: {case.name}", need=5):
            continue
        start = time.perf_counter()
        row = dict(case=case.name, op=case.op, dtype=str(case.dtype)[6:], tf32=case.tf32, experts=case.experts,
                   compiled=case.compiled)
        try:
            row.update(_run_case(case, device, backend))
        except Exception as err:  # noqa: BLE001 -- recorded as the case's failure
            row.update(tolerance=None, errors={}, batch_invariant=None, passed=False, error=describe(err))
        row["seconds"] = time.perf_counter() - start
        results.append(row)
    return results
