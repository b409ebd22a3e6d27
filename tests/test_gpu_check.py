"""benchmarks/gpu_check.py without a GPU: its one-line refusal, every section run at tiny sizes on CPU (the
plumbing: builders, checks, timing, JSON, the BENCHMARKS.md section), and each check shown able to fail."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks/ is not installed with the package: import it from the checkout
from benchmarks import gpu_check, gpu_report  # noqa: E402
from benchmarks.gpu import noise, ops, recursion_check, train_step  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_one_line_and_nonzero_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "g.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "g.json").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of every section at tiny sizes on CPU (in this process, one thread: at these sizes threads only
    contend); the compiled cases take the compiled code path uncompiled."""
    out = tmp_path_factory.mktemp("gpu_check")
    md = out / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## A\n\ntext\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = gpu_check.main(["--device", "cpu", "--tiny", "--compile-backend", "none", "--out",
                                 str(out / "g.json"), "--update", str(md)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return json.loads((out / "g.json").read_text()), (out / "g.md").read_text(), md.read_text()


def test_json_records_versions_and_every_section(tiny_run):
    report, _, _ = tiny_run
    assert report["schema"] == gpu_check.SCHEMA and report["passed"] and report["failures"] == []
    assert set(gpu_check.SECTIONS) <= set(report) and report["skipped"] == []
    assert {"torch", "triton", "cuda_runtime", "driver", "cuda_driver_api", "gpu", "diffusers"} <= set(
        report["environment"])
    assert report["environment"]["torch"] == torch.__version__


def test_ops_at_every_expert_count_eager_and_compiled(tiny_run):
    rows = tiny_run[0]["ops"]
    assert all(r["passed"] for r in rows)
    for op in ("routed_lora", "refine_step", "gate_top1"):
        for compiled in (False, True):
            assert {r["experts"] for r in rows if r["op"] == op and r["compiled"] == compiled} == {2, 3, 5}
    assert all(r["batch_invariant"] for r in rows if r["op"] != "gate_top1" and not r["compiled"])


def test_recursion_end_to_end_both_models(tiny_run):
    rows = tiny_run[0]["recursion"]
    assert {(r["model"], r["experts"], r["compiled"]) for r in rows} == {
        (kind, m, c) for kind in recursion_check.KINDS for m in (2, 3, 5) for c in (False, True)}
    for r in rows:
        assert r["passed"] and r["noise_calls"] > 0 and r["max_error"] < r["tolerance"]
        assert any(k.endswith("lora_a") for k in r["errors"]) and "d input" in r["errors"]
    assert all(r["routing_flips"] == 0 for r in rows if not r["compiled"])


def test_speed_host_and_capture_rows(tiny_run):
    report = tiny_run[0]
    from benchmarks.gpu.op_speed import speed_impls

    assert {r["impl"] for r in report["speed"]} == set(speed_impls())
    ours = [r for r in report["speed"] if r["impl"] == "tp_kernels.routed_lora"]
    assert ours and all(r["fwd"] > 0 and r["fwd+bwd"] > 0 for r in ours)
    # torch._grouped_mm is CUDA-only: recorded as unsupported, not a crash
    assert all(r.get("unsupported") for r in report["speed"] if r["impl"] == "torch._grouped_mm" and r["fwd"] is None)
    assert len(report["host"]) == 5 and all(r["host_us"] > 0 and r["work_items"] > 0 for r in report["host"])
    assert [r["call"] for r in report["capture"]] == ["routed_lora fwd+bwd", "refine_step fwd+bwd",
                                                       "recursion block fwd+bwd (T = 3)"]
    assert all(r["passed"] and r["captured"] is False for r in report["capture"])  # no graphs on CPU


def test_train_steps_every_variant_same_function(tiny_run):
    cases = tiny_run[0]["train"]
    assert [c["case"] for c in cases] == [c.name for c in train_step.TINY]
    for case in cases:
        variants = {(r["variant"], r["compiled"]) for r in case["variants"]}
        assert variants == set(train_step._plan(compiled=True)), case
        for r in case["variants"]:
            assert "error" not in r and r["step_s"] > 0
            assert ("added_s" in r) == (r["variant"] != train_step.BASE)
            if r["variant"] != train_step.BASE:
                assert r["output_rel_l2_vs_apply_recursion"] < 0.02
        check = case["function_check"]
        assert check["passed"]
        # the check can tell: the recursion moves the output far beyond the tolerance the variants keep to
        assert check["max_rel_diff"][train_step.BASE] > 30 * check["tolerance"]


