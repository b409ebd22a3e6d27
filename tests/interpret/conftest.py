"""Tests of the Triton kernels on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported, so these run in
their own process (tests/test_triton_interpret.py starts it); collected in any
other process they are skipped.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def dot_tol():
    """What the interpreter can promise about a token's results when other tokens share its batch (rtol = atol).

    Interpreted, tl.dot is numpy's matmul on the tile, i.e. the BLAS library's sgemm, whose summation order for
    a row may depend on the row's place in the tile (OpenBLAS's Haswell kernels: up to ~1e-6 apart at these
    sizes; OPENBLAS_CORETYPE=Haswell shows it on an AVX-512 machine). So the products agree to this tolerance,
    far below what reading another token's row would give, and the dot-free results (routing, gate weight)
    bitwise. Bitwise batch invariance is checked on the CPU backends (tests/test_refine.py,
    tests/test_routed_lora.py) and for the compiled kernels by benchmarks/gpu_check.py on a GPU.
    """
    return 1e-5
