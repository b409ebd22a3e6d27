"""Every op's argument checks, each error naming the argument and what it must be.

Two kinds, run once per call:
    check_<op>          the public wrapper's arguments (``tp_kernels.<op>(...)``): types, shapes, dtypes, devices
                        and numbers, before the wrapper reshapes them; wrapped in :class:`CheckedSignatures` where
                        the check depends on metadata alone (``<op>_signature``), so a loop's repeated calls pay it
                        once per signature.
    check_<op>_op       a registered op's raw arguments (``torch.ops.tp_kernels.*`` called directly): the dense
                        layout its kernels index (:class:`OpArgs`). The ops run it only when the caller has not
                        checked (their ``checked`` argument): the public wrappers and the autograd backward pass
                        ``checked=True``.
Expert indices are data, not metadata: :func:`check_index_range` runs on every call that reaches a kernel
(on CUDA a device-side assert, no host sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dispatch import resolve

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, *, dtypes=None, dim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None:
        dims = dim if isinstance(dim, tuple) else (dim,)
        if t.dim() not in dims:
            raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all must share a device")


def check_index_range(name: str, idx: torch.Tensor, num: int, allow_skip: bool = False) -> None:
    """Fail if any index is outside [0, num) ([-1, num) with ``allow_skip``: -1 = skip the token).

    On CPU this is a plain check. On CUDA it is a device-side assert
    (``torch._assert_async``): no host sync; a bad index aborts the next
    synchronising CUDA call with this message instead of reading out of bounds.
    """
    if idx.numel() == 0:
        return
    low = -1 if allow_skip else 0
    want = f"[{low}, {num})" + (" (-1: skip the token)" if allow_skip else "")
    if idx.device.type == "cpu":
        lo, hi = torch.aminmax(idx)  # one pass, two values read back (cheap on CPU)
        if int(lo) < low or int(hi) >= num:
            first = idx[(idx < low) | (idx >= num)][0]
            raise IndexError(f"{name} must lie in {want}, found {int(first)}")
    else:
        torch._assert_async(~((idx < low) | (idx >= num)).any(), f"{name} must lie in {want}")


def _signature(value):
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.device
    return type(value), value


class CheckedSignatures:
    """A public wrapper's argument checks that depend on metadata alone (types, shapes, dtypes, devices and the
    Python numbers), run once per signature: a training loop calls an op with a few signatures, over and over.

    Called with the wrapper's arguments; a signature is remembered only after ``check`` passed on it.
    """

    def __init__(self, check, size: int = 1024):
        self.check, self.seen, self.size = check, set(), size

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # traced once per graph anyway
            return self.check(*args)
        try:
            key = tuple(_signature(a) for a in args)
            hash(key)
        except TypeError:  # an unhashable argument: the check will name it
            return self.check(*args)
        if key not in self.seen:
            self.check(*args)
            if len(self.seen) >= self.size:
                self.seen.clear()
            self.seen.add(key)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite_number(name: str, value, *, positive: bool = False) -> None:
    """A real Python number (not a bool), finite, and > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be a finite {'positive ' if positive else ''}float, got {value!r}")


