"""Command line: ``thinking-pixel {train,sample,evaluate,analyze}`` (also ``python -m thinking_pixel``).

Argument parsing only; the work is done by thinking_pixel.train / .sample / .evaluate / .analyze, imported
once the arguments are valid, so ``--help`` and argument errors stay fast (nothing here imports torch).
``train``'s options map onto the sections of :class:`~thinking_pixel.train_config.TrainConfig`
(:meth:`~thinking_pixel.train_config.TrainConfig.from_flat`); options left unset keep its defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ._presets import DIT_CONFIGS, RECIPES, SD3_CONFIGS, SD3_INITS
from ._arguments import (DATA_DIR_REQUIRED, DATASET_NAMES, GUIDANCE_INTERVAL, SAMPLER_NAMES,
                         add_analyze_arguments, add_evaluate_arguments, add_halting_arguments, check_image_output,
                         timestep_interval)

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _flag(name: str, value) -> str:
    """An option as a command-line flag: recursion=False -> --no-recursion, max_steps=5 -> --max-steps 5."""
    if value is False:
        return f"--no-{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")


def _layers(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2 or 2,4, got {text!r}") from None


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a caption such as \"a red circle\", got an empty one (the model "
                                         "would draw its unconditional samples)")
    return text


def _names(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(","))


class _Renamed(argparse.Action):
    """A renamed option: using the old spelling is an argument error that names the new one."""

    def __init__(self, option_strings, dest, message, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.message}")


def _preset_help() -> str:
    return (f"architecture preset (default DiT-N/4, or SD3-T/2 for caption data). DiT: {', '.join(DIT_CONFIGS)}. "
            f"Text-to-image SD3: {', '.join(SD3_CONFIGS)}")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    # One group per section of TrainConfig (thinking_pixel.train_config); TrainConfig.from_flat maps them.
    S = argparse.SUPPRESS  # unset options keep TrainConfig's defaults
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_NAMES, default=S, help="default: shapes (embedded)")
    g.add_argument("--data-dir", default=S, help="data location for folder / latents / captions / fashion_mnist")
    g.add_argument("--image-size", type=_positive_int, default=S, help="default 16")
    g.add_argument("--hflip", action="store_true", default=S, help="random horizontal flips")
    g.add_argument("--num-workers", type=int, default=S, help="data loader worker processes (default 0)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=[*DIT_CONFIGS, *SD3_CONFIGS], metavar="NAME", default=S, help=_preset_help())
    g.add_argument("--depth", type=_positive_int, default=S, help="override the preset's depth")
    g.add_argument("--hidden-size", type=_positive_int, default=S, help="override the preset's width")
    g.add_argument("--num-heads", type=_positive_int, default=S, help="override the preset's heads")
    g.add_argument("--patch-size", type=_positive_int, default=S, help="override the preset's patch size")
    g.add_argument("--prediction", choices=("eps", "v", "x0"), default=S,
                   help="DiT output: eps (DiT), v or x0 (the clean image), converted to eps inside the model "
                        "(default v)")
    g.add_argument("--finetune-from", default=S, help="a trained model to wrap: a checkpoint of ours (its EMA "
                   "weights), a diffusers DiT model directory (with or without transformer/), or a "
                   "facebookresearch/DiT .pt")
    g.add_argument("--no-freeze-base", dest="freeze_base", action="store_false", default=S,
                   help="with --finetune-from: also train the base model")
    g = p.add_argument_group("recursion")
    g.add_argument("--no-recursion", dest="recursion", action="store_false", default=S,
                   help="train a plain model (the options below are then unused)")
    g.add_argument("--recursion-layers", type=_layers, default=S, help="blocks that recurse, e.g. 2 or 1,3 "
                   "(default: the middle block)")
    g.add_argument("--experts", type=_positive_int, default=S, help="LoRA experts M (default 2)")
    g.add_argument("--recursion-steps", type=_positive_int, default=S, help="latent recursion steps T (default 2)")
    g.add_argument("--steps", action=_Renamed, message="was renamed --recursion-steps (latent recursion steps T); "
                   "--max-steps sets the optimisation steps")
    g.add_argument("--rank", type=_positive_int, default=S, help="LoRA rank (default 16)")
    g.add_argument("--tau", type=float, default=S, help="gate Gumbel-softmax temperature (default 5.0)")
    g.add_argument("--gate-inputs", type=_names, default=S,
                   help="what the gate sees, comma-separated subset of tokens,timestep,condition (default all)")
    g.add_argument("--halting", choices=("none", "learned", "delta"), default=S,
                   help="per-token adaptive recursion depth at inference; 'learned' trains a PonderNet halting head "
                        "(default none)")
    g.add_argument("--halt-threshold", type=float, default=S, help="halting threshold (default: the mode's)")
    g.add_argument("--halt-prior", type=float, default=S,
                   help="learned halting: geometric prior's per-step halting probability (default 0.5)")
    g.add_argument("--halt-kl-weight", type=float, default=S, help="learned halting: weight of the prior KL (0.01)")
    g.add_argument("--lora-b-std", type=float, default=S,
                   help="start the experts' LoRA B from N(0, std^2) with a zero-initialised gain on the final step's "
                        "LoRA, so the intermediate steps move the state from the start (default 0: B = 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=_positive_int, default=S,
                   help="total optimisation steps (default 5000: ~8 min for the default preset on 2 idle cores)")
    g.add_argument("--batch-size", type=_positive_int, default=S, help="default 64")
    g.add_argument("--lr", type=float, default=S, help="AdamW learning rate (default 4e-3; DiT: 1e-4)")
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--warmup-steps", type=int, default=S, help="linear lr warm-up (default 100)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=S,
                   help="after warm-up: constant, or cosine decay to 0 at --max-steps (default cosine)")
    g.add_argument("--min-snr-gamma", type=float, default=S,
                   help="DiT: Min-SNR-gamma weighting of the eps loss, 0 = off (default 5)")
    g.add_argument("--grad-clip", type=float, default=S, help="max grad norm, 0 disables (default 1.0)")
    g.add_argument("--ema-decay", type=float, default=S, help="default 0.999 (DiT: 0.9999 for long runs)")
    g.add_argument("--bf16", action="store_true", default=S, help="bfloat16 autocast")
    g = p.add_argument_group("text-to-image", "runs on caption data (captions, compositional) or an SD3 preset")
    g.add_argument("--pipeline", default=S, help="a local diffusers StableDiffusion3Pipeline dir: train the recursion "
                   "on its transformer, in its VAE's latents, with its text encoders")
    g.add_argument("--peft-lora", action="store_true", default=S, help="a plain peft LoRA (rank --rank) on "
                   "to_q/to_k/to_v of --recursion-layers instead of the recursion (the baseline)")
    g.add_argument("--init", choices=SD3_INITS, default=S, help="a fresh SD3 transformer's init: diffusers' own, or "
                   "adaln-zero (DiT's: each block starts as the identity; default diffusers)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=S, help="a measured recipe's options (options given "
                   "here win); " + "; ".join(f"{name}: " + " ".join(_flag(k, v) for k, v in options.items())
                                              for name, options in RECIPES.items()))
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=S, help="run directory; rerunning on it resumes (default runs/default)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--device", default=S, help="auto, cpu or cuda[:i] (default auto)")
    g.add_argument("--threads", dest="num_threads", type=_positive_int, default=S,
                   help="torch CPU threads (default: torch's, one per core); 1 is often faster beside other jobs")
    g.add_argument("--distributed", choices=("ddp", "fsdp"), default=S,
                   help="under torchrun: ddp (default) or fsdp (FSDP2, shards weights and optimizer state)")
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument("--checkpoint-every", type=_positive_int, default=S, help="default 500")
    g.add_argument("--checkpoint-minutes", type=float, default=S,
                   help="also checkpoint after this many minutes since the last one, 0 = never (default 5)")
    g.add_argument("--log-every", type=_positive_int, default=S,
                   help="read metrics from the device every N steps (default: 1 on CPU, 25 on CUDA)")
    g.add_argument("--keep-checkpoints", type=int, default=S, help="newest checkpoints kept, 0 = all (default 2)")
    g.add_argument("--no-sample-grid", dest="sample_grid", action="store_false", default=S,
                   help="do not draw the sample grid at the end (samples.png in --output-dir; the DiT's: 4 per "
                        "class, DDPM 100 steps)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)


def _add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="training output dir, step dir, or save_pretrained dir")
    p.add_argument("--output", default=None, help="PNG path (default: OUTPUT_DIR/samples/step_NNNNNNN.png for a "
                   "training run, CHECKPOINT/samples.png for a model directory)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    p.add_argument("--cfg-interval", type=timestep_interval, default=GUIDANCE_INTERVAL,
                   help="class-conditional models: guide only at timesteps LO..HI; 0,999 guides every step (default "
                        "0,300: guiding the noisiest steps makes objects larger and more central than the data's)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm",
                   help="ddpm (learned variance, DiT's), ddim, or dpm (DPM-Solver++, 10-25 steps); default ddpm")
    p.add_argument("--num-steps", type=_positive_int, default=100, help="sampling steps (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=_layers, default=None, help="comma-separated class indices (default all)")
    p.add_argument("--per-class", type=_positive_int, default=8, help="samples per class, one row per class")
    p.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw (non-EMA) weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--scale", type=_positive_int, default=None, help="pixel upscaling of the grid (default auto)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL dir, for latent models")
    g = p.add_argument_group("text-to-image")
    g.add_argument("--prompt", action="append", type=_prompt, default=None,
                   help="a caption; repeat for more rows (one per prompt)")
    g.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    g.add_argument("--per-prompt", type=_positive_int, default=4, help="samples per prompt (default 4)")
    g.add_argument("--pipeline", default=None, help="the diffusers SD3 pipeline dir of a --pipeline checkpoint "
                   "(default: the path stored in the checkpoint)")
    p.add_argument("--threads", dest="num_threads", type=_positive_int, default=None, help="torch CPU threads")
    add_halting_arguments(p)


def _plugin(name: str):
    """thinking_pixel.<name>, imported on use; None if that module is not available."""
    try:
        return importlib.import_module(f"thinking_pixel.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"thinking_pixel.{name}":
            raise
        return None


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an option its command does not know is reported with that command's usage."""

    commands: dict[str, argparse.ArgumentParser]  # set by build_parser

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self.commands.get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """``thinking-pixel``'s parser; no option is matched by a prefix (``--max-step`` is an error, not --max-steps)."""
    parser = _Parser(prog="thinking-pixel", allow_abbrev=False,
                     description="Recursive sparse reasoning in diffusion latents (The Thinking Pixel).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,evaluate,analyze}")
    commands = {"train": (_add_train_arguments, "train (or resume) a model"),
                "sample": (_add_sample_arguments, "write a PNG grid of samples from a checkpoint"),
                "evaluate": (add_evaluate_arguments, "evaluate a checkpoint (FID and friends)"),
                "analyze": (add_analyze_arguments, "analyse routing and recursion of a checkpoint")}
    parser.commands = {name: sub.add_parser(name, help=help_text, allow_abbrev=False)
                       for name, (_, help_text) in commands.items()}
    for name, (add_arguments, _) in commands.items():
        add_arguments(parser.commands[name])
    return parser


