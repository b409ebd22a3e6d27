"""RoutedLoRA, Gate and RecursiveAttention against plain-PyTorch restatements of their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from thinking_pixel.models import Attention
from thinking_pixel.recursion import Gate, RecursiveAttention, RoutedLoRA

D, H, N, T = 16, 2, 2, 6


def _manual_lora(x, idx, lora, gate=None):
    """Per token: gate * scale * [B_{e,s} A_{e,s} x for s in slices], concatenated."""
    a, b = lora.lora_a[idx], lora.lora_b[idx]  # (..., S, R, D_in), (..., S, D_out, R)
    y = torch.einsum("...sor,...srd,...d->...so", b, a, x) * lora.scale  # (..., S, D_out)
    if gate is not None:
        y = y * gate[..., None, None]
    return y.flatten(-2)


def _manual_attention(qkv, num_heads, context_kv=None):
    q, k, v = (z.unflatten(-1, (num_heads, -1)).transpose(1, 2) for z in qkv.chunk(3, -1))  # (N, H, T, Dh)
    if context_kv is not None:
        k, v = torch.cat([k, context_kv[0]], 2), torch.cat([v, context_kv[1]], 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ v).transpose(1, 2).flatten(2)  # (N, T, D)


def _randomize_(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


# --- RoutedLoRA ------------------------------------------------------------------------------------------------

def test_routed_lora_init():
    lora = RoutedLoRA(3, D, 2 * D, rank=4)
    assert lora.lora_a.shape == (3, 3, 4, D) and lora.lora_b.shape == (3, 3, 2 * D, 4)
    assert torch.count_nonzero(lora.lora_b) == 0
    bound = 1 / math.sqrt(D)  # kaiming_uniform(a=sqrt(5)) on a (R, D_in) matrix, as peft's lora_A
    assert lora.lora_a.abs().max() <= bound and lora.lora_a.abs().max() > 0.5 * bound
    x = torch.randn(N, T, D)
    assert torch.count_nonzero(lora(x, torch.zeros(N, T, dtype=torch.long))) == 0
    assert RoutedLoRA(1, D, D, rank=4).scale == 1.0 and RoutedLoRA(1, D, D, rank=4, alpha=8).scale == 2.0


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_routed_lora_matches_manual(alpha):
    lora = _randomize_(RoutedLoRA(3, D, D, rank=4, alpha=alpha)).double()
    x = torch.randn(N, T, D, dtype=torch.float64)
    idx = torch.randint(0, 3, (N, T))
    gate = torch.rand(N, T, dtype=torch.float64)
    torch.testing.assert_close(lora(x, idx), _manual_lora(x, idx, lora))
    torch.testing.assert_close(lora(x, idx, gate=gate), _manual_lora(x, idx, lora, gate))


def test_routed_lora_casts_weights_to_activation_dtype():
    lora = _randomize_(RoutedLoRA(2, D, D, rank=4))
    x = torch.randn(N, T, D).bfloat16()
    y = lora(x, torch.randint(0, 2, (N, T)), gate=torch.ones(N, T))
    assert y.dtype == torch.bfloat16


def test_routed_lora_rejects_bad_args():
    with pytest.raises(ValueError, match="rank"):
        RoutedLoRA(2, D, D, rank=0)
    with pytest.raises(ValueError, match="alpha"):
        RoutedLoRA(2, D, D, rank=4, alpha=-1)


# --- Gate ------------------------------------------------------------------------------------------------------

def test_gate_eval_is_argmax_of_logits_and_deterministic():
    gate = _randomize_(Gate(D, 8, num_experts=4)).eval()
    h, cond = torch.randn(N, T, D), torch.randn(N, 8)
    idx, weight = gate(h, cond)
    logits = h @ gate.token_proj.weight.T + gate.token_proj.bias + (F.silu(cond) @ gate.cond_proj.weight.T
                                                                     + gate.cond_proj.bias)[:, None]
    assert idx.shape == (N, T) and torch.equal(idx, logits.argmax(-1))
    assert torch.equal(weight, torch.ones(N, T))
    assert torch.equal(gate(h, cond)[0], idx)


def test_gate_noise_in_training_only_unless_asked():
    h, cond = torch.randn(4, 64, D), torch.randn(4, D)
    gate = Gate(D, D, num_experts=5)  # small init: logits near 0, so Gumbel noise decides
    gate.train()
    assert not torch.equal(gate(h, cond)[0], gate(h, cond)[0])
    gate.eval()
    assert torch.equal(gate(h, cond)[0], gate(h, cond)[0])
    gate.noise_at_eval = True
    assert not torch.equal(gate(h, cond)[0], gate(h, cond)[0])


def test_gate_straight_through_gradient():
    gate = _randomize_(Gate(D, D, num_experts=3, tau=5.0)).train()
    h = torch.randn(N, T, D)
    _, weight = gate(h, torch.randn(N, D))
    (weight * torch.randn(N, T)).sum().backward()
    assert gate.token_proj.weight.grad.abs().sum() > 0 and gate.cond_proj.weight.grad.abs().sum() > 0


def test_gate_inputs_ablation_and_errors():
    cond_only = _randomize_(Gate(D, D, num_experts=3, use_tokens=False)).eval()
    idx, _ = cond_only(torch.randn(N, T, D), torch.randn(N, D))
    assert cond_only.token_proj is None and (idx == idx[:, :1]).all()  # one expert per sample
    tokens_only = Gate(D, D, num_experts=3, use_cond=False)
    assert tokens_only.cond_proj is None and tokens_only(torch.randn(N, T, D))[0].shape == (N, T)
    with pytest.raises(ValueError, match="pass cond"):
        Gate(D, D, num_experts=3)(torch.randn(N, T, D))
    with pytest.raises(ValueError, match="at least one input"):
        Gate(D, D, num_experts=3, use_tokens=False, use_cond=False)
    with pytest.raises(ValueError, match="tau"):
        Gate(D, D, num_experts=3, tau=0)


# --- RecursiveAttention ----------------------------------------------------------------------------------------

def _recursive(steps, experts, **kwargs):
    base = _randomize_(Attention(D, H)).double()
    attn = RecursiveAttention.from_attention(base, experts=experts, steps=steps, rank=4, **kwargs).double()
    return base, attn


def _manual_recursion(attn, x, cond, context=None, final_lora_gain=1.0):
    """The method's pseudocode, written out with dense ops (the last step's LoRA times ``final_lora_gain``)."""
    context_kv = None
    if context is not None:
        _, k_c, v_c = F.linear(context, attn.qkv.weight, attn.qkv.bias).chunk(3, -1)
        context_kv = [z.unflatten(-1, (H, -1)).transpose(1, 2) for z in (k_c, v_c)]
    a = x
    for step in range(1, attn.steps + 1):
        h = F.layer_norm(a, (D,), eps=1e-6) if attn.norm_first_step or step > 1 else a
        idx = attn.gate.logits(h, cond).argmax(-1)  # eval: no noise
        qkv = _manual_lora(h, idx, attn.lora)
        if step == attn.steps:
            qkv = final_lora_gain * qkv + F.linear(x, attn.qkv.weight, attn.qkv.bias)
        out = _manual_attention(qkv, H, context_kv)
        a = out + x
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("experts", [1, 3])
def test_recursive_attention_zero_b_is_the_base_attention(steps, experts):
    base, attn = _recursive(steps, experts)
    x, cond = torch.randn(N, T, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    for mode in (True, False):
        attn.train(mode)
        torch.testing.assert_close(attn(x, cond), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm_first_step", [True, False])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_recursive_attention_matches_the_method(steps, norm_first_step):
    _, attn = _recursive(steps, experts=3, norm_first_step=norm_first_step)
    _randomize_(attn.lora)
    _randomize_(attn.gate)
    attn.eval()
    x, cond = torch.randn(N, T, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x, cond), _manual_recursion(attn, x, cond))
    context = torch.randn(N, 5, D, dtype=torch.float64)
    out_ctx = attn(x, cond, context=context)
    torch.testing.assert_close(out_ctx, _manual_recursion(attn, x, cond, context))
    assert out_ctx.shape == (N, T, D) and not torch.allclose(out_ctx, attn(x, cond))


def test_recursive_attention_shares_base_modules_and_checks_context():
    base, attn = _recursive(2, 2)
    assert attn.qkv is base.qkv and attn.proj is base.proj
    with pytest.raises(ValueError, match="context must have shape"):
        attn(torch.randn(N, T, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64),
             context=torch.randn(N, 5, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        RecursiveAttention.from_attention(base, steps=0)


def test_recursive_attention_recorder_sees_each_step():
    _, attn = _recursive(3, 2)
    attn.eval()
    seen = []
    attn.recorder = lambda step, idx, state: seen.append((step, idx.shape, state.shape))
    attn(torch.randn(N, T, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64))
    assert seen == [(s, (N, T), (N, T, D)) for s in (1, 2, 3)]


def test_mixed_precision_casts_the_experts_once_per_call_not_once_per_step():
    """bf16 tokens, fp32 recursion weights, T = 4: lora_a, lora_b and the gate's token weight are each cast to bf16
    once per forward, not once per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    attn = RecursiveAttention.from_attention(Attention(16, 2), experts=3, steps=4, rank=4).eval()
    shapes = {tuple(attn.lora.lora_a.shape), tuple(attn.lora.lora_b.shape), tuple(attn.gate.token_proj.weight.shape)}

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                    and tuple(args[0].shape) in shapes):
                Casts.count += 1
            return func(*args, **(kwargs or {}))

    attn.to(torch.bfloat16)
    attn.lora.float()  # the recursion's own weights in full precision (as under diffusers' layerwise casting)
    attn.gate.float()
    with torch.no_grad(), Casts():
        attn(torch.randn(2, 6, 16, dtype=torch.bfloat16), torch.randn(2, 16, dtype=torch.bfloat16))
    assert Casts.count == 3


def test_nonzero_b_init_is_the_base_at_init_and_matches_the_method_with_its_gain():
    """lora_b_std > 0: B ~ N(0, std^2); the final step's LoRA is scaled by final_gain (zero at init)."""
    torch.manual_seed(0)
    base = Attention(D, H).double()
    attn = RecursiveAttention.from_attention(base, experts=3, steps=3, rank=4, lora_b_std=0.5).double().eval()
    assert attn.final_gain.item() == 0 and attn.lora.lora_b.std() > 0.3
    x, cond = torch.randn(N, T, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x, cond), base(x), rtol=0, atol=1e-12)
    with torch.no_grad():
        attn.final_gain.fill_(0.6)
    manual = RecursiveAttention.from_attention(base, experts=3, steps=3, rank=4).double().eval()
    manual.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "final_gain"})
    want = _manual_recursion(manual, x, cond, final_lora_gain=0.6)
    torch.testing.assert_close(attn(x, cond), want)
    assert ("final_gain", attn.final_gain) in attn.recursion_parameters()
    with pytest.raises(ValueError, match="b_std must be a number >= 0"):
        RecursiveAttention.from_attention(base, lora_b_std=-1.0)
