"""Inputs and comparisons shared by the kernel tests (tests/test_*.py and tests/interpret/; tests/ is on sys.path)."""

import torch

# Allowed max |error| / max(1, max |expected|) against a float64 reference, by the dtype computed in.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}


def make_inputs(n, d_in, d_out, rank, n_exp, n_slice=None, dtype=torch.float32, gate=True, idx=None, seed=None):
    """routed_lora's inputs -> x (n, D_in), idx (n,), lora_a, lora_b, gate (n,) or None, in ``dtype`` (drawn in fp32).

    n_slice None: 3-D weights (E, R, D_in), (E, D_out, R); else stacked (E, S, R, D_in), (E, S, D_out, R).
    idx: the experts (default: uniform over [0, E)). seed: drawn from a generator with this seed, else from torch's
    global generator.
    """
    g = None if seed is None else torch.Generator().manual_seed(seed)
    s = 1 if n_slice is None else n_slice
    x = torch.randn(n, d_in, generator=g)
    a = torch.randn(n_exp, s, rank, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(n_exp, s, d_out, rank, generator=g) / rank ** 0.5
    if n_slice is None:
        a, b = a[:, 0], b[:, 0]
    if idx is None:
        idx = torch.randint(0, n_exp, (n,), generator=g)
    gt = torch.rand(n, generator=g) + 0.5 if gate else None
    return x.to(dtype), idx, a.to(dtype), b.to(dtype), None if gt is None else gt.to(dtype)


def assert_close(actual, expected, tol, name):
    """Same shape, and max |actual - expected| <= tol * max(1, max |expected|); ``tol`` a number or a dtype (TOL)."""
    tol = TOL[tol] if isinstance(tol, torch.dtype) else tol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    bound = tol * max(1.0, expected.double().abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (tol {tol})"
