"""Backend choice for every tp_kernels op.

``auto`` picks by device: Triton for CUDA tensors, the fast CPU path for CPU
tensors, and ``torch`` -- tokens grouped by expert, one GEMM pair per expert in
composed torch ops -- on any other device, or CUDA without Triton (the
``reference`` gathers per-token weights: ~14 GB at DiT-XL with 8192 tokens).
``TP_KERNELS_BACKEND`` (environment) or :func:`use_backend` (context
manager, wins over the environment) force one of ``reference``, ``cpu``,
``torch`` or ``triton``. Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
set before triton is imported; that is how the kernels are tested here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import re
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "torch", "triton")
_ENV_VAR = "TP_KERNELS_BACKEND"
# The Triton releases the kernels are compiled and checked with (README "Supported versions"): those torch 2.7 and
# 2.14 pin. What a compiler pass makes of a kernel changes between releases (before 3.8 one turned a
# broadcast-multiply-sum into a tensor-core dot too short for the hardware; 3.2.0, torch 2.6's, aborts compiling
# the bf16 / fp16 forward at rank 128 for sm_90a), so a release outside the range is untested, not assumed right.
TESTED_TRITON = ((3, 3), (3, 8))
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tp_kernels_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for: the context manager's, else the environment's, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto", _ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (thread- and task-local)."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_release() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    import triton

    return tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())


@functools.lru_cache(maxsize=None)
def check_triton_version() -> None:
    """Warn once if the installed Triton is outside :data:`TESTED_TRITON`, naming it and the ways out."""
    import triton

    version = triton.__version__
    (lo, hi) = TESTED_TRITON
    if not lo <= triton_release() <= hi:
        warnings.warn(
            f"tp_kernels: Triton {version} is outside the tested range {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}, and a "
            f"compiler release can miscompile a kernel silently. Install a tested Triton (pip install "
            f"'triton>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}') or run the composed-torch backend: "
            f"TP_KERNELS_BACKEND=torch.", stacklevel=3)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device) -> str:
    """The backend that will run for tensors on ``device``."""
    name = requested_backend()
    if name == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "cpu" if device.type == "cpu" else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{_ENV_VAR}=triton but triton is not importable")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' was requested for tensors on {device}")
    return name


def implementation(device: torch.device, package: str, *, reference, torch_ops, cpu):
    """The module (or class) that runs an op of ``package`` for tensors on ``device``: ``reference``,
    ``torch_ops`` (composed torch ops), ``cpu`` (a callable: the extension's, which may fall back when it is not
    built) or the package's ``triton`` module."""
    name = resolve(device)
    if name == "reference":
        return reference
    if name == "torch":
        return torch_ops
    if name == "cpu":
        return cpu()
    check_triton_version()
    return importlib.import_module(".triton", package)
