"""apply_recursion / save_recursion / load_recursion on diffusers' SD3 and DiT transformers and on our DiT."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from thinking_pixel import (RecursionConfig, ThinkingPixelDiT, apply_recursion, load_recursion, recursion_config,
                            save_recursion)
from thinking_pixel.recursion.diffusers import RecursionAttnProcessor

from diffusers_helpers import KINDS, block_outputs, make_base, make_inputs, perturb, run

pytest.importorskip("diffusers")


def processors(model):
    """The recursion modules of a wrapped model: diffusers processors, or our DiT's RecursiveAttentions."""
    if isinstance(model, ThinkingPixelDiT):
        return [attn for _, attn in model.recursive_attentions()]
    return [m for m in model.modules() if isinstance(m, RecursionAttnProcessor)]


@pytest.mark.parametrize("layers", [(1,), (0, 1, 2)], ids=["one_layer", "all_layers"])
@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_wrap_equals_the_base(kind, steps, experts, layers):
    base = make_base(kind)
    inputs = make_inputs(kind)
    with torch.no_grad():
        want, want_blocks = block_outputs(base, inputs)
        model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=layers, experts=experts, steps=steps,
                                                                    rank=4))
        assert len(processors(model)) == len(layers)
        got, got_blocks = block_outputs(model, inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for got_block, want_block in zip(got_blocks, want_blocks, strict=True):  # both streams of every SD3 block
        for g, w in zip(got_block, want_block, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_recursion_trains_and_every_routed_expert_gets_a_gradient(kind):
    base = make_base(kind)
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(0, 2), experts=3, steps=2, rank=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    marker = ".attn.lora." if kind == "dit" else ".processor."
    assert trainable and all(marker in n or ".attn.gate." in n for n in trainable), sorted(trainable)
    assert len(trainable) == 2 * 6  # two layers: lora_a, lora_b, token_proj.{weight,bias}, cond_proj.{weight,bias}
    unfrozen = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(1,), rank=4), freeze_base=False)
    assert all(p.requires_grad for name, p in unfrozen.named_parameters() if name != "pos_embed")

    mods = processors(model)
    for mod in mods:
        perturb(mod.lora, std=0.3)  # B away from zero: the experts' outputs (and the gate) now matter
    routed = [[] for _ in mods]
    for seen, mod in zip(routed, mods):
        mod.recorder = lambda step, idx, state, seen=seen: seen.append(idx)
    model.train()
    run(model, make_inputs(kind, n=4)).square().mean().backward()
    for seen, mod in zip(routed, mods):
        used = torch.zeros(mod.lora.num_experts, dtype=torch.bool)
        used[torch.cat([idx.flatten() for idx in seen])] = True
        assert used.any()
        for p in (mod.lora.lora_a, mod.lora.lora_b):
            per_expert = p.grad.flatten(1).abs().sum(1)
            assert torch.equal(per_expert > 0, used), (per_expert, used)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.gate.parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_into_a_fresh_base_is_bit_exact(kind, tmp_path):
    base = make_base(kind)
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(0, 2), experts=3, steps=2, rank=4))
    for mod in processors(model):
        perturb(mod.lora, std=0.3), perturb(mod.gate, std=0.3)  # (a RecursiveAttention also holds base Linears)
    inputs = make_inputs(kind)
    with torch.no_grad():
        want = run(model, inputs)
    save_recursion(model, tmp_path)
    stored = load_file(tmp_path / "recursion.safetensors")
    assert set(stored) == {n for n, p in model.named_parameters() if p.requires_grad}  # the recursion, nothing else
    assert json.loads((tmp_path / "recursion_config.json").read_text())["recursion"]["layers"] == [0, 2]

    loaded = load_recursion(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), want)
    assert recursion_config(loaded) == recursion_config(model)
    again = load_recursion(loaded, tmp_path)  # into a model that already has the same recursion: fills it in
    assert again is loaded


def test_sd3_gradient_checkpointing_and_deepcopy_keep_the_gate_conditioned():
    base = make_base("sd3")
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(1,), experts=2, steps=2, rank=4))
    perturb(processors(model)[0], std=0.3)
    inputs = make_inputs("sd3")
    with torch.no_grad():
        want = run(model, inputs)
    twin = copy.deepcopy(model)  # e.g. an EMA copy: its hooks must feed its own processors
    with torch.no_grad():
        assert torch.equal(run(twin, inputs), want)
    (mine,), (theirs,) = processors(model), processors(twin)
    assert all(mine.embeddings[k] is not theirs.embeddings[k] for k in mine.embeddings)
    model.enable_gradient_checkpointing()
    model.train()
    run(model, inputs).sum().backward()
    assert mine.lora.lora_b.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "dit_diffusers"])