def test_markdown_section_and_update(tiny_run, tmp_path):
    report, section, updated = tiny_run
    assert section.startswith(gpu_report.SECTION) and "Every check passed." in section
    for heading in ("### Targets", "The ops against", "The recursion end to end", "routed_lora forward + backward",
                    "Host time", "CUDA-graph capture", "Training step: DiT tiny", "Training step: SD3 tiny"):
        assert heading in section
    assert updated.startswith("# Benchmarks\n\n## A\n\ntext\n") and updated.count(gpu_report.SECTION) == 1
    # gpu_report reruns from the JSON, replacing the section in place
    (tmp_path / "g.json").write_text(json.dumps(dict(report, command="rerun")))
    md = tmp_path / "B.md"
    md.write_text(updated)
    assert gpu_report.main([str(tmp_path / "g.json"), "--update", str(md)]) == 0
    text = md.read_text()
    assert text.count(gpu_report.SECTION) == 1 and "`rerun`" in text and "## A" in text


def test_targets_read_from_a_gpu_run():
    speed = [dict(shape="T=8192", dtype="bfloat16", impl=impl, **{"fwd+bwd": ms * 1e-3}) for impl, ms in (
        ("tp_kernels.routed_lora", 0.7), ("torch._grouped_mm", 0.9), ("unrouted cuBLAS LoRA (floor)", 0.5))]
    host = [dict(call="routed_lora forward (no grad)", host_us=70.0, work_items=4.0),
            dict(call="refine_step fwd+bwd", host_us=500.0, work_items=12.0)]
    variants = [dict(variant=v, compiled=False, added_s=a, peak_gib=m) for v, a, m in (
        ("apply_recursion", 0.01, 9.0), ("dense einsum", 0.03, 12.0))]
    report = dict(environment=dict(gpu="H200"), speed=speed, host=host,
                  train=[dict(case="DiT-XL/2", variants=variants)])
    got = {name: (value, met) for name, value, met in gpu_report.targets(report)}
    assert got == {
        "routed_lora fwd+bwd T=8192: <= 1.5x the unrouted floor": ("1.40x", True),
        "routed_lora fwd+bwd T=8192: faster than torch._grouped_mm": ("0.70 vs 0.90 ms", True),
        "routed_lora forward (no grad): host time <= 80 µs": ("70 µs", True),
        "routed_lora forward (no grad): device work items <= 3": ("4", False),
        "refine_step fwd+bwd: host time <= 400 µs": ("500 µs", False),
        "refine_step fwd+bwd: device work items <= 12": ("12", True),
        "DiT-XL/2 eager: added time <= 0.5x the dense processor's": ("0.33x", True),
        "DiT-XL/2 eager: peak memory <= the dense processor's": ("9.0 vs 12.0 GiB", True)}


def _grad_times(factor):
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * factor

    return Scale.apply


def test_ops_check_catches_a_wrong_gradient(monkeypatch):
    routed_lora, wrong = tp_kernels.routed_lora, _grad_times(1.1)  # beyond even bf16's tolerance
    monkeypatch.setattr(tp_kernels, "routed_lora", lambda x, *a, **k: routed_lora(wrong(x), *a, **k))
    results = ops.check_correctness(CPU, quick=True, compiled=False)
    assert {r["case"] for r in results if not r["passed"]} == {r["case"] for r in results
                                                                if r["op"] == "routed_lora"}


def test_recursion_check_catches_a_wrong_state_gradient(monkeypatch):
    """What a miscompiled refine_step backward did on Triton 3.6: d state off, everything else right."""
    refine_step, wrong = tp_kernels.refine_step, _grad_times(1.5)
    monkeypatch.setattr(tp_kernels, "refine_step", lambda state, *a, **k: refine_step(
        wrong(state) if state.dtype == torch.float32 else state, *a, **k))  # the "device" copy runs fp32
    row = recursion_check.run_case(recursion_check.RecursionCase(recursion_check.KINDS[1], 3), CPU,
                                   recursion_check.TINY, "none")
    assert not row["passed"] and row["max_error"] > 1e-2


def test_function_check_catches_a_wrong_variant(monkeypatch):
    from benchmarks.gpu.processors import DenseEinsumProcessor

    experts = DenseEinsumProcessor.experts
    monkeypatch.setattr(DenseEinsumProcessor, "experts", lambda self, h, idx, w: experts(self, h, idx, w) * 1.01)
    case = train_step.TINY[0]
    with noise.fixed_noise():
        state = train_step.expert_state(case, CPU)
        outputs = {name: train_step.check_forward(train_step.build_variant(case, CPU, name, state), case, CPU)
                   for name in (train_step.OURS, "dense einsum", "masked loop")}
    check = train_step.function_check(outputs)
    assert not check["passed"] and check["max_rel_diff"]["masked loop"] <= check["tolerance"]


