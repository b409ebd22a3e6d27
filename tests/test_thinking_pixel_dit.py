"""ThinkingPixelDiT: wrapping a DiT, gradients, routing records, checkpoints, context tokens, torch.compile."""

import json

import pytest
import torch

from thinking_pixel import DIT_CONFIGS, DiT, RecursionConfig, ThinkingPixelDiT, dit_config, load_model

from model_helpers import inputs, randomize  # noqa: E402  (tests/ is on sys.path)


def tiny_config(**overrides):
    return dit_config("DiT-T/2", **{"depth": 3, "hidden_size": 32, "num_heads": 2, "input_size": 8, **overrides})




def wrapped(steps=2, experts=2, layers=(0, 2), seed=0, depth=3, **kwargs):
    cfg = tiny_config(depth=depth)
    dit = randomize(DiT(cfg), seed=seed)
    recursion = RecursionConfig(layers=layers, experts=experts, steps=steps, rank=4, **kwargs)
    return dit, ThinkingPixelDiT.from_dit(dit, recursion)


def set_experts_nonzero(model, std=0.2):
    with torch.no_grad():
        for p in model.expert_parameters():
            p.copy_(torch.randn_like(p) * std)


# --- RecursionConfig --------------------------------------------------------------------------------------------

def test_recursion_config_json_round_trip():
    rc = RecursionConfig(layers=[3, 1], experts=5, steps=5, rank=16, gate_inputs=["tokens", "timestep"], lora_alpha=32)
    assert rc.layers == (3, 1) and rc.gate_inputs == ("tokens", "timestep")
    assert RecursionConfig.from_dict(json.loads(json.dumps(rc.to_dict()))) == rc
    assert RecursionConfig.from_dict(RecursionConfig().to_dict()) == RecursionConfig()


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=()), "layers"),
    (dict(layers=(1, 1)), "duplicates"),
    (dict(layers=(-1,)), "layers"),
    (dict(layers=3), "layers"),
    (dict(experts=0), "experts"),
    (dict(steps=1.5), "steps"),
    (dict(rank=0), "rank"),
    (dict(tau=0.0), "tau"),
    (dict(gate_inputs=()), "gate_inputs"),
    (dict(gate_inputs=("tokens", "text")), "gate_inputs"),
    (dict(gate_inputs="tokens"), "gate_inputs"),
    (dict(gate_inputs=None), "gate_inputs"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(gate_noise_at_eval=1), "gate_noise_at_eval"),
])
def test_recursion_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecursionConfig(**kwargs)


def test_layers_checked_against_depth_and_default_is_middle():
    with pytest.raises(ValueError, match=r"out of range for a model with depth 3"):
        ThinkingPixelDiT(tiny_config(), RecursionConfig(layers=(3,)))
    model = ThinkingPixelDiT(tiny_config(), RecursionConfig(rank=4))
    assert model.recursive_layers == (1,)
    assert [type(b.attn).__name__ for b in model.blocks] == ["Attention", "RecursiveAttention", "Attention"]


# --- wrapping a DiT ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("experts", [1, 2, 5])
def test_from_dit_computes_exactly_the_dit_output(steps, experts):
    dit, model = wrapped(steps=steps, experts=experts)
    x, t, y = inputs(dit.config)
    for mode in (False, True):
        dit.train(mode)
        model.train(mode)
        torch.manual_seed(123)  # same train-time class dropout in both (drawn before any Gumbel noise)
        ref = dit(x, t, y)
        torch.manual_seed(123)
        out = model(x, t, y)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_from_dit_copies_weights_and_freezes_base():
    dit, model = wrapped()
    assert model.config == dit.config and model.training == dit.training
    assert model.blocks[0].attn.qkv.weight is not dit.blocks[0].attn.qkv.weight
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, dit.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.expert_named_parameters()}
    assert trainable == {f"blocks.{i}.attn.{p}" for i in (0, 2) for p in
                         ("lora.lora_a", "lora.lora_b", "gate.token_proj.weight", "gate.token_proj.bias",
                          "gate.cond_proj.weight", "gate.cond_proj.bias")}
    unfrozen = ThinkingPixelDiT.from_dit(dit, model.recursion, freeze_base=False)
    assert all(p.requires_grad for name, p in unfrozen.named_parameters() if name != "pos_embed")
    with pytest.raises(TypeError, match="expects a DiT"):
        ThinkingPixelDiT.from_dit(model, model.recursion)


