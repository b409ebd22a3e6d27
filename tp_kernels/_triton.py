"""Triton helpers shared by the ops' kernels: the tl.dot precision and its call, host-side grid arithmetic, and
the :class:`Launch` record every kernel launch is described with (tp_kernels._aot compiles the same records).

Imported only by the ops' ``triton.py`` modules: importing it imports triton.
"""

from __future__ import annotations

import typing

import torch
import triton
import triton.language as tl

from ._dispatch import triton_interpret

# Triton 3.8's interpreter runs tl.dot as np.matmul on the raw storage, which is uint16 for bf16.
# There, bf16 operands are widened to fp32 first: exact (a bf16 product fits in fp32), only the
# summation order can differ from the tensor-core result. Compiled kernels never take this branch.
INTERPRET = triton_interpret()  # fixed per process: it must be set before triton is imported
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation, on tensor cores when compiled."""
    if _WIDEN_BF16_DOT and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def precision(dtype):
    """tl.dot input_precision for operands of ``dtype``, following torch's float32 matmul setting.

    fp16 / bf16: None (Triton's native tensor-core dot). fp32: ``"tf32"`` when torch allows TF32
    (``torch.backends.cuda.matmul.allow_tf32``, set by ``torch.set_float32_matmul_precision("high")`` or
    ``"medium"``), else -- torch's default, "highest" -- ``"tf32x3"``: three TF32 tensor-core products per
    multiply (the 3xTF32 split of each operand into a TF32 head and tail), fp32-level accuracy (the dropped
    tail x tail term is ~2^-22 relative) at tensor-core speed. Under the interpreter, ``"ieee"`` (numpy fp32).
    """
    if dtype != torch.float32:
        return None
    if INTERPRET:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


PRECISIONS = {torch.float32: ("tf32", "tf32x3"), torch.bfloat16: (None,), torch.float16: (None,)}  # reachable on GPU


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: triton.cdiv is a ConstexprFunction, ~14 µs per host call under Triton 3.8."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (n >= 1), on the host (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()


class Launch(typing.NamedTuple):
    """One kernel launch, described before it runs (so ahead-of-time compiles see the same configs); a named
    tuple: made several times per call, it must be cheap to make."""

    kernel: object
    grid: tuple
    args: dict  # runtime arguments by name: tensors, ints, floats, or None for an absent pointer
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self):
        # every kernel indexes its tensors as dense row-major arrays: the ops check that their inputs are
        # (tp_kernels._validate: the public wrappers, or the op itself when called directly), and allocate the
        # rest so
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)
