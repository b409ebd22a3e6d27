"""Routed LoRA on CPU through the compiled extension (csrc/routed_lora.cpp): the ``cpu`` backend, with the
interface of torch.py.

float32 and bfloat16 run in the extension (fp32 accumulation, h kept in fp32); float16 and float64
use the composed-torch path of torch.py. On CPUs with AVX512_BF16 the extension multiplies bfloat16 with
bf16 dot-product instructions (the intermediates gate * scale * h and dh rounded to bf16, as torch.py rounds
them); elsewhere it converts bfloat16 to fp32 and multiplies in fp32, and then bfloat16 with a rank above
BF16_EXT_MAX_RANK (where the GEMMs, not the memory passes, dominate) goes to torch.py instead. Results of the
extension are bit-identical for any thread count. Tokens with expert_idx -1 (halted) are skipped inside the
extension: no multiply, no gather or scatter of the other tokens; their outputs and gradients are zero.

The extension multiplies with the weights rearranged into panels. Packing them costs a pass over every expert's
A and B per call, a fixed cost that the T steps of a recursion would each pay for the same weights. Inside
``with PACKED.reuse():`` (a recursion's forward) calls share one packed copy per weight pair, and their backward
shares one more (the ops' autograd contexts keep the scope's copies and resume them). Outside a scope every call
packs: nothing outside can promise that the weights did not change since the last call, and version counters do not
tell (torch's fused optimizers and writes through ``.data`` change a tensor without bumping its version).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .. import _ext
from .._grouping import group_by_expert
from . import torch as _torch_path

# Largest rank for which bfloat16 runs in the extension when it multiplies in fp32 (no bf16 dot products).
# Measured with 2 threads on an AVX-512 BF16 CPU with the fp32 kernels (T=8192, E=5, noisy shared machine):
# rank 32 (D=384) and 64 (D=1152) ran 1.4-1.7x faster forward and 1.3x faster backward there than in torch.py;
# at rank 128 (D=1152) the two traded places from run to run. With bf16 dot products the extension is
# the faster one at every rank measured (up to 256), so no cut-over applies.
BF16_EXT_MAX_RANK = 64


def _in_extension(x, rank):
    if x.dtype == torch.float32:
        return True
    return x.dtype == torch.bfloat16 and (_ext.bf16_dot() or rank <= BF16_EXT_MAX_RANK)


def _dims(x, lora_a, lora_b):
    n_exp, n_slice, rank, _ = lora_a.shape
    return x.shape[0], x.shape[1], n_exp, n_slice, rank, lora_b.shape[2]


def _gate_f32(gate):
    return None if gate is None else gate.to(torch.float32).contiguous()


class PackedWeights:
    """Packed copies of (lora_a, lora_b) for the extension's forward and backward, shared by the calls inside a
    :meth:`reuse` scope, in which the caller promises that the weights do not change. A copy is found by the
    weights' addresses, shapes and dtype, and holds the weight tensors, so their memory cannot be reused by other
    tensors while the copies live. Scopes are per thread and nest; the outermost one drops its forward copies on
    exit, and the backward of its calls, which :meth:`resume` the scope, adds one backward copy that lives as long
    as their autograd graph. Outside a scope :meth:`get` returns None and every call packs the experts it uses."""

    def __init__(self):
        self._local = threading.local()

    def _state(self):
        local = self._local
        if not hasattr(local, "depth"):
            local.depth, local.entries = 0, {}
        return local

    @contextlib.contextmanager
    def reuse(self):
        state = self._state()
        state.depth += 1
        try:
            yield self
        finally:
            state.depth -= 1
            if state.depth == 0:  # the forward copies go; backward copies may still join these entries (resume)
                for key in [key for key in state.entries if not key[-1]]:
                    del state.entries[key]
                state.entries = {}

    def current(self):
        """The innermost scope's copies, or None outside a scope. A call's autograd context keeps them, so that the
        backward of the scope's calls packs once for all of them (:func:`resumed`)."""
        state = self._state()
        return state.entries if state.depth else None

    @contextlib.contextmanager
    def resume(self, entries):
        """Re-enters the scope whose copies :meth:`current` returned, for the backward of calls made in it: they
        saved the weights they ran with, which autograd forbids changing in between."""
        state = self._state()
        saved = state.depth, state.entries
        state.depth, state.entries = saved[0] + 1, entries
        try:
            yield self
        finally:
            state.depth, state.entries = saved

    def __len__(self):
        return len(self._state().entries)

    def get(self, lora_a, lora_b, backward: bool):
        """The packed buffer (float32) for contiguous lora_a (E, S, R, D_in) and lora_b (E, S, D_out, R), or None
        outside a scope."""
        state = self._state()
        if state.depth == 0:
            return None
        key = (lora_a.data_ptr(), lora_b.data_ptr(), tuple(lora_a.shape), tuple(lora_b.shape), lora_a.dtype, backward)
        entry = state.entries.get(key)
        if entry is None:
            entry = state.entries[key] = (lora_a, lora_b, pack(lora_a, lora_b, backward))
        return entry[2]


