"""benchmarks/gpu_check.py without a GPU: its one-line refusal, and every part that does not need CUDA run on CPU
(correctness harness on the CPU backends, a broken kernel caught, timing and the report on a small shape)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks/ is not installed with the package: import it from the checkout
from benchmarks import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_one_line_and_nonzero_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--json", str(tmp_path / "g.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("backend", ["cpu"])
def test_correctness_harness_passes_on_cpu_backends(backend):
    with tp_kernels.use_backend(backend):
        results = gpu_check.check_correctness(torch.device("cpu"), quick=True)
    assert results and all(r["passed"] for r in results), results
    assert {r["case"].split()[0] for r in results} == {"routed_lora", "refine_step", "gate_top1"}


def test_correctness_harness_catches_a_wrong_gradient(monkeypatch):
    from tp_kernels.routed_lora import cpu as lora_cpu

    backward = lora_cpu.backward

    def off_by_a_bit(*args):
        dx, da, db, dg = backward(*args)
        return dx * 1.1, da, db, dg  # beyond even bf16's tolerance

    monkeypatch.setattr(lora_cpu, "backward", off_by_a_bit)
    with tp_kernels.use_backend("torch"):
        results = gpu_check.check_correctness(torch.device("cpu"), quick=True)
    failed = {r["case"] for r in results if not r["passed"]}
    assert any(c.startswith("routed_lora") for c in failed)


def test_all_cases_cover_every_precision_variant():
    cases = gpu_check.correctness_cases()
    variants = {(c.op, c.dtype, c.tf32) for c in cases}
    for op in ("routed_lora", "refine_step"):
        assert {(op, torch.bfloat16, False), (op, torch.float16, False), (op, torch.float32, False),
                (op, torch.float32, True)} <= variants
        assert any(c.op == op and c.collapsed and c.tokens > 2 * 512 for c in cases)  # several chunks
        assert any(c.op == op and c.rank >= 128 and c.strided for c in cases)


def test_speed_and_report_on_cpu(tmp_path, monkeypatch):
    from benchmarks import shapes

    monkeypatch.setattr(shapes, "LORA_QUICK", shapes.LORA_QUICK[:1])
    with tp_kernels.use_backend("torch"):
        speed = gpu_check.time_speed(torch.device("cpu"), quick=True, rounds=2)
    impls = {r["impl"] for r in speed}
    assert impls == set(gpu_check.speed_impls())
    ours = [r for r in speed if r["impl"] == "tp_kernels.routed_lora"]
    assert all(r["fwd"] > 0 and r["fwd+bwd"] > 0 for r in ours)
    # torch._grouped_mm is CUDA-only: recorded as unsupported, not a crash
    assert all(r.get("unsupported") for r in speed if r["impl"] == "torch._grouped_mm" and r["fwd"] is None)
    report = dict(device="cpu", torch=torch.__version__, triton="-", seconds=1.0, speed=speed,
                  correctness=[dict(case="c", dtype="float32", tf32=False, tolerance=1e-5, errors={"y": 1e-7},
                                    batch_invariant=True, passed=True, seconds=0.1)])
    section = gpu_check.markdown(report)
    json.dumps(report)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## A\n\ntext\n\n## B\n\nmore\n")
    gpu_check.update_markdown(str(md), section)
    gpu_check.update_markdown(str(md), section.replace("| c |", "| d |"))  # a rerun replaces its section
    text = md.read_text()
    assert text.count(gpu_check.SECTION) == 1 and "| d |" in text and "| c |" not in text
    assert text.startswith("# Benchmarks\n\n## A\n\ntext\n\n## B\n\nmore\n")
