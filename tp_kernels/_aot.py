"""Compile every Triton kernel of tp_kernels ahead of time for an NVIDIA target, without a GPU.

The launches come from the same planning functions the runtime uses
(``routed_lora.triton.forward_launch`` / ``backward_launches``, ``gate.triton.gate_launch``,
``refine.triton.stats_gate_launch`` / ``gate_ln_bwd_launch``), fed with ``meta`` tensors of
the wanted shapes, so the tile sizes, warps and stages compiled here are the ones a GPU would run.
Every precision variant a GPU run can reach is compiled (:data:`VARIANTS`): bf16, fp16, and fp32 both with
TF32 (torch allows TF32) and with 3xTF32 (torch's default, full fp32 precision).
Arguments are specialised as the Triton runtime does for contiguous torch
tensors: pointers and integers divisible by 16 carry ``tt.divisibility=16``,
integers equal to 1 become constants.

Each record says how the kernel came out: registers, spills (from ``ptxas -v``
rerun on Triton's PTX with Triton's flags, since the driver that normally
reports them is absent), static shared memory, and the tensor-core
instructions in the PTX (``mma.sync`` on sm_80+, ``wgmma`` on sm_90a).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import torch

_TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One routed-LoRA layer (plus its gate): D_in -> S slices of D_out, E experts of rank R."""

    name: str
    d_in: int
    d_out: int
    rank: int
    n_exp: int
    n_slice: int
    n_tok: int = 8192


DIT_XL = Shape("DiT-XL qkv", d_in=1152, d_out=1152, rank=128, n_exp=5, n_slice=3)
DIT_S = Shape("DiT-S qkv", d_in=384, d_out=384, rank=32, n_exp=5, n_slice=3)
TOKENS_PER_SAMPLE = 256  # DiT-*/2 at 256x256: the refinement step's per-sample conditioning rows


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    kernel: str  # role, e.g. "routed_lora.bwd_dA"
    function: str  # the @triton.jit function compiled
    shape: str
    arch: str  # e.g. "sm_80", "sm_90a"
    dtype: str
    precision: str  # tl.dot input_precision: "tf32x3"/"tf32" for fp32, "native" for fp16/bf16, "-" without tl.dot
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    mma_sync: int  # count of mma.sync instructions in the PTX
    wgmma: int  # count of wgmma.mma_async instructions in the PTX
    uses_dot: bool

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def tensor_core_ops(self) -> str:
        ops = [name for name, n in (("mma.sync", self.mma_sync), ("wgmma", self.wgmma)) if n]
        return "+".join(ops) or "-"


# (dtype, torch allows TF32): every variant a GPU run reaches; fp32 follows torch.backends.cuda.matmul.allow_tf32
VARIANTS = ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False))


