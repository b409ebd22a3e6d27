"""Training: ``train(TrainConfig(...))``, DiT's recipe with resumable, reproducible checkpoints.

The loop is DiT's (train.py of facebookresearch/DiT): uniform timesteps, the hybrid MSE + VLB loss,
AdamW (lr 1e-4 there, weight decay 0), an EMA copy of the weights. Additions for small machines and
for the method:

- recursion: the model is a ThinkingPixelDiT (recursive sparse reasoning in ``recursion_layers``) unless
  ``recursion=False``; with ``finetune_from`` a trained DiT is wrapped and, by default, frozen so only the
  LoRA experts and gates train (the paper's setting).
- EMA: DiT uses decay 0.9999 over 400k steps. A few-thousand-step CPU run needs a shorter memory, so the
  default here is 0.999, with the usual warm-up min(decay, (1 + n) / (10 + n)) so the early EMA tracks
  the model instead of averaging in its random initialisation.
- resume: running the same command on the same ``output_dir`` continues from ``latest`` and produces the
  same losses as an uninterrupted run, also after ``kill -9``. The data order is a pure function of (seed,
  step) (:class:`~thinking_pixel.data.StepBatchSampler`), the random numbers of step s on rank r (noise,
  timesteps, Gumbel noise, label dropout) come from the global RNG seeded with (seed, s, r) at the start of the
  step, and the optimizer and the EMA are restored from the checkpoint; metrics lines past it are dropped.
  Checkpoints are written every ``checkpoint_every`` steps, at the end, every ``checkpoint_minutes`` and when
  SIGTERM or Ctrl-C arrives (the run then stops after that step).
- several processes: under torchrun the run is data-parallel (:mod:`thinking_pixel.distributed`: DDP, or FSDP2
  with ``distributed="fsdp"``); rank 0 alone writes metrics and checkpoints, and a run resumes on any number of
  processes.
- no host syncs in the step on CUDA: metrics stay on the device and are read every ``log_every`` steps
  (:class:`~thinking_pixel._train_log.StepLog`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import _checkpoint as ckpt
from . import distributed
from ._fileio import atomic_write
from ._interrupts import StopRequests
from ._runtime import torch_threads
from ._train_log import RoutingCounts, StepLog
from .data import StepBatchSampler, make_dataset
from .diffusion import GaussianDiffusion
from .models import GATE_INPUTS, DiT, RecursionConfig, ThinkingPixelDiT, dit_config

TEXT_DATASETS = ("captions", "compositional")  # datasets of (image, caption): trained with the text-to-image model

__all__ = ["DiTTask", "TrainConfig", "TrainResult", "build_model", "task_for", "train"]

LR_SCHEDULES = ("constant", "cosine")
# What runs saved before these options existed did (their defaults are different today).
_BEHAVIOUR_BEFORE_OPTION = {"prediction": "eps", "lr_schedule": "constant", "min_snr_gamma": None}
# Settings that may change between a run and its resumption without changing what is computed.
_RESUMABLE_CHANGES = {"output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "num_workers", "compile",
                      "progress", "sample_grid", "device", "num_threads", "distributed", "log_every",
                      "checkpoint_minutes", "halt_threshold"}


@dataclass
class TrainConfig:
    """Everything a training run depends on; serialised into every checkpoint as train_config.json.

    The defaults are the CPU default run (``thinking-pixel train`` with no arguments): DiT-N/4 with
    recursion in its middle block, on 16x16 embedded shapes. DiT's own recipe is lr 1e-4, no warm-up,
    EMA 0.9999, eps prediction, uniform loss weights (use --lr 1e-4 --warmup-steps 0 --ema-decay 0.9999
    --lr-schedule constant --prediction eps --min-snr-gamma 0 for DiT's recipe); the defaults here are tuned
    by measured class accuracy for a short CPU run (5000 steps, ~8 min on 2 idle cores; RESULTS.md): lr 4e-3 after
    a 100-step warm-up (class accuracy at 1000 steps: lr 1e-3 0.22, 2e-3 0.43, 4e-3 0.57, 8e-3 0.61; at 3000 steps:
    2e-3 0.89, 4e-3 0.93, 8e-3 0.73; 4e-3 at 5000 steps: 0.99), cosine decay, v prediction and Min-SNR-5 weighting.
    """

    output_dir: str = "runs/default"
    # data
    dataset: str = "shapes"
    data_dir: Optional[str] = None
    image_size: int = 16
    hflip: bool = False  # random horizontal flips (right for photos, wrong for digits)
    num_workers: int = 0
    # model
    # None: DiT-N/4 (4 blocks of width 128, 16 tokens of 4x4 pixels at 16 px: minutes, not hours), or SD3-T/2 for
    # text-to-image data (captions, compositional); an SD3-* preset selects the text-to-image model.
    preset: Optional[str] = None
    pipeline: Optional[str] = None  # a local diffusers SD3 pipeline dir: train its transformer in its VAE's latents
    peft_lora: bool = False  # text-to-image: a plain peft LoRA on to_q/to_k/to_v of recursion_layers (the baseline)
    # Overrides of the preset's architecture (None: the preset's value).
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    class_dropout_prob: float = 0.1
    prediction: str = "v"  # what the network outputs: "eps" (DiT), "v" or "x0" (converted to eps in the model)
    recursion: bool = True
    recursion_layers: Optional[tuple] = None  # None: the middle block
    experts: int = 2
    recursion_steps: int = 2
    rank: int = 16
    tau: float = 5.0
    gate_inputs: tuple = GATE_INPUTS  # what the gate sees (the Fig. 4 ablation: ("tokens",))
    halting: str = "none"  # per-token adaptive depth (RecursionConfig.halting); "learned" trains a halting head
    halt_threshold: Optional[float] = None
    halt_prior: float = 0.5
    halt_kl_weight: float = 0.01
    finetune_from: Optional[str] = None  # a trained DiT: ours, a diffusers DiT model dir, or a reference .pt
    freeze_base: bool = True  # with finetune_from: train only the experts and gates
    # optimisation
    max_steps: int = 5000
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # after warm-up: "constant" (DiT) or "cosine" (decays to 0 at max_steps)
    min_snr_gamma: Optional[float] = 5.0  # Min-SNR-gamma loss weighting of the eps MSE (None or 0: DiT's uniform)
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default); 1 is faster on a busy machine
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    # bookkeeping
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0  # also checkpoint when this much time passed since the last one (0: never)
    log_every: Optional[int] = None  # read metrics from the device every N steps (None: 1 on CPU, 25 on CUDA)
    keep_checkpoints: int = 2
    sample_grid: bool = True  # write samples.png (DDPM 100 steps, cfg 4, 4 per class) at the end of training
    progress: bool = True

    def __post_init__(self):
        if self.preset is None:
            self.preset = "SD3-T/2" if self.dataset in TEXT_DATASETS or self.pipeline else "DiT-N/4"
        if self.recursion_layers is not None:
            self.recursion_layers = tuple(self.recursion_layers)
        if isinstance(self.gate_inputs, str) or not hasattr(self.gate_inputs, "__iter__"):
            raise ValueError(f"TrainConfig.gate_inputs must be a sequence of names from {GATE_INPUTS}, "
                             f"got {self.gate_inputs!r}")
        self.gate_inputs = tuple(self.gate_inputs)
        if not self.gate_inputs or not set(self.gate_inputs) <= set(GATE_INPUTS):
            raise ValueError(f"TrainConfig.gate_inputs must be a non-empty subset of {GATE_INPUTS}, "
                             f"got {self.gate_inputs!r}")
        positive = ("image_size", "max_steps", "batch_size", "checkpoint_every", "experts", "recursion_steps", "rank")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "num_threads", "log_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or an int >= 1, got {value!r}")
        for name in ("lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "num_workers", "keep_checkpoints",
                     "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.distributed not in distributed.STRATEGIES:
            raise ValueError(f"TrainConfig.distributed must be one of {distributed.STRATEGIES}, "
                             f"got {self.distributed!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma >= 0:
            raise ValueError(f"TrainConfig.min_snr_gamma must be None or >= 0 (0: off), got {self.min_snr_gamma!r}")
        if self.min_snr_gamma == 0:
            self.min_snr_gamma = None  # one spelling of "off", so saved and resumed configs compare equal
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recursion_layers"] = None if self.recursion_layers is None else list(self.recursion_layers)
        d["gate_inputs"] = list(self.gate_inputs)
        return d

    @property
    def text_to_image(self) -> bool:
        """Whether this run trains the text-to-image SD3 model (thinking_pixel.text_to_image) instead of the DiT."""
        return self.dataset in TEXT_DATASETS or self.preset.startswith("SD3") or self.pipeline is not None

    def recursion_config(self) -> RecursionConfig | None:
        if not self.recursion:
            return None
        return RecursionConfig(layers=self.recursion_layers, experts=self.experts, steps=self.recursion_steps,
                               rank=self.rank, tau=self.tau, gate_inputs=self.gate_inputs, halting=self.halting,
                               halt_threshold=self.halt_threshold, halt_prior=self.halt_prior,
                               halt_kl_weight=self.halt_kl_weight)


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
    """A fresh model for ``cfg`` (from a preset, or wrapping ``cfg.finetune_from``), shaped for ``dataset``."""
    recursion = cfg.recursion_config()
    if cfg.finetune_from is not None:
        base = ckpt.load_base_model(cfg.finetune_from)  # ours, a diffusers DiT directory, or a reference .pt
        if type(base) is not DiT:
            raise ValueError(f"finetune_from must hold a plain DiT, got a {type(base).__name__} "
                             f"({cfg.finetune_from}); to continue a run, rerun it on its output dir")
        _check_matches_data(base.config, dataset, f"the DiT in {cfg.finetune_from}")
        if base.config.prediction != cfg.prediction:
            raise ValueError(f"the DiT in {cfg.finetune_from} predicts {base.config.prediction!r}; fine-tune it with "
                             f"--prediction {base.config.prediction} (got {cfg.prediction!r})")
        if recursion is None:
            return base.train()  # plain continued training of the whole DiT
        return ThinkingPixelDiT.from_dit(base, recursion, freeze_base=cfg.freeze_base).train()
    overrides = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")
                 if getattr(cfg, k) is not None}
    overrides["prediction"] = cfg.prediction
    config = dit_config(cfg.preset, input_size=dataset.image_size, in_channels=dataset.num_channels,
                        num_classes=dataset.num_classes, class_dropout_prob=cfg.class_dropout_prob,
                        cond_channels=dataset.cond_channels, **overrides)
    return DiT(config) if recursion is None else ThinkingPixelDiT(config, recursion)


class DiTTask:
    """What the loop needs from a model family, for the class-conditional DiT: its data, model, loss and grid."""

    unused_settings = frozenset({"pipeline", "peft_lora"})  # text-to-image options

    @staticmethod
    def make_dataset(cfg: TrainConfig):
        return make_dataset(cfg.dataset, root=cfg.data_dir, image_size=cfg.image_size, seed=cfg.seed)

    build_model = staticmethod(build_model)

    def __init__(self, cfg: TrainConfig, dataset, model, device: torch.device, output_dir: Path):
        self.diffusion, self.device, self.min_snr_gamma = GaussianDiffusion(), device, cfg.min_snr_gamma

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
        from .data import DATASETS
        from .sample import sample_checkpoint

        if DATASETS[cfg.dataset].cond_channels:  # the grid shows classes, not image-conditioned outputs
            return None

        return sample_checkpoint(output_dir, output_dir / "samples.png", sampler="ddpm", num_steps=100,
                                 cfg_scale=4.0, per_class=4, seed=cfg.seed, device=str(device))  # sample's defaults


def task_for(cfg: TrainConfig):
    """The model family ``cfg`` trains: DiTTask, or the text-to-image SD3 task."""
    if cfg.text_to_image:
        from .text_to_image.training import TextToImageTask

        return TextToImageTask
    return DiTTask


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # local shards under FSDP2 (the EMA is sharded like the model), the tensors themselves otherwise
    torch._foreach_lerp_(distributed.local_tensors(ema.parameters()), distributed.local_tensors(model.parameters()),
                         1.0 - decay)


def _ema_decay(cfg: TrainConfig, num_updates: int) -> float:
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + num_updates) / (10 + num_updates))
    return cfg.ema_decay


def _lr(cfg: TrainConfig, step: int) -> float:
    """Learning rate for update number ``step`` (0-based): linear warm-up, then constant (as DiT) or a cosine
    decay to 0 at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr


def _adamw(params: list, cfg: TrainConfig) -> torch.optim.AdamW:
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


def _check_resumable(saved: dict, cfg: TrainConfig, output_dir: Path) -> None:
    current = cfg.to_dict()
    # Settings added after the run was saved had their defaults then: today's, or the old behaviour where it changed.
    saved = {**TrainConfig().to_dict(), **_BEHAVIOUR_BEFORE_OPTION, **saved}
    unused = task_for(cfg).unused_settings  # options the run's model family does not read
    diffs = [f"{k}: {saved[k]!r} (saved) vs {current[k]!r} (now)"
             for k in current if k not in _RESUMABLE_CHANGES | unused and saved[k] != current[k]]
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
    with torch_threads(cfg.num_threads), distributed.initialized(cfg.device) as runtime:
        with StopRequests(announce=runtime.is_main) as stop:
            result = _train(cfg, on_step, runtime, stop)
        if cfg.sample_grid and runtime.is_main and result.last_loss is not None and result.stopped_by is None:
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
            "ema": {"decay": cfg.ema_decay, "num_updates": step},
            "data": data_position,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "world_size": runtime.world_size,
        }
        try:
            path = ckpt.write_checkpoint(output_dir, step, model, ema, training_state, cfg.to_dict(),
                                         keep=cfg.keep_checkpoints, model_state=model_state, ema_state=ema_state)
        except ckpt.CheckpointError as e:
            error = e
    failed = distributed.all_reduce_sum(torch.tensor([float(error is not None)], device=runtime.device), runtime)
    if error is not None:
        raise error
    if failed.item():
        raise ckpt.CheckpointError(f"rank 0 could not write the checkpoint of step {step} (see its error)")
    return path