class OpArgs:
    """Checks of a registered op's raw arguments, run in the op body before any kernel or ctypes call.

    The public wrappers reshape and convert their inputs; the ops themselves can be called directly
    (``torch.ops.tp_kernels.*``), so they check the layout the kernels index: dims, sizes, dtypes, devices
    and dense row-major storage. ``dims`` name the sizes (``"N"``, ``"E"``...) so one size seen in several
    arguments must agree; each error names the op and the argument.
    """

    def __init__(self, op: str, device: torch.device):
        self.op, self.device, self.sizes = op, device, {}

    def __call__(self, name: str, t, dims, dtypes=None, optional=False):
        if t is None:
            if optional:
                return
            raise TypeError(f"{self.op}: {name} must be a tensor, got None")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(dims):
            raise ValueError(f"{self.op}: {name} must have shape ({', '.join(map(str, dims))}), "
                             f"got {tuple(t.shape)}")
        for dim, size in zip(dims, t.shape):
            if isinstance(dim, int):
                if size != dim:
                    raise ValueError(f"{self.op}: {name} must have shape {tuple(dims)}, got {tuple(t.shape)}")
                continue
            want, first = self.sizes.setdefault(dim, (size, name))
            if size != want:
                raise ValueError(f"{self.op}: {name} has {dim} = {size} (shape {tuple(t.shape)}) but {first} has "
                                 f"{dim} = {want}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"{self.op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{self.op}: {name} is on {t.device}, expected {self.device}")
        if not t.is_contiguous():
            raise ValueError(f"{self.op}: {name} must be contiguous, got strides {t.stride()}")


# routed_lora

def check_routed_lora(x, expert_idx, lora_a, lora_b, gate, scale) -> None:
    """routed_lora's arguments, but for the index range (data, checked per call)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("expert_idx", expert_idx, dtypes=INDEX_DTYPES)
    check_tensor("lora_a", lora_a, dim=(3, 4))
    check_tensor("lora_b", lora_b, dim=(3, 4))
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., D_in)")
    if lora_a.dim() != lora_b.dim():
        raise ValueError(f"lora_a and lora_b must both be 3-D or both 4-D, got {lora_a.dim()} and {lora_b.dim()}")
    if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
        raise TypeError(f"lora_a and lora_b must have x's dtype {x.dtype}, got {lora_a.dtype} and {lora_b.dtype}")
    stacked = lora_a.dim() == 4
    n_exp, n_slice, rank, d_in = lora_a.shape if stacked else (lora_a.shape[0], 1, *lora_a.shape[1:])
    if x.shape[-1] != d_in:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal lora_a's D_in ({d_in})")
    b = lora_b.shape if stacked else (lora_b.shape[0], 1, *lora_b.shape[1:])
    if b[0] != n_exp or b[1] != n_slice or b[3] != rank:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
            f"expected (E={n_exp}{f', S={n_slice}' if stacked else ''}, D_out, R={rank})"
        )
    if n_exp < 1 or rank < 1:
        raise ValueError(f"lora_a must have at least one expert and rank >= 1, got shape {tuple(lora_a.shape)}")
    if expert_idx.shape != x.shape[:-1]:
        raise ValueError(f"expert_idx must have shape {tuple(x.shape[:-1])} (x without its last dim), "
                         f"got {tuple(expert_idx.shape)}")
    if gate is not None:
        check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
        if gate.shape != x.shape[:-1]:
            raise ValueError(f"gate must have shape {tuple(x.shape[:-1])}, got {tuple(gate.shape)}")
    check_finite_number("scale", scale)
    check_same_device(x=x, expert_idx=expert_idx, lora_a=lora_a, lora_b=lora_b, gate=gate)


routed_lora_signature = CheckedSignatures(check_routed_lora)


def triton_checks_indices(idx) -> bool:
    """Whether routed_lora's forward checks the index range itself: the Triton path on CUDA, from its grouping's
    flag (no host sync)."""
    return idx.device.type == "cuda" and resolve(idx.device) == "triton"


def check_expert_idx(idx, num_experts: int) -> None:
    """expert_idx in [-1, E) (-1: skip the token), unless the Triton forward checks it (:func:`triton_checks_indices`)."""
    if not triton_checks_indices(idx):
        check_index_range("expert_idx", idx, num_experts, allow_skip=True)


def _routed_lora_layout(op, x, idx, lora_a, lora_b, gate, scale) -> OpArgs:
    """x (N, D_in), idx (N,), lora_a (E, S, R, D_in), lora_b (E, S, D_out, R), gate (N,) or None."""
    arg = OpArgs(op, x.device if isinstance(x, Tensor) else None)
    arg("x", x, ("N", "D_in"), FLOAT_DTYPES)
    arg("idx", idx, ("N",), INDEX_DTYPES)
    arg("lora_a", lora_a, ("E", "S", "R", "D_in"), (x.dtype,))
    arg("lora_b", lora_b, ("E", "S", "D_out", "R"), (x.dtype,))
    arg("gate", gate, ("N",), FLOAT_DTYPES, optional=True)
    if lora_a.shape[0] < 1 or lora_a.shape[2] < 1:
        raise ValueError(f"{op}: lora_a needs at least one expert and rank >= 1, got shape {tuple(lora_a.shape)}")
    check_finite_number("scale", scale)
    return arg


def check_routed_lora_fwd_op(x, idx, lora_a, lora_b, gate, scale) -> None:
    """tp_kernels::routed_lora_fwd's raw layout (the index range: :func:`check_expert_idx`, per call)."""
    _routed_lora_layout("tp_kernels.routed_lora_fwd", x, idx, lora_a, lora_b, gate, scale)


def check_routed_lora_bwd_op(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale) -> None:
    """tp_kernels::routed_lora_bwd's raw layout and index range."""
    arg = _routed_lora_layout("tp_kernels.routed_lora_bwd", x, idx, lora_a, lora_b, gate, scale)
    check_expert_idx(idx, lora_a.shape[0])
    n_slice, rank, d_out = lora_a.shape[1], lora_a.shape[2], lora_b.shape[2]
    arg("grad_y", grad_y, ("N", n_slice * d_out), FLOAT_DTYPES)
    arg("h", h, ("N", n_slice * rank), (acc_dtype(x.dtype),))
    arg("perm", perm, ("N",), (torch.int64,))
    arg("offsets", offsets, (lora_a.shape[0] + 1,), (torch.int64,))


# gate_top1

def check_gate_top1(logits, tau, noise) -> None:
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., E) with E >= 1, got {tuple(logits.shape)}")
    check_finite_number("tau", tau, positive=True)
    if noise is not None:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES)
        if noise.shape != logits.shape:
            raise ValueError(f"noise must have logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
        check_same_device(logits=logits, noise=noise)


def check_gate_top1_fwd_op(logits, noise, tau) -> None:
    """tp_kernels::gate_top1_fwd's raw layout: logits (N, E), noise (N, E) or None."""
    op = "tp_kernels.gate_top1_fwd"
    arg = OpArgs(op, logits.device if isinstance(logits, Tensor) else None)
    arg("logits", logits, ("N", "E"), FLOAT_DTYPES)
    arg("noise", noise, ("N", "E"), FLOAT_DTYPES, optional=True)
    if logits.shape[1] < 1:
        raise ValueError(f"{op}: logits needs at least one expert (column), got shape {tuple(logits.shape)}")
    check_finite_number("tau", tau, positive=True)


# layer_norm

def check_layer_norm(x, eps) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    check_finite_number("eps", eps, positive=True)


# refine_step

def cond_groups(cond_logits, lead, n_exp):
    """cond_logits broadcastable to (*lead, E) -> (G, E) rows, token n using row n // (N / G).

    A shape that matches lead on its first k dims and is 1 after them (e.g. (N, 1, E) per sample, (E,)
    for all tokens) is used as is; any other broadcastable shape is expanded to one row per token.
    """
    shape = (1,) * (len(lead) + 1 - cond_logits.dim()) + tuple(cond_logits.shape)
    if cond_logits.dim() > len(lead) + 1 or shape[-1] != n_exp:
        raise ValueError(f"cond_logits must be broadcastable to {(*lead, n_exp)} (last dim = E = {n_exp}), "
                         f"got {tuple(cond_logits.shape)}")
    k = 0
    while k < len(lead) and shape[k] == lead[k]:
        k += 1
    if all(s == 1 for s in shape[k:-1]):
        return cond_logits.reshape(math.prod(lead[:k]), n_exp).contiguous()
    try:
        expanded = cond_logits.expand(*lead, n_exp)
    except RuntimeError:
        raise ValueError(f"cond_logits must be broadcastable to {(*lead, n_exp)}, "
                         f"got {tuple(cond_logits.shape)}") from None
    return expanded.reshape(-1, n_exp).contiguous()


def check_refine_step(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps, normalize,
                      active) -> None:
    """refine_step's arguments (all metadata: checked once per signature)."""
    check_tensor("state", state, dtypes=FLOAT_DTYPES)
    check_tensor("lora_a", lora_a, dim=(3, 4))
    check_tensor("lora_b", lora_b, dim=(3, 4))
    if state.dim() < 1 or state.shape[-1] < 1:
        raise ValueError(f"state must have shape (..., D) with D >= 1, got {tuple(state.shape)}")
    if lora_a.dim() != lora_b.dim():
        raise ValueError(f"lora_a and lora_b must both be 3-D or both 4-D, got {lora_a.dim()} and {lora_b.dim()}")
    if lora_a.dtype != state.dtype or lora_b.dtype != state.dtype:
        raise TypeError(f"lora_a and lora_b must have state's dtype {state.dtype}, "
                        f"got {lora_a.dtype} and {lora_b.dtype}")
    a = lora_a if lora_a.dim() == 4 else lora_a.unsqueeze(1)  # (E, S, R, D)
    b = lora_b if lora_b.dim() == 4 else lora_b.unsqueeze(1)  # (E, S, D_out, R)
    n_exp, n_slice, rank, dim = a.shape
    if state.shape[-1] != dim:
        raise ValueError(f"state's last dim ({state.shape[-1]}) must equal lora_a's D ({dim})")
    if b.shape[0] != n_exp or b.shape[1] != n_slice or b.shape[3] != rank:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
                         f"expected (E={n_exp}, S={n_slice}, D_out, R={rank})")
    if n_exp < 1 or rank < 1:
        raise ValueError(f"lora_a must have at least one expert and rank >= 1, got shape {tuple(lora_a.shape)}")
    lead = tuple(state.shape[:-1])
    d_out = b.shape[2]
    if token_weight is not None:
        check_tensor("token_weight", token_weight, dtypes=(state.dtype,), dim=2)
        if tuple(token_weight.shape) != (n_exp, dim):
            raise ValueError(f"token_weight must have shape (E, D) = {(n_exp, dim)}, got {tuple(token_weight.shape)}")
    if cond_logits is not None:
        check_tensor("cond_logits", cond_logits, dtypes=FLOAT_DTYPES)
        cond_groups(cond_logits, lead, n_exp)
    if noise is not None:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES)
        if tuple(noise.shape) != (*lead, n_exp):
            raise ValueError(f"noise must have shape {(*lead, n_exp)} (state's lead dims, E), got {tuple(noise.shape)}")
    if base is not None:
        check_tensor("base", base, dtypes=(state.dtype,))
        if tuple(base.shape) != (*lead, n_slice * d_out):
            raise ValueError(f"base must have shape {(*lead, n_slice * d_out)}, got {tuple(base.shape)}")
    check_finite_number("tau", tau, positive=True)
    check_finite_number("scale", scale)
    check_finite_number("eps", eps, positive=True)
    if active is not None:
        check_tensor("active", active, dtypes=(torch.bool,))
        if tuple(active.shape) != lead:
            raise ValueError(f"active must have shape {lead} (state's lead dims), got {tuple(active.shape)}")
    check_same_device(state=state, lora_a=lora_a, lora_b=lora_b, token_weight=token_weight, cond_logits=cond_logits,
                      noise=noise, base=base, active=active)

    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")


