"""Argument checks shared by the public op wrappers: each error names the argument."""

from __future__ import annotations

import math

import torch

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