def test_gradients_reach_experts_and_gate_not_frozen_base():
    # With lora_b at zero, d/d lora_a and d/d gate vanish (both act through B); make B nonzero first.
    _, model = wrapped(steps=2, experts=2)
    set_experts_nonzero(model)
    model.train()
    x, t, y = inputs(model.config)
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_gradients_reach_base_when_not_frozen():
    dit, _ = wrapped()
    model = ThinkingPixelDiT.from_dit(dit, RecursionConfig(layers=(1,), rank=4), freeze_base=False).train()
    x, t, y = inputs(model.config)
    model(x, t, y).square().mean().backward()
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.lora.lora_b.grad.abs().sum() > 0  # B gets gradient from its zero init
    assert model.pos_embed.grad is None


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_every_registry_size_builds_and_runs_on_meta(name):
    cfg = dit_config(name)
    with torch.device("meta"):
        model = ThinkingPixelDiT(cfg, RecursionConfig(experts=5, steps=2)).eval()
        x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
        out = model(x, torch.zeros(2), torch.zeros(2).long())
    assert out.shape == (2, cfg.out_channels, cfg.input_size, cfg.input_size)
    attn = model.blocks[cfg.depth // 2].attn
    assert attn.lora.lora_a.shape == (5, 3, 128, cfg.hidden_size)


def test_bfloat16_autocast_forward_backward():
    _, model = wrapped()
    set_experts_nonzero(model)
    model.train()
    x, t, y = inputs(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert model.blocks[0].attn.lora.lora_a.grad.dtype == torch.float32


# --- routing records --------------------------------------------------------------------------------------------

def test_routing_records():
    _, model = wrapped(steps=3, experts=5, layers=(0, 2))
    model.eval()
    cfg = model.config
    x, t, y = inputs(cfg)
    n_tokens = cfg.num_patches
    with model.record_routing() as rec:
        out = model(x, t, y)
    assert [(e["layer"], e["step"]) for e in rec.entries] == [(layer, s) for layer in (0, 2) for s in (1, 2, 3)]
    for e in rec.entries:
        assert e["expert_idx"].shape == (3, n_tokens) and e["expert_idx"].dtype == torch.int64
        assert 0 <= e["expert_idx"].min() and e["expert_idx"].max() < 5
        assert not e["expert_idx"].requires_grad and "state" not in e
        assert torch.equal(e["timestep"], t) and torch.equal(e["condition"], y)
    torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)  # recording changes nothing
    assert all(a.recorder is None for _, a in model.recursive_attentions())


def test_routing_records_states_and_nesting():
    _, model = wrapped(steps=2, experts=2, layers=(1,))
    set_experts_nonzero(model)
    model.eval()
    x, t, y = inputs(model.config)
    with model.record_routing(states=True) as rec:
        model(x, t, y)
        model(x, t, y)
        with pytest.raises(RuntimeError, match="already active"):
            with model.record_routing():
                pass
    assert len(rec.entries) == 2 * 2
    first, second = rec.entries[0]["state"], rec.entries[1]["state"]
    assert first.shape == second.shape == (3, model.config.num_patches, model.config.hidden_size)
    assert not torch.allclose(first, second)  # a^1 = attention output + x~ differs from a^0 = x~


def test_eval_routing_is_deterministic_and_training_is_not():
    _, model = wrapped(steps=2, experts=5, layers=(1,))
    x, t, y = inputs(model.config, n=4)

    def routes():
        with model.record_routing() as rec:
            model(x, t, y)
        return torch.stack([e["expert_idx"] for e in rec.entries])

    model.eval()
    assert torch.equal(routes(), routes())
    model.train()
    assert not torch.equal(routes(), routes())
    noisy = ThinkingPixelDiT(model.config, RecursionConfig(layers=(1,), experts=5, rank=4, gate_noise_at_eval=True))
    model = noisy.eval()
    assert not torch.equal(routes(), routes())


def test_gate_inputs_ablation():
    dit, _ = wrapped()
    model = ThinkingPixelDiT.from_dit(dit, RecursionConfig(layers=(1,), rank=4, gate_inputs=("tokens",)))
    assert model.blocks[1].attn.gate.cond_proj is None
    cond_only = ThinkingPixelDiT.from_dit(dit, RecursionConfig(layers=(1,), rank=4, gate_inputs=("timestep",)))
    assert cond_only.blocks[1].attn.gate.token_proj is None
    x, t, y = inputs(dit.config)
    dit.eval()
    for m in (model.eval(), cond_only.eval()):
        # fp32 rounding only: the wrapped model's parameters need a gradient, so its attention runs the CPU kernel
        # (tp_kernels.joint_attention), the frozen DiT's runs torch's
        torch.testing.assert_close(m(x, t, y), dit(x, t, y), rtol=1e-5, atol=1e-6)


# --- context tokens ---------------------------------------------------------------------------------------------

def test_context_tokens():
    dit, model = wrapped(steps=2, experts=2, layers=(1,))
    set_experts_nonzero(model)
    model.eval()
    cfg = model.config
    x, t, y = inputs(cfg)
    context = torch.randn(3, 7, cfg.hidden_size)
    out = model(x, t, y, context=context)
    assert out.shape == model(x, t, y).shape
    assert not torch.allclose(out, model(x, t, y))
    assert not torch.allclose(out, model(x, t, y, context=context + 1))
    cfg_out = model.forward_with_cfg(torch.cat([x[:1], x[:1]]), t[:2], torch.tensor([1, cfg.num_classes]),
                                     cfg_scale=2.0, context=context[:2])
    assert cfg_out.shape == (2, cfg.out_channels, cfg.input_size, cfg.input_size)
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, t, y, context=torch.randn(3, 7, cfg.hidden_size + 1))