refine_step_signature = CheckedSignatures(check_refine_step)


def _refine_step_layout(op, state, lora_a, lora_b, token_weight, tau, scale, eps) -> OpArgs:
    """The layout both refine_step ops share: state (N, D), lora_a (E, S, R, D), lora_b (E, S, D_out, R)."""
    arg = OpArgs(op, state.device if isinstance(state, Tensor) else None)
    arg("state", state, ("N", "D"), FLOAT_DTYPES)
    arg("lora_a", lora_a, ("E", "S", "R", "D"), (state.dtype,))
    arg("lora_b", lora_b, ("E", "S", "D_out", "R"), (state.dtype,))
    arg("token_weight", token_weight, ("E", "D"), (state.dtype,), optional=True)
    if lora_a.shape[0] < 1 or lora_a.shape[2] < 1:
        raise ValueError(f"{op}: lora_a needs at least one expert and rank >= 1, got shape {tuple(lora_a.shape)}")
    check_finite_number("tau", tau, positive=True)
    check_finite_number("scale", scale)
    check_finite_number("eps", eps, positive=True)
    return arg


def _check_groups(op, n_groups, n_tok):
    if n_groups < 0 or (n_groups == 0 and n_tok > 0) or (n_groups and n_tok % n_groups):
        raise ValueError(f"{op}: cond_logits' {n_groups} rows must divide the {n_tok} tokens")


