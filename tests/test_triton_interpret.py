"""Run tests/interpret in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", TP_KERNELS_BACKEND="triton")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/interpret", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " passed" in out, f"interpreter suite failed (exit {proc.returncode}):\n{out}"
