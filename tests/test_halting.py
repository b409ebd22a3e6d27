"""Per-token halting of the recursion (thinking_pixel.recursion.layers): the rules, their limits, the step count,
the learned head's training term, and the settings in RecursionConfig / checkpoints."""

import pytest
import torch

from thinking_pixel.models import dit_config
from thinking_pixel.recursion import RecursionConfig, ThinkingPixelDiT
from thinking_pixel.models.attention import Attention
from thinking_pixel.recursion.layers import RecursiveAttention

from model_helpers import inputs, randomize

DIM, HEADS = 32, 2


def _block(steps, seed=0, **halting):
    torch.manual_seed(seed)
    attn = RecursiveAttention.from_attention(Attention(DIM, HEADS), DIM, experts=2, steps=steps, rank=4, **halting)
    with torch.no_grad():
        attn.lora.lora_b.normal_(std=0.3)  # experts that change the output
    return attn.eval()


def _run(attn, x, cond, steps=None, **rule):
    if rule:
        attn.halting.set_rule(**rule)
    saved, attn.steps = attn.steps, steps or attn.steps
    attn.halting.reset_count()
    try:
        out = attn(x, cond)
        taken = attn.halting.steps_taken
        if attn.halting.mode == "none":  # every token takes T steps: the forward counts nothing
            assert not taken.any()
            mean = attn.steps
        else:
            mean = (taken[0] / taken[1]).item()
    finally:
        attn.steps = saved
    return out, mean


def test_delta_rule_limits():
    attn = _block(5)
    x, cond = torch.randn(3, 6, DIM), torch.randn(3, DIM)
    full, steps = _run(attn, x, cond, mode="none")
    assert steps == 5
    never, steps = _run(attn, x, cond, mode="delta", threshold=1e-12)  # no state ever moves that little
    assert torch.equal(never, full) and steps == 5
    at_once, steps = _run(attn, x, cond, mode="delta", threshold=1e9)  # every token halts after step 1
    two_steps, _ = _run(attn, x, cond, steps=2, mode="none")
    assert torch.allclose(at_once, two_steps, atol=1e-6) and steps == 2


def test_learned_rule_limits_and_per_token_state():
    attn = _block(4, halting="learned")
    x, cond = torch.randn(2, 5, DIM), torch.randn(2, DIM)
    full, _ = _run(attn, x, cond, mode="none")
    never, steps = _run(attn, x, cond, mode="learned", threshold=1.0)  # cumulative P(halt) < 1 at prior 0.5
    assert torch.equal(never, full) and steps == 4
    with torch.no_grad():
        attn.halting.head.bias.fill_(20.0)  # lambda ~ 1: every token halts before step 1
    at_once, steps = _run(attn, x, cond, mode="learned", threshold=0.5)
    one_step, _ = _run(attn, x, cond, steps=1, mode="none")
    assert torch.allclose(at_once, one_step, atol=1e-6) and steps == 1

    # some tokens halt, others do not: halted tokens show expert -1 and keep their state
    with torch.no_grad():
        attn.halting.head.bias.zero_()
        attn.halting.head.weight.normal_(std=2.0)
    record = []
    attn.recorder = lambda step, idx, state: record.append((idx.clone(), state.clone()))
    _, steps = _run(attn, x, cond, mode="learned", threshold=0.6)
    attn.recorder = None
    assert 1 < steps < 4 and len(record) == 4  # 3 intermediate steps and the final one
    assert (record[0][0] == -1).any() and (record[0][0] != -1).any()
    for (idx, state), (next_idx, next_state) in zip(record, record[1:]):
        halted = idx == -1
        assert (next_idx[halted] == -1).all() or next_idx is record[-1][0]  # halting is final
        assert torch.equal(next_state[halted], state[halted])  # a halted token keeps its state
    assert (record[-1][0] >= 0).all()  # every token is read out by the final step


def test_pondering_trains_the_head_from_the_prior():
    attn = _block(3, halting="learned", halt_prior=0.3).train()
    x, cond = torch.randn(2, 4, DIM), torch.randn(2, DIM)
    out = attn(x, cond)
    assert out.shape == (2, 4, DIM)
    assert abs(attn.halting.loss.item()) < 1e-6  # the head starts at the geometric prior: KL = 0
    out.square().mean().backward()
    assert attn.halting.head.weight.grad.abs().sum() > 0  # the expected output trains the head
    # a head that halts more than the prior pays a KL
    with torch.no_grad():
        attn.halting.head.bias.fill_(3.0)
    attn(x, cond)
    assert attn.halting.loss.item() > 0


def test_recursion_config_halting_settings_and_checkpoint(tmp_path):
    assert RecursionConfig(halting="learned").halt_head is True
    assert RecursionConfig(halting="delta").halt_head is False
    for bad, match in ((dict(halting="sometimes"), "halting must be"), (dict(halting="learned", halt_head=False),
                       "halting head"), (dict(halting="learned", halt_threshold=2.0), "halt_threshold"),
                       (dict(halt_prior=1.0), "halt_prior"), (dict(halt_kl_weight=-1.0), "halt_kl_weight")):
        with pytest.raises(ValueError, match=match):
            RecursionConfig(**bad)
    cfg = dit_config("DiT-N/4", input_size=8, patch_size=2, depth=2, hidden_size=32, num_heads=2, num_classes=3)
    model = randomize(ThinkingPixelDiT(cfg, RecursionConfig(steps=3, rank=4, halting="learned"))).eval()
    assert "blocks.1.attn.halting.head.weight" in dict(model.expert_named_parameters())
    x, t, y = inputs(cfg)
    model.set_halting("delta", 0.2)
    assert model.recursion.halting == "delta" and model.recursion.halt_threshold == 0.2
    model.reset_recursion_stats()
    out = model(x, t, y)
    assert 2 <= model.mean_recursion_steps() <= 3
    loaded = ThinkingPixelDiT.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.recursion == model.recursion and torch.equal(loaded(x, t, y), out)
    assert loaded.mean_recursion_steps() == model.mean_recursion_steps()  # its counters start at zero
    plain = ThinkingPixelDiT(cfg, RecursionConfig(steps=3, rank=4))
    with pytest.raises(ValueError, match="halting head"):
        plain.set_halting("learned")
    assert plain.mean_recursion_steps() == 3  # no halting rule: every token takes T steps
    model.reset_recursion_stats()
    assert model.mean_recursion_steps() is None  # a halting rule and no forward since the reset