def resumed(entries):
    """PACKED.resume(entries) for saved scope copies, or a no-op context for None (a call made outside a scope)."""
    return contextlib.nullcontext() if entries is None else PACKED.resume(entries)


def pack(lora_a, lora_b, backward: bool):
    """Every expert of contiguous lora_a (E, S, R, D_in), lora_b (E, S, D_out, R) packed as the extension's forward
    (or backward) multiplies them: a float32 buffer to pass as a call's ``packed``."""
    lib = _ext.library()
    n_exp, n_slice, rank, d_in = lora_a.shape
    dims = (_ext.DTYPE_CODES[lora_a.dtype], n_exp, n_slice, rank, d_in, lora_b.shape[2], int(backward))
    packed = torch.empty(lib.tp_routed_lora_packed_floats(*dims), dtype=torch.float32)
    status = lib.tp_routed_lora_pack(lora_a.data_ptr(), lora_b.data_ptr(), *dims, packed.data_ptr(),
                                     torch.get_num_threads())
    _ext.check(status, "routed_lora pack", n_exp)
    return packed


PACKED = PackedWeights()


def forward(x, idx, lora_a, lora_b, gate, scale):
    """x (N, D_in), idx (N,), lora_a (E, S, R, D_in), lora_b (E, S, D_out, R)
    -> y (N, S*D_out) in x.dtype, h (N, S*R) float32 (= A_e x, unscaled, token order), perm, offsets.

    The extension groups the tokens itself (a counting sort per call); perm / offsets are returned for the
    op's interface (the backward of torch.py uses them), not used by the extension's backward."""
    n, d_in, n_exp, n_slice, rank, d_out = _dims(x, lora_a, lora_b)
    if not _in_extension(x, rank):
        return _torch_path.forward(x, idx, lora_a, lora_b, gate, scale)
    y = torch.empty(n, n_slice * d_out, dtype=x.dtype)
    h = torch.empty(n, n_slice * rank, dtype=torch.float32)
    if n == 0:
        return (y, h, *group_by_expert(idx, n_exp))
    x, idx, lora_a, lora_b = x.contiguous(), idx.to(torch.int64).contiguous(), lora_a.contiguous(), lora_b.contiguous()
    gate = _gate_f32(gate)
    packed = PACKED.get(lora_a, lora_b, backward=False)
    status = _ext.library().tp_routed_lora_fwd(
        x.data_ptr(), idx.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), _ext.ptr(gate), _ext.DTYPE_CODES[x.dtype],
        n, d_in, n_exp, n_slice, rank, d_out, float(scale), y.data_ptr(), h.data_ptr(), _ext.ptr(packed),
        torch.get_num_threads(),
    )
    _ext.check(status, "routed_lora", n_exp)
    return (y, h, *group_by_expert(idx, n_exp))  # after the call: the extension checks the indices first


def _backward_call(grad_y, x, idx, lora_a, lora_b, gate, h, scale, dx, da, db, dg, dh_rows=None, hm_rows=None):
    """tp_routed_lora_bwd on n > 0 tokens, writing the given outputs (None: not wanted) -> the contiguous
    (x, grad_y, idx) it read."""
    n, d_in, n_exp, n_slice, rank, d_out = _dims(x, lora_a, lora_b)
    grad_y = grad_y.to(x.dtype).contiguous()
    x, idx, lora_a, lora_b = x.contiguous(), idx.to(torch.int64).contiguous(), lora_a.contiguous(), lora_b.contiguous()
    h, gate32 = h.to(torch.float32).contiguous(), _gate_f32(gate)  # kept alive across the call
    packed = PACKED.get(lora_a, lora_b, backward=True) if dx is not None else None  # the packed layout includes A
    status = _ext.library().tp_routed_lora_bwd(
        grad_y.data_ptr(), x.data_ptr(), idx.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), _ext.ptr(gate32),
        h.data_ptr(), _ext.DTYPE_CODES[x.dtype], n, d_in, n_exp, n_slice, rank, d_out, float(scale), _ext.ptr(dx),
        _ext.ptr(da), _ext.ptr(db), _ext.ptr(dg), _ext.ptr(packed), _ext.ptr(dh_rows), _ext.ptr(hm_rows),
        torch.get_num_threads(),
    )
    _ext.check(status, "routed_lora backward", n_exp)
    return x, grad_y, idx


def backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w, need_gate):
    """Gradients for forward(); unneeded ones come back as empty tensors."""
    n, d_in, n_exp, n_slice, rank, d_out = _dims(x, lora_a, lora_b)
    if not _in_extension(x, rank):
        return _torch_path.backward(grad_y, x, idx, lora_a, lora_b, gate, h, perm, offsets, scale, need_x, need_w,
                                    need_gate)
    need_gate = need_gate and gate is not None
    dx = torch.empty(n, d_in, dtype=x.dtype) if need_x else None
    da = torch.empty(lora_a.shape, dtype=lora_a.dtype) if need_w else None
    db = torch.empty(lora_b.shape, dtype=lora_b.dtype) if need_w else None
    dg = torch.empty(n, dtype=torch.float32) if need_gate else None
    if n == 0 and need_w:
        da.zero_()
        db.zero_()
    elif n > 0 and (need_x or need_w or need_gate):
        _backward_call(grad_y, x, idx, lora_a, lora_b, gate, h, scale, dx, da, db, dg)
    # distinct empties: custom-op outputs may not alias each other
    return (
        dx if need_x else x.new_empty(0),
        da if need_w else x.new_empty(0),
        db if need_w else x.new_empty(0),
        dg.to(gate.dtype) if need_gate else x.new_empty(0),
    )


def backward_rows(grad_y, x, idx, lora_a, lora_b, gate, h, scale, need_x, need_gate):
    """backward() without the weight gradients: -> dx (or empty), dgate (or empty), and the rows that
    :func:`weight_grads` reduces, dh and m h (N, S*R) float32 with tokens in grouped order. float32 only."""
    n, _, _, n_slice, rank, _ = _dims(x, lora_a, lora_b)
    need_gate = need_gate and gate is not None
    dx = torch.empty(n, x.shape[1], dtype=x.dtype) if need_x else x.new_empty(0)
    dg = torch.empty(n, dtype=torch.float32) if need_gate else x.new_empty(0)
    dh_rows = torch.empty(n, n_slice * rank, dtype=torch.float32)
    hm_rows = torch.empty(n, n_slice * rank, dtype=torch.float32)
    if n > 0:
        x, grad_y, idx = _backward_call(grad_y, x, idx, lora_a, lora_b, gate, h, scale, dx if need_x else None, None,
                                        None, dg if need_gate else None, dh_rows, hm_rows)
    return dx, dg, (x, grad_y, idx, dh_rows, hm_rows)


def weight_grads(rows, lora_a, lora_b):
    """dA, dB (lora_a's and lora_b's shapes) summed over calls of :func:`backward_rows` with these weights, in one
    reduction per expert over all their tokens. rows: the calls' row tuples, in the order their sums are taken."""
    _, n_slice, rank, d_in = lora_a.shape
    da, db = torch.empty(lora_a.shape, dtype=lora_a.dtype), torch.empty(lora_b.shape, dtype=lora_b.dtype)
    table = torch.tensor([[x.data_ptr(), g.data_ptr(), i.data_ptr(), dh.data_ptr(), hm.data_ptr(), x.shape[0]]
                          for x, g, i, dh, hm in rows], dtype=torch.int64).reshape(-1, 6)
    status = _ext.library().tp_routed_lora_wgrad(
        len(rows), table.data_ptr(), _ext.DTYPE_CODES[lora_a.dtype], d_in, lora_a.shape[0], n_slice, rank,
        lora_b.shape[2], da.data_ptr(), db.data_ptr(), torch.get_num_threads())
    _ext.check(status, "routed_lora weight gradients", lora_a.shape[0])
    return da, db