def check_refine_step_fwd_op(state, lora_a, lora_b, token_weight, cond_logits, noise, base, tau, scale, eps,
                             active) -> None:
    """tp_kernels::refine_step_fwd's raw layout."""
    op = "tp_kernels.refine_step_fwd"
    arg = _refine_step_layout(op, state, lora_a, lora_b, token_weight, tau, scale, eps)
    arg("cond_logits", cond_logits, ("G", "E"), FLOAT_DTYPES, optional=True)
    arg("noise", noise, ("N", "E"), FLOAT_DTYPES, optional=True)
    arg("base", base, ("N", lora_b.shape[1] * lora_b.shape[2]), (state.dtype,), optional=True)
    arg("active", active, ("N",), (torch.bool,), optional=True)
    if cond_logits is not None:
        _check_groups(op, cond_logits.shape[0], state.shape[0])


def check_refine_step_bwd_op(grad_qkv, grad_weight, state, lora_a, lora_b, token_weight, idx, probs, lora_h, perm,
                             offsets, mean, rstd, n_groups, tau, scale, eps, normalize, need_cond) -> None:
    """tp_kernels::refine_step_bwd's raw layout and expert indices (-1: an inactive token)."""
    op = "tp_kernels.refine_step_bwd"
    arg = _refine_step_layout(op, state, lora_a, lora_b, token_weight, tau, scale, eps)
    n_exp, n_slice, rank, _ = lora_a.shape
    acc = (acc_dtype(state.dtype),)
    arg("grad_qkv", grad_qkv, ("N", n_slice * lora_b.shape[2]), FLOAT_DTYPES)
    arg("grad_weight", grad_weight, ("N",), FLOAT_DTYPES, optional=True)
    arg("idx", idx, ("N",), INDEX_DTYPES)
    arg("probs", probs, ("N", "E"), acc)
    arg("lora_h", lora_h, ("N", n_slice * rank), acc)
    arg("perm", perm, ("N",), (torch.int64,))
    arg("offsets", offsets, (n_exp + 1,), (torch.int64,))
    for name, stat in (("mean", mean), ("rstd", rstd)):  # the forward's LayerNorm statistics, none without it
        arg(name, stat, ("N" if normalize else 0,), acc)
    if need_cond:
        _check_groups(op, n_groups, state.shape[0])
    check_index_range("expert_idx", idx, n_exp, allow_skip=True)


