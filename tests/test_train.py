"""Training loop: metrics, atomic checkpoints, exact resume, fine-tuning with a frozen base, sampling a grid."""

import json

import pytest
import torch
from safetensors.torch import load_file

from thinking_pixel import DiT, ThinkingPixelDiT
from thinking_pixel.checkpoints import CheckpointError, resolve_weights_dir
from thinking_pixel.sample import sample_checkpoint
from thinking_pixel.train import TrainConfig, train


def tiny(tmp_path, name="run", **overrides):
    """A config that trains in well under a second per step: 8x8 images, 2 blocks of width 32."""
    options = dict(output_dir=str(tmp_path / name), image_size=8, patch_size=2, depth=2, hidden_size=32,
                   num_heads=2, rank=4, batch_size=4, max_steps=4, checkpoint_every=2, lr=1e-3, warmup_steps=0,
                   sample_grid=False, progress=False, num_threads=1)
    options.update(overrides)
    return TrainConfig.from_flat(**options)


def losses(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, len(lines) + 1))
    return [m["loss"] for m in lines]


class Interrupt(Exception):
    pass


def test_metrics_and_checkpoint_layout(tmp_path):
    result = train(tiny(tmp_path, keep_checkpoints=1))
    out = tmp_path / "run"
    assert result.step == 4 and result.checkpoint == out / "checkpoints" / "step_0000004"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {"step", "loss", "mse", "vb", "lr", "it_s", "grad_norm"} <= set(lines[0])
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004"]  # pruned, no temp dirs
    step_dir = out / "checkpoints" / "step_0000004"
    for sub in ("model", "ema"):
        assert (step_dir / sub / "config.json").is_file() and (step_dir / sub / "model.safetensors").is_file()
    assert json.loads((step_dir / "train_config.json").read_text())["optimisation"]["max_steps"] == 4
    model, ema = load_file(step_dir / "model" / "model.safetensors"), load_file(step_dir / "ema" / "model.safetensors")
    assert any(not torch.equal(model[k], ema[k]) for k in model), "EMA must lag the model"
    assert resolve_weights_dir(out) == step_dir / "ema"
    assert resolve_weights_dir(out, ema=False) == step_dir / "model"


def test_resume_gives_the_same_losses(tmp_path):
    train(tiny(tmp_path, "straight", max_steps=6, checkpoint_every=3))

    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupt

    cfg = tiny(tmp_path, "resumed", max_steps=6, checkpoint_every=3)
    with pytest.raises(Interrupt):
        train(cfg, on_step=stop_at_5)  # dies after step 5's metrics line, its last checkpoint is step 3
    assert (tmp_path / "resumed" / "latest").read_text().strip() == "checkpoints/step_0000003"
    assert len(losses(tmp_path / "resumed")) == 5
    train(cfg)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_0000006" / "ema" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step_0000006" / "ema" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run_and_refusing_changed_settings(tmp_path):
    train(tiny(tmp_path, max_steps=2))
    assert train(tiny(tmp_path, max_steps=2)).last_loss is None  # nothing left to do
    train(tiny(tmp_path, max_steps=4))
    assert len(losses(tmp_path / "run")) == 4
    with pytest.raises(ValueError, match="lr: 0.001 \\(saved\\) vs 0.01 \\(now\\)"):
        train(tiny(tmp_path, max_steps=6, lr=1e-2))


def test_gate_inputs_reach_the_model_and_old_checkpoints_resume(tmp_path):
    result = train(tiny(tmp_path, gate_inputs=("tokens",), max_steps=2))
    model = ThinkingPixelDiT.from_pretrained(result.checkpoint / "model")
    assert model.recursion.gate_inputs == ("tokens",)
    gates = [m for name, m in model.named_modules() if name.endswith("attn.gate")]
    assert gates and all(g.token_proj is not None and g.cond_proj is None for g in gates)
    # a saved recursion without gate_inputs resumes as the default (all inputs)
    train(tiny(tmp_path, "old", max_steps=2))
    saved = tmp_path / "old" / "checkpoints" / "step_0000002" / "train_config.json"
    config = json.loads(saved.read_text())
    del config["recursion"]["gate_inputs"]
    saved.write_text(json.dumps(config))
    assert train(tiny(tmp_path, "old", max_steps=3)).step == 3
    with pytest.raises(ValueError, match="gate_inputs"):
        tiny(tmp_path, gate_inputs=("tokens", "text"))
    with pytest.raises(ValueError, match="gate_inputs"):
        tiny(tmp_path, gate_inputs="tokens")


def test_finetune_freezes_the_base(tmp_path):
    train(tiny(tmp_path, "base", recursion=False, max_steps=2))
    base = DiT.from_pretrained(tmp_path / "base" / "checkpoints" / "step_0000002" / "ema")
    result = train(tiny(tmp_path, "ft", finetune_from=str(tmp_path / "base"), max_steps=2))
    tuned = ThinkingPixelDiT.from_pretrained(result.checkpoint / "model")
    tuned_state, base_state = tuned.state_dict(), base.state_dict()
    for name, value in base_state.items():
        assert torch.equal(tuned_state[name], value), f"{name} of the frozen base moved"
    assert any(tuned_state[n].abs().max() > 0 for n in tuned_state if n.endswith("lora.lora_b")), "experts trained"
    state = torch.load(result.checkpoint / "training_state.pt", weights_only=True)
    assert all(".attn.lora." in n or ".attn.gate." in n for n in state["trainable"])
    with pytest.raises(ValueError, match="plain DiT"):
        train(tiny(tmp_path, "ft2", finetune_from=str(tmp_path / "ft")))
    with pytest.raises(ValueError, match="does not fit the dataset"):
        train(tiny(tmp_path, "ft3", finetune_from=str(tmp_path / "base"), image_size=16))
    with pytest.raises(ValueError, match="--prediction v"):
        train(tiny(tmp_path, "ft4", finetune_from=str(tmp_path / "base"), prediction="eps"))


def test_bf16_no_recursion_and_grid(tmp_path, capsys):
    result = train(tiny(tmp_path, recursion=False, bf16=True, max_steps=2, sample_grid=True))
    assert "--no-sample-grid skips this" in capsys.readouterr().out  # the grid's time is announced
    assert type(DiT.from_pretrained(result.checkpoint / "model")) is DiT
    assert all(loss == loss for loss in losses(tmp_path / "run"))  # finite (NaN != NaN)
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples.png")
    assert grid.size[1] > grid.size[0]  # 16 class rows of 4 samples


def test_sample_checkpoint_is_seeded(tmp_path):
    train(tiny(tmp_path, max_steps=2))
    kwargs = dict(sampler="dpm", num_steps=3, classes=[0, 5], per_class=2, scale=1)
    a = sample_checkpoint(tmp_path / "run", tmp_path / "a.png", seed=1, **kwargs)
    b = sample_checkpoint(tmp_path / "run", tmp_path / "b.png", seed=1, **kwargs)
    c = sample_checkpoint(tmp_path / "run", tmp_path / "c.png", seed=2, **kwargs)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    from PIL import Image

    assert Image.open(a).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2 x 2 images of 8 px, 2 px padding
    with pytest.raises(ValueError, match="out of range"):
        sample_checkpoint(tmp_path / "run", tmp_path / "d.png", **{**kwargs, "classes": [16]})
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        sample_checkpoint(tmp_path, tmp_path / "e.png")
