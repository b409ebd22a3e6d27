"""Multi-process training with torch.distributed, as launched by torchrun.

    torchrun --nproc_per_node 4 $(which thinking-pixel) train ...                 # one node, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --rdzv-id RUN $(which thinking-pixel) train ...   # on every node

What each rank does (see :func:`thinking_pixel.train.train`):

- setup: the process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``...), with NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU. Without
  torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised and training is single-process.
- model: DistributedDataParallel by default; ``strategy="fsdp"`` shards parameters, gradients and optimizer
  state with FSDP2 (``fully_shard`` per DiT block, then the whole model) for models that do not fit one device.
- data: ``batch_size`` is the global batch; rank r takes its contiguous ``batch_size / world_size`` slice of
  every global batch of the seeded order, so the data seen per step does not depend on the number of processes.
- checkpoints and ``metrics.jsonl`` are written by rank 0 only, as full (unsharded) state keyed by parameter
  name: a run can resume on a different number of processes, or without torchrun. Every rank reads the
  checkpoint it resumes from, so on several nodes ``--output-dir`` must be on a filesystem they share.
- metrics (loss terms, routing counts) are all-reduced with ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._runtime import resolve_device

__all__ = ["STRATEGIES", "Runtime", "ShardedBatches", "all_reduce_sum", "full_state_dict", "initialized",
           "load_optimizer_state", "local_tensors", "optimizer_state", "replicated", "shard_like", "unwrap",
           "wrap_model"]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Runtime:
    """Where this process sits: its rank among ``world_size`` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


@contextlib.contextmanager
def initialized(device: str = "auto"):
    """The :class:`Runtime` of this process, with the process group set up for the block when torchrun started
    several processes (and torn down afterwards, unless the caller had already initialised it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        yield Runtime(device=resolve_device(device))
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:  # one GPU per process
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        if dev.type == "cuda":  # binding the group to its GPU lets NCCL connect eagerly (no hang on a first barrier)
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    try:
        yield Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)
    finally:
        if owned:
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, runtime: Runtime, strategy: str = "ddp") -> torch.nn.Module:
    """``model`` ready for data-parallel training on ``runtime`` (unchanged on a single process).

    ddp: a DistributedDataParallel wrapper (it broadcasts rank 0's weights once, here). fsdp: ``model`` itself,
    sharded in place by FSDP2: each DiT block is its own unit, the embeddings and head the root's.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
    if runtime.world_size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # static_graph: the same parameters take part in every step (also when some never get a gradient, like
        # the context branch of SD3's last block), so DDP need not search for unused ones at each step.
        # broadcast_buffers=False: no buffer changes in training (positional tables, the halting step counters,
        # which count rank-local eval forwards), so rank 0's broadcast at wrapping is the only one they need
        return DistributedDataParallel(model, device_ids=device_ids, static_graph=True, broadcast_buffers=False)
    shard_like(model, runtime)
    return model


def shard_like(module: torch.nn.Module, runtime: Runtime) -> None:
    """Shard ``module`` in place with FSDP2 the way :func:`wrap_model` shards a model (used for its EMA too, so
    their local shards line up)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for block in getattr(module, "blocks", ()):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DistributedDataParallel wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def local_tensors(params) -> list[torch.Tensor]:
    """This rank's part of each parameter: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A DTensor result (e.g. FSDP2's grad norm) as a plain tensor, equal on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(module: torch.nn.Module, runtime: Runtime) -> dict | None:
    """The full, unsharded weights of ``module`` on rank 0 (None on the others): a collective under FSDP2."""
    module = unwrap(module)
    if not _is_sharded(module):
        return module.state_dict() if runtime.is_main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(cpu_offload=True))
    return state if runtime.is_main else None


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict | None:
    """The optimizer's full state keyed by parameter name, on rank 0 (None on the others), whatever the
    strategy, so a checkpoint resumes on any number of processes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=_is_sharded(model)))
    return state if runtime.is_main else None


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`optimizer_state`'s result (every rank passes the full state; FSDP2 keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # strict=False: a trainable parameter that never received a gradient (an unused branch) has no state
    set_optimizer_state_dict(unwrap(model), optimizer, state, options=_options(strict=False))


def _is_sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in unwrap(module).parameters())


def all_reduce_sum(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """``t`` summed over all ranks (``t`` itself on a single process)."""
    if runtime.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ShardedBatches(torch.utils.data.Sampler):
    """Rank ``rank``'s contiguous slice of every global batch that ``sampler`` yields."""

    def __init__(self, sampler, batch_size: int, runtime: Runtime):
        if batch_size % runtime.world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) must be divisible by the number of "
                             f"processes, {runtime.world_size}")
        self.sampler, self.per_rank, self.rank = sampler, batch_size // runtime.world_size, runtime.rank

    def __iter__(self):
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for batch in self.sampler:
            yield batch[lo:hi]
