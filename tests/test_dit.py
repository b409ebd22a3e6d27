"""The base DiT: config, registry, reference behaviour (init, embeddings, CFG), checkpoints."""

import json

import numpy as np
import pytest
import torch

from thinking_pixel import DIT_CONFIGS, DiT, DiTConfig, dit_config, load_model
from thinking_pixel.models.dit import TimestepEmbedder, get_2d_sincos_pos_embed

from model_helpers import inputs, randomize  # noqa: E402  (tests/ is on sys.path)


def tiny_config(**overrides):
    return dit_config("DiT-T/2", **{"depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 8, **overrides})




# --- config and registry ---------------------------------------------------------------------------------

def test_config_round_trip_through_json():
    cfg = tiny_config(learn_sigma=False)
    assert DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DiTConfig() == dit_config("DiT-XL/2")


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=30, num_heads=4), "num_heads"),
    (dict(input_size=10, patch_size=4), "patch_size"),
    (dict(depth=0), "depth"),
    (dict(hidden_size=34, num_heads=2), "divisible by 4"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(mlp_ratio=0), "mlp_ratio"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**kwargs)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown DiT config"):
        dit_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown fields"):
        DiTConfig.from_dict({"hidden": 3})


def test_registry_sizes():
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, hidden, heads) in expected.items():
        for patch in (2, 4, 8):
            cfg = dit_config(f"DiT-{size}/{patch}")
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, patch)
    assert dit_config("DiT-T/2", num_classes=3).num_classes == 3


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_every_registry_size_builds_and_runs_on_meta(name):
    cfg = dit_config(name)
    with torch.device("meta"):
        model = DiT(cfg).eval()
        x, t, y = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size), torch.zeros(2), torch.zeros(2).long()
        out = model(x, t, y)
    assert out.shape == (2, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)


def test_dit_xl2_parameter_count():
    with torch.device("meta"):
        model = DiT(dit_config("DiT-XL/2"))
    # DiT-XL/2 is the paper's 675M model: 675,129,632 parameters including the fixed pos_embed.
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_state_dict_names_follow_the_reference():
    names = set(DiT(tiny_config()).state_dict())
    for name in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                 "y_embedder.embedding_table.weight", "pos_embed", "blocks.1.attn.qkv.weight",
                 "blocks.1.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                 "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight",
                 "final_layer.adaLN_modulation.1.bias"]:
        assert name in names


# --- reference behaviour -----------------------------------------------------------------------------------

def _reference_pos_embed(embed_dim, grid_size):
    """DiT's numpy get_2d_sincos_pos_embed (MAE's), restated independently."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_reference():
    ours = get_2d_sincos_pos_embed(64, 5)
    ref = torch.from_numpy(_reference_pos_embed(64, 5)).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    model = DiT(tiny_config())
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4))
    assert not model.pos_embed.requires_grad


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 8)
    freqs = torch.exp(-np.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    assert TimestepEmbedder.timestep_embedding(t, 7).shape == (4, 7)


def test_adaln_zero_init_gives_zero_output_and_right_shape():
    cfg = tiny_config()
    model = DiT(cfg)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    out = model(*inputs(cfg))
    assert out.shape == (3, 2 * cfg.in_channels, cfg.input_size, cfg.input_size)
    assert torch.count_nonzero(out) == 0
    assert DiT(tiny_config(learn_sigma=False))(*inputs(cfg)).shape[1] == cfg.in_channels


def test_unpatchify_inverts_the_reference_patch_order():
    cfg = tiny_config(learn_sigma=False, patch_size=4)
    model = DiT(cfg)
    img = torch.randn(2, 3, 8, 8)
    n, c, p, h = 2, 3, 4, 2
    tokens = img.reshape(n, c, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h * h, p * p * c)  # (n, T, p*p*c)
    torch.testing.assert_close(model.unpatchify(tokens), img, rtol=0, atol=0)


def test_forward_rejects_bad_shapes():
    cfg = tiny_config()
    model = DiT(cfg)
    x, t, y = inputs(cfg)
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="t and y"):
        model(x, t[:2], y)


def test_label_dropout():
    cfg = tiny_config()
    model = randomize(DiT(cfg))
    emb = model.y_embedder
    labels = torch.tensor([1, 2, 3])
    dropped = emb.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1]))
    assert dropped.tolist() == [cfg.num_classes, 2, cfg.num_classes]
    assert emb.embedding_table.num_embeddings == cfg.num_classes + 1
    # Eval: no dropout, deterministic. Train: some labels become the null class.
    model.eval()
    x, t, y = inputs(cfg, n=64)
    torch.testing.assert_close(model(x, t, y), model(x, t, y), rtol=0, atol=0)
    emb.dropout_prob = 0.5
    torch.manual_seed(0)
    train_out = emb(y, train=True)
    null = emb.embedding_table.weight[cfg.num_classes]
    n_null = (train_out == null).all(dim=1).sum()
    assert 0 < n_null < 64


def test_forward_with_cfg():
    cfg = tiny_config()
    model = randomize(DiT(cfg)).eval()
    x, t, _ = inputs(cfg, n=2)
    x = torch.cat([x[:1], x[:1]])
    y = torch.tensor([4, cfg.num_classes])
    cond, uncond = model(x, t, y).chunk(2)
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    c = cfg.in_channels
    guided = uncond[:, :c] + 4.0 * (cond[:, :c] - uncond[:, :c])
    torch.testing.assert_close(out[0, :c], guided[0])
    torch.testing.assert_close(out[1, :c], guided[0])
    torch.testing.assert_close(out[:, c:], torch.cat([cond, uncond])[:, c:])
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, cfg_scale=1.0)[0], cond[0])


def test_bfloat16_model_runs():
    cfg = tiny_config()
    model = randomize(DiT(cfg)).to(torch.bfloat16)
    x, t, y = inputs(cfg)
    assert model(x.bfloat16(), t, y).dtype == torch.bfloat16


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    cfg = tiny_config()
    model = randomize(DiT(cfg)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    for loaded in (DiT.from_pretrained(tmp_path / "ckpt"), load_model(tmp_path / "ckpt")):
        assert type(loaded) is DiT and loaded.config == cfg and not loaded.training
        x, t, y = inputs(cfg)
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
        assert not loaded.pos_embed.requires_grad and loaded.blocks[0].attn.qkv.weight.requires_grad


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        DiT.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DiT.from_pretrained(tmp_path)

    ckpt = DiT(tiny_config()).save_pretrained(tmp_path / "ckpt")
    config_path = ckpt / "config.json"
    good = config_path.read_text()

    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DiT.from_pretrained(ckpt)
    config_path.write_text(json.dumps({"format": 1, "class": "Bogus"}))
    with pytest.raises(ValueError, match="unknown model class"):
        DiT.from_pretrained(ckpt)
    bad = json.loads(good)
    bad["dit"]["hidden"] = 3
    config_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="invalid DiT config"):
        DiT.from_pretrained(ckpt)
    bad = json.loads(good)
    bad["dit"]["hidden_size"] = 64
    config_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not match"):
        DiT.from_pretrained(ckpt)

    config_path.write_text(good)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DiT.from_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        DiT.from_pretrained(ckpt)