# --- checkpoints ------------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    _, model = wrapped(steps=3, experts=2)
    set_experts_nonzero(model)
    model.eval()
    path = model.save_pretrained(tmp_path / "tp")
    config = json.loads((path / "config.json").read_text())
    assert config["class"] == "ThinkingPixelDiT" and config["recursion"]["layers"] == [0, 2]
    x, t, y = inputs(model.config)
    for loaded in (ThinkingPixelDiT.from_pretrained(path), load_model(path)):
        assert type(loaded) is ThinkingPixelDiT and loaded.recursion == model.recursion
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    assert not list(path.glob("*.tmp"))


def test_from_pretrained_errors(tmp_path):
    dit, model = wrapped()
    tp_path = model.save_pretrained(tmp_path / "tp")
    dit_path = dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match="holds a ThinkingPixelDiT checkpoint, not a DiT"):
        DiT.from_pretrained(tp_path)
    with pytest.raises(ValueError, match="holds a DiT checkpoint"):
        ThinkingPixelDiT.from_pretrained(dit_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ThinkingPixelDiT.from_pretrained(tmp_path / "missing")
    config = json.loads((tp_path / "config.json").read_text())
    config["recursion"]["rank"] = 8
    (tp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match.*wrong shape"):
        ThinkingPixelDiT.from_pretrained(tp_path)
    config["recursion"]["rank"] = 4
    config["recursion"]["layers"] = [0, 1]
    (tp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match.*missing.*unexpected"):
        ThinkingPixelDiT.from_pretrained(tp_path)
    config["recursion"]["layers"] = [0, 9]
    (tp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="invalid ThinkingPixelDiT config.*out of range"):
        ThinkingPixelDiT.from_pretrained(tp_path)


# --- torch.compile ----------------------------------------------------------------------------------------------

def test_compile_fullgraph_forward_backward():
    # aot_eager traces the whole forward and backward (fullgraph: any graph break fails) without paying for
    # inductor's C++ codegen in the test suite; the custom ops are opaque to the compiler either way.
    torch._dynamo.reset()
    _, model = wrapped(steps=2, experts=2, layers=(0,), depth=1)
    set_experts_nonzero(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, t, y = inputs(model.config)
    model.eval()
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
    model.train()
    compiled(x, t, y).square().mean().backward()
    lora = model.blocks[0].attn.lora
    assert lora.lora_a.grad.abs().sum() > 0 and lora.lora_b.grad.abs().sum() > 0
    assert model.blocks[0].attn.gate.token_proj.weight.grad.abs().sum() > 0
