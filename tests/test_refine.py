"""tp_kernels.refine_step: every CPU backend vs the float64 reference, forward and gradients, plus plumbing.

The Triton kernels run the same checks under the interpreter (tests/interpret/test_refine_triton.py).
"""

import pytest
import torch
import torch.nn.functional as F

import tp_kernels
from tp_kernels.refine_step.op import refine_step_bwd, refine_step_fwd
from tp_kernels.refine_step.reference import refine_step_reference

from kernel_helpers import assert_close  # tests/ is on sys.path

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
# Cases: name -> (lead, D, D_out, R, E, S or None (3-D weights), token term, cond kind, noise, base)
CASES = {
    "full": ((2, 9), 24, 16, 4, 3, 3, True, "sample", True, True),
    "tokens_only_no_noise": ((2, 9), 24, 16, 4, 3, 3, True, None, False, False),
    "cond_per_token_base": ((3, 5), 16, 8, 8, 4, 3, False, "token", True, True),
    "global_cond_flat_tokens": ((21,), 20, 12, 2, 5, 2, True, "global", True, False),
    "no_gate_inputs": ((2, 4), 16, 16, 4, 3, 3, False, None, False, True),
    "odd_unstacked": ((3, 11), 37, 19, 3, 7, None, True, "sample", True, True),
    "expanded_cond": ((2, 6), 16, 8, 4, 3, 3, True, "per_position", True, True),
}


def make_case(case, dtype=torch.float32, seed=0, mean=0.5):
    """Inputs of a CASES entry, by name or as a tuple (state with a non-zero mean: the LayerNorm's centring matters)."""
    lead, d, d_out, rank, n_exp, n_slice, token, cond, noise, base = CASES[case] if isinstance(case, str) else case
    g = torch.Generator().manual_seed(seed)
    s = n_slice or 1
    a = torch.randn(n_exp, s, rank, d, generator=g) / d ** 0.5
    b = torch.randn(n_exp, s, d_out, rank, generator=g) / rank ** 0.5
    cond_shape = {"sample": (lead[0], *(1,) * (len(lead) - 1), n_exp), "token": (*lead, n_exp), "global": (n_exp,),
                  "per_position": (1, *lead[1:], n_exp), None: None}[cond]
    return dict(
        state=(torch.randn(*lead, d, generator=g) * 1.5 + mean).to(dtype),
        lora_a=(a if n_slice else a[:, 0]).to(dtype),
        lora_b=(b if n_slice else b[:, 0]).to(dtype),
        token_weight=(torch.randn(n_exp, d, generator=g) * 0.5).to(dtype) if token else None,
        cond_logits=torch.randn(cond_shape, generator=g) if cond else None,
        noise=tp_kernels.gumbel_noise((*lead, n_exp), generator=g) if noise else None,
        base=torch.randn(*lead, s * d_out, generator=g).to(dtype) if base else None,
    )


DIFFERENTIABLE = ("state", "lora_a", "lora_b", "token_weight", "cond_logits", "base")


def reference(inputs, tau, scale, expert_idx=None):
    """float64 leaves and outputs of the spec; cond broadcast to every token by torch (not the op's grouping)."""
    leaves = {k: (v.detach().double().requires_grad_(k in DIFFERENTIABLE) if v is not None else None)
              for k, v in inputs.items()}
    state = leaves["state"]
    lead, d = state.shape[:-1], state.shape[-1]
    a, b = leaves["lora_a"], leaves["lora_b"]
    if a.dim() == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    n_exp = a.shape[0]
    cond = leaves["cond_logits"]
    flat = None if cond is None else cond.expand(*lead, n_exp).reshape(-1, n_exp)  # (N, E): G = N
    noise, base = leaves["noise"], leaves["base"]
    qkv, idx, weight = refine_step_reference(
        state.reshape(-1, d), a, b, leaves["token_weight"], flat, tau,
        None if noise is None else noise.reshape(-1, n_exp), scale,
        None if base is None else base.reshape(-1, base.shape[-1]), 1e-6, expert_idx)
    return leaves, qkv.reshape(*lead, -1), idx.reshape(lead), weight.reshape(lead)