def _launches(shape: Shape, dtype: torch.dtype):
    """(role, Launch) for the forward, the full backward (with gate), the gate and the refinement step at ``shape``.

    The refinement step is compiled in its fullest form: token and per-sample conditioning logits, noise and
    the base (one sample per ``TOKENS_PER_SAMPLE`` tokens).
    """
    from .gate.triton import gate_launch
    from .refine.triton import gate_ln_bwd_launch, stats_gate_launch
    from .routed_lora.triton import backward_launches, forward_launch, max_chunks

    def meta(*size, dt=dtype):
        return torch.empty(*size, dtype=dt, device="meta")

    n, e, s, r = shape.n_tok, shape.n_exp, shape.n_slice, shape.rank
    x, gate = meta(n, shape.d_in), meta(n)
    a, b = meta(e, s, r, shape.d_in), meta(e, s, shape.d_out, r)
    perm, offsets = meta(n, dt=torch.int64), meta(e + 1, dt=torch.int64)
    y, h, dh, dgp = meta(n, s * shape.d_out), meta(n, s * r, dt=torch.float32), meta(n, s * r, dt=torch.float32), \
        meta(n, s, dt=torch.float32)
    fwd = [forward_launch(x, perm, offsets, a, b, gate, 1.0, y, h)]
    chunks = max_chunks(n, e)
    bwd = backward_launches(y, x, perm, offsets, a, b, gate, h, 1.0, dh, dgp, torch.empty_like(x),
                            torch.empty_like(a), torch.empty_like(b), meta(chunks, s, r, shape.d_in, dt=torch.float32),
                            meta(chunks, s, shape.d_out, r, dt=torch.float32))
    logits = meta(n, e)
    gate_fwd = gate_launch(logits, torch.empty_like(logits), 1.0, True, meta(n, dt=torch.int64),
                           meta(n, dt=torch.float32), meta(n, e, dt=torch.float32))
    stats = meta(n, dt=torch.float32)
    refine_gate = stats_gate_launch(x, meta(e, shape.d_in), meta(max(1, n // TOKENS_PER_SAMPLE), e, dt=torch.float32),
                                    meta(n, e, dt=torch.float32), 5.0, 1e-6, True, meta(n, dt=torch.int64), stats,
                                    meta(n, e, dt=torch.float32), stats, stats)
    refine_lora = forward_launch(x, perm, offsets, a, b, None, 1.0, torch.empty_like(y), h, mean=stats, rstd=stats,
                                 base=y)
    probs = meta(n, e, dt=torch.float32)
    refine_bwd = gate_ln_bwd_launch(torch.empty_like(x), stats, stats, x, meta(n, 1, dt=torch.float32),
                                    meta(n, 1, dt=torch.float32), meta(e, shape.d_in), probs, meta(n, dt=torch.int64),
                                    5.0, torch.empty_like(probs), torch.empty_like(x))
    roles = ["routed_lora.fwd", "routed_lora.bwd_dh", "routed_lora.bwd_dx", "routed_lora.bwd_dA",
             "routed_lora.bwd_dA_sum", "routed_lora.bwd_dB", "routed_lora.bwd_dB_sum", "gate.fwd", "refine.stats_gate",
             "refine.fwd", "refine.bwd_gate_ln"]
    return list(zip(roles, fwd + bwd + [gate_fwd, refine_gate, refine_lora, refine_bwd]))


def _source(launch):
    """An ASTSource for ``launch`` specialised like the runtime specialises torch tensors and ints."""
    from triton.compiler import ASTSource

    fn = launch.kernel
    values = {**launch.args, **launch.constexprs}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if name in launch.constexprs or v is None or (isinstance(v, int) and v == 1):
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif isinstance(v, int):
            signature[name] = "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"cannot compile argument {name}={v!r} of {fn.__name__}")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas_usage(ptx: str, capability: int):
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "k.cubin")],
            check=True, capture_output=True, text=True,
        )
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@contextlib.contextmanager
def allow_tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 set to ``enabled`` inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def compile_kernels(capability: int = 80, variants=VARIANTS, shapes=(DIT_XL, DIT_S)):
    """Compile every kernel for ``GPUTarget("cuda", capability, 32)`` at each shape and variant -> [KernelRecord].

    ``variants``: (dtype, allow_tf32) pairs; fp32 kernels get the tl.dot precision the runtime picks under
    that ``torch.backends.cuda.matmul.allow_tf32`` (``routed_lora.triton._precision``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    target = GPUTarget("cuda", capability, 32)
    records = []
    for shape in shapes:
        for dtype, tf32 in variants:
            with allow_tf32(tf32):
                launches = _launches(shape, dtype)
            for role, launch in launches:
                compiled = triton.compile(_source(launch), target=target,
                                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
                ptx = compiled.asm["ptx"]
                regs, spill_st, spill_ld = _ptxas_usage(ptx, capability)
                uses_dot = re.search(r"(tl\.|_)dot\(", launch.kernel.src) is not None
                precision = launch.constexprs.get("PRECISION") or ("native" if uses_dot else "-")
                records.append(KernelRecord(
                    kernel=role, function=launch.kernel.__name__, shape=shape.name,
                    arch=sm_arch_from_capability(capability), dtype=str(dtype).replace("torch.", ""),
                    precision=precision, num_warps=launch.num_warps, num_stages=launch.num_stages,
                    registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
                    shared_bytes=compiled.metadata.shared,
                    mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)),
                    wgmma=len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
                    uses_dot=uses_dot,
                ))
    return records


def format_table(records) -> str:
    """A plain-text table of records, one kernel per line."""
    cols = ("kernel", "shape", "arch", "dtype", "precision", "num_warps", "registers", "spills", "shared_bytes",
            "tensor_core_ops")
    rows = [cols] + [tuple(str(getattr(r, c)) for c in cols) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)


if __name__ == "__main__":
    for cc in (80, 90):
        print(format_table(compile_kernels(cc)))
