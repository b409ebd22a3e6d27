"""The optional compiled CPU extension built from csrc/ (a plain C++/OpenMP library loaded with ctypes).

What it adds over the composed-torch CPU path: tokens grouped by a counting sort, gathered tile by tile
into cache-resident buffers, shrink and expand fused per tile with each output row written once, and a
one-pass top-1 gate. ``pip install .`` builds it where a C++ compiler exists; for development,
``python setup.py build_ext --inplace`` puts it next to this file. Each op's ``cpu.py`` calls it.

:func:`routed_lora_cpu` and :func:`gate_cpu` return the backend modules ``routed_lora/cpu.py`` and
``gate_top1/cpu.py`` (the interface of the ops' ``torch.py``), or None when the library was not built (no compiler,
TP_KERNELS_NO_EXT=1 at install) or TP_KERNELS_NO_EXT=1 is set at run time; callers then use the
composed-torch path (``torch.py``), which computes the same function.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import warnings
from pathlib import Path

import torch

LIB_PATH = Path(__file__).with_name("_cpu_kernels.so")
ABI_VERSION = 7  # csrc/common.h: TP_ABI_VERSION; a library built from other sources is not called
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # csrc/kernels.h: DType

_P, _I64, _INT, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "tp_isa": (ctypes.c_char_p, []),
    "tp_has_bf16_dot": (_INT, []),
    # x, idx, a, b, gate, dtype, n, d_in, n_exp, n_slice, rank, d_out, scale, y, h, packed, threads
    "tp_routed_lora_fwd": (_INT, [_P, _P, _P, _P, _P, _INT] + [_I64] * 6 + [_F64, _P, _P, _P, _INT]),
    # grad_y, x, idx, a, b, gate, h, dtype, n, d_in, n_exp, n_slice, rank, d_out, scale, dx, da, db, dgate, packed,
    # dh_rows, hm_rows, threads
    "tp_routed_lora_bwd": (_INT, [_P] * 7 + [_INT] + [_I64] * 6 + [_F64] + [_P] * 7 + [_INT]),
    # calls, table (calls x 6 int64), dtype, d_in, n_exp, n_slice, rank, d_out, da, db, threads
    "tp_routed_lora_wgrad": (_INT, [_I64, _P, _INT] + [_I64] * 5 + [_P, _P, _INT]),
    # dtype, n_exp, n_slice, rank, d_in, d_out, for_backward
    "tp_routed_lora_packed_floats": (_I64, [_INT] + [_I64] * 5 + [_INT]),
    # a, b, dtype, n_exp, n_slice, rank, d_in, d_out, for_backward, out, threads
    "tp_routed_lora_pack": (_INT, [_P, _P, _INT] + [_I64] * 5 + [_INT, _P, _INT]),
    # logits, logits dtype, noise, noise dtype, n, e, tau, idx, probs, threads
    "tp_gate_top1_fwd": (_INT, [_P, _INT, _P, _INT, _I64, _I64, _F64, _P, _P, _INT]),
    # src (6 x 4 int64), batch, heads, head_dim, scale, out, lse, threads
    "tp_attention_fwd": (_INT, [_P, _I64, _I64, _I64, _F64, _P, _P, _INT]),
    # src, grad (6 x 4 int64 each), batch, heads, head_dim, scale, grad_out, out, lse, threads
    "tp_attention_bwd": (_INT, [_P, _P, _I64, _I64, _I64, _F64, _P, _P, _P, _INT]),
    # h, dtype, n, d, w, e, out, threads
    "tp_gate_logits": (_INT, [_P, _INT, _I64, _I64, _P, _I64, _P, _INT]),
    # dh, dtype, n, d, dl, w, e, threads
    "tp_gate_logits_grad": (_INT, [_P, _INT, _I64, _I64, _P, _P, _I64, _INT]),
    # x, dtype, n, d, eps, y, mean, rstd, threads
    "tp_layer_norm_fwd": (_INT, [_P, _INT, _I64, _I64, _F64, _P, _P, _P, _INT]),
    # grad_y, x, dtype, n, d, mean, rstd, dx, threads
    "tp_layer_norm_bwd": (_INT, [_P, _P, _INT, _I64, _I64, _P, _P, _P, _INT]),
}


def disabled() -> bool:
    return os.environ.get("TP_KERNELS_NO_EXT", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _load():
    if not LIB_PATH.exists():
        return None
    try:
        lib = ctypes.CDLL(str(LIB_PATH))
    except OSError as err:  # e.g. built for another platform
        warnings.warn(f"tp_kernels: cannot load the CPU extension {LIB_PATH} ({err}); using the torch CPU path")
        return None
    # A stale build (older sources, another checkout's library) would be called with the wrong arguments:
    # only a library that reports this interface's version and exports every function is used.
    try:
        version_fn = lib.tp_abi_version
    except AttributeError:
        version = None
    else:
        version_fn.restype, version_fn.argtypes = _INT, []
        version = version_fn()
    if version != ABI_VERSION:
        warnings.warn(f"tp_kernels: the CPU extension {LIB_PATH} has interface version {version}, this package needs "
                      f"{ABI_VERSION} (rebuild it: python setup.py build_ext --inplace); using the torch CPU path")
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            warnings.warn(f"tp_kernels: the CPU extension {LIB_PATH} lacks {name} (rebuild it: python setup.py "
                          "build_ext --inplace); using the torch CPU path")
            return None
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def library():
    """The loaded ctypes library, or None (not built, or disabled with TP_KERNELS_NO_EXT=1)."""
    return None if disabled() else _load()


def isa() -> str | None:
    """The instruction set the extension's kernels run with ("avx512_bf16", "avx512", "avx2", "baseline"), or None.

    The widest one the CPU supports, or a narrower one asked for with TP_KERNELS_ISA before the library loads.
    """
    lib = library()
    return None if lib is None else lib.tp_isa().decode()


def bf16_dot() -> bool:
    """Whether the extension multiplies bfloat16 with bf16 dot-product instructions (else it converts to fp32)."""
    lib = library()
    return lib is not None and bool(lib.tp_has_bf16_dot())


def ptr(t: torch.Tensor | None):
    """A tensor's data pointer for the library (None for a missing tensor)."""
    return None if t is None else t.data_ptr()


def check(status: int, op: str, num_experts: int = 0) -> None:
    """Turn the library's status code (csrc/common.h: Status) into an exception."""
    if status == 1:
        raise IndexError(f"{op}: expert_idx must lie in [0, {num_experts}) or be -1 (skipped)")
    if status == 2:
        raise MemoryError(f"{op}: out of memory for the CPU extension's buffers")
    if status == 3:
        raise ValueError(f"{op}: the CPU extension keeps weight-gradient rows for fp32 operands only")
    if status != 0:
        raise RuntimeError(f"{op}: CPU extension failed with status {status}")


def _backend(module: str):
    return importlib.import_module(module, __package__) if library() is not None else None


def routed_lora_cpu():
    return _backend(".routed_lora.cpu")


def gate_cpu():
    return _backend(".gate_top1.cpu")
