"""benchmarks/flop_model.py against what autograd runs: the GEMM FLOPs of the fine-tuning benchmark's steps, counted
by torch.utils.flop_counter on small configs of the real diffusers models.

The FLOP model prices the recursion's added time at the base step's measured rate, so counting FLOPs the base does
not run (its frozen Q/K/V backward, stopped at the leaves the benchmark makes of their outputs) or leaving out FLOPs
the wrapped model does run (the Q/K/V dX of blocks whose input needs a gradient) skews every prediction. Only
GEMMs are compared: the model's elementwise terms (norms, activations, softmax) and attention are set to zero here,
since FlopCounterMode counts neither the elementwise ops nor torch's CPU flash attention, nor our custom ops
(the peft masked variant is used for the added FLOPs: it runs each token through its own expert, in torch GEMMs).
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks/ is not installed with the package: import it from the checkout
from benchmarks import flop_model  # noqa: E402
from benchmarks import test_finetune_diffusers as ft  # noqa: E402
from thinking_pixel import RecursionConfig  # noqa: E402

CASES = [
    ft.FinetuneCase("dit", "test", 2, 64, 3, 16, 2, (RecursionConfig(experts=3, steps=2, rank=16),), rounds=1),
    ft.FinetuneCase("sd3", "test", 2, 64, 3, 16, 2, (RecursionConfig(experts=3, steps=3, rank=16),), rounds=1,
                    ctx=12),
]


def _gemm_only(monkeypatch):
    zero = flop_model.Cost(0, 0)
    for name in ("elementwise", "layer_norm", "sdpa", "gate_top1"):
        monkeypatch.setattr(flop_model, name, lambda *a, **k: zero)
    real_linear = flop_model.linear
    monkeypatch.setattr(flop_model, "linear", lambda *a, **k: real_linear(*a, **{**k, "bias": False}))


def _counted(model, inputs, target):
    step = ft.make_step(model, inputs, target)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
def test_base_and_added_gemm_flops_match_what_autograd_runs(case, monkeypatch):
    torch.manual_seed(0)
    variants, _ = ft.build_variants(case, torch.device("cpu"))
    inputs, target = ft.make_inputs(case, torch.device("cpu"))
    _gemm_only(monkeypatch)
    base_parts, added = ft.flop_parts(case)
    tag = f"M={case.recursions[0].experts} T={case.recursions[0].steps}"
    base = _counted(variants["base"], inputs, target)
    masked = _counted(variants[f"peft masked {tag}"], inputs, target)
    # within 1%: diffusers' DiT also reruns its timestep / label embedding MLPs in every block and for the final
    # layer (on the batch's rows: 0.2% here, less at real widths), which the model counts once
    assert flop_model.total(base_parts).flops == pytest.approx(base, rel=0.01)
    added_gemms = [(name, cost) for name, cost in added[(tag, "masked")] if name != "adamw"]
    assert flop_model.total(added_gemms).flops == pytest.approx(masked - base, rel=0.01)


def test_attention_flops_are_what_torch_counts_for_sdpa():
    """The model's attention GEMMs, forward and backward (trained or frozen), against torch.utils.flop_counter's
    formulas for scaled_dot_product_attention, whose backward recomputes the scores as flash attention does."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    batch, seq, kv_seq, heads, head_dim = 2, 40, 52, 3, 16
    q, kv = (batch, heads, seq, head_dim), (batch, heads, kv_seq, head_dim)
    softmax = 5 * batch * heads * seq * kv_seq  # the model's elementwise term, which torch does not count
    forward = flop_model.sdpa(batch, seq, heads * head_dim, heads, 4, kv_seq=kv_seq).flops - softmax
    assert forward == sdpa_flop_count(q, kv, kv)
    for name in ("attention", "joint attention"):
        for backward in (flop_model.trained_backward(name), flop_model.frozen_backward(name)):
            assert backward * forward == sdpa_backward_flop_count(q, q, kv, kv)
