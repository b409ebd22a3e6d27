"""Training: ``train(TrainConfig(...))``, DiT's recipe with resumable, reproducible checkpoints.

The loop is DiT's (train.py of facebookresearch/DiT): uniform timesteps, the hybrid MSE + VLB loss,
AdamW (lr 1e-4 there, weight decay 0), an EMA copy of the weights. Additions for small machines and
for the method:

- recursion: the model is a ThinkingPixelDiT (recursive sparse reasoning in ``recursion.layers``) unless
  ``recursion=None``; with ``model.finetune_from`` a trained DiT is wrapped and, by default, frozen so only the
  LoRA experts and gates train (the paper's setting).
- EMA: DiT uses decay 0.9999 over 400k steps. A few-thousand-step CPU run needs a shorter memory, so the
  default here is 0.999, with the usual warm-up min(decay, (1 + n) / (10 + n)) so the early EMA tracks
  the model instead of averaging in its random initialisation.
- resume: running the same command on the same ``output_dir`` continues from ``latest`` and produces the
  same losses as an uninterrupted run, also after ``kill -9``. The data order is a pure function of (seed,
  step) (:class:`~thinking_pixel.data.StepBatchSampler`), the random numbers of step s on rank r (noise,
  timesteps, Gumbel noise, label dropout) come from the global RNG seeded with (seed, s, r) at the start of the
  step, and the optimizer and the EMA are restored from the checkpoint; metrics lines past it are dropped.
  Checkpoints are written every ``run.checkpoint_every`` steps, at the end, every ``run.checkpoint_minutes`` and when
  SIGTERM or Ctrl-C arrives (the run then stops after that step).
- several processes: under torchrun the run is data-parallel (:mod:`thinking_pixel.distributed`: DDP, or FSDP2
  with ``run.distributed="fsdp"``); rank 0 alone writes metrics and checkpoints, and a run resumes on any number of
  processes.
- no host syncs in the step on CUDA: metrics stay on the device and are read every ``run.log_every`` steps
  (:class:`~thinking_pixel._train_log.StepLog`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import _run_dir as ckpt
from . import distributed
from ._fileio import atomic_write
from ._interrupts import StopRequests
from ._runtime import torch_threads
from ._train_log import RoutingCounts, SlowdownHint, StepLog
from .checkpoints import load_base_model, load_model_dir
from .data import StepBatchSampler
from .datasets import DATASETS, make_dataset
from .diffusion import GaussianDiffusion
from .models import DiT, dit_config
from .recursion import ThinkingPixelDiT
from .sample import sample_checkpoint
from .train_config import OptimisationConfig, TrainConfig

__all__ = ["DiTTask", "TrainConfig", "TrainResult", "build_model", "task_for", "train"]

# Settings that may change between a run and its resumption without changing what is computed.
_RESUMABLE_CHANGES = {"run.output_dir", "optimisation.max_steps", "run.checkpoint_every", "run.keep_checkpoints",
                      "data.num_workers", "run.compile", "run.progress", "run.sample_grid", "run.device",
                      "run.num_threads", "run.distributed", "run.log_every", "run.checkpoint_minutes",
                      "recursion.halt_threshold"}


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path
    last_loss: float | None  # None when there was nothing left to train
    samples: Path | None = None  # the grid written at the end (sample_grid=True)
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run (after a checkpoint)


def _check_matches_data(config, dataset, source: str) -> None:
    expected = dict(input_size=dataset.image_size, in_channels=dataset.num_channels, num_classes=dataset.num_classes,
                    cond_channels=dataset.cond_channels)
    wrong = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        details = ", ".join(f"{k}={m} (data needs {d})" for k, (m, d) in wrong.items())
        raise ValueError(f"{source} does not fit the dataset: {details}")
    if not config.learn_sigma:
        raise ValueError(f"{source} must have learn_sigma=True (the training loss needs the variance output)")


def build_model(cfg: TrainConfig, dataset) -> torch.nn.Module:
    """A fresh model for ``cfg`` (from a preset, or wrapping ``cfg.model.finetune_from``), shaped for ``dataset``."""
    recursion, m = cfg.recursion, cfg.model
    if m.finetune_from is not None:
        base = load_base_model(m.finetune_from)  # ours, a diffusers DiT directory, or a reference .pt
        if type(base) is not DiT:
            raise ValueError(f"finetune_from must hold a plain DiT, got a {type(base).__name__} "
                             f"({m.finetune_from}); to continue a run, rerun it on its output dir")
        _check_matches_data(base.config, dataset, f"the DiT in {m.finetune_from}")
        if base.config.prediction != m.prediction:
            raise ValueError(f"the DiT in {m.finetune_from} predicts {base.config.prediction!r}; fine-tune it with "
                             f"--prediction {base.config.prediction} (got {m.prediction!r})")
        if recursion is None:
            return base.train()  # plain continued training of the whole DiT
        return ThinkingPixelDiT.from_dit(base, recursion, freeze_base=m.freeze_base).train()
    overrides = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")
                 if getattr(m, k) is not None}
    config = dit_config(m.preset, input_size=dataset.image_size, in_channels=dataset.num_channels,
                        num_classes=dataset.num_classes, class_dropout_prob=m.class_dropout_prob,
                        cond_channels=dataset.cond_channels, prediction=m.prediction, **overrides)
    return DiT(config) if recursion is None else ThinkingPixelDiT(config, recursion)


class DiTTask:
    """What the loop needs from a model family, for the class-conditional DiT: its data, model, loss and grid."""

    @staticmethod
    def make_dataset(cfg: TrainConfig):
        return make_dataset(cfg.data.dataset, root=cfg.data.data_dir, image_size=cfg.data.image_size,
                            seed=cfg.run.seed)

    build_model = staticmethod(build_model)

    def __init__(self, cfg: TrainConfig, dataset, model, device: torch.device, output_dir: Path):
        # 0: DiT's uniform weights
        self.diffusion, self.device = GaussianDiffusion(), device
        self.min_snr_gamma = cfg.optimisation.min_snr_gamma or None

    def losses(self, model, x, y, cond_image=None) -> dict:
        """{"loss": (N,), other per-sample terms logged as metrics}: DiT's hybrid MSE + VLB loss.
        ``cond_image`` (N, C_cond, H, W): the conditioning image of an image-conditioned dataset (e.g. frozenlake)."""
        t = self.diffusion.sample_timesteps(x.shape[0], device=self.device)  # (N,)
        model_kwargs = {"y": y.to(self.device, non_blocking=True)}
        if cond_image is not None:
            model_kwargs["cond_image"] = cond_image.to(self.device, non_blocking=True)
        terms = self.diffusion.training_losses(model, x, t, model_kwargs=model_kwargs,
                                               min_snr_gamma=self.min_snr_gamma)
        return {"loss": terms["loss"], "mse": terms["mse"], "vb": terms["vb"]}

    @staticmethod
    def sample_grid(cfg: TrainConfig, output_dir: Path, device: torch.device) -> Path | None:
        if DATASETS[cfg.data.dataset].cond_channels:  # the grid shows classes, not image-conditioned outputs
            return None
        path = output_dir / "samples.png"
        print(f"{path}: drawing 4 samples per class, DDPM 100 steps (--no-sample-grid skips this)", flush=True)
        return sample_checkpoint(output_dir, path, sampler="ddpm", num_steps=100, cfg_scale=4.0, per_class=4,
                                 seed=cfg.run.seed, device=str(device), progress=cfg.run.progress)  # sample's defaults


def task_for(cfg: TrainConfig):
    """The model family ``cfg`` trains: DiTTask, or the text-to-image SD3 task."""
    if cfg.text_to_image is not None:
        from .text_to_image.training import TextToImageTask

        return TextToImageTask
    return DiTTask


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # local shards under FSDP2 (the EMA is sharded like the model), the tensors themselves otherwise
    torch._foreach_lerp_(distributed.local_tensors(ema.parameters()), distributed.local_tensors(model.parameters()),
                         1.0 - decay)


def _ema_decay(cfg: OptimisationConfig, num_updates: int) -> float:
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + num_updates) / (10 + num_updates))
    return cfg.ema_decay


def _lr(cfg: OptimisationConfig, step: int) -> float:
    """Learning rate for update number ``step`` (0-based): linear warm-up, then constant (as DiT) or a cosine
    decay to 0 at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr


