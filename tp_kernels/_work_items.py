"""Device work items of a call, counted without a GPU: Triton launches plus the torch kernels it runs.

:func:`count_work_items` watches a block: every :class:`~tp_kernels._triton.Launch` (all of the
package's Triton kernels go through it) and every torch op that would run a kernel on a GPU -- not a view,
not an allocation, not an op that hands back one of its inputs unchanged (``.to`` the same dtype,
``.contiguous()`` of a contiguous tensor). Ops inside ``tp_kernels`` custom ops and inside the autograd
backward are counted too. Reads of a tensor's value on the host (``.item()``, ``bool(t)``: a sync on CUDA)
are recorded apart. With ``stub=True`` the Triton launches are counted but not run (their outputs are then
garbage): the host path alone, e.g. under ``TRITON_INTERPRET=1`` on CPU, where launching would interpret them.

:func:`fake_cuda` runs a block on fake CUDA tensors, no GPU needed: shapes and dtypes only, so the ops take
their CUDA path (Triton backend), and a read of a value on the host raises (``DataDependentOutputException``)
as does an op whose output shape depends on the data (``DynamicOutputShapeException``) -- the two things a
CUDA graph cannot capture. Triton launches must be stubbed there (``count_work_items(stub=True)``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
_HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}


@dataclasses.dataclass
class WorkItems:
    triton: list = dataclasses.field(default_factory=list)  # kernel names, in launch order
    torch: list = dataclasses.field(default_factory=list)  # aten op names that would launch a kernel
    host_reads: list = dataclasses.field(default_factory=list)  # ops that read a value back (a sync on CUDA)

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.torch)

    def clear(self):
        self.triton.clear()
        self.torch.clear()
        self.host_reads.clear()


def _storages(tree):
    return {StorageWeakRef(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves(tree)
            if isinstance(t, torch.Tensor)}


class _Counter(TorchDispatchMode):
    def __init__(self, items: WorkItems):
        super().__init__()
        self.items = items

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tp_kernels":  # run the op's body with this mode still on, to see its kernels
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if func.namespace == "prim":  # metadata (prim.device)
            return out
        if name in _HOST_READS:
            self.items.host_reads.append(str(func))
        elif not (func.is_view or name in _ALLOCATIONS):
            # an op that returns an input untouched (to / contiguous / clone-free reshape) launches nothing
            if func._schema.is_mutable or not (_storages(out) & _storages((args, kwargs))):
                self.items.torch.append(str(func))
        return out


@contextlib.contextmanager
def _launches_replaced(call):
    from ._triton import Launch

    real = Launch.__call__
    Launch.__call__ = lambda launch: call(launch, real)
    try:
        yield
    finally:
        Launch.__call__ = real


def stub_launches():
    """Inside the block every Triton launch is skipped (host-time measurements of the path around the kernels)."""
    return _launches_replaced(lambda launch, real: None)


@contextlib.contextmanager
def count_work_items(stub: bool = False):
    """Yields a :class:`WorkItems` that fills while the block runs; ``stub``: count Triton launches, don't run them."""
    items = WorkItems()

    def counted(launch, real):
        if all(g > 0 for g in launch.grid):
            items.triton.append(launch.kernel.__name__)
        if not stub:
            with _disable_current_modes():  # the interpreter's own tensor copies are not the kernel's work
                real(launch)

    with _launches_replaced(counted), _Counter(items):
        yield items


def fake_cuda():
    """A FakeTensorMode context: tensors made inside with ``device="cuda"`` need no GPU and hold no data."""
    return FakeTensorMode(allow_non_fake_inputs=False)


class _Ctx:
    """The parts of an autograd context a tp_kernels op's setup_context / backward use."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = tuple(needs_input_grad)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def forward_backward(op: str, args, needs_input_grad, grads):
    """The custom op ``tp_kernels::<op>`` forward on ``args``, then its registered backward on ``grads`` (one per
    output, None for those nothing differentiates) -> (outputs, input gradients). The autograd engine is not
    involved: it cannot run on fake CUDA tensors (it would start a CUDA device thread)."""
    opdef = OPDEFS[f"tp_kernels::{op}"]
    outputs = getattr(torch.ops.tp_kernels, op)(*args)
    ctx = _Ctx(needs_input_grad)
    opdef._setup_context_fn(ctx, tuple(args), outputs)
    return outputs, opdef._backward_fn(ctx, *grads)
