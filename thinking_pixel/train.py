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
  same losses as an uninterrupted run. The data order is a pure function of (seed, step)
  (:class:`~thinking_pixel.data.StepBatchSampler`), and the torch / numpy / python RNG states, the optimizer
  and the EMA are restored from the checkpoint; metrics lines past the checkpoint are dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import _checkpoint as ckpt
from ._runtime import resolve_device, torch_threads
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
                      "progress", "sample_grid", "device", "num_threads"}


@dataclass
class TrainConfig:
    """Everything a training run depends on; serialised into every checkpoint as train_config.json.

    The defaults are the CPU default run (``thinking-pixel train`` with no arguments): DiT-N/4 with
    recursion in its middle block, on 16x16 embedded shapes. DiT's own recipe is lr 1e-4, no warm-up,
    EMA 0.9999, eps prediction, uniform loss weights (use --lr 1e-4 --warmup-steps 0 --ema-decay 0.9999
    --lr-schedule constant --prediction eps --min-snr-gamma 0 for DiT's recipe); the defaults here are tuned
    by measured class accuracy for a short CPU run (3000 steps, ~5 min on 2 idle cores; RESULTS.md): lr 1e-3 after
    a 100-step warm-up, cosine decay, v prediction and Min-SNR-5 weighting.
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
    prediction: str = "v"  # what the network outputs: "eps" (DiT) or "v" (converted to eps inside the model)
    recursion: bool = True
    recursion_layers: Optional[tuple] = None  # None: the middle block
    experts: int = 2
    recursion_steps: int = 2
    rank: int = 16
    tau: float = 5.0
    gate_inputs: tuple = GATE_INPUTS  # what the gate sees (the Fig. 4 ablation: ("tokens",))
    finetune_from: Optional[str] = None  # a trained DiT: ours, a diffusers DiT model dir, or a reference .pt
    freeze_base: bool = True  # with finetune_from: train only the experts and gates
    # optimisation
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
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
    # bookkeeping
    checkpoint_every: int = 500
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
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "num_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or an int >= 1, got {value!r}")
        for name in ("lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "num_workers", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
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
                               rank=self.rank, tau=self.tau, gate_inputs=self.gate_inputs)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path
    last_loss: float | None  # None when there was nothing left to train
    samples: Path | None = None  # the grid written at the end (sample_grid=True)


def _check_matches_data(config, dataset, source: str) -> None:
    expected = dict(input_size=dataset.image_size, in_channels=dataset.num_channels, num_classes=dataset.num_classes)
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
                        num_classes=dataset.num_classes, class_dropout_prob=cfg.class_dropout_prob, **overrides)
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

    def losses(self, model, x, y) -> dict:
        """{"loss": (N,), other per-sample terms logged as metrics}: DiT's hybrid MSE + VLB loss."""
        t = self.diffusion.sample_timesteps(x.shape[0], device=self.device)  # (N,)
        terms = self.diffusion.training_losses(model, x, t, model_kwargs={"y": y.to(self.device, non_blocking=True)},
                                               min_snr_gamma=self.min_snr_gamma)
        return {"loss": terms["loss"], "mse": terms["mse"], "vb": terms["vb"]}

    @staticmethod
    def sample_grid(cfg: TrainConfig, output_dir: Path, device: torch.device) -> Path:
        from .sample import sample_checkpoint

        return sample_checkpoint(output_dir, output_dir / "samples.png", sampler="ddpm", num_steps=100,
                                 cfg_scale=4.0, per_class=4, seed=cfg.seed, device=str(device))


def task_for(cfg: TrainConfig):
    """The model family ``cfg`` trains: DiTTask, or the text-to-image SD3 task."""
    if cfg.text_to_image:
        from .text_to_image.training import TextToImageTask

        return TextToImageTask
    return DiTTask


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


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


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only metric lines up to ``step`` (lines past a checkpoint are recomputed on resume)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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


def train(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns where it ended.

    ``on_step(step, metrics)`` is called after every optimisation step, after its metrics line is written
    (used by tests to interrupt a run; an exception raised there stops training without a checkpoint).
    """
    with torch_threads(cfg.num_threads):
        return _train(cfg, on_step)


def _train(cfg: TrainConfig, on_step) -> TrainResult:
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    metrics_path = output_dir / "metrics.jsonl"

    task_type = task_for(cfg)
    dataset = task_type.make_dataset(cfg)

    step_dir = ckpt.read_latest(output_dir)
    if step_dir is None:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        model = task_type.build_model(cfg, dataset).to(device).train()
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        state = None
        start_step = 0
        if metrics_path.exists():
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
        _truncate_metrics(metrics_path, start_step)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start_step)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state["data"] != {"num_samples": len(dataset), "batch_size": cfg.batch_size, "seed": cfg.seed,
                             **sampler.position(start_step)}:
            raise ckpt.CheckpointError(f"{step_dir}: saved data order {state['data']} does not match this dataset")
        ckpt.set_rng_state(state["rng"])  # last: nothing above may draw random numbers after this

    if start_step >= cfg.max_steps:
        print(f"{output_dir}: already trained to step {start_step} (max_steps={cfg.max_steps}); nothing to do")
        return TrainResult(output_dir, start_step, step_dir, None)

    task = task_type(cfg, dataset, model, device, output_dir)
    forward = torch.compile(model) if cfg.compile else model
    # Its own generator: the loader would otherwise draw its worker seed from the global RNG when iteration
    # starts, which happens at a different point of the random stream in a resumed run.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not cfg.progress, dynamic_ncols=True,
               desc=f"{type(model).__name__} {n_trainable / 1e6:.2f}M/{n_total / 1e6:.2f}M params")
    step, loss_value, last_time = start_step, None, time.perf_counter()
    checkpoint = step_dir
    with open(metrics_path, "a") as metrics_file:
        for x, y in loader:
            x = x.to(device, non_blocking=True)  # (N, C, H, W); y: labels (N,) or captions
            if cfg.hflip:
                flip = torch.rand(x.shape[0], device=device) < 0.5  # (N,)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            lr = _lr(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                terms = task.losses(forward, x, y)
            loss = terms["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            _update_ema(ema, model, _ema_decay(cfg, step))
            step += 1

            now = time.perf_counter()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}; try a lower lr or --grad-clip")
            metrics = {"step": step, "loss": loss_value,
                       **{k: v.mean().item() for k, v in terms.items() if k != "loss"},
                       "grad_norm": grad_norm.item(), "lr": lr, "it_s": 1.0 / max(now - last_time, 1e-9)}
            last_time = now
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if on_step is not None:
                on_step(step, metrics)

            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                training_state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "ema": {"decay": cfg.ema_decay, "num_updates": step},
                    "rng": ckpt.rng_state(),
                    "data": {"num_samples": len(dataset), "batch_size": cfg.batch_size, "seed": cfg.seed,
                             **sampler.position(step)},
                    "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                }
                checkpoint = ckpt.write_checkpoint(output_dir, step, model, ema, training_state, cfg.to_dict(),
                                                   keep=cfg.keep_checkpoints)
            if step >= cfg.max_steps:
                break
    bar.close()

    samples = None
    if cfg.sample_grid:
        samples = task_type.sample_grid(cfg, output_dir, device)
    return TrainResult(output_dir, step, checkpoint, loss_value, samples)
