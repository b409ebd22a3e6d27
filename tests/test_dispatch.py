"""Which backend runs where: devices without Triton take the grouped composed-torch path, never the reference."""

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tp_kernels
from tp_kernels import _dispatch
from tp_kernels.gate_top1 import reference as gate_reference
from tp_kernels.refine_step import reference as refine_reference
from tp_kernels.routed_lora import reference as lora_reference

OPS = ("routed_lora", "gate_top1", "layer_norm", "refine_step", "joint_attention")
OP_FILES = {"__init__.py", "functional.py", "op.py", "reference.py", "torch.py", "cpu.py", "triton.py"}


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
    def trap(*args, **kwargs):
        raise AssertionError("the reference ran")

    for module in (lora_reference, gate_reference, refine_reference):
        monkeypatch.setattr(module, "forward", trap)
        if hasattr(module, "backward"):
            monkeypatch.setattr(module, "backward", trap)
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
                module = _dispatch.implementation(torch.device("cuda"), "tp_kernels.gate_top1", reference=None,
                                                  torch_ops=None, cpu=None)
    finally:
        _dispatch.check_triton_version.cache_clear()
    assert module.__name__ == "tp_kernels.gate_top1.triton"
    messages = [str(w.message) for w in caught if "tp_kernels" in str(w.message)]
    if untested:
        assert len(messages) == 1, messages
        assert f"Triton {version} is outside the tested range 3.3 to 3.8" in messages[0]
        assert "TP_KERNELS_BACKEND=torch" in messages[0] and "triton>=3.3,<3.9" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_module_per_backend(op):
    """Each op's folder is named after it and holds the same files: its public wrapper, its op registration, and a
    module per backend of _dispatch.BACKENDS (one without an implementation of its own names the one it reuses)."""
    folder = Path(tp_kernels.__file__).parent / op
    assert OP_FILES <= {p.name for p in folder.glob("*.py")}
    assert {name for name in _dispatch.BACKENDS if name != "auto"} <= {p.stem for p in folder.glob("*.py")}
    assert getattr(tp_kernels, op).__module__ == f"tp_kernels.{op}.functional"


def test_backend_modules_named_torch_leave_torch_alone():
    """A backend module named torch.py inside a package: every module of the package still sees the real torch
    (absolute imports), and only the package's own namespace holds the backend module under that name."""
    for op in OPS:
        for name in sorted(OP_FILES - {"__init__.py", "triton.py"}):  # triton.py imports triton
            importlib.import_module(f"tp_kernels.{op}.{name[:-3]}")
    for op in OPS:
        assert sys.modules[f"tp_kernels.{op}"].torch is sys.modules[f"tp_kernels.{op}.torch"]
    wrong = [name for name, module in sys.modules.items() if name.startswith("tp_kernels.")
             and not hasattr(module, "__path__") and vars(module).get("torch", torch) is not torch]
    assert wrong == []
