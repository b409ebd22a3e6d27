"""The registered ops called directly (``torch.ops.tp_kernels.*``) check their raw arguments before any kernel:
each malformed call raises an error naming the op's argument, on every backend (nothing reaches ctypes or a launch)."""

import pytest
import torch

ops = torch.ops.tp_kernels


def lora_args(**change):
    n, d_in, d_out, rank, n_exp, n_slice = 6, 8, 5, 4, 3, 2
    args = dict(x=torch.randn(n, d_in), idx=torch.tensor([0, 1, 2, 0, 1, 2]), lora_a=torch.randn(n_exp, n_slice, rank, d_in),
                lora_b=torch.randn(n_exp, n_slice, d_out, rank), gate=torch.rand(n), scale=0.5)
    args.update(change)
    return args


def lora_bwd_args(**change):
    args = lora_args()
    n, (_, n_slice, rank, _), d_out = 6, args["lora_a"].shape, args["lora_b"].shape[2]
    args = dict(grad_y=torch.randn(n, n_slice * d_out), **{k: v for k, v in args.items() if k != "scale"},
                h=torch.randn(n, n_slice * rank), perm=torch.tensor([0, 3, 1, 4, 2, 5]),
                offsets=torch.tensor([0, 2, 4, 6]), scale=0.5, need_x=True, need_w=True, need_gate=True)
    args.update(change)
    return args


def refine_args(**change):
    n, d, d_out, rank, n_exp, n_slice = 6, 8, 5, 4, 3, 2
    args = dict(state=torch.randn(n, d), lora_a=torch.randn(n_exp, n_slice, rank, d),
                lora_b=torch.randn(n_exp, n_slice, d_out, rank), token_weight=torch.randn(n_exp, d),
                cond_logits=torch.randn(2, n_exp), noise=torch.randn(n, n_exp), base=torch.randn(n, n_slice * d_out),
                tau=5.0, scale=0.5, eps=1e-6, normalize=True)
    args.update(change)
    return args


def refine_bwd_args(**change):
    fwd = refine_args()
    n, (n_exp, n_slice, rank, _), d_out = 6, fwd["lora_a"].shape, fwd["lora_b"].shape[2]
    args = dict(grad_qkv=torch.randn(n, n_slice * d_out), grad_weight=torch.randn(n), state=fwd["state"],
                lora_a=fwd["lora_a"], lora_b=fwd["lora_b"], token_weight=fwd["token_weight"],
                idx=torch.tensor([0, 1, 2, 0, 1, 2]), probs=torch.rand(n, n_exp), lora_h=torch.randn(n, n_slice * rank),
                perm=torch.tensor([0, 3, 1, 4, 2, 5]), offsets=torch.tensor([0, 2, 4, 6]), mean=torch.randn(n),
                rstd=torch.rand(n), n_groups=2, tau=5.0, scale=0.5, eps=1e-6, normalize=True, need_state=True, need_w=True,
                need_token_weight=True, need_cond=True)
    args.update(change)
    return args


