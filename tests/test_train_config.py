"""TrainConfig: sections, the flat options' mapping, JSON round trip, and the flat train_config.json of earlier
versions (tests/fixtures/flat_train_config, written by that code) loading, resuming and sampling."""

import json
import shutil
from pathlib import Path

import pytest

from thinking_pixel import RecursionConfig, cli
from thinking_pixel.sample import sample_checkpoint
from thinking_pixel.train import train
from thinking_pixel.train_config import (DataConfig, ModelConfig, OptimisationConfig, PeftLoRAConfig, RunConfig,
                                         TextToImageConfig, TrainConfig)

FIXTURES = Path(__file__).parent / "fixtures" / "flat_train_config"
# The options each flat fixture was written from (TrainConfig(**options).to_dict() of the flat layout).
FLAT_FIXTURES = {
    "text_to_image_peft_lora.json": dict(output_dir="runs/peft", dataset="captions", data_dir="captions",
                                         image_size=16, preset="SD3-N/2", peft_lora=True, rank=4,
                                         recursion_layers=(1,), finetune_from="runs/base", max_steps=2,
                                         warmup_steps=0),
    "text_to_image_pipeline.json": dict(output_dir="runs/pipe", dataset="captions", data_dir="captions",
                                        pipeline="pipe", image_size=16, rank=4, max_steps=2),
    "text_to_image_recursion.json": dict(output_dir="runs/comp", dataset="compositional", image_size=16,
                                         preset="SD3-N/2", recursion_layers=(0, 1), experts=3, recursion_steps=3,
                                         rank=4, halting="learned", halt_prior=0.4),
    "dit_learned_halting_eps.json": dict(output_dir="runs/halt", dataset="digits", halting="learned",
                                         halt_threshold=0.6, prediction="eps", lr_schedule="constant",
                                         min_snr_gamma=0, gate_inputs=("tokens",), bf16=True, hflip=True),
    "dit_no_recursion.json": dict(output_dir="runs/plain", recursion=False, preset="DiT-S/2", num_threads=2,
                                  sample_grid=False),
}
# The 2-step run in FIXTURES / "dit_run", as thinking-pixel train options.
FIXTURE_RUN = dict(image_size=8, patch_size=4, depth=1, hidden_size=16, num_heads=2, rank=2, batch_size=4,
                   checkpoint_every=2, warmup_steps=0, gate_inputs=("tokens", "timestep"), recursion_layers=(0,),
                   sample_grid=False, progress=False, num_threads=1)


@pytest.mark.parametrize("name", sorted(FLAT_FIXTURES))
def test_flat_train_configs_load_as_the_same_options_map_today(name):
    flat = json.loads((FIXTURES / name).read_text())
    assert "data" not in flat and len(flat) == 50  # the flat layout
    cfg = TrainConfig.from_dict(flat)
    assert cfg == TrainConfig.from_flat(**FLAT_FIXTURES[name])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # and it round-trips as JSON


def test_flat_fixtures_map_onto_the_sections():
    load = {name: TrainConfig.from_dict(json.loads((FIXTURES / name).read_text())) for name in FLAT_FIXTURES}
    halt = load["dit_learned_halting_eps.json"]
    assert (halt.data.dataset, halt.data.hflip, halt.model.prediction, halt.optimisation.min_snr_gamma) == \
        ("digits", True, "eps", 0.0)
    assert halt.recursion == RecursionConfig(rank=16, gate_inputs=("tokens",), halting="learned", halt_threshold=0.6)
    assert halt.text_to_image is None and halt.optimisation.bf16 and halt.optimisation.lr_schedule == "constant"
    peft = load["text_to_image_peft_lora.json"]
    assert peft.recursion is None and peft.text_to_image == TextToImageConfig(peft_lora=PeftLoRAConfig(4, (1,)))
    assert peft.model.prediction is None and peft.optimisation.min_snr_gamma is None  # the DiT's options
    assert peft.model.finetune_from == "runs/base"
    pipe = load["text_to_image_pipeline.json"]
    assert pipe.text_to_image.pipeline == "pipe" and pipe.model.preset == "SD3-T/2" and pipe.recursion.rank == 4
    comp = load["text_to_image_recursion.json"]
    assert (comp.recursion.experts, comp.recursion.steps, comp.recursion.halt_prior, comp.recursion.halt_head) == \
        (3, 3, 0.4, True)
    plain = load["dit_no_recursion.json"]
    assert plain.recursion is None and plain.model.preset == "DiT-S/2" and plain.run.num_threads == 2
    # a flat config saved before an option existed takes it as the run behaved then (or today's default)
    old = {k: v for k, v in json.loads((FIXTURES / "dit_no_recursion.json").read_text()).items()
           if k not in ("prediction", "min_snr_gamma", "gate_inputs", "recursion")}
    old = TrainConfig.from_dict(old)
    assert (old.model.prediction, old.optimisation.min_snr_gamma, old.recursion.gate_inputs) == \
        ("eps", 0.0, ("tokens", "timestep", "condition"))


