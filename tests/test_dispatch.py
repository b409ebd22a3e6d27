"""Which backend runs where: devices without Triton take the grouped composed-torch path, never the reference."""

import warnings

import pytest
import torch

import tp_kernels
from tp_kernels import _dispatch


@pytest.mark.parametrize("device, triton, expected", [
    ("cpu", True, "cpu"),
    ("cuda", True, "triton"),
    ("cuda", False, "torch"),  # CUDA without an importable Triton
    ("mps", True, "torch"),
    ("xpu", False, "torch"),
])
def test_auto_backend_by_device(monkeypatch, device, triton, expected):
    monkeypatch.setattr(_dispatch, "triton_available", lambda: triton)
    monkeypatch.delenv("TP_KERNELS_BACKEND", raising=False)
    assert tp_kernels.resolve_backend(torch.device(device)) == expected


def test_torch_backend_can_be_forced_anywhere():
    with tp_kernels.use_backend("torch"):
        assert tp_kernels.resolve_backend(torch.device("cpu")) == "torch"
        assert tp_kernels.resolve_backend(torch.device("mps")) == "torch"


def test_torch_backend_is_the_grouped_path(monkeypatch):
    """Backend "torch" never gathers per-token weights (the reference's (N, S, R, D) tensors): trap the gather."""
    from tp_kernels.gate import op as gate_op
    from tp_kernels.refine import op as refine_op
    from tp_kernels.routed_lora import op as lora_op

    def trap(*args, **kwargs):
        raise AssertionError("the reference ran")

    for module in (lora_op, gate_op, refine_op):
        monkeypatch.setattr(module._Reference, "forward", trap)
        if hasattr(module._Reference, "backward"):
            monkeypatch.setattr(module._Reference, "backward", trap)
    x = torch.randn(10, 8, requires_grad=True)
    a = torch.randn(3, 2, 4, 8, requires_grad=True)
    b = torch.randn(3, 2, 6, 4, requires_grad=True)
    with tp_kernels.use_backend("torch"):
        y = tp_kernels.routed_lora(x, torch.randint(0, 3, (10,)), a, b)
        y.sum().backward()
        qkv, _, w = tp_kernels.refine_step(x, a, b, token_weight=torch.randn(3, 8))
        (qkv.sum() + w.sum()).backward()
        tp_kernels.gate_top1(torch.randn(10, 3))
    with tp_kernels.use_backend("reference"), pytest.raises(AssertionError, match="the reference ran"):
        tp_kernels.routed_lora(x, torch.randint(0, 3, (10,)), a, b)


@pytest.mark.parametrize("version, untested", [
    ("3.2.0", True), ("3.3.0", False), ("3.6.0", False), ("3.8.1", False), ("3.9.0", True), ("4.0.0+git1a2b3c4", True),
])
def test_untested_triton_warns_once_on_first_use(monkeypatch, version, untested):
    """The Triton backend's first use warns, once, when the Triton is outside the tested range (mocked here)."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    _dispatch.check_triton_version.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught, tp_kernels.use_backend("triton"):
            warnings.simplefilter("always")
            for _ in range(2):
                module = _dispatch.implementation(torch.device("cuda"), "tp_kernels.gate", reference=None,
                                                  torch_ops=None, cpu=None)
    finally:
        _dispatch.check_triton_version.cache_clear()
    assert module.__name__ == "tp_kernels.gate.triton"
    messages = [str(w.message) for w in caught if "tp_kernels" in str(w.message)]
    if untested:
        assert len(messages) == 1, messages
        assert f"Triton {version} is outside the tested range 3.3 to 3.8" in messages[0]
        assert "TP_KERNELS_BACKEND=torch" in messages[0] and "triton>=3.3,<3.9" in messages[0]
    else:
        assert messages == []