BAD = [
    # routed_lora_fwd
    ("routed_lora_fwd", lora_args(x=torch.randn(6, 9)), ValueError, "lora_a has D_in = 8 .* but x has D_in = 9"),
    ("routed_lora_fwd", lora_args(x=torch.randn(6, 8, 1)), ValueError, "x must have shape"),
    ("routed_lora_fwd", lora_args(lora_a=torch.randn(3, 4, 8)), ValueError, "lora_a must have shape"),
    ("routed_lora_fwd", lora_args(lora_b=torch.randn(3, 2, 5, 3)), ValueError, "lora_b has R = 3"),
    ("routed_lora_fwd", lora_args(lora_b=torch.randn(3, 2, 5, 4, dtype=torch.float64)), TypeError, "lora_b must have dtype"),
    ("routed_lora_fwd", lora_args(idx=torch.tensor([0, 1, 2])), ValueError, "idx has N = 3"),
    ("routed_lora_fwd", lora_args(idx=torch.tensor([0, 1, 2, 0, 1, 3])), IndexError, "expert_idx must lie in"),
    ("routed_lora_fwd", lora_args(idx=torch.zeros(6)), TypeError, "idx must have dtype"),
    ("routed_lora_fwd", lora_args(gate=torch.rand(5)), ValueError, "gate has N = 5"),
    ("routed_lora_fwd", lora_args(x=torch.randn(8, 6).t()), ValueError, "x must be contiguous"),
    ("routed_lora_fwd", lora_args(scale=float("nan")), ValueError, "scale must be a finite"),
    ("routed_lora_fwd", lora_args(lora_a=torch.randn(0, 2, 4, 8), lora_b=torch.randn(0, 2, 5, 4)), ValueError,
     "at least one expert"),
    # routed_lora_bwd
    ("routed_lora_bwd", lora_bwd_args(grad_y=torch.randn(6, 9)), ValueError, "grad_y must have shape"),
    ("routed_lora_bwd", lora_bwd_args(h=torch.randn(6, 8, dtype=torch.float64)), TypeError, "h must have dtype"),
    ("routed_lora_bwd", lora_bwd_args(h=torch.randn(5, 8)), ValueError, "h has N = 5"),
    ("routed_lora_bwd", lora_bwd_args(x=torch.randn(6, 8, dtype=torch.bfloat16)), TypeError, "lora_a must have dtype"),
    ("routed_lora_bwd", lora_bwd_args(offsets=torch.tensor([0, 6])), ValueError, "offsets must have shape"),
    ("routed_lora_bwd", lora_bwd_args(perm=torch.arange(6, dtype=torch.int32)), TypeError, "perm must have dtype"),
    # gate_top1_fwd
    ("gate_top1_fwd", dict(logits=torch.randn(4, 3), noise=torch.randn(4, 2), tau=1.0, hard=True), ValueError,
     "noise has E = 2"),
    ("gate_top1_fwd", dict(logits=torch.randn(4), noise=None, tau=1.0, hard=True), ValueError, "logits must have shape"),
    ("gate_top1_fwd", dict(logits=torch.randn(4, 3), noise=None, tau=float("inf"), hard=True), ValueError,
     "tau must be a finite positive"),
    ("gate_top1_fwd", dict(logits=torch.randn(4, 0), noise=None, tau=1.0, hard=True), ValueError, "at least one expert"),
    # refine_step_fwd
    ("refine_step_fwd", refine_args(state=torch.randn(6, 7)), ValueError, "lora_a has D = 8 .* but state has D = 7"),
    ("refine_step_fwd", refine_args(token_weight=torch.randn(4, 8)), ValueError, "token_weight has E = 4"),
    ("refine_step_fwd", refine_args(cond_logits=torch.randn(4, 3)), ValueError, "cond_logits' 4 rows must divide"),
    ("refine_step_fwd", refine_args(noise=torch.zeros(6, 3, dtype=torch.int32)), TypeError, "noise must have dtype"),
    ("refine_step_fwd", refine_args(base=torch.randn(6, 9)), ValueError, "base must have shape"),
    ("refine_step_fwd", refine_args(base=torch.randn(6, 10, dtype=torch.float16)), TypeError, "base must have dtype"),
    ("refine_step_fwd", refine_args(tau=0.0), ValueError, "tau must be a finite positive"),
    ("refine_step_fwd", refine_args(eps=float("inf")), ValueError, "eps must be a finite positive"),
    # refine_step_bwd
    ("refine_step_bwd", refine_bwd_args(grad_weight=torch.randn(5)), ValueError, "grad_weight has N = 5"),
    ("refine_step_bwd", refine_bwd_args(idx=torch.tensor([0, 1, 2, 0, 1, 7])), IndexError, "expert_idx must lie in"),
    ("refine_step_bwd", refine_bwd_args(probs=torch.rand(6, 4)), ValueError, "probs has E = 4"),
    ("refine_step_bwd", refine_bwd_args(lora_h=torch.randn(6, 9)), ValueError, "lora_h must have shape"),
    ("refine_step_bwd", refine_bwd_args(n_groups=4), ValueError, "cond_logits' 4 rows must divide"),
    ("refine_step_bwd", refine_bwd_args(rstd=torch.rand(5)), ValueError, "rstd has N = 5"),
    ("refine_step_bwd", refine_bwd_args(normalize=False), ValueError, r"mean must have shape \(0,\)"),
]


@pytest.mark.parametrize("op, args, exc, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_raw_call_names_the_argument(backend, op, args, exc, match):
    with pytest.raises(exc, match=match):
        getattr(ops, op)(*args.values())


@pytest.mark.parametrize("op, args", [("routed_lora_fwd", lora_args()), ("routed_lora_bwd", lora_bwd_args()),
                                      ("refine_step_fwd", refine_args()), ("refine_step_bwd", refine_bwd_args())])
def test_well_formed_raw_call_runs(backend, op, args):
    getattr(ops, op)(*args.values())
