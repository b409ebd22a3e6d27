"""The settings of a training run: :class:`TrainConfig`, one dataclass per section, and their JSON form.

``thinking-pixel train``'s flat options map onto the sections (:meth:`TrainConfig.from_flat`); every checkpoint
holds the config as train_config.json (:meth:`TrainConfig.to_dict`), which :meth:`TrainConfig.load` reads back,
also in the flat layout of earlier versions. Sampling and evaluation read the data a run trained on from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import _run_dir as ckpt
from ._presets import DIT_CONFIGS, RECIPE_NEEDS, RECIPES, SD3_CONFIGS, SD3_INITS
from .distributed import STRATEGIES
from ._checks import is_int, is_number
from .models.pretrained import config_from_dict
from .recursion.config import RecursionConfig

__all__ = ["DataConfig", "ModelConfig", "OptimisationConfig", "PeftLoRAConfig", "RunConfig", "TEXT_DATASETS",
           "TextToImageConfig", "TrainConfig"]

TEXT_DATASETS = ("captions", "compositional")  # datasets of (image, caption): trained with the text-to-image model

LR_SCHEDULES = ("constant", "cosine")
# The class-conditional DiT's defaults where the text-to-image model takes None (its flow has its own target and
# timestep density).
_DIT_DEFAULTS = {"prediction": "v", "min_snr_gamma": 5.0}
# What runs saved before these options existed did (their defaults are different today); flat layout's names.
_BEHAVIOUR_BEFORE_OPTION = {"prediction": "eps", "lr_schedule": "constant", "min_snr_gamma": None}
# The recursion of a training run unless told otherwise: RecursionConfig's, at rank 16 (the paper's 128 is slow on CPU).
_RECURSION_DEFAULTS = {"rank": 16}
# ``thinking-pixel train``'s recursion options -> RecursionConfig fields (the other options keep their section's name).
_RECURSION_OPTIONS = {"recursion_layers": "layers", "recursion_steps": "steps",
                      **{name: name for name in ("experts", "rank", "tau", "gate_inputs", "halting", "halt_threshold",
                                                 "halt_prior", "halt_kl_weight", "lora_b_std")}}


def _check_fields(config, *, ints=(), optional_ints=(), positive=(), non_negative=()) -> None:
    """Range checks of a config section's fields; errors name ``Section.field``."""
    owner = type(config).__name__
    for name in ints:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")
    for name in optional_ints:
        value = getattr(config, name)
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{owner}.{name} must be None or an int >= 1, got {value!r}")
    for name in positive:
        if not (is_number(getattr(config, name)) and getattr(config, name) > 0):
            raise ValueError(f"{owner}.{name} must be > 0, got {getattr(config, name)!r}")
    for name in non_negative:
        if not (is_number(getattr(config, name)) and getattr(config, name) >= 0):
            raise ValueError(f"{owner}.{name} must be >= 0, got {getattr(config, name)!r}")


@dataclass
class DataConfig:
    """What the run learns from: a dataset of :data:`thinking_pixel.datasets.DATASETS`."""

    dataset: str = "shapes"
    data_dir: Optional[str] = None  # its files: folder / latents / captions (required), fashion_mnist (optional)
    image_size: int = 16
    hflip: bool = False  # random horizontal flips (right for photos, wrong for digits)
    num_workers: int = 0  # data loader worker processes

    def __post_init__(self):
        _check_fields(self, ints=("image_size",), non_negative=("num_workers",))


@dataclass
class ModelConfig:
    """The base model: a preset with optional overrides of its architecture, or a trained model to build on."""

    # None: DiT-N/4 (4 blocks of width 128, 16 tokens of 4x4 pixels at 16 px: minutes, not hours), or SD3-T/2 for a
    # text-to-image run
    preset: Optional[str] = None
    depth: Optional[int] = None  # overrides of the preset's architecture (None: the preset's)
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    class_dropout_prob: float = 0.1  # labels (captions) dropped in training, for classifier-free guidance
    # The DiT's output: "eps" (DiT), "v" or "x0", converted to eps in the model (None: "v"). A text-to-image run's
    # flow has its own target and takes None.
    prediction: Optional[str] = None
    finetune_from: Optional[str] = None  # a trained model: ours, a diffusers DiT model dir, or a reference DiT .pt
    freeze_base: bool = True  # with finetune_from: train only the experts and gates

    def __post_init__(self):
        _check_fields(self, optional_ints=("depth", "hidden_size", "num_heads", "patch_size"),
                      non_negative=("class_dropout_prob",))
        presets = {**DIT_CONFIGS, **SD3_CONFIGS}
        if self.preset is not None and self.preset not in presets:
            raise ValueError(f"ModelConfig.preset must be one of {', '.join(presets)}, got {self.preset!r}")