def _adamw(params: list, cfg: OptimisationConfig) -> torch.optim.AdamW:
    """AdamW, fused where torch has it (plain CPU and CUDA tensors, not FSDP2's DTensor shards): one pass over each
    parameter and its moments instead of the default implementation's one per elementwise op (``pytest
    benchmarks/test_optimizer.py --benchmark-only``)."""
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric lines up to ``step`` (lines past a checkpoint are recomputed on resume)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] > step:
                break
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # the last line, cut short by a kill
        kept.append(line)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def _differences(saved, current, path: str = "") -> list[str]:
    """Where two :meth:`TrainConfig.to_dict` trees differ ("section.field: saved vs now"), outside
    _RESUMABLE_CHANGES."""
    if path in _RESUMABLE_CHANGES:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        return [diff for key in dict.fromkeys([*current, *saved])
                for diff in _differences(saved.get(key), current.get(key), f"{path}.{key}" if path else key)]
    return [] if saved == current else [f"{path}: {saved!r} (saved) vs {current!r} (now)"]


def _check_resumable(saved: TrainConfig, cfg: TrainConfig, output_dir: Path) -> None:
    diffs = _differences(saved.to_dict(), cfg.to_dict())
    if diffs:
        raise ValueError(f"{output_dir} holds a run with different settings ({'; '.join(diffs)}); "
                         "rerun with the same settings to resume, or use a new output dir")


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns where it ended.

    ``on_step(step, metrics)`` is called for every optimisation step once its metrics line is written (every
    ``log_every`` steps; used by tests to interrupt a run; an exception raised there stops training without a
    checkpoint). Under torchrun, every process calls this and rank 0 writes the files.
    """
    with torch_threads(cfg.run.num_threads), distributed.initialized(cfg.run.device) as runtime:
        with StopRequests(announce=runtime.is_main) as stop:
            result = _train(cfg, on_step, runtime, stop)
        if cfg.run.sample_grid and runtime.is_main and result.last_loss is not None and result.stopped_by is None:
            result.samples = task_for(cfg).sample_grid(cfg, result.output_dir, runtime.device)
        return result


def _save(cfg, runtime, output_dir, step, wrapped, model, ema, optimizer, data_position) -> Path:
    """Checkpoint ``step``: every rank takes part (gathering FSDP2 shards), rank 0 writes, all learn if it failed."""
    model_state = distributed.full_state_dict(model, runtime)
    ema_state = distributed.full_state_dict(ema, runtime)
    optimizer_state = distributed.optimizer_state(wrapped, optimizer, runtime)
    path, error = output_dir / ckpt.CHECKPOINTS / f"step_{step:07d}", None
    if runtime.is_main:
        training_state = {
            "step": step,
            "optimizer": optimizer_state,
            "ema": {"decay": cfg.optimisation.ema_decay, "num_updates": step},
            "data": data_position,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "world_size": runtime.world_size,
        }
        try:
            path = ckpt.write_checkpoint(output_dir, step, model, ema, training_state, cfg.to_dict(),
                                         keep=cfg.run.keep_checkpoints, model_state=model_state, ema_state=ema_state)
        except ckpt.CheckpointError as e:
            error = e
    failed = distributed.all_reduce_sum(torch.tensor([float(error is not None)], device=runtime.device), runtime)
    if error is not None:
        raise error
    if failed.item():
        raise ckpt.CheckpointError(f"rank 0 could not write the checkpoint of step {step} (see its error)")
    return path


def _train(cfg: TrainConfig, on_step, runtime: distributed.Runtime, stop: StopRequests) -> TrainResult:
    data, opt, run = cfg.data, cfg.optimisation, cfg.run
    output_dir = Path(run.output_dir)
    device = runtime.device
    metrics_path = output_dir / "metrics.jsonl"
    say = print if runtime.is_main else (lambda *args, **kwargs: None)
    if runtime.is_main:
        ckpt.prepare_output_dir(output_dir)

    task_type = task_for(cfg)
    dataset = task_type.make_dataset(cfg)
    if data.hflip and dataset.cond_channels:
        raise ValueError(f"hflip cannot be used with dataset {data.dataset!r}: it flips the target, not its condition")

    step_dir = ckpt.read_latest(output_dir)
    if step_dir is None:
        torch.manual_seed(run.seed)  # the same initial weights on every rank
        model = task_type.build_model(cfg, dataset).to(device).train()
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        state = None
        start_step = 0
        if runtime.is_main and metrics_path.exists():
            metrics_path.unlink()  # a previous attempt that never reached its first checkpoint
    else:
        _check_resumable(TrainConfig.load(step_dir), cfg, output_dir)  # older layouts as they behaved
        state = ckpt.load_training_state(step_dir)
        model = load_model_dir(step_dir / "model", device=device).train()
        ema = load_model_dir(step_dir / "ema", device=device).requires_grad_(False).eval()
        trainable = set(state["trainable"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        start_step = state["step"]
        if runtime.is_main:
            _truncate_metrics(metrics_path, start_step)

    wrapped = distributed.wrap_model(model, runtime, run.distributed)
    if wrapped is model and runtime.world_size > 1:  # FSDP2 shards in place; shard the EMA the same way
        distributed.shard_like(ema, runtime)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the sharded parameters
    optimizer = _adamw(params, opt)
    sampler = StepBatchSampler(len(dataset), opt.batch_size, seed=run.seed, start_step=start_step)
    if state is not None:
        if isinstance(state["optimizer"]["param_groups"][0]["params"][0], int):  # saved before distributed training
            optimizer.load_state_dict(state["optimizer"])
        else:
            distributed.load_optimizer_state(wrapped, optimizer, state["optimizer"])
        if state["data"] != {"num_samples": len(dataset), "batch_size": opt.batch_size, "seed": run.seed,
                             **sampler.position(start_step)}:
            raise ckpt.CheckpointError(f"{step_dir}: saved data order {state['data']} does not match this dataset")

    if start_step >= opt.max_steps:
        say(f"{output_dir}: already trained to step {start_step} (max_steps={opt.max_steps}); nothing to do")
        return TrainResult(output_dir, start_step, step_dir, None)
    processes = f" on {runtime.world_size} processes ({run.distributed})" if runtime.world_size > 1 else ""
    if state is None:
        say(f"{output_dir}: starting a new run of {opt.max_steps} steps{processes}", flush=True)
    else:
        saved_by = state.get("world_size", 1)
        moved = f"; saved by {saved_by} process{'es' * (saved_by > 1)}" if saved_by != runtime.world_size else ""
        say(f"{output_dir}: resuming from step {start_step} of {opt.max_steps} ({step_dir}){processes}{moved}",
            flush=True)

    task = task_type(cfg, dataset, model, device, output_dir)
    forward = torch.compile(wrapped) if run.compile else wrapped
    # Its own generator: the loader would otherwise draw its worker seed from the global RNG when iteration
    # starts, which happens at a different point of the random stream in a resumed run.
    batches = distributed.ShardedBatches(sampler, opt.batch_size, runtime)  # this rank's part of each global batch
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(run.seed))
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    from tqdm.auto import tqdm

    bar = tqdm(total=opt.max_steps, initial=start_step, disable=not (run.progress and runtime.is_main),
               dynamic_ncols=True, desc=f"{type(model).__name__} {n_trainable / 1e6:.2f}M/{n_total / 1e6:.2f}M params")
    routing = RoutingCounts(model, device)
    log = StepLog(metrics_path, runtime, routing, every=run.log_every or (1 if device.type == "cpu" else 25))
    slowdown = SlowdownHint(torch.get_num_threads() if device.type == "cpu" and runtime.is_main else 1, bar.write)
    step, loss_value, checkpoint, saved_at, stopped_by = start_step, None, step_dir, time.monotonic(), None
    with routing.recording(), log, bar:
        for x, y, *cond in loader:  # cond: [conditioning image] for image-conditioned datasets
            torch.manual_seed(_step_seed(run.seed, step, runtime.rank))
            x = x.to(device, non_blocking=True)  # (N, C, H, W); y: labels (N,), moved by the task
            if data.hflip:
                flip = torch.rand(x.shape[0], device=device) < 0.5  # (N,)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            lr = _lr(opt, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opt.bf16):
                terms = task.losses(forward, x, y, *cond)
            loss = terms["loss"].mean()
            if isinstance(model, ThinkingPixelDiT):
                loss = loss + model.auxiliary_loss()  # e.g. the learned halting head's prior term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opt.grad_clip if opt.grad_clip > 0 else math.inf)
            optimizer.step()
            _update_ema(ema, model, _ema_decay(opt, step))
            step += 1
            log.add(step, lr, terms, grad_norm)

            scheduled = step % run.checkpoint_every == 0 or step == opt.max_steps
            if not (scheduled or log.due()):
                continue
            overdue = 0 < run.checkpoint_minutes * 60 <= time.monotonic() - saved_at
            asked = (stop.signal_name == "SIGTERM", stop.signal_name == "SIGINT", overdue)
            lines, (sigterm, sigint, overdue) = log.flush(asked)  # what any rank asked: every rank acts alike
            stopped_by = "SIGTERM" if sigterm else "SIGINT" if sigint else None
            for metrics in lines:
                bar.update(1)
                slowdown.add(metrics["it_s"])
                if on_step is not None:
                    on_step(metrics["step"], metrics)
            loss_value = lines[-1]["loss"]
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if scheduled or overdue or stopped_by:
                log.sync()
                checkpoint = _save(cfg, runtime, output_dir, step, wrapped, model, ema, optimizer,
                                   {"num_samples": len(dataset), "batch_size": opt.batch_size, "seed": run.seed,
                                    **sampler.position(step)})
                saved_at = time.monotonic()
            if stopped_by:
                break
            if step >= opt.max_steps:
                break
    if stopped_by is not None:
        say(f"{output_dir}: stopped by {stopped_by} at step {step} of {opt.max_steps}; checkpoint {checkpoint}; "
            "run the same command to resume", flush=True)
    return TrainResult(output_dir, step, checkpoint, loss_value, stopped_by=stopped_by)