# Paths the commands read, by argument: checked to exist before the commands import torch.
_INPUT_PATHS = {"checkpoint": "--checkpoint", "finetune_from": "--finetune-from", "data_dir": "--data-dir",
                "pipeline": "--pipeline", "vae": "--vae", "prompts_file": "--prompts-file"}


def _check_inputs(args: argparse.Namespace) -> None:
    """A missing checkpoint, dataset or file, reported in a moment rather than after seconds of imports."""
    for dest, flag in _INPUT_PATHS.items():
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"{flag} {value!r} not found")
    dataset = getattr(args, "dataset", None)
    if args.command == "train" and dataset in DATA_DIR_REQUIRED and getattr(args, "data_dir", None) is None:
        raise ValueError(f"--dataset {dataset} needs --data-dir (where its files are)")


def _openmp_defaults() -> None:
    """Threads of torch's OpenMP runtime, which the CPU extension shares, sleep while they wait instead of spinning,
    unless the environment says otherwise: a spinning thread holds a core that another process on the machine needs,
    and then the step waits for it. Set before torch is imported (the commands import it later)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    _openmp_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sample" and args.output is not None:
            check_image_output(args.output)  # before anything is loaded
        _check_inputs(args)
        if args.command == "train":
            from .train import TrainConfig, train

            result = train(TrainConfig.from_flat(**{k: v for k, v in vars(args).items() if k != "command"}))
            if result.stopped_by is not None:
                return 143 if result.stopped_by == "SIGTERM" else 130
            if result.last_loss is not None and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
                print(f"step {result.step}: loss {result.last_loss:.4f}; checkpoint {result.checkpoint}"
                      + (f"; samples {result.samples}" if result.samples else ""))
        elif args.command == "sample":
            if args.output is None:
                from ._run_dir import default_samples_path

                args.output = default_samples_path(args.checkpoint)
                args.output.parent.mkdir(parents=True, exist_ok=True)
            if args.prompt is not None or args.prompts_file is not None:
                from .text_to_image.sampling import read_prompts, sample_prompts

                path = sample_prompts(args.checkpoint, args.output, read_prompts(args.prompt, args.prompts_file),
                                      per_prompt=args.per_prompt, cfg_scale=args.cfg_scale, num_steps=args.num_steps,
                                      seed=args.seed, use_ema=args.use_ema, device=args.device,
                                      batch_size=args.batch_size, scale=args.scale, pipeline=args.pipeline,
                                      num_threads=args.num_threads, progress=True)
            else:
                from .sample import sample_checkpoint

                text_options = ("prompt", "prompts_file", "per_prompt", "pipeline")
                options = {k: v for k, v in vars(args).items()
                           if k not in ("command", "checkpoint", "output", "halting", "halt_threshold", *text_options)}
                halting = {k: v for k, v in (("mode", args.halting), ("threshold", args.halt_threshold))
                           if v is not None}
                path = sample_checkpoint(args.checkpoint, args.output, progress=True, halting=halting, **options)
            print(f"wrote {path}")
        else:
            module = _plugin(args.command)
            if module is None:
                print(f"thinking-pixel: error: the '{args.command}' command is not available "
                      f"(module thinking_pixel.{args.command} is missing)", file=sys.stderr)
                return 1
            return module.run(args) or 0
    except (FileNotFoundError, ValueError, FloatingPointError) as e:  # ValueError: also CheckpointError
        print(f"thinking-pixel: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        from .text.minilm import TextEncoderMissing  # imported only here: the parser stays light

        if not isinstance(e, TextEncoderMissing):
            raise
        print(f"thinking-pixel: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("thinking-pixel: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
