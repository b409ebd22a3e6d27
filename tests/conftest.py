import pytest
import torch

import tp_kernels


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "cpu", "cpu-torch"])
def backend(request, monkeypatch):
    """Every CPU backend: "cpu" runs the compiled extension when built, "cpu-torch" the composed-torch path
    (backend "torch", which devices without Triton take; the same modules as "cpu" without the extension)."""
    name = request.param
    if name == "cpu-torch":
        monkeypatch.setenv("TP_KERNELS_NO_EXT", "1")
        name = "torch"
    with tp_kernels.use_backend(name):
        yield request.param