@dataclass
class OptimisationConfig:
    """The loss, the optimizer and its schedule, the EMA. See :class:`TrainConfig` for how the defaults were chosen."""

    max_steps: int = 5000
    batch_size: int = 64  # the global batch (split across processes under torchrun)
    lr: float = 4e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # after warm-up: "constant" (DiT) or "cosine" (decays to 0 at max_steps)
    # Min-SNR-gamma weighting of the DiT's eps MSE, 0 = DiT's uniform weights (None: 5). A text-to-image run's flow
    # has its own timestep density and takes None.
    min_snr_gamma: Optional[float] = None
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True
    bf16: bool = False  # bfloat16 autocast

    def __post_init__(self):
        _check_fields(self, ints=("max_steps", "batch_size"), positive=("lr",),
                      non_negative=("weight_decay", "grad_clip", "warmup_steps"))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"OptimisationConfig.lr_schedule must be one of {LR_SCHEDULES}, "
                             f"got {self.lr_schedule!r}")
        if self.min_snr_gamma is not None and not (is_number(self.min_snr_gamma) and self.min_snr_gamma >= 0):
            raise ValueError(f"OptimisationConfig.min_snr_gamma must be None or >= 0 (0: off), "
                             f"got {self.min_snr_gamma!r}")
        if not (is_number(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ValueError(f"OptimisationConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")


@dataclass
class PeftLoRAConfig:
    """The text-to-image baseline: a plain peft LoRA on to_q / to_k / to_v of ``layers``, in place of the recursion."""

    rank: int = _RECURSION_DEFAULTS["rank"]
    layers: Optional[tuple] = None  # block indices; None: the middle block

    def __post_init__(self):
        _check_fields(self, ints=("rank",))
        if self.layers is not None:
            self.layers = tuple(self.layers)


@dataclass
class TextToImageConfig:
    """A text-to-image run (thinking_pixel.text_to_image: an SD3 transformer conditioned on captions)."""

    pipeline: Optional[str] = None  # a local diffusers SD3 pipeline dir: train its transformer in its VAE's latents
    peft_lora: Optional[PeftLoRAConfig] = None  # the plain-LoRA baseline instead of the recursion
    # A fresh transformer's init: "diffusers" (its own) or "adaln-zero" (DiT's: every block's modulation and the
    # output layer start at zero, so each block starts as the identity and the model predicts 0)
    init: str = "diffusers"

    def __post_init__(self):
        if self.init not in SD3_INITS:
            raise ValueError(f"TrainConfig.text_to_image.init must be one of {SD3_INITS}, got {self.init!r}")


@dataclass
class RunConfig:
    """Where and how the run executes: the seed, the hardware, checkpoints and output. Only the seed changes what is
    computed."""

    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default); 1 is faster on a busy machine
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 500
    checkpoint_minutes: float = 5.0  # also checkpoint when this much time passed since the last one (0: never)
    log_every: Optional[int] = None  # read metrics from the device every N steps (None: 1 on CPU, 25 on CUDA)
    keep_checkpoints: int = 2  # newest checkpoints kept, 0 = all
    sample_grid: bool = True  # write samples.png at the end of training (DiTTask / TextToImageTask.sample_grid)
    progress: bool = True

    def __post_init__(self):
        _check_fields(self, ints=("checkpoint_every",), optional_ints=("num_threads", "log_every"),
                      non_negative=("keep_checkpoints", "checkpoint_minutes"))
        if self.distributed not in STRATEGIES:
            raise ValueError(f"RunConfig.distributed must be one of {STRATEGIES}, "
                             f"got {self.distributed!r}")


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optimisation": OptimisationConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    """Everything a training run depends on; serialised into every checkpoint as train_config.json.

    Sections: ``data``, ``model``, ``recursion`` (a :class:`RecursionConfig`, or None for a plain model),
    ``optimisation``, ``text_to_image`` (None: the class-conditional DiT) and ``run``. ``thinking-pixel train``'s flat
    options map onto them with :meth:`from_flat`; :meth:`from_dict` also reads the flat train_config.json of
    earlier versions.

    The defaults are the CPU default run (``thinking-pixel train`` with no arguments): DiT-N/4 with recursion in its
    middle block, on 16x16 embedded shapes. DiT's own recipe is lr 1e-4, no warm-up, EMA 0.9999, eps prediction,
    uniform loss weights (use --lr 1e-4 --warmup-steps 0 --ema-decay 0.9999 --lr-schedule constant --prediction eps
    --min-snr-gamma 0 for DiT's recipe); the defaults here are tuned by measured class accuracy for a short CPU run
    (5000 steps; RESULTS.md, appendix): lr 4e-3 after a 100-step warm-up (class accuracy at 1000 steps:
    lr 1e-3 0.22, 2e-3 0.43, 4e-3 0.57, 8e-3 0.61; at 3000 steps: 2e-3 0.89, 4e-3 0.93, 8e-3 0.73; 4e-3 at 5000
    steps: 0.99), cosine decay, v prediction and Min-SNR-5 weighting.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    recursion: Optional[RecursionConfig] = field(default_factory=lambda: RecursionConfig(**_RECURSION_DEFAULTS))
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    text_to_image: Optional[TextToImageConfig] = None
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        expected = {**_SECTIONS, "recursion": RecursionConfig, "text_to_image": TextToImageConfig}
        for name, cls in expected.items():
            value = getattr(self, name)
            if not isinstance(value, cls) and not (value is None and name in ("recursion", "text_to_image")):
                raise ValueError(f"TrainConfig.{name} must be a {cls.__name__}, got {type(value).__name__} "
                                 "(TrainConfig.from_dict reads dicts)")
        if self.text_to_image is None:
            family = ("data.dataset", self.data.dataset) if self.data.dataset in TEXT_DATASETS else \
                ("model.preset", self.model.preset) if self.model.preset in SD3_CONFIGS else None
            if family is not None:
                raise ValueError(f"TrainConfig.{family[0]} {family[1]!r} trains the text-to-image model: "
                                 "set text_to_image=TextToImageConfig()")
            # the DiT's defaults, on copies: the sections passed in stay as they were
            self.model = dataclasses.replace(self.model, preset=self.model.preset or "DiT-N/4",
                                             prediction=self.model.prediction or _DIT_DEFAULTS["prediction"])
            if self.optimisation.min_snr_gamma is None:
                self.optimisation = dataclasses.replace(self.optimisation,
                                                        min_snr_gamma=_DIT_DEFAULTS["min_snr_gamma"])
            return
        for section, name, flag in (("model", "prediction", "--prediction"),
                                    ("optimisation", "min_snr_gamma", "--min-snr-gamma")):
            if getattr(getattr(self, section), name) is not None:
                raise ValueError(f"TrainConfig.{section}.{name} ({flag}) applies to the class-conditional DiT; a "
                                 "text-to-image run trains SD3's rectified flow (velocity target, logit-normal "
                                 "timesteps): leave it None")
        if self.text_to_image.peft_lora is not None and self.recursion is not None:
            raise ValueError("TrainConfig.text_to_image.peft_lora replaces the recursion: set recursion=None")
        self.model = dataclasses.replace(self.model, preset=self.model.preset or "SD3-T/2")

    def to_dict(self) -> dict:
        """The JSON form (train_config.json): one object per section, None for an absent recursion / text-to-image."""
        d = dataclasses.asdict(self)
        d["recursion"] = None if self.recursion is None else self.recursion.to_dict()
        peft_lora = None if self.text_to_image is None else self.text_to_image.peft_lora
        if peft_lora is not None and peft_lora.layers is not None:
            d["text_to_image"]["peft_lora"]["layers"] = list(peft_lora.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of a train_config.json: :meth:`to_dict`'s sections, or the flat layout of earlier versions
        (one level of ``thinking-pixel train``'s option names), whose missing options are taken as they behaved
        when the run was saved."""
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig.from_dict expects a dict, got {type(d).__name__}")
        if not isinstance(d.get("data"), dict):
            return _from_flat_layout(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown sections {unknown}")
        sections = {name: config_from_dict(section, d.get(name, {})) for name, section in _SECTIONS.items()}
        recursion, text_to_image = d.get("recursion", {}), d.get("text_to_image")
        if recursion is not None:
            recursion = RecursionConfig.from_dict({**_RECURSION_DEFAULTS, **recursion})
        if text_to_image is not None:
            text_to_image = config_from_dict(TextToImageConfig, text_to_image)
            if text_to_image.peft_lora is not None:
                text_to_image.peft_lora = config_from_dict(PeftLoRAConfig, text_to_image.peft_lora)
        return cls(**sections, recursion=recursion, text_to_image=text_to_image)

    @classmethod
    def load(cls, step_dir: str | Path) -> "TrainConfig":
        """The config saved in checkpoint step directory ``step_dir`` (its train_config.json)."""
        return cls.from_dict(ckpt.load_train_config(Path(step_dir)))

    @classmethod
    def from_flat(cls, **options) -> "TrainConfig":
        """The config of ``thinking-pixel train``'s options, by their Python names (``max_steps``, ``recursion_steps``,
        ``peft_lora``, ``recursion=False`` for --no-recursion, ...); options not given keep their defaults.

        A run is text-to-image when its dataset holds captions, its preset is an SD3 one or it has a ``pipeline``.
        ``peft_lora`` outside a text-to-image run and the DiT's ``prediction`` / ``min_snr_gamma`` in one are
        errors. Without the recursion (``recursion=False``, or ``peft_lora``, which takes ``rank`` and
        ``recursion_layers``) the recursion options are left unused, so that one set of options serves a run and
        its ablation."""
        if "recipe" in options:
            recipe = options.pop("recipe")
            if recipe not in RECIPES:
                raise ValueError(f"recipe (--recipe) must be one of {sorted(RECIPES)}, got {recipe!r}")
            need = RECIPE_NEEDS.get(recipe)
            if need and options.get(need) is None:
                raise ValueError(f"recipe {recipe} needs {need} (--{need.replace('_', '-')}): the run it continues")
            options = {**RECIPES[recipe], **options}
        section_of = {f.name: name for name, section in _SECTIONS.items() for f in dataclasses.fields(section)}
        unknown = sorted(set(options) - set(section_of) - set(_RECURSION_OPTIONS) - {"recursion", "pipeline",
                                                                                     "peft_lora", "init"})
        if unknown:
            raise ValueError(f"TrainConfig.from_flat: unknown options {unknown}")
        sections = {name: {} for name in _SECTIONS}
        for name, value in options.items():
            if name in section_of:
                sections[section_of[name]][name] = value
        recursion = {_RECURSION_OPTIONS[k]: v for k, v in options.items() if k in _RECURSION_OPTIONS}
        text, peft_lora = _trains_text_to_image(options), options.get("peft_lora", False)
        if peft_lora and not text:
            raise ValueError("peft_lora (--peft-lora) is a text-to-image baseline; this run trains the DiT "
                             f"(dataset {options.get('dataset', DataConfig.dataset)!r}, "
                             f"preset {options.get('preset') or 'DiT-N/4'!r})")
        text_to_image = None
        if text:
            lora = {k: v for k, v in recursion.items() if k in ("rank", "layers")}
            text_to_image = TextToImageConfig(pipeline=options.get("pipeline"),
                                              peft_lora=PeftLoRAConfig(**lora) if peft_lora else None,
                                              init=options.get("init", TextToImageConfig.init))
        elif "init" in options:
            raise ValueError("init (--init) sets a fresh text-to-image transformer's init; this run trains the DiT "
                             "(whose blocks always start adaLN-Zero)")
        if peft_lora or not options.get("recursion", True):
            recursion_config = None
        else:
            recursion_config = RecursionConfig(**{**_RECURSION_DEFAULTS, **recursion})
        return cls(**{name: _SECTIONS[name](**values) for name, values in sections.items()},
                   recursion=recursion_config, text_to_image=text_to_image)


def _trains_text_to_image(options: dict) -> bool:
    """Whether flat options describe a text-to-image run: caption data, an SD3 preset or a diffusers pipeline."""
    return (options.get("dataset") in TEXT_DATASETS or options.get("preset") in SD3_CONFIGS
            or options.get("pipeline") is not None)


def _from_flat_layout(saved: dict) -> TrainConfig:
    """A TrainConfig from the flat train_config.json of earlier versions, which held every option, used or not."""
    flat = {**_BEHAVIOUR_BEFORE_OPTION, **saved}
    text = _trains_text_to_image(flat)
    unused = {"prediction", "min_snr_gamma"} if text else {"pipeline", "peft_lora", "init"}
    if not text and flat["min_snr_gamma"] is None:
        flat["min_snr_gamma"] = 0.0  # that layout's spelling of "off"
    return TrainConfig.from_flat(**{k: v for k, v in flat.items() if k not in unused})