def test_variants_share_the_frozen_weights():
    case = train_step.TINY[1]
    state = train_step.expert_state(case, CPU)
    base = train_step.build_variant(case, CPU, train_step.BASE, state).state_dict()
    for name in (train_step.OURS, train_step.PEFT):
        model = train_step.build_variant(case, CPU, name, state).state_dict()
        shared = [k for k in base if k in model]
        assert len(shared) > 0.9 * len(base) and all(torch.equal(base[k], model[k]) for k in shared)


def test_fixed_noise_is_device_independent_decisive_and_what_the_recursion_draws():
    sample = noise.decisive_noise((4000, 5))
    assert torch.equal(sample, noise.decisive_noise((4000, 5))) and sample.dtype == torch.float32
    assert not torch.equal(sample, noise.decisive_noise((4000, 5), seed=1))
    top2 = sample.topk(2, dim=-1).values
    assert (top2[:, 0] == noise.MARGIN).all() and (top2[:, 1] < 0).all()  # one winner per token, far ahead
    assert torch.bincount(sample.argmax(-1)).min() > 700  # every expert wins about a fifth of the tokens
    assert torch.equal(noise.decisive_noise((7, 3), dtype=torch.float64).float(), noise.decisive_noise((7, 3)))
    model = recursion_check.build_model(recursion_check.RecursionCase(recursion_check.KINDS[0], 2),
                                        recursion_check.TINY)
    x, t, y, _ = recursion_check.make_inputs(recursion_check.TINY)
    with noise.fixed_noise() as counter, torch.no_grad():
        first = recursion_check.forward(model, x, t, y)
        second = recursion_check.forward(model, x, t, y)
    assert counter.calls == 2 * 2  # 2 forwards x 2 recursive blocks, one draw for the T = 3 steps of each
    assert all(shape[0] == 3 and shape[-1] == 2 for shape in counter.shapes)  # (T, N, L, M)
    assert torch.equal(first, second) and tp_kernels.gumbel_noise is not None


def test_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args(["--sections", "ops,train", "--models", "sd3"])
    assert args.sections == ["ops", "train"] and args.models == ["sd3"]
    assert args.out == str(tmp_path / "gpu_check.json") and args.markdown == str(tmp_path / "gpu_check.md")
    for bad in (["--sections", "ops,bogus"], ["--models", "unet"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_cases_cover_every_precision_and_expert_count():
    cases = ops.correctness_cases()
    variants = {(c.op, c.dtype, c.tf32) for c in cases}
    for op in ("routed_lora", "refine_step"):
        assert {(op, torch.bfloat16, False), (op, torch.float16, False), (op, torch.float32, False),
                (op, torch.float32, True)} <= variants
        assert any(c.op == op and c.collapsed and c.tokens > 2 * 512 for c in cases)  # several chunks
        assert any(c.op == op and c.rank >= 128 and c.strided for c in cases)
    for op in ("routed_lora", "refine_step", "gate_top1"):
        for compiled in (False, True):
            assert {c.experts for c in cases if c.op == op and c.compiled == compiled} == {2, 3, 5}
    eager = [c.name for c in cases if not c.compiled]
    assert [c.name for c in cases if c.compiled] == [f"{n}, compiled" for n in eager]


def test_full_cases_build_and_run_on_the_meta_device():
    """The timed shapes as the check builds them, without memory or compute: apply_recursion on DiT-XL/2 and
    SD3-medium, a bf16 forward at the timed batch."""
    meta = torch.device("meta")
    for case in train_step.FULL:
        from thinking_pixel import apply_recursion

        model = apply_recursion(train_step.build_base(case, meta), train_step.recursion_of(case))
        inputs, target = train_step.make_inputs(case, meta, torch.bfloat16)
        out = train_step.forward(train_step.to_dtype(model, train_step.OURS, torch.bfloat16), inputs)
        assert out.shape == target.shape and out.dtype == torch.bfloat16
        assert len(train_step._recursions(model)) == 3


def test_full_cases_are_the_ones_timed():
    dit, sd3 = train_step.FULL
    assert (dit.depth, dit.dim, dit.batch, dit.tokens, dit.experts, dit.steps, dit.rank, dit.layers) == (
        28, 1152, 32, 256, 5, 5, 128, (4, 8, 12))
    assert (sd3.depth, sd3.dim, sd3.tokens, sd3.ctx, sd3.experts, sd3.steps, sd3.rank, sd3.layers) == (
        24, 1536, 1024, 333, 2, 2, 128, (4, 8, 12))