def _train(cfg: TrainConfig, on_step, runtime: distributed.Runtime, stop: StopRequests) -> TrainResult:
    output_dir = Path(cfg.output_dir)
    device = runtime.device
    metrics_path = output_dir / "metrics.jsonl"
    say = print if runtime.is_main else (lambda *args, **kwargs: None)
    if runtime.is_main:
        ckpt.prepare_output_dir(output_dir)

    task_type = task_for(cfg)
    dataset = task_type.make_dataset(cfg)
    if cfg.hflip and dataset.cond_channels:
        raise ValueError(f"hflip cannot be used with dataset {cfg.dataset!r}: it flips the target, not its condition")

    step_dir = ckpt.read_latest(output_dir)
    if step_dir is None:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = task_type.build_model(cfg, dataset).to(device).train()
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        state = None
        start_step = 0
        if runtime.is_main and metrics_path.exists():
            metrics_path.unlink()  # a previous attempt that never reached its first checkpoint
    else:
        _check_resumable(ckpt.load_train_config(step_dir), cfg, output_dir)
        state = ckpt.load_training_state(step_dir)
        model = ckpt.load_model_dir(step_dir / "model", device=device).train()
        ema = ckpt.load_model_dir(step_dir / "ema", device=device).requires_grad_(False).eval()
        trainable = set(state["trainable"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        start_step = state["step"]
        if runtime.is_main:
            _truncate_metrics(metrics_path, start_step)

    wrapped = distributed.wrap_model(model, runtime, cfg.distributed)
    if wrapped is model and runtime.world_size > 1:  # FSDP2 shards in place; shard the EMA the same way
        distributed.shard_like(ema, runtime)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the sharded parameters
    optimizer = _adamw(params, cfg)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start_step)
    if state is not None:
        if isinstance(state["optimizer"]["param_groups"][0]["params"][0], int):  # saved before distributed training
            optimizer.load_state_dict(state["optimizer"])
        else:
            distributed.load_optimizer_state(wrapped, optimizer, state["optimizer"])
        if state["data"] != {"num_samples": len(dataset), "batch_size": cfg.batch_size, "seed": cfg.seed,
                             **sampler.position(start_step)}:
            raise ckpt.CheckpointError(f"{step_dir}: saved data order {state['data']} does not match this dataset")

    if start_step >= cfg.max_steps:
        say(f"{output_dir}: already trained to step {start_step} (max_steps={cfg.max_steps}); nothing to do")
        return TrainResult(output_dir, start_step, step_dir, None)
    processes = f" on {runtime.world_size} processes ({cfg.distributed})" if runtime.world_size > 1 else ""
    if state is None:
        say(f"{output_dir}: starting a new run of {cfg.max_steps} steps{processes}", flush=True)
    else:
        saved_by = state.get("world_size", 1)
        moved = f"; saved by {saved_by} process{'es' * (saved_by > 1)}" if saved_by != runtime.world_size else ""
        say(f"{output_dir}: resuming from step {start_step} of {cfg.max_steps} ({step_dir}){processes}{moved}",
            flush=True)

    task = task_type(cfg, dataset, model, device, output_dir)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    # Its own generator: the loader would otherwise draw its worker seed from the global RNG when iteration
    # starts, which happens at a different point of the random stream in a resumed run.
    batches = distributed.ShardedBatches(sampler, cfg.batch_size, runtime)  # this rank's part of each global batch
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (cfg.progress and runtime.is_main),
               dynamic_ncols=True, desc=f"{type(model).__name__} {n_trainable / 1e6:.2f}M/{n_total / 1e6:.2f}M params")
    routing = RoutingCounts(model, device)
    log = StepLog(metrics_path, runtime, routing, every=cfg.log_every or (1 if device.type == "cpu" else 25))
    step, loss_value, checkpoint, saved_at, stopped_by = start_step, None, step_dir, time.monotonic(), None
    with routing.recording(), log, bar:
        for x, y, *cond in loader:  # cond: [conditioning image] for image-conditioned datasets
            torch.manual_seed(_step_seed(cfg.seed, step, runtime.rank))
            x = x.to(device, non_blocking=True)  # (N, C, H, W); y: labels (N,), moved by the task
            if cfg.hflip:
                flip = torch.rand(x.shape[0], device=device) < 0.5  # (N,)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            lr = _lr(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                terms = task.losses(forward, x, y, *cond)
            loss = terms["loss"].mean()
            if isinstance(model, ThinkingPixelDiT):
                loss = loss + model.auxiliary_loss()  # e.g. the learned halting head's prior term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            _update_ema(ema, model, _ema_decay(cfg, step))
            step += 1
            log.add(step, lr, terms, grad_norm)

            scheduled = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
            if not (scheduled or log.due()):
                continue
            overdue = 0 < cfg.checkpoint_minutes * 60 <= time.monotonic() - saved_at
            asked = (stop.signal_name == "SIGTERM", stop.signal_name == "SIGINT", overdue)
            lines, (sigterm, sigint, overdue) = log.flush(asked)  # what any rank asked: every rank acts alike
            stopped_by = "SIGTERM" if sigterm else "SIGINT" if sigint else None
            for metrics in lines:
                bar.update(1)
                if on_step is not None:
                    on_step(metrics["step"], metrics)
            loss_value = lines[-1]["loss"]
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if scheduled or overdue or stopped_by:
                log.sync()
                checkpoint = _save(cfg, runtime, output_dir, step, wrapped, model, ema, optimizer,
                                   {"num_samples": len(dataset), "batch_size": cfg.batch_size, "seed": cfg.seed,
                                    **sampler.position(step)})
                saved_at = time.monotonic()
            if stopped_by:
                break
            if step >= cfg.max_steps:
                break
    if stopped_by is not None:
        say(f"{output_dir}: stopped by {stopped_by} at step {step} of {cfg.max_steps}; checkpoint {checkpoint}; "
            "run the same command to resume", flush=True)
    return TrainResult(output_dir, step, checkpoint, loss_value, stopped_by=stopped_by)
