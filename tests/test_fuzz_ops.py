"""Property tests of every public op (Hypothesis): random shapes, dtypes, index ranges, strides, empty inputs,
NaN/Inf, on each CPU backend.

Every valid call returns the float64 reference's answer (outputs and gradients) within a bound that scales
with the dtype's precision and the sizes of the terms summed; tokens with NaN/Inf inputs leave every other
token's result untouched. Every malformed call raises an error naming the argument.

Profiles: CI runs 30 examples per test, derandomized (a few seconds per op); the long profile is
``TP_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz_ops.py -s`` (random seeds; prints the examples run per op).
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import tp_kernels
from tp_kernels.gate_top1.reference import gate_top1_reference
from tp_kernels.refine_step.reference import refine_step_reference
from tp_kernels.routed_lora.reference import routed_lora_backward_reference, routed_lora_reference

EXAMPLES = int(os.environ.get("TP_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = ["reference", "cpu", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# unit roundoff of each dtype, times a safety factor for the few roundings between input and output
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float64: 2.0 ** -53}
counts = {}


def counted(name):
    counts[name] = counts.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz examples run:", dict(sorted(counts.items())))


def randn(gen, shape, dtype, *, strided=False, scale=1.0):
    """Random normal values in ``dtype``; ``strided``: a non-contiguous view of them (every other element of the
    last dim, or a transposed copy for 2-D)."""
    if not strided or not shape or min(shape) == 0:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    wide = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64) * scale).to(dtype)
    return wide[..., ::2]


def poison(gen, t, n_tok, enabled):
    """(t, rows): t (with n_tok leading rows) with NaN / +-Inf in one element of up to two random rows, as a
    contiguous copy; rows sorted. Unchanged t and no rows when not enabled or empty."""
    if not enabled or not n_tok:
        return t, []
    rows = sorted(set(torch.randint(0, n_tok, (2,), generator=gen).tolist()))
    t = t.contiguous()
    flat = t.view(n_tok, -1)
    values = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=t.dtype)
    for r in rows:
        j = int(torch.randint(0, flat.shape[1], (1,), generator=gen))
        flat[r, j] = values[int(torch.randint(0, 3, (1,), generator=gen))]
    return t, rows


def assert_matches(name, got, want, bound, ok_rows=None):
    """|got - want| <= bound elementwise on rows ok_rows (all by default); elsewhere the same finiteness."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want, bound = got.double(), want.double(), bound.double()
    if ok_rows is not None and got.dim():
        bad = ~ok_rows
        assert torch.equal(torch.isfinite(got[bad]), torch.isfinite(want[bad])), f"{name}: non-finite pattern"
        got, want, bound = got[ok_rows], want[ok_rows], bound[ok_rows]
    err = (got - want).abs()
    assert torch.all(err <= bound + 1e-30), (
        f"{name}: max error {err.max().item():.3g} at bound {bound.flatten()[err.argmax()].item():.3g}")


# ---------------------------------------------------------------- routed_lora


@st.composite
def lora_cases(draw):
    lead = tuple(draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    return dict(
        lead=lead, d_in=draw(st.integers(1, 40)), d_out=draw(st.integers(1, 24)), rank=draw(st.integers(1, 9)),
        n_exp=draw(st.integers(1, 6)), n_slice=draw(st.sampled_from([None, 1, 2, 3])),
        dtype=draw(st.sampled_from(DTYPES)), idx_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        gate=draw(st.booleans()), scale=draw(st.floats(-4, 4, allow_nan=False)), strided=draw(st.booleans()),
        skip=draw(st.booleans()),
        poison=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)), backend=draw(st.sampled_from(BACKENDS)),
    )


def lora_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    s, dt = c["n_slice"] or 1, c["dtype"]
    x = randn(gen, (*c["lead"], c["d_in"]), dt, strided=c["strided"])
    idx = torch.randint(-1 if c["skip"] else 0, c["n_exp"], c["lead"], generator=gen).to(c["idx_dtype"])
    a = randn(gen, (c["n_exp"], s, c["rank"], c["d_in"]), dt, scale=c["d_in"] ** -0.5)
    b = randn(gen, (c["n_exp"], s, c["d_out"], c["rank"]), dt, strided=c["strided"], scale=c["rank"] ** -0.5)
    if c["n_slice"] is None:
        a, b = a[:, 0], b[:, 0]
    gate = randn(gen, c["lead"], dt) if c["gate"] else None
    return gen, x, idx, a, b, gate