def test_a_checkpoint_with_a_flat_config_resumes_and_samples(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "dit_run", run)
    with pytest.raises(ValueError, match="optimisation.lr: 0.004 \\(saved\\) vs 0.001 \\(now\\)"):
        train(TrainConfig.from_flat(output_dir=str(run), max_steps=3, **{**FIXTURE_RUN, "lr": 1e-3}))
    result = train(TrainConfig.from_flat(output_dir=str(run), max_steps=3, **FIXTURE_RUN))
    assert "resuming from step 2 of 3" in capsys.readouterr().out
    assert result.step == 3 and [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == [1, 2, 3]
    assert TrainConfig.load(result.checkpoint) == TrainConfig.from_flat(output_dir=str(run), max_steps=3,
                                                                        **FIXTURE_RUN)
    assert "data" in json.loads((result.checkpoint / "train_config.json").read_text())  # written in sections
    grid = sample_checkpoint(FIXTURES / "dit_run", tmp_path / "grid.png", num_steps=2, per_class=1, classes=[0, 1],
                             num_threads=1)
    assert grid.is_file()
    # and through the command line, on a fresh copy
    shutil.copytree(FIXTURES / "dit_run", tmp_path / "cli")
    flags = ["--image-size", "8", "--patch-size", "4", "--depth", "1", "--hidden-size", "16", "--num-heads", "2",
             "--rank", "2", "--batch-size", "4", "--checkpoint-every", "2", "--warmup-steps", "0", "--gate-inputs",
             "tokens,timestep", "--recursion-layers", "0", "--no-sample-grid", "--no-progress", "--threads", "1"]
    assert cli.main(["train", "--output-dir", str(tmp_path / "cli"), "--max-steps", "3", *flags]) == 0
    assert "resuming from step 2 of 3" in capsys.readouterr().out


def test_nested_construction_and_its_checks():
    model = ModelConfig()
    cfg = TrainConfig(model=model, optimisation=OptimisationConfig(max_steps=10), run=RunConfig(seed=3))
    assert model.preset is None and model.prediction is None  # the sections passed in are not changed
    assert (cfg.model.preset, cfg.model.prediction, cfg.optimisation.min_snr_gamma) == ("DiT-N/4", "v", 5.0)
    assert cfg.recursion == RecursionConfig(rank=16) and cfg.text_to_image is None
    text = TrainConfig(data=DataConfig(dataset="compositional"), text_to_image=TextToImageConfig())
    assert text.model.preset == "SD3-T/2" and text.model.prediction is None
    with pytest.raises(ValueError, match="trains the text-to-image model: set text_to_image"):
        TrainConfig(data=DataConfig(dataset="captions"))
    with pytest.raises(ValueError, match="trains the text-to-image model"):
        TrainConfig(model=ModelConfig(preset="SD3-T/4"))
    with pytest.raises(ValueError, match="prediction \\(--prediction\\) applies to the class-conditional DiT"):
        TrainConfig(model=ModelConfig(preset="SD3-T/4", prediction="eps"), text_to_image=TextToImageConfig())
    with pytest.raises(ValueError, match="peft_lora replaces the recursion"):
        TrainConfig(text_to_image=TextToImageConfig(peft_lora=PeftLoRAConfig()))
    with pytest.raises(ValueError, match="TrainConfig.data must be a DataConfig, got dict"):
        TrainConfig(data={"dataset": "shapes"})
    with pytest.raises(ValueError, match="ModelConfig.preset must be one of .*SD3-T/4"):
        ModelConfig(preset="DiT-M/2")
    for bad in (dict(max_steps=0), dict(lr=0.0), dict(ema_decay=1.0), dict(batch_size=True)):
        with pytest.raises(ValueError, match=f"OptimisationConfig.{next(iter(bad))}"):
            OptimisationConfig(**bad)
    with pytest.raises(ValueError, match="unknown sections \\['optimizer'\\]"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "optimizer": {}})


