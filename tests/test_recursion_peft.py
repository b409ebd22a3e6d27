"""export_peft (peft / diffusers load an exported expert) and the peft-built baselines (same function)."""

import copy
import json

import pytest
import torch

from thinking_pixel import RecursionConfig, ThinkingPixelDiT, apply_recursion
from thinking_pixel.recursion.diffusers import _processors
from thinking_pixel.recursion.peft import add_peft_experts, add_peft_lora, copy_experts_to_peft, export_peft

from diffusers_helpers import make_base, make_inputs, perturb, run  # noqa: E402  (tests/ is on sys.path)

peft = pytest.importorskip("peft")


def recursion_modules(model):
    if isinstance(model, ThinkingPixelDiT):
        return [attn for _, attn in model.recursive_attentions()]
    return list(_processors(model).values())


def force_gate(model, expert):
    """Route every token to ``expert`` (eval mode: no noise)."""
    with torch.no_grad():
        for mod in recursion_modules(model):
            for p in mod.gate.parameters():
                p.zero_()
            mod.gate.token_proj.bias[expert] = 5.0
    return model.eval()


@pytest.mark.parametrize("b_std", [0.0, 0.2], ids=["b_zero", "b_nonzero"])
@pytest.mark.parametrize("kind", ["sd3", "sd3_qk_norm", "dit_diffusers", "dit"])
def test_an_exported_expert_loaded_by_peft_is_the_recursion_with_t1_and_that_expert(kind, b_std, tmp_path):
    base = make_base(kind)
    inputs = make_inputs(kind)
    cfg = RecursionConfig(layers=(0, 2), experts=3, steps=1, rank=4, lora_alpha=8, norm_first_step=False,
                          lora_b_std=b_std)
    model = apply_recursion(copy.deepcopy(base), cfg)
    for mod in recursion_modules(model):
        perturb(mod.lora, std=0.3)
        if b_std:
            with torch.no_grad():
                mod.final_gain.fill_(0.5)  # T = 1: the only step adds the base, so its LoRA carries the gain
    outputs = []
    for expert in (2, 0):
        force_gate(model, expert)
        with torch.no_grad():
            want = run(model, inputs)
        outputs.append(want)
        export_peft(model, tmp_path / str(expert), expert=expert)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / str(expert)).eval()
        with torch.no_grad():
            torch.testing.assert_close(run(loaded, inputs), want, rtol=0, atol=1e-5)
        if kind.startswith("sd3"):  # diffusers' own loader, from either file
            for weight_name, prefix in (("pytorch_lora_weights.safetensors", "transformer"),
                                        ("adapter_model.safetensors", "base_model.model")):
                native = copy.deepcopy(base)
                native.load_lora_adapter(tmp_path / str(expert), weight_name=weight_name, prefix=prefix)
                with torch.no_grad():
                    torch.testing.assert_close(run(native, inputs), want, rtol=0, atol=1e-5)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the experts differ, so the check above can fail
    config = json.loads((tmp_path / "0" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    with pytest.raises(ValueError, match="expert must be an int in \\[0, 3\\)"):
        export_peft(model, tmp_path / "bad", expert=3)
    with pytest.warns(UserWarning, match="steps=1 and norm_first_step=False"):
        export_peft(apply_recursion(copy.deepcopy(base), RecursionConfig(layers=(1,), rank=4)), tmp_path / "w")
    if kind != "dit":
        with pytest.raises(ValueError, match="lora_b_std must be 0"):
            add_peft_experts(copy.deepcopy(base), RecursionConfig(layers=(1,), rank=4, lora_b_std=0.1))


@pytest.mark.parametrize("kind", ["sd3", "dit_diffusers"])
def test_peft_expert_baselines_compute_the_recursion(kind):
    """add_peft_experts (dense mix and masked loop) with copied weights: the same outputs and gradients."""
    base = make_base(kind)
    inputs = make_inputs(kind)
    cfg = RecursionConfig(layers=(0, 2), experts=3, steps=3, rank=4, lora_alpha=2)
    model = apply_recursion(copy.deepcopy(base), cfg).train()
    for mod in recursion_modules(model):
        perturb(mod.lora, std=0.3), perturb(mod.gate, std=0.3)
    torch.manual_seed(5)  # the same Gumbel draws in the same order
    want = run(model, inputs)
    want_grads = torch.autograd.grad(want.square().sum(), [p for p in model.parameters() if p.requires_grad])
    for mode in ("dense", "masked"):
        baseline = copy_experts_to_peft(model, add_peft_experts(copy.deepcopy(base), cfg, mode=mode)).train()
        trainable = [n for n, p in baseline.named_parameters() if p.requires_grad]
        assert len(trainable) == 2 * (3 * 3 * 2 + 4)  # 2 layers: 3 experts x q/k/v x (A, B); the gate's 4
        torch.manual_seed(5)
        got = run(baseline, inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        grads = dict(zip(trainable, torch.autograd.grad(got.square().sum(),
                                                        [p for p in baseline.parameters() if p.requires_grad])))
        for name, g in zip([n for n, p in model.named_parameters() if p.requires_grad], want_grads):
            if ".gate." in name:
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5)
            else:  # processor.lora.lora_{a,b} (E, S, ...) <-> {to_q,to_k,to_v}.lora_{A,B}.expert_e.weight
                attn, part = name.split(".processor.lora.")
                for e in range(3):
                    for s, proj in enumerate(("to_q", "to_k", "to_v")):
                        peft_name = f"{attn}.{proj}.lora_{part[-1].upper()}.expert_{e}.weight"
                        torch.testing.assert_close(grads[peft_name], g[e, s], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        add_peft_experts(copy.deepcopy(base), cfg, mode="sparse")


def test_add_peft_lora_is_the_plain_lora_baseline():
    base = make_base("sd3")
    model = add_peft_lora(copy.deepcopy(base), layers=(1,), rank=4)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"transformer_blocks.1.attn.{proj}.lora_{ab}.default.weight"
                               for proj in ("to_q", "to_k", "to_v") for ab in "AB")
    with torch.no_grad():  # B starts at zero: the base's function
        torch.testing.assert_close(run(model, make_inputs("sd3")), run(base, make_inputs("sd3")))


def test_peft_expert_baselines_follow_the_halting_of_the_recursion():
    """With per-token halting at inference (refine(active=...)), the peft baselines still compute the recursion."""
    base = make_base("sd3")
    inputs = make_inputs("sd3")
    cfg = RecursionConfig(layers=(0, 2), experts=3, steps=3, rank=4, lora_alpha=2, halting="delta", halt_threshold=0.5)
    model = apply_recursion(copy.deepcopy(base), cfg).eval()
    for mod in recursion_modules(model):
        perturb(mod.lora, std=0.3), perturb(mod.gate, std=0.3)
    with torch.no_grad():
        want = run(model, inputs)
        for mode in ("dense", "masked"):
            baseline = copy_experts_to_peft(model, add_peft_experts(copy.deepcopy(base), cfg, mode=mode)).eval()
            torch.testing.assert_close(run(baseline, inputs), want, rtol=1e-5, atol=1e-5)