# joint_attention

def check_joint_attention(op, qkv, context_q, context_k, context_v, num_heads) -> None:
    """Shapes and dtypes of a joint attention's inputs (any device), with errors naming the argument."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"{op}: qkv must be a tensor (N, T, 3D), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    dim = qkv.shape[-1] // 3
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"{op}: num_heads must be a positive int dividing D = {dim}, got {num_heads!r}")
    if (context_k is None) != (context_v is None) or (context_q is not None and context_k is None):
        raise ValueError(f"{op}: context_k and context_v come together, and context_q needs them")
    for name, c in (("context_q", context_q), ("context_k", context_k), ("context_v", context_v)):
        if c is not None and (not isinstance(c, Tensor) or c.dtype != qkv.dtype or c.device != qkv.device
                              or c.dim() != 3 or c.shape[0] != qkv.shape[0] or c.shape[2] != dim
                              or c.shape[1] != context_k.shape[1]):
            raise ValueError(f"{op}: {name} must be a {qkv.dtype} tensor on {qkv.device} of shape (N={qkv.shape[0]}, "
                             f"L, D={dim}) with context_k's L, got "
                             f"{(c.dtype, tuple(c.shape), str(c.device)) if isinstance(c, Tensor) else c!r}")


def check_joint_attention_op(op, qkv, context_q, context_k, context_v, num_heads) -> None:
    """A joint attention op's raw inputs: :func:`check_joint_attention`, and the CPU kernel's float32 CPU tensors."""
    check_joint_attention(op, qkv, context_q, context_k, context_v, num_heads)
    if qkv.dtype != torch.float32 or qkv.device.type != "cpu":
        raise ValueError(f"{op}: the CPU kernel takes float32 CPU tensors, got {qkv.dtype} on {qkv.device}")