@pytest.mark.parametrize("options, message", [
    (dict(peft_lora=True), "--peft-lora\\) is a text-to-image baseline"),
    (dict(dataset="compositional", min_snr_gamma=5.0), "min_snr_gamma \\(--min-snr-gamma\\) applies to the"),
    (dict(max_step=10), "unknown options \\['max_step'\\]"),
])
def test_flat_options_a_run_would_not_use_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_flat(**options)


def test_recursion_options_without_the_recursion_are_left_unused():
    assert TrainConfig.from_flat(recursion=False, experts=3, rank=4) == TrainConfig.from_flat(recursion=False)
    peft = TrainConfig.from_flat(dataset="compositional", peft_lora=True, rank=4, recursion_layers=(1,), tau=2.0)
    assert peft.recursion is None and peft.text_to_image.peft_lora == PeftLoRAConfig(rank=4, layers=(1,))


def test_a_recipe_sets_its_options_and_explicit_options_win():
    from thinking_pixel._presets import RECIPES

    cfg = TrainConfig.from_flat(recipe="t2i-compositional", recursion=False)
    r = RECIPES["t2i-compositional"]
    assert (cfg.data.dataset, cfg.data.image_size, cfg.model.preset, cfg.text_to_image.init) == (
        r["dataset"], r["image_size"], r["preset"], r["init"])
    o = cfg.optimisation
    assert (o.lr, o.warmup_steps, o.lr_schedule, o.batch_size, o.max_steps) == (4e-3, 200, "constant", 32, 24000)
    assert cfg.recursion is None
    assert TrainConfig.from_flat(recipe="t2i-compositional", max_steps=10, lr=1e-3).optimisation.max_steps == 10
    with pytest.raises(ValueError, match=r"recipe \(--recipe\) must be one of "
                                         r"\['t2i-compositional', 't2i-compositional-cooldown'\]"):
        TrainConfig.from_flat(recipe="fast")
    args = cli.build_parser().parse_args(["train", "--recipe", "t2i-compositional", "--max-steps", "5"])
    assert TrainConfig.from_flat(**{k: v for k, v in vars(args).items() if k != "command"}).optimisation.max_steps == 5


def test_lora_b_std_flag_reaches_the_recursion_config():
    args = cli.build_parser().parse_args(["train", "--lora-b-std", "0.1", "--experts", "3"])
    cfg = TrainConfig.from_flat(**{k: v for k, v in vars(args).items() if k != "command"})
    assert (cfg.recursion.lora_b_std, cfg.recursion.experts) == (0.1, 3)
    with pytest.raises(ValueError, match="RecursionConfig.lora_b_std must be a number >= 0"):
        TrainConfig.from_flat(lora_b_std=-0.5)


def test_the_cooldown_recipe_is_the_measured_second_stage_and_needs_the_run_it_continues():
    measured = dict(dataset="compositional", image_size=32, preset="SD3-T/4", recursion=False, max_steps=2000,
                    batch_size=32, lr=4e-3, warmup_steps=50, lr_schedule="cosine", finetune_from="runs/base")
    assert TrainConfig.from_flat(recipe="t2i-compositional-cooldown", finetune_from="runs/base") == \
        TrainConfig.from_flat(**measured)
    with pytest.raises(ValueError, match="recipe t2i-compositional-cooldown needs finetune_from \\(--finetune-from\\)"):
        TrainConfig.from_flat(recipe="t2i-compositional-cooldown")
    args = cli.build_parser().parse_args(["train", "--recipe", "t2i-compositional-cooldown", "--finetune-from", "b"])
    cfg = TrainConfig.from_flat(**{k: v for k, v in vars(args).items() if k != "command"})
    assert cfg.optimisation.lr_schedule == "cosine" and cfg.recursion is None and cfg.model.finetune_from == "b"