def lora_reference(x, idx, a, b, gate, scale, gy):
    """float64 y and grads (dx, da, db, dgate) of the flattened call, 3-D weights as S = 1."""
    a4, b4 = (a, b) if a.dim() == 4 else (a.unsqueeze(1), b.unsqueeze(1))
    d = torch.float64
    xs, ids = x.reshape(-1, x.shape[-1]).to(d), idx.reshape(-1).long()
    gs = None if gate is None else gate.reshape(-1).to(d)
    y = routed_lora_reference(xs, ids, a4.to(d), b4.to(d), gs, scale)
    dx, da, db, dg = routed_lora_backward_reference(gy.reshape(xs.shape[0], gy.shape[-1]).to(d), xs, ids, a4.to(d), b4.to(d),
                                                    gs, scale)
    return y, dx, da.reshape(a.shape), db.reshape(b.shape), dg


@FUZZ
@given(lora_cases())
def test_routed_lora_matches_reference(c):
    counted("routed_lora valid")
    note(str({k: v for k, v in c.items()}))
    gen, x, idx, a, b, gate = lora_inputs(c)
    n_tok = math.prod(c["lead"])
    x, bad_rows = poison(gen, x, n_tok, c["poison"])
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, a, b, gate)]
    with tp_kernels.use_backend(c["backend"]):
        y = tp_kernels.routed_lora(leaves[0], idx, leaves[1], leaves[2], scale=c["scale"], gate=leaves[3])
        gy = randn(gen, y.shape, y.dtype, strided=c["strided"])
        y.backward(gy)
    assert y.dtype == x.dtype and y.shape == (*c["lead"], (c["n_slice"] or 1) * c["d_out"])
    ref = lora_reference(x, idx, a, b, gate, c["scale"], gy)
    # |terms| summed: the reference on absolute values bounds every rounding error, term by term
    mag = lora_reference(x.abs(), idx, a.abs(), b.abs(), None if gate is None else gate.abs(), abs(c["scale"]),
                         gy.abs())
    eps = EPS[c["dtype"]]
    k = 8 * (c["d_in"] + c["rank"] + c["d_out"] + 4)
    # values below the dtype's normal range (a tiny scale) lose their relative precision: an absolute floor
    floor = 4 * (c["rank"] + n_tok + 1) * torch.finfo(c["dtype"]).smallest_normal
    mag = [None if m is None else m * k * eps + floor for m in mag]
    ok = torch.ones(n_tok, dtype=torch.bool)
    ok[bad_rows] = False
    assert_matches("y", y.reshape(n_tok, y.shape[-1]), ref[0], mag[0], ok)
    dx = leaves[0].grad.reshape(n_tok, c["d_in"])
    if bad_rows:  # the weights' gradients sum over tokens: only the clean tokens' own gradients are defined
        assert_matches("dx", dx, ref[1], mag[1], ok)
        return
    grads = [dx, leaves[1].grad, leaves[2].grad]
    for name, got, want, bound in zip(("dx", "da", "db"), grads, ref[1:4], mag[1:4]):
        assert_matches(name, got, want, bound)
    if gate is not None:
        assert_matches("dgate", leaves[3].grad.reshape(-1), ref[4], mag[4])


# ---------------------------------------------------------------- gate_top1


@st.composite
def gate_cases(draw):
    return dict(
        lead=tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))), n_exp=draw(st.integers(1, 12)),
        dtype=draw(st.sampled_from(DTYPES)), noise=draw(st.booleans()), hard=draw(st.booleans()),
        tau=draw(st.floats(0.05, 20)), strided=draw(st.booleans()), poison=draw(st.booleans()),
        ties=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)), backend=draw(st.sampled_from(BACKENDS)),
    )