def margins(inputs):
    """Per token: the gap between the largest and second-largest float64 z (inf with one expert)."""
    with torch.no_grad():
        leaves, *_ = reference(inputs, 1.0, 1.0)
        d = inputs["state"].shape[-1]
        h = F.layer_norm(leaves["state"], (d,), eps=1e-6)
        n_exp = inputs["lora_a"].shape[0]
        z = torch.zeros(*h.shape[:-1], n_exp, dtype=torch.float64)
        for term in (None if leaves["token_weight"] is None else h @ leaves["token_weight"].t(),
                     leaves["cond_logits"], leaves["noise"]):
            if term is not None:
                z = z + term
        if n_exp == 1:
            return torch.full(z.shape[:-1], float("inf"), dtype=torch.float64)
        top = z.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]


def _backward(outputs, grads):
    """Backward through the outputs that have a graph (the weight has none when no gate input is differentiable)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def upstream_grads(qkv, weight, seed, strided=False):
    """Random d loss / d qkv and d loss / d weight; ``strided``: laid out as autograd often hands them over,
    d qkv a every-other-column view and d weight one value expanded (stride 0, as ``weight.sum()`` gives)."""
    g = torch.Generator().manual_seed(seed)
    if not strided:
        return torch.randn(qkv.shape, generator=g).to(qkv.dtype), torch.randn(weight.shape, generator=g)
    grad_qkv = torch.randn(*qkv.shape[:-1], 2 * qkv.shape[-1], generator=g).to(qkv.dtype)[..., ::2]
    return grad_qkv, torch.randn((), generator=g).expand(weight.shape)


def check(inputs, tau=2.0, scale=0.5, tol=None, seed=1, need=DIFFERENTIABLE, strided_grads=False):
    """refine_step forward + backward (through qkv and the gate weight) vs the float64 reference;
    gradients for the inputs named in ``need``; ``strided_grads``: non-contiguous upstream gradients."""
    dtype = inputs["state"].dtype
    tol = TOL[dtype] if tol is None else tol
    leaves = {k: (v.clone().requires_grad_(k in need) if v is not None else None)
              for k, v in inputs.items()}
    kwargs = {k: v for k, v in leaves.items() if k not in ("state", "lora_a", "lora_b")}
    qkv, idx, weight = tp_kernels.refine_step(leaves["state"], leaves["lora_a"], leaves["lora_b"], tau=tau,
                                              scale=scale, **kwargs)
    lead = inputs["state"].shape[:-1]
    assert qkv.dtype == dtype and idx.dtype == torch.int64 and idx.shape == lead and weight.shape == lead
    assert weight.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.all(weight == 1)
    grad_qkv, grad_weight = upstream_grads(qkv, weight, seed, strided_grads)
    _backward([qkv, weight], [grad_qkv, grad_weight.to(weight.dtype)])

    # Routing: the float64 argmax wherever it is not a near-tie at this dtype's precision; then everything
    # else is compared at the routing the op chose.
    _, _, ref_idx, _ = reference(inputs, tau, scale)
    clear = margins(inputs) > (0.05 if dtype in (torch.bfloat16, torch.float16) else 0)
    assert torch.equal(idx[clear], ref_idx[clear]), "expert_idx differs from the float64 argmax"
    ref_leaves, ref_qkv, _, ref_weight = reference(inputs, tau, scale, expert_idx=idx.reshape(-1))
    _backward([ref_qkv, ref_weight], [grad_qkv.double(), grad_weight.double()])
    assert_close(qkv, ref_qkv, tol, "qkv")
    for name in need:
        if leaves[name] is not None:
            assert leaves[name].grad is not None, f"no gradient for {name}"
            assert leaves[name].grad.dtype == leaves[name].dtype
            leaf_tol = max(tol, TOL[leaves[name].dtype])  # cond_logits stays float32 with a float64 state
            assert_close(leaves[name].grad, ref_leaves[name].grad, leaf_tol, f"d{name}")
    return qkv, idx, leaves


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend, name):
    check(make_case(name))


def test_normalize_false_uses_the_state_as_is(backend):
    """normalize=False: h = state, on every backend (forward and gradients vs the float64 reference)."""
    inputs = make_case("full")
    leaves = {k: v.detach().double().requires_grad_(k in ("state", "lora_b")) for k, v in inputs.items()}
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in leaves.items()}
    want, want_idx, _ = refine_step_reference(flat["state"], leaves["lora_a"], leaves["lora_b"], flat["token_weight"],
                                              leaves["cond_logits"].expand(2, 9, 3).reshape(-1, 3), 2.0,
                                              flat["noise"], 0.5, flat["base"], normalize=False)
    got, idx, _ = tp_kernels.refine_step(leaves["state"], leaves["lora_a"], leaves["lora_b"],
                                         token_weight=leaves["token_weight"], cond_logits=leaves["cond_logits"],
                                         tau=2.0, noise=leaves["noise"], scale=0.5, base=leaves["base"],
                                         normalize=False)
    assert torch.equal(idx.reshape(-1), want_idx)
    torch.testing.assert_close(got.reshape(want.shape), want)
    grads = torch.autograd.grad(got.square().sum(), [leaves["state"], leaves["lora_b"]])
    want_grads = torch.autograd.grad(want.square().sum(), [leaves["state"], leaves["lora_b"]])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="normalize"):
        tp_kernels.refine_step(leaves["state"], leaves["lora_a"], leaves["lora_b"], normalize=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", ["full", "odd_unstacked"])
def test_other_dtypes(backend, name, dtype):
    check(make_case(name, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_with_large_mean(backend, dtype):
    """|mean| >> std in bf16/fp16: the LayerNorm statistics must not be kept in the input's dtype (torch's CPU
    LayerNorm does, and its backward then returns garbage)."""
    check(make_case("full", dtype, mean=40.0))


@pytest.mark.parametrize("name", ["full", "odd_unstacked"])
def test_strided_upstream_grads(backend, name):
    """A loss on the gate weight (``weight.sum()``: a stride-0 gradient) and a non-contiguous d qkv."""
    check(make_case(name), strided_grads=True)


def test_large_mean_state(backend):
    """|mean| >> std: the LayerNorm must not lose the tokens to cancellation."""
    check(make_case("full", mean=300.0), tol=1e-4)


def test_zero_b_gives_the_base_exactly(backend):
    inputs = make_case("full")
    inputs["lora_b"] = torch.zeros_like(inputs["lora_b"])
    with torch.no_grad():
        qkv, _, _ = tp_kernels.refine_step(inputs["state"], inputs["lora_a"], inputs["lora_b"], tau=5.0,
                                           **{k: inputs[k] for k in ("token_weight", "cond_logits", "noise", "base")})
    assert torch.equal(qkv, inputs["base"])


PARTIAL = [("state",), ("token_weight", "cond_logits"), ("lora_a", "lora_b", "base"), ("state", "cond_logits")]


@pytest.mark.parametrize("need", PARTIAL, ids="+".join)
def test_partial_grads(backend, need):
    _, _, leaves = check(make_case("full"), need=need)
    assert all(v.grad is None for k, v in leaves.items() if v is not None and k not in need)


def test_no_tokens(backend):
    check_no_tokens()


def check_no_tokens():
    """(2, 0, D) state: empty outputs, zero weight gradients."""
    inputs = make_case("full")
    empty = {k: (v[:, :0] if v is not None and v.dim() > 1 and k not in ("lora_a", "lora_b", "token_weight",
                                                                            "cond_logits") else v)
             for k, v in inputs.items()}
    leaves = {k: (v.clone().requires_grad_() if k in ("lora_a", "lora_b") else v) for k, v in empty.items()}
    qkv, idx, _ = tp_kernels.refine_step(leaves["state"], leaves["lora_a"], leaves["lora_b"], tau=2.0,
                                         **{k: leaves[k] for k in ("token_weight", "cond_logits", "noise", "base")})
    assert qkv.shape == (2, 0, 48) and idx.shape == (2, 0)
    qkv.sum().backward()
    assert leaves["lora_a"].grad.abs().sum() == 0 and leaves["lora_b"].grad.abs().sum() == 0


def test_bit_identical_repeats(backend):
    inputs = make_case("full")
    a = check(inputs)
    b = check(inputs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in DIFFERENTIABLE:
        assert torch.equal(a[2][name].grad, b[2][name].grad), name


def test_cond_grouping_matches_per_token_rows(backend):
    """Per-sample cond_logits (G = N rows used by T tokens each) == the same rows expanded to every token."""
    inputs = make_case("full")
    per_token = dict(inputs, cond_logits=inputs["cond_logits"].expand(2, 9, 3).clone())
    with torch.no_grad():
        grouped = tp_kernels.refine_step(inputs["state"], inputs["lora_a"], inputs["lora_b"], tau=2.0,
                                         **{k: inputs[k] for k in ("token_weight", "cond_logits", "noise", "base")})
        expanded = tp_kernels.refine_step(per_token["state"], per_token["lora_a"], per_token["lora_b"], tau=2.0,
                                          **{k: per_token[k] for k in ("token_weight", "cond_logits", "noise", "base")})
    assert torch.equal(grouped[1], expanded[1]) and torch.equal(grouped[0], expanded[0])


@pytest.mark.parametrize("change,match", [
    (dict(state=torch.zeros(2, 9, 24, dtype=torch.int64)), "state must have dtype"),
    (dict(lora_a=torch.zeros(3, 3, 4, 24, dtype=torch.float64)), "lora_a and lora_b must have state's dtype"),
    (dict(lora_a=torch.zeros(3, 3, 4, 25)), "state's last dim"),
    (dict(lora_b=torch.zeros(3, 2, 16, 4)), "lora_b .* does not match lora_a"),
    (dict(token_weight=torch.zeros(4, 24)), "token_weight must have shape"),
    (dict(token_weight=torch.zeros(3, 24, dtype=torch.float64)), "token_weight must have dtype"),
    (dict(cond_logits=torch.zeros(2, 1, 4)), "cond_logits must be broadcastable"),
    (dict(cond_logits=torch.zeros(3, 1, 3)), "cond_logits must be broadcastable"),
    (dict(noise=torch.zeros(2, 9, 4)), "noise must have shape"),
    (dict(base=torch.zeros(2, 9, 47)), "base must have shape"),
    (dict(base=torch.zeros(2, 9, 48, dtype=torch.float64)), "base must have dtype"),
    (dict(tau=0.0), "tau must be a finite positive"),
    (dict(tau=float("inf")), "tau must be a finite positive"),
    (dict(eps=-1.0), "eps must be a finite positive"),
    (dict(scale=float("nan")), "scale must be a finite"),
    (dict(scale="1"), "scale must be a Python float"),
])
def test_bad_input_names_the_argument(change, match):
    inputs = make_case("full")
    kwargs = dict(tau=2.0, **{k: inputs[k] for k in ("token_weight", "cond_logits", "noise", "base")})
    args = {k: inputs[k] for k in ("state", "lora_a", "lora_b")}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises((TypeError, ValueError), match=match):
        tp_kernels.refine_step(args["state"], args["lora_a"], args["lora_b"], **kwargs)


def _op_args(with_optional, grad=True, normalize=True):
    inputs = make_case("full")
    n_tok = 18
    args = [inputs["state"].reshape(n_tok, -1), inputs["lora_a"], inputs["lora_b"]]
    opt = [inputs["token_weight"], inputs["cond_logits"].reshape(2, -1), inputs["noise"].reshape(n_tok, -1),
           inputs["base"].reshape(n_tok, -1)]
    if not with_optional:
        opt = [opt[0], None, None, None]
    args = [t.clone().requires_grad_(grad) for t in args]
    opt = [None if t is None else t.clone().requires_grad_(grad and i != 2) for i, t in enumerate(opt)]
    return args + opt + [2.0, 0.5, 1e-6, normalize]


@pytest.mark.parametrize("with_optional,normalize", [(True, True), (False, True), (True, False)])
def test_opcheck_fwd(backend, with_optional, normalize):
    torch.library.opcheck(refine_step_fwd, tuple(_op_args(with_optional, normalize=normalize)))


def test_opcheck_fwd_active_mask(backend):
    active = torch.arange(18) % 3 != 0
    torch.library.opcheck(refine_step_fwd, tuple(_op_args(True)) + (active,))


@pytest.mark.parametrize("needs,normalize", [((True, True, True, True), True), ((True, False, False, False), True),
                                             ((False, True, False, True), True), ((True, True, True, True), False)])
def test_opcheck_bwd(backend, needs, normalize):
    args = _op_args(True, grad=False, normalize=normalize)
    qkv, weight, idx, probs, lora_h, perm, offsets, mean, rstd = refine_step_fwd(*args)
    assert mean.shape == rstd.shape == ((18,) if normalize else (0,))
    state, lora_a, lora_b, token_weight = args[:4]
    torch.library.opcheck(refine_step_bwd, (torch.randn_like(qkv), torch.randn_like(weight), state, lora_a, lora_b,
                                            token_weight, idx, probs, lora_h, perm, offsets, mean, rstd, 2, 2.0, 0.5,
                                            1e-6, normalize, *needs))


def check_batch_invariance(dtype=torch.float32, dot_tol=None):
    """A token's qkv, expert, gate weight and state gradient are bit-identical whatever other tokens share its
    batch (gradients of the weights, sums over tokens, excepted). ``dot_tol``: qkv and the state gradient, which
    come out of matrix products, need only agree to that tolerance (rtol = atol; see the interpreter's test)."""
    inputs = make_case(((150,), 72, 40, 16, 3, 3, True, "token", True, True), dtype)
    g = torch.Generator().manual_seed(2)
    grad_qkv = torch.randn(150, 120, generator=g).to(dtype)
    grad_weight = torch.randn(150, generator=g)

    def run(rows):
        state = inputs["state"][rows].clone().requires_grad_()
        kwargs = {k: inputs[k][rows] for k in ("cond_logits", "noise", "base")}
        qkv, idx, weight = tp_kernels.refine_step(state, inputs["lora_a"], inputs["lora_b"], tau=2.0, scale=0.5,
                                                  token_weight=inputs["token_weight"], **kwargs)
        torch.autograd.backward([qkv, weight], [grad_qkv[rows], grad_weight[rows].to(weight.dtype)])
        return qkv.detach(), idx, weight.detach(), state.grad

    full = run(torch.arange(150))
    for rows in (torch.arange(3, 150, 7), torch.tensor([17]), torch.arange(150).flip(0)):
        for name, got, want in zip(("qkv", "idx", "weight", "dstate"), run(rows), full):
            message = f"{name} of a token changed with the batch around it"
            if dot_tol is not None and name in ("qkv", "dstate"):
                torch.testing.assert_close(got, want[rows], rtol=dot_tol, atol=dot_tol, msg=message)
            else:
                assert torch.equal(got, want[rows]), message


def check_active_mask(dtype=torch.float32):
    """Inactive tokens: expert -1, gate weight 0, qkv = base exactly, no gradient but the base's; the active ones
    get exactly what a call on them alone gives."""
    inputs = make_case(((60,), 40, 24, 8, 3, 3, True, "token", True, True), dtype)
    active = torch.rand(60, generator=torch.Generator().manual_seed(3)) < 0.6
    g = torch.Generator().manual_seed(4)
    grad_qkv, grad_weight = torch.randn(60, 72, generator=g).to(dtype), torch.randn(60, generator=g)

    def run(rows, mask):
        leaves = {k: (v[rows] if k in ("state", "cond_logits", "noise", "base") else v).clone().requires_grad_(
            k != "noise") for k, v in inputs.items()}
        qkv, idx, weight = tp_kernels.refine_step(leaves["state"], leaves["lora_a"], leaves["lora_b"], tau=2.0,
                                                  scale=0.5, active=None if mask is None else mask[rows],
                                                  **{k: leaves[k] for k in ("token_weight", "cond_logits", "noise",
                                                                            "base")})
        torch.autograd.backward([qkv, weight], [grad_qkv[rows], grad_weight[rows].to(weight.dtype)])
        return qkv.detach(), idx, weight.detach(), leaves

    qkv, idx, weight, leaves = run(torch.arange(60), active)
    off = ~active
    assert torch.equal(idx[off], torch.full_like(idx[off], -1)) and torch.equal(weight[off], torch.zeros_like(
        weight[off]))
    assert torch.equal(qkv[off], inputs["base"][off])
    assert leaves["state"].grad[off].abs().max() == 0 and leaves["cond_logits"].grad[off].abs().max() == 0
    assert torch.equal(leaves["base"].grad[off], grad_qkv[off])
    rows = active.nonzero()[:, 0]
    qkv_a, idx_a, weight_a, leaves_a = run(rows, None)
    assert torch.equal(qkv[active], qkv_a) and torch.equal(idx[active], idx_a) and torch.equal(weight[active], weight_a)
    assert torch.equal(leaves["state"].grad[active], leaves_a["state"].grad)
    for name in ("lora_a", "lora_b", "token_weight"):
        torch.testing.assert_close(leaves[name].grad, leaves_a[name].grad)
    with torch.no_grad():  # no base: inactive rows are 0
        qkv, _, _ = tp_kernels.refine_step(inputs["state"], inputs["lora_a"], inputs["lora_b"], active=active)
    assert torch.equal(qkv[off], torch.zeros_like(qkv[off]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_active_mask(backend, dtype):
    check_active_mask(dtype)


def test_active_mask_must_match_the_tokens():
    inputs = make_case("full")
    with pytest.raises(ValueError, match="active must have shape"):
        tp_kernels.refine_step(inputs["state"], inputs["lora_a"], inputs["lora_b"], active=torch.ones(2, 8, dtype=bool))
    with pytest.raises(TypeError, match="active must have dtype"):
        tp_kernels.refine_step(inputs["state"], inputs["lora_a"], inputs["lora_b"], active=torch.ones(2, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batch_invariance(backend, dtype):
    check_batch_invariance(dtype)


def check_op_normalize_modes(dtype=torch.float64, seed=0):
    """The op with normalize=True on a equals normalize=False on LN(a), forward and gradients."""
    args = _op_args(True, normalize=True)
    state = args[0].detach().to(dtype)
    a_leaf = state.clone().requires_grad_()
    h_leaf = F.layer_norm(a_leaf, (state.shape[1],), eps=1e-6)
    rest = [None if t is None else t.detach().to(dtype) for t in args[1:7]]
    outs = [refine_step_fwd(x, *rest, 2.0, 0.5, 1e-6, norm) for x, norm in ((a_leaf, True), (h_leaf, False))]
    assert torch.equal(outs[0][2], outs[1][2])
    torch.testing.assert_close(outs[0][0], outs[1][0])
    g = torch.randn(outs[0][0].shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    grads = [torch.autograd.grad(o[0], a_leaf, g)[0] for o in outs]
    torch.testing.assert_close(grads[0], grads[1])


def test_op_normalize_modes_agree(backend):
    check_op_normalize_modes()


class RefineBlock(torch.nn.Module):
    """The smallest user: a gate (token + per-sample conditioning) routes a LoRA'd qkv on top of a base Linear."""

    def __init__(self, dim=16, rank=4, n_exp=3):
        super().__init__()
        self.token_proj = torch.nn.Linear(dim, n_exp)
        self.cond_proj = torch.nn.Linear(dim, n_exp)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.lora_a = torch.nn.Parameter(torch.randn(n_exp, 3, rank, dim) / dim ** 0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(n_exp, 3, dim, rank) / rank ** 0.5)

    def forward(self, x, cond, noise):
        cond_logits = (self.cond_proj(cond) + self.token_proj.bias).unsqueeze(1)  # (N, 1, E)
        qkv, _, _ = tp_kernels.refine_step(x, self.lora_a, self.lora_b, token_weight=self.token_proj.weight,
                                           cond_logits=cond_logits, tau=5.0, noise=noise, scale=0.5,
                                           base=self.qkv(x))
        return qkv


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    module = RefineBlock()
    x = torch.randn(2, 10, 16, requires_grad=True)
    cond = torch.randn(2, 16)
    noise = tp_kernels.gumbel_noise((2, 10, 3), generator=torch.Generator().manual_seed(0))
    y_eager = module(x, cond, noise)
    params = [x, *module.parameters()]
    grads_eager = torch.autograd.grad(y_eager.square().sum(), params)
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    y = compiled(x, cond, noise)
    grads = torch.autograd.grad(y.square().sum(), params)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    names = [name for name, _ in module.named_parameters()]
    assert grads[1 + names.index("token_proj.weight")].abs().sum() > 0  # the gate learns through the op


def _unfused_recursion(attn, x, cond):
    """RecursiveAttention's steps as separate modules (LN, Gate, RoutedLoRA, base add): what refine_step fuses."""
    from thinking_pixel.models.attention import attend

    a = x
    for step in range(1, attn.steps + 1):
        h = F.layer_norm(a, (attn.dim,), eps=attn.eps)
        expert_idx, weight = attn.gate(h, cond)  # draws its Gumbel noise like RecursiveAttention does
        qkv = attn.lora(h, expert_idx, gate=weight)
        if step == attn.steps:
            qkv = qkv + attn.qkv(x)
        out = attend(qkv, attn.num_heads)
        a = out + x
    return attn.proj(out)


@pytest.mark.parametrize("gate_inputs", [dict(), dict(gate_tokens=False), dict(gate_cond=False)],
                         ids=["tokens+cond", "cond_only", "tokens_only"])
def test_recursive_attention_trains_like_the_unfused_modules(backend, gate_inputs):
    check_recursive_training(gate_inputs)


def check_recursive_training(gate_inputs, dtype=torch.float64):
    """Train mode (Gumbel noise): outputs and every gradient equal the module-by-module composition."""
    from thinking_pixel.models import Attention
    from thinking_pixel.recursion import RecursiveAttention

    torch.manual_seed(0)
    attn = RecursiveAttention.from_attention(Attention(16, 2), experts=3, steps=3, rank=4, lora_alpha=8,
                                             **gate_inputs).to(dtype).train()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x, cond = torch.randn(2, 6, 16, dtype=dtype), torch.randn(2, 16, dtype=dtype)
    # float32: the loss sums squares of O(10) outputs, so gradients reach O(100) and their rounding error scales
    # with that size, not with each element's (measured: at most 6e-7 of the largest gradient, either path)
    tol = (lambda ref: {}) if dtype == torch.float64 else (lambda ref: dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item()))
    results = []
    for run in (attn, lambda x_, c_: _unfused_recursion(attn, x_, c_)):
        torch.manual_seed(1)  # the same noise draws, in the same order
        x_leaf = x.clone().requires_grad_()
        out = run(x_leaf, cond if gate_inputs.get("gate_cond", True) else None)
        grads = torch.autograd.grad(out.square().sum(), [x_leaf, *attn.parameters()], allow_unused=True)
        results.append((out, grads))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, **tol(out_ref))
    for (name, _), g, g_ref in zip([("x", None), *attn.named_parameters()], grads, grads_ref):
        if g_ref is None:
            assert g is None or g.abs().max() == 0, name
        else:
            torch.testing.assert_close(g, g_ref, **tol(g_ref), msg=lambda m, name=name: f"d{name}: {m}")
    assert grads[1 + [n for n, _ in attn.named_parameters()].index("lora.lora_b")].abs().sum() > 0
