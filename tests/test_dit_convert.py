"""dit_from_diffusers, load_original_dit (facebookresearch/DiT .pt) and train --finetune-from on them."""

import argparse
import dataclasses
import json

import pytest
import torch

from thinking_pixel import DiT, ThinkingPixelDiT, cli, dit_config
from thinking_pixel.models import config_from_original_state_dict, dit_from_diffusers, load_original_dit

from diffusers_helpers import DIT_KW, make_base, make_inputs, run  # noqa: E402  (tests/ is on sys.path)

diffusers = pytest.importorskip("diffusers")


def tied(model):
    """A diffusers DiT whose blocks share block 0's timestep and class embedders (as converted checkpoints do)."""
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def test_from_diffusers_computes_the_diffusers_model():
    source = tied(make_base("dit_diffusers"))
    inputs = make_inputs("dit_diffusers", n=3)
    ours = dit_from_diffusers(source)
    assert type(ours) is DiT and not ours.training
    cfg = ours.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.num_classes, cfg.learn_sigma) == (3, 16, 2, 10, True)
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (1.0, 1e-5)  # where diffusers' DiT differs from DiT's
    with torch.no_grad():
        want = run(source, inputs)
        torch.testing.assert_close(ours(*inputs), want, rtol=0, atol=1e-5)
        reference_flavour = DiT(dataclasses.replace(cfg, timestep_freq_shift=0.0, mlp_norm_eps=1e-6))
        reference_flavour.load_state_dict(ours.state_dict())
        assert (reference_flavour(*inputs) - want).abs().max() > 1e-5  # the two fields are needed
    with pytest.raises(ValueError, match=r"transformer_blocks\[1\].norm1.emb.* differs"):
        dit_from_diffusers(make_base("dit_diffusers"))
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        dit_from_diffusers(make_base("sd3"))


def test_original_checkpoint_loads_with_its_config_read_off_the_shapes(tmp_path):
    source = dit_from_diffusers(tied(make_base("dit_diffusers")))
    inputs = make_inputs("dit", n=3)
    plain = tmp_path / "DiT-tiny.pt"
    torch.save(source.state_dict(), plain)
    trainer = tmp_path / "0000100.pt"  # facebookresearch/DiT train.py: model, ema, opt, args
    torch.save({"model": {k: v * 0 for k, v in source.state_dict().items()}, "ema": source.state_dict(),
                "opt": {}, "args": argparse.Namespace(model="DiT-tiny")}, trainer)
    with torch.no_grad():
        want = source(*inputs)
        for path in (plain, trainer):
            loaded = load_original_dit(path, num_heads=2, timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
            assert loaded.config == source.config
            assert torch.equal(loaded(*inputs), want)

    with torch.device("meta"):  # DiT-XL/2's shapes without its weights: num_heads comes from the preset
        xl = DiT(dit_config("DiT-XL/2"))
    assert config_from_original_state_dict(xl.state_dict()) == dit_config("DiT-XL/2")

    with pytest.raises(ValueError, match="pass num_heads"):
        load_original_dit(plain)
    broken = dict(source.state_dict())
    broken["blocks.1.attn.qkv.weight"] = broken["blocks.1.attn.qkv.weight"][:, :8]
    del broken["blocks.2.mlp.fc2.bias"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['blocks.2.mlp.fc2.bias'\].*wrong shape blocks.1.attn.qkv.weight"):
        load_original_dit(tmp_path / "broken.pt", num_heads=2)
    torch.save({"weights": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # code, not tensors: refused
    with pytest.raises(ValueError, match="weights_only=True"):
        load_original_dit(tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="no 'x_embedder.proj.weight'"):
        torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
        load_original_dit(tmp_path / "other.pt")


TINY = ["--image-size", "8", "--rank", "4", "--batch-size", "4", "--no-progress", "--no-sample-grid", "--threads", "1",
        "--max-steps", "1", "--recursion-layers", "1"]


def test_train_finetunes_from_a_diffusers_directory(tmp_path, capsys):
    from diffusers import DiTTransformer2DModel

    kw = dict(DIT_KW, in_channels=3, out_channels=6, num_embeds_ada_norm=16)  # the shapes dataset: RGB, 16 classes
    source = tied(DiTTransformer2DModel(**kw))
    source.save_pretrained(tmp_path / "pipeline" / "transformer")  # a pipeline directory
    source.save_pretrained(tmp_path / "model")  # the transformer alone
    for path in (tmp_path / "pipeline", tmp_path / "model"):
        out = tmp_path / f"ft_{path.name}"
        # diffusers' DiT predicts eps; the train default became v (i11), and fine-tuning keeps the base's target
        assert cli.main(["train", "--output-dir", str(out), "--finetune-from", str(path), "--prediction", "eps",
                         *TINY]) == 0
        tuned = ThinkingPixelDiT.from_pretrained(out / "checkpoints" / "step_0000001" / "model")
        base = dit_from_diffusers(source)
        assert all(torch.equal(tuned.state_dict()[k], v) for k, v in base.state_dict().items())  # frozen base
    legacy = tmp_path / "legacy"  # older DiT checkpoints name the class Transformer2DModel
    source.save_pretrained(legacy)
    config = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    assert cli.main(["train", "--output-dir", str(tmp_path / "ft_legacy"), "--finetune-from", str(legacy),
                     "--prediction", "eps", *TINY]) == 0
    make_base("sd3").save_pretrained(tmp_path / "sd3" / "transformer")
    assert cli.main(["train", "--output-dir", str(tmp_path / "ft_sd3"), "--finetune-from", str(tmp_path / "sd3"),
                     *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert "SD3Transformer2DModel needs text conditioning" in err and "\n" not in err