@FUZZ
@given(gate_cases())
def test_gate_top1_matches_reference(c):
    counted("gate_top1 valid")
    note(str(c))
    gen = torch.Generator().manual_seed(c["seed"])
    shape = (*c["lead"], c["n_exp"])
    logits = randn(gen, shape, c["dtype"], strided=c["strided"], scale=3.0)
    if c["ties"]:  # exact ties: the lowest index wins
        logits = logits.round()
    noise = tp_kernels.gumbel_noise(shape, generator=gen).to(c["dtype"]) if c["noise"] else None
    n_tok = math.prod(c["lead"])
    logits, bad_rows = poison(gen, logits, n_tok, c["poison"])
    leaf = logits.clone().requires_grad_()
    with tp_kernels.use_backend(c["backend"]):
        idx, gate = tp_kernels.gate_top1(leaf, tau=c["tau"], noise=noise, hard=c["hard"])
        gw = randn(gen, gate.shape, gate.dtype)
        gate.backward(gw)
    ref_leaf = logits.double().requires_grad_()
    ref_idx, ref_gate = gate_top1_reference(ref_leaf.reshape(-1, c["n_exp"]),
                                            None if noise is None else noise.double().reshape(-1, c["n_exp"]),
                                            c["tau"], c["hard"])
    ref_gate.backward(gw.double().reshape(ref_gate.shape))
    assert idx.shape == c["lead"] and idx.dtype == torch.int64
    assert gate.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32)
    # the op adds noise in fp32 (fp64 for fp64): near-ties may break either way after that rounding
    z = logits.double() + (0 if noise is None else noise.double())
    z = z.reshape(n_tok, c["n_exp"])
    top2 = z.topk(min(2, c["n_exp"]), -1).values
    near_tie = (top2[:, 0] - top2[:, -1] < 1e-5 * (1 + top2[:, 0].abs())) if c["n_exp"] > 1 else torch.zeros(
        n_tok, dtype=torch.bool)
    exact_tie = (top2[:, 0] == top2[:, -1]) if c["n_exp"] > 1 else near_tie
    clean = torch.ones(n_tok, dtype=torch.bool)
    clean[bad_rows] = False
    decided = clean & (~near_tie | (exact_tie & (noise is None)))
    assert torch.equal(idx.reshape(-1)[decided], ref_idx[decided]), "expert_idx differs from the reference"
    bad = ~clean
    assert torch.equal(idx.reshape(-1)[bad], ref_idx[bad]), "NaN/Inf rows: argmax semantics differ from torch"
    tol = 64 * 2.0 ** -24 if c["dtype"] != torch.float64 else 1e-12
    ok = decided
    if c["hard"]:  # exactly 1 forward, by definition (the reference's 1 + p - sg(p) is NaN on a NaN row)
        assert bool((gate == 1).all())
    else:
        assert_matches("gate", gate.reshape(n_tok, c["n_exp"]), ref_gate.reshape(n_tok, c["n_exp"]).detach(),
                       torch.full((n_tok, c["n_exp"]), tol), ok)
    # d logits is computed at tol and returned in the logits' dtype (one more rounding)
    grad_bound = (tol + 2 * EPS[c["dtype"]]) * (1 + (gw.abs().max().item() if gw.numel() else 0)) / c["tau"] * 4
    assert_matches("dlogits", leaf.grad.reshape(n_tok, c["n_exp"]), ref_leaf.grad.reshape(n_tok, c["n_exp"]),
                   torch.full((n_tok, c["n_exp"]), grad_bound), ok)


# ---------------------------------------------------------------- refine_step


@st.composite
def refine_cases(draw):
    batch, tokens = draw(st.integers(0, 3)), draw(st.integers(0, 8))
    return dict(
        lead=(batch, tokens), dim=draw(st.integers(2, 40)), d_out=draw(st.integers(1, 20)),
        rank=draw(st.integers(1, 8)), n_exp=draw(st.integers(1, 6)), n_slice=draw(st.sampled_from([None, 1, 3])),
        dtype=draw(st.sampled_from(DTYPES)), token=draw(st.booleans()),
        cond=draw(st.sampled_from([None, "sample", "token", "global"])), noise=draw(st.booleans()),
        base=draw(st.booleans()), tau=draw(st.floats(0.1, 10)), scale=draw(st.floats(-3, 3)),
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])), mean=draw(st.floats(-50, 50)), strided=draw(st.booleans()),
        active=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)), backend=draw(st.sampled_from(BACKENDS)),
    )


