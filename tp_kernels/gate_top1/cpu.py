"""Top-1 gate on CPU through the compiled extension (csrc/gate.cpp): the ``cpu`` backend, with the interface of
torch.py.

One pass over the logits per block of rows: noise add, argmax (ties to the lowest index), softmax.
float32 and bfloat16 logits/noise are read directly, float16 is converted to float32 first, and float64
logits use the composed-torch path of torch.py (they need float64 outputs). The gate's token term (logits = h W^T and
its input gradient) runs row by row in fp32 for float32 and bfloat16 h: a skinny (E columns) product that a BLAS
call made batch-invariant (mm_rows) spends more time on than the extension's single pass.
"""

from __future__ import annotations

import torch

from .. import _ext
from . import torch as _torch_path


def _readable(t):
    if t is None:
        return None
    return (t if t.dtype in _ext.DTYPE_CODES else t.to(torch.float32)).contiguous()


def forward(logits, noise, tau, hard):
    """logits (N, E) -> idx (N,) int64, weight (N,) ones if hard else (N, E) probs, probs (N, E) or empty."""
    if logits.dtype == torch.float64:
        return _torch_path.forward(logits, noise, tau, hard)
    n, n_exp = logits.shape
    idx = torch.empty(n, dtype=torch.int64)
    probs = torch.empty(n, n_exp, dtype=torch.float32)
    if n > 0:
        logits, noise = _readable(logits), _readable(noise)
        status = _ext.library().tp_gate_top1_fwd(
            logits.data_ptr(), _ext.DTYPE_CODES[logits.dtype], _ext.ptr(noise),
            _ext.DTYPE_CODES[noise.dtype] if noise is not None else 0, n, n_exp, float(tau),
            idx.data_ptr(), probs.data_ptr(), torch.get_num_threads(),
        )
        _ext.check(status, "gate_top1")
    if hard:
        return idx, torch.ones(n, dtype=torch.float32), probs
    return idx, probs, probs.new_empty(0)


def _kernel_takes(h):
    return h.device.type == "cpu" and h.dtype in _ext.DTYPE_CODES and h.is_contiguous() and h.dim() == 2


def logits(h, weight):
    """h (N, D) @ weight (E, D)^T -> (N, E) float32: accumulated in fp32, rounded to h's dtype as the gate's Linear
    computes it (float64 h: torch.py's)."""
    if not _kernel_takes(h):
        return _torch_path.logits(h, weight)
    n, d = h.shape
    w = weight.to(torch.float32).contiguous()
    out = torch.empty(n, w.shape[0], dtype=torch.float32)
    if n > 0:
        _ext.check(_ext.library().tp_gate_logits(h.data_ptr(), _ext.DTYPE_CODES[h.dtype], n, d, w.data_ptr(),
                                                 w.shape[0], out.data_ptr(), torch.get_num_threads()), "gate logits")
    return out


def add_logits_grad(dh, dlogits, weight):
    """dh (N, D) += dlogits (N, E) @ weight (E, D), computed in fp32 and rounded to dh's dtype once."""
    if not _kernel_takes(dh):
        return _torch_path.add_logits_grad(dh, dlogits, weight)
    n, d = dh.shape
    w = weight.to(torch.float32).contiguous()
    dl = dlogits.to(torch.float32).contiguous()
    if n > 0:
        _ext.check(_ext.library().tp_gate_logits_grad(dh.data_ptr(), _ext.DTYPE_CODES[dh.dtype], n, d, dl.data_ptr(),
                                                      w.data_ptr(), w.shape[0], torch.get_num_threads()),
                   "gate logits backward")
