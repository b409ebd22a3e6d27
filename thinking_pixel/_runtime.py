"""Small runtime helpers shared by training and sampling: device choice and the CPU thread count."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_device", "set_threads", "torch_threads"]


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA if available, else CPU), 'cpu' or 'cuda[:i]'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """Run the block with ``num_threads`` CPU threads (None: leave torch's setting), restoring it afterwards.

    On a machine shared with other jobs, one thread is often much faster than several for small models:
    OpenMP threads that wait for a descheduled peer spin instead of working.
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_threads(threads: int | None) -> None:
    """Apply a --threads option (None: keep torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