@FUZZ
@given(refine_cases())
def test_refine_step_matches_reference(c):
    counted("refine_step valid")
    note(str(c))
    gen = torch.Generator().manual_seed(c["seed"])
    lead, dt, e, s = c["lead"], c["dtype"], c["n_exp"], c["n_slice"] or 1
    state = (randn(gen, (*lead, c["dim"]), torch.float64, strided=c["strided"]) * 1.5 + c["mean"]).to(dt)
    a = randn(gen, (e, s, c["rank"], c["dim"]), dt, scale=c["dim"] ** -0.5)
    b = randn(gen, (e, s, c["d_out"], c["rank"]), dt, scale=c["rank"] ** -0.5)
    if c["n_slice"] is None:
        a, b = a[:, 0], b[:, 0]
    cond_shape = {"sample": (lead[0], 1, e), "token": (*lead, e), "global": (e,), None: None}[c["cond"]]
    inputs = dict(
        token_weight=randn(gen, (e, c["dim"]), dt, scale=0.5) if c["token"] else None,
        cond_logits=randn(gen, cond_shape, torch.float32) if c["cond"] else None,
        noise=tp_kernels.gumbel_noise((*lead, e), generator=gen) if c["noise"] else None,
        base=randn(gen, (*lead, s * c["d_out"]), dt, strided=c["strided"]) if c["base"] else None,
    )
    leaves = {k: (v.clone().requires_grad_() if v is not None and k != "noise" else v)
              for k, v in dict(state=state, lora_a=a, lora_b=b, **inputs).items()}
    active = torch.rand(lead, generator=gen) < 0.7 if c["active"] else None
    with tp_kernels.use_backend(c["backend"]):
        qkv, idx, weight = tp_kernels.refine_step(
            leaves["state"], leaves["lora_a"], leaves["lora_b"], tau=c["tau"], scale=c["scale"], eps=c["eps"],
            active=active, **{k: leaves[k] for k in inputs})
        gq = randn(gen, qkv.shape, qkv.dtype, strided=c["strided"])
        gw = randn(gen, (), weight.dtype).expand(weight.shape)  # a loss on the gate weight: stride-0 grad
        torch.autograd.backward([t for t in (qkv, weight) if t.requires_grad],
                                [g for t, g in ((qkv, gq), (weight, gw)) if t.requires_grad])
    assert qkv.shape == (*lead, s * c["d_out"]) and qkv.dtype == dt and idx.shape == lead
    # reference at the op's routing (near-ties at low precision may route differently; see test_refine.py)
    n_tok = math.prod(lead)
    d = torch.float64
    ref = {k: (v.detach().to(d).requires_grad_() if v is not None and k != "noise" else v)
           for k, v in dict(state=state, lora_a=a, lora_b=b, **inputs).items()}
    a4, b4 = (ref["lora_a"], ref["lora_b"]) if a.dim() == 4 else (ref["lora_a"][:, None], ref["lora_b"][:, None])
    cond = ref["cond_logits"]
    ref_qkv, ref_idx, ref_w = refine_step_reference(
        ref["state"].reshape(n_tok, c["dim"]), a4, b4, ref["token_weight"],
        None if cond is None else cond.expand(*lead, e).reshape(n_tok, e), c["tau"],
        None if inputs["noise"] is None else inputs["noise"].to(d).reshape(n_tok, e), c["scale"],
        None if ref["base"] is None else ref["base"].reshape(n_tok, s * c["d_out"]), c["eps"], idx.reshape(-1),
        active=None if active is None else active.reshape(-1))
    pairs = [(ref_qkv, gq.to(d).reshape(n_tok, s * c["d_out"])), (ref_w, gw.to(d).reshape(-1))]
    torch.autograd.backward(*zip(*[(t, g) for t, g in pairs if t.requires_grad]))
    eps = EPS[dt] if dt != torch.float32 else 2.0 ** -20
    width = c["dim"] + c["rank"] + c["d_out"] + 8
    # LayerNorm's condition: max |a| / std per token (|mean| >> std, or a short row of near-equal values): the
    # centring loses that many digits, and its gradient scales with 1 / std
    rows = state.double().reshape(n_tok, c["dim"])
    cond = (rows.abs().amax(-1) / (rows.std(-1, unbiased=False) + c["eps"] ** 0.5)).max().item() if n_tok else 1.0
    big = 1 + cond
    scale_q = (1 + ref_qkv.detach().abs().max().item()) if n_tok else 1
    assert_matches("qkv", qkv.reshape(n_tok, s * c["d_out"]), ref_qkv.detach(),
                   torch.full_like(ref_qkv, 16 * width * eps * big * scale_q))
    for name, leaf in leaves.items():
        if leaf is None or name == "noise":
            continue
        want = ref[name].grad
        if want is None:
            want = torch.zeros_like(ref[name])
        got = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        leaf_eps = max(eps, EPS[leaf.dtype])  # cond_logits stays float32 with any state dtype
        bound = 64 * width * leaf_eps * big * (1 + want.abs().max().item() if want.numel() else 1)
        assert_matches(f"d{name}", got, want.reshape(got.shape), torch.full(got.shape, bound, dtype=d))


# ---------------------------------------------------------------- malformed calls


def _lora_call(x=None, idx=None, a=None, b=None, **kw):
    x = torch.randn(5, 8) if x is None else x
    idx = torch.tensor([0, 1, 2, 0, 1]) if idx is None else idx
    a = torch.randn(3, 4, 8) if a is None else a
    b = torch.randn(3, 6, 4) if b is None else b
    return tp_kernels.routed_lora(x, idx, a, b, **kw)


def _gate_call(logits=None, **kw):
    return tp_kernels.gate_top1(torch.randn(5, 3) if logits is None else logits, **kw)