def test_the_recursion_adds_no_graph_break(kind):
    base = make_base(kind)
    inputs = make_inputs(kind)
    torch._dynamo.reset()
    before = torch._dynamo.explain(base)(*inputs)
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(0, 2), experts=3, steps=2, rank=4))
    model.train()
    torch._dynamo.reset()
    after = torch._dynamo.explain(model)(*inputs)
    assert before.graph_break_count == 0 and before.graph_count == 1
    assert after.graph_break_count == 0 and after.graph_count == 1, after.break_reasons


def test_bad_inputs_are_named(tmp_path):
    cfg = RecursionConfig(layers=(1,), experts=2, steps=2, rank=4)
    with pytest.raises(TypeError, match="SD3Transformer2DModel.*DiTTransformer2DModel.*thinking_pixel.DiT"):
        apply_recursion(torch.nn.Linear(2, 2), cfg)
    with pytest.raises(TypeError, match="RecursionConfig"):
        apply_recursion(make_base("sd3"), {"layers": [1]})
    for kind in ("sd3", "dit_diffusers", "dit"):
        with pytest.raises(ValueError, match=r"layers \[3\] out of range.*depth 3"):
            apply_recursion(make_base(kind), RecursionConfig(layers=(3,)))
        model = apply_recursion(make_base(kind), cfg)
        with pytest.raises(ValueError, match="already has the recursion"):
            apply_recursion(model, cfg)
        save_recursion(model, tmp_path / kind)
    other = apply_recursion(make_base("sd3"), RecursionConfig(layers=(1,), experts=3, steps=2, rank=8))
    with pytest.raises(ValueError, match="another RecursionConfig.*experts: saved 2, model 3.*rank: saved 4, model 8"):
        load_recursion(other, tmp_path / "sd3")
    with pytest.raises(ValueError, match="another model: dim: saved 16, model 16|model_class: saved 'DiT"):
        load_recursion(make_base("sd3"), tmp_path / "dit")
    with pytest.raises(ValueError, match="no recursion"):
        save_recursion(make_base("sd3"), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="recursion_config.json"):
        load_recursion(make_base("sd3"), tmp_path / "missing")


@pytest.mark.parametrize("kind", ["sd3", "dit_diffusers"])
def test_a_bf16_model_gets_fp32_experts_and_trains(kind):
    base = make_base(kind).to(torch.bfloat16)
    inputs = [i.to(torch.bfloat16) if i.is_floating_point() else i for i in make_inputs(kind)]
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(1,), experts=2, steps=2, rank=4))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # like peft's adapters
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), run(base, inputs))
    run(model.train(), inputs).float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_nonzero_b_init_keeps_the_base_at_init_and_engages_the_intermediate_steps(kind):
    """lora_b_std > 0: B starts away from zero, the final step's LoRA behind a zero gain. The wrapped model is the
    base; the intermediate steps already move the state; the gain gets a gradient and is saved and loaded."""
    base = make_base(kind)
    inputs = make_inputs(kind)
    config = RecursionConfig(layers=(0, 2), experts=3, steps=3, rank=4, lora_b_std=0.3)
    model = apply_recursion(copy.deepcopy(base), config)
    zero_b = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(0, 2), experts=3, steps=3, rank=4))
    mods = processors(model)
    assert all(m.final_gain is not None and m.final_gain.item() == 0 and m.lora.lora_b.abs().min() > 0 for m in mods)
    assert all(m.final_gain is None for m in processors(zero_b))
    states, zero_states = [], []
    processors(model)[0].recorder = lambda step, idx, state: states.append(state)
    processors(zero_b)[0].recorder = lambda step, idx, state: zero_states.append(state)
    with torch.no_grad():
        want = run(base, inputs)
        torch.testing.assert_close(run(model, inputs), want, rtol=0, atol=1e-5)
        run(zero_b, inputs)
    # the intermediate steps move the state further than with B = 0 (where only context tokens move it)
    change = [(b - a).norm() / b.norm() for a, b in zip(states, states[1:])]
    zero_change = [(b - a).norm() / b.norm() for a, b in zip(zero_states, zero_states[1:])]
    assert all(c > z + 0.01 for c, z in zip(change, zero_change)), (change, zero_change)

    model.train()
    run(model, make_inputs(kind, n=4)).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith("final_gain")} and all(m.final_gain.grad.abs() > 0 for m in mods)
    with torch.no_grad():
        for m in mods:
            m.final_gain.fill_(0.7)
        moved = run(model, inputs)
    assert not torch.allclose(moved, want, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_nonzero_b_init_round_trips(kind, tmp_path):
    base = make_base(kind)
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(1,), experts=2, steps=2, rank=4,
                                                                 lora_b_std=0.2))
    with torch.no_grad():
        for m in processors(model):
            m.final_gain.fill_(0.5)
    inputs = make_inputs(kind)
    with torch.no_grad():
        want = run(model, inputs)
    save_recursion(model, tmp_path)
    loaded = load_recursion(copy.deepcopy(base), tmp_path)
    assert recursion_config(loaded).lora_b_std == 0.2
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), want)