def _refine_call(state=None, a=None, b=None, **kw):
    state = torch.randn(2, 5, 8) if state is None else state
    a = torch.randn(3, 2, 4, 8) if a is None else a
    b = torch.randn(3, 2, 6, 4) if b is None else b
    return tp_kernels.refine_step(state, a, b, **kw)


NONFINITE = st.sampled_from([float("nan"), float("inf"), -float("inf")])
MALFORMED = [
    # (op, argument name, strategy of a bad value, call)
    ("routed_lora", "x", st.sampled_from([torch.randn(5, 9), torch.randn(5), torch.zeros(5, 8, dtype=torch.int32)]),
     lambda v: _lora_call(x=v)),
    ("routed_lora", "expert_idx", st.integers(3, 10 ** 6) | st.integers(-10 ** 6, -2),
     lambda v: _lora_call(idx=torch.tensor([0, 1, v, 0, 1]))),
    ("routed_lora", "expert_idx", st.sampled_from([torch.zeros(5), torch.zeros(4, dtype=torch.int64),
                                                  torch.zeros(5, 1, dtype=torch.int64)]),
     lambda v: _lora_call(idx=v)),
    ("routed_lora", "lora_a", st.sampled_from([torch.randn(3, 4), torch.randn(3, 4, 7), torch.randn(0, 4, 8)]),
     lambda v: _lora_call(a=v)),
    ("routed_lora", "lora_b", st.sampled_from([torch.randn(3, 6, 5), torch.randn(2, 6, 4),
                                              torch.randn(3, 6, 4, dtype=torch.float64)]),
     lambda v: _lora_call(b=v)),
    ("routed_lora", "gate", st.sampled_from([torch.rand(4), torch.rand(5, 1), torch.ones(5, dtype=torch.int64)]),
     lambda v: _lora_call(gate=v)),
    ("routed_lora", "scale", NONFINITE | st.sampled_from(["1", None, torch.tensor(1.0)]),
     lambda v: _lora_call(scale=v)),
    ("gate_top1", "tau", NONFINITE | st.floats(max_value=0.0, allow_nan=False) | st.sampled_from(["1", None]),
     lambda v: _gate_call(tau=v)),
    ("gate_top1", "logits", st.sampled_from([torch.zeros(5, 0), torch.zeros(5, 3, dtype=torch.int64),
                                            torch.tensor(1.0)]),
     lambda v: _gate_call(logits=v)),
    ("gate_top1", "noise", st.sampled_from([torch.zeros(5, 4), torch.zeros(4, 3), torch.zeros(5, 3, dtype=torch.int32)]),
     lambda v: _gate_call(noise=v)),
    ("refine_step", "tau", NONFINITE | st.floats(max_value=0.0, allow_nan=False), lambda v: _refine_call(tau=v)),
    ("refine_step", "eps", NONFINITE | st.floats(max_value=0.0, allow_nan=False), lambda v: _refine_call(eps=v)),
    ("refine_step", "scale", NONFINITE, lambda v: _refine_call(scale=v)),
    ("refine_step", "state", st.sampled_from([torch.randn(2, 5, 7), torch.zeros(2, 5, 8, dtype=torch.int64)]),
     lambda v: _refine_call(state=v)),
    ("refine_step", "token_weight", st.sampled_from([torch.randn(4, 8), torch.randn(3, 7), torch.randn(3, 8).double()]),
     lambda v: _refine_call(token_weight=v)),
    ("refine_step", "cond_logits", st.sampled_from([torch.randn(3, 1, 3), torch.randn(2, 5, 4), torch.randn(4)]),
     lambda v: _refine_call(cond_logits=v)),
    ("refine_step", "noise", st.sampled_from([torch.randn(2, 5, 4), torch.randn(2, 4, 3)]),
     lambda v: _refine_call(noise=v)),
    ("refine_step", "base", st.sampled_from([torch.randn(2, 5, 11), torch.randn(2, 5, 12).double()]),
     lambda v: _refine_call(base=v)),
    ("refine_step", "lora_b", st.sampled_from([torch.randn(3, 2, 6, 5), torch.randn(3, 6, 4)]),
     lambda v: _refine_call(b=v)),
]


@pytest.mark.parametrize("op, name, values, call", MALFORMED, ids=[f"{m[0]}-{m[1]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_call_names_the_argument(op, name, values, call):
    @FUZZ
    @given(value=values, backend=st.sampled_from(BACKENDS))
    def run(value, backend):
        counted(f"{op} malformed")
        with tp_kernels.use_backend(backend), pytest.raises((TypeError, ValueError, IndexError)) as info:
            call(value)
        assert name in str(info.value), f"{name!r} not named in: {info.value}"

    run()
