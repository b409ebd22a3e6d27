"""Compile every Triton kernel of tp_kernels ahead of time for an NVIDIA target, without a GPU.

The launches come from the same planning functions the runtime uses
(``routed_lora.triton.forward_launch`` / ``backward_launches``, ``gate_top1.triton.gate_launch``,
``refine_step.triton.stats_gate_launch`` / ``gate_ln_bwd_launch``), fed with ``meta`` tensors of
the wanted shapes, so the tile sizes, warps and stages compiled here are the ones a GPU would run.
Every precision variant a GPU run can reach is compiled (:data:`VARIANTS`): bf16, fp16, and fp32 both with
TF32 (torch allows TF32) and with 3xTF32 (torch's default, full fp32 precision).
Arguments are specialised as the Triton runtime does for contiguous torch
tensors: pointers and integers divisible by 16 carry ``tt.divisibility=16``,
integers equal to 1 become constants.

Each record says how the kernel came out: registers, spills (from ``ptxas -v``
rerun on Triton's PTX with Triton's flags, since the driver that normally
reports them is absent), static shared memory, the tensor-core
instructions in the PTX (``mma.sync`` on sm_80+, ``wgmma`` on sm_90a), and the
``tt.dot`` ops in the Triton IR next to the ``tl.dot`` calls of the source: Triton may
rewrite other code into a dot (releases before 3.8 turn ``tl.sum(a[:, :, None] * b[None, :, :], 1)``
into one), which the tests catch by comparing the two.

Works with Triton 3.2 to 3.8 (the API differences between them are handled in :func:`_ast_source` and
:func:`_ptxas_command`); 3.2.0 aborts on the bf16 / fp16 forward at rank 128 for sm_90a, which is why the
tested range (``_dispatch.TESTED_TRITON``) starts at 3.3.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import os
import re
import subprocess
import tempfile

import torch

_TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.bool: "i1",
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
    kernel: str  # role, e.g. "routed_lora.bwd_dW"
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
    dot_calls: int  # tl.dot calls in the kernel's source (see dot_calls)
    tt_dots: int  # tt.dot ops in the Triton IR Triton made of it

    @property
    def uses_dot(self) -> bool:
        return self.dot_calls > 0

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
    from ._triton import next_power_of_2
    from .gate_top1.triton import gate_launch
    from .refine_step.triton import gate_ln_bwd_launch, stats_gate_launch
    from .routed_lora.triton import GROUP_BLOCK, GROUP_INLINE, backward_launches, forward_launch, group_launches

    def meta(*size, dt=dtype):
        return torch.empty(*size, dtype=dt, device="meta")

    n, e, s, r = shape.n_tok, shape.n_exp, shape.n_slice, shape.rank
    x, gate = meta(n, shape.d_in), meta(n)
    a, b = meta(e, s, r, shape.d_in), meta(e, s, shape.d_out, r)
    perm, offsets = meta(n, dt=torch.int64), meta(e + 1, dt=torch.int64)
    y, h, dh, dgp = meta(n, s * shape.d_out), meta(n, s * r, dt=torch.float32), meta(n, s * r, dt=torch.float32), \
        meta(n, s, dt=torch.float32)
    fwd = [forward_launch(x, perm, offsets, a, b, gate, 1.0, y, h)]
    bwd = backward_launches(y, x, perm, offsets, a, b, gate, h, 1.0, dh, dgp, torch.empty_like(x),
                            torch.empty_like(a), torch.empty_like(b), torch.empty_like(gate))
    # the grouping: one program at these token counts; per-block histograms, then the scatter, above GROUP_INLINE
    ok, many = meta(1, dt=torch.bool), 2 * GROUP_INLINE
    group = group_launches(meta(n, dt=torch.int64), e, perm, offsets, None, ok)
    group += group_launches(meta(many, dt=torch.int64), e, meta(many, dt=torch.int64), offsets,
                            meta(many // GROUP_BLOCK, next_power_of_2(e + 2), dt=torch.int32), ok)
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
    refine_bwd = gate_ln_bwd_launch(torch.empty_like(x), stats, stats, x, stats, stats, meta(e, shape.d_in), probs,
                                    meta(n, dt=torch.int64), 5.0, torch.empty_like(probs), torch.empty_like(x),
                                    meta(n // 16, e, shape.d_in, dt=torch.float32))
    # the step's weight gradients: a unit gate (no multiplier) and LN(x) normalised as loaded
    refine_dw = backward_launches(y, x, perm, offsets, a, b, None, h, 1.0, dh, dgp, torch.empty_like(x),
                                  torch.empty_like(a), torch.empty_like(b), torch.empty_like(gate), mean=stats,
                                  rstd=stats)[-1]
    roles = ["routed_lora.group", "routed_lora.group_count", "routed_lora.group_scatter", "routed_lora.fwd",
             "routed_lora.bwd_dh", "routed_lora.bwd_dx", "routed_lora.bwd_dW", "gate_top1.fwd",
             "refine_step.stats_gate", "refine_step.fwd", "refine_step.bwd_gate_ln", "refine_step.bwd_dW"]
    launches = group + fwd + bwd + [gate_fwd, refine_gate, refine_lora, refine_bwd, refine_dw]
    assert len(launches) == len(roles), [launch.kernel.__name__ for launch in launches]
    return list(zip(roles, launches))


def _source(launch):
    """An ASTSource for ``launch`` specialised like the runtime specialises torch tensors and ints."""
    fn = launch.kernel
    values = {**launch.args, **launch.constexprs}
    types, constants, divisible = {}, dict(launch.constexprs), []
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if name in launch.constexprs:
            continue
        if v is None or (isinstance(v, int) and v == 1):
            constants[name] = v
        if v is None:
            types[name] = "*i8"
        elif isinstance(v, torch.Tensor):
            types[name] = "*" + _TRITON_DTYPES[v.dtype]
            divisible.append(i)
        elif isinstance(v, float):
            types[name] = "fp32"
        elif isinstance(v, int):
            types[name] = "i32" if -(2 ** 31) <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                divisible.append(i)
        else:
            raise TypeError(f"cannot compile argument {name}={v!r} of {fn.__name__}")
    return _ast_source(fn, types, constants, divisible)


def _ast_source(fn, types, constants, divisible):
    """triton.compiler.ASTSource in the API of the installed Triton.

    ``types``: Triton type of each runtime argument by name (constexpr parameters left out), ``constants``:
    the specialised values by name (constexprs, None pointers, ints equal to 1), ``divisible``: indices of
    the arguments divisible by 16.
    """
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3
        signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
        return ASTSource(fn=fn, signature=signature, constexprs=constants,
                         attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    from triton.backends.compiler import AttrsDescriptor  # Triton 3.2: runtime arguments only, attributes object

    return ASTSource(fn, types, constants, AttrsDescriptor.from_hints({i: 16 for i in divisible}))


@functools.lru_cache
def _ptxas_command(capability: int):
    """[ptxas, flags...] as the installed Triton runs it for ``capability`` (its binary, its register options)."""
    from triton.backends.nvidia import compiler

    tool = compiler.get_ptxas(capability) if hasattr(compiler, "get_ptxas") else compiler._path_to_binary("ptxas")
    ptxas = tool.path if hasattr(tool, "path") else tool[0]  # Triton >= 3.4: a NvidiaTool; before: (path, version)
    # Triton 3.8 passes --regAllocOptLevel=2 (a ptxas 13 workaround): it changes the register counts
    reg_alloc = "--regAllocOptLevel=2" in inspect.getsource(compiler.CUDABackend.make_cubin)
    return [ptxas, "-v", *(["--regAllocOptLevel=2"] if reg_alloc else []), f"--gpu-name={_arch(capability)}"]


def _arch(capability: int) -> str:
    return f"sm_{capability}" + ("a" if capability >= 90 else "")


def dot_calls(fn) -> int:
    """tl.dot calls of a @triton.jit function: its own and, at each call, those of the jit helpers it calls.

    A helper whose every tl.dot is a ``return`` value (``_triton.dot``: one of its branches is
    compiled) is one dot per call. Loops do not multiply: a loop body appears once in the Triton IR.
    """
    counts = 0
    for node in ast.walk(ast.parse(fn.src)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "dot" and isinstance(f.value, ast.Name) and f.value.id == "tl":
            counts += 1
        elif isinstance(f, ast.Name) and f.id != fn.__name__ and hasattr(fn.__globals__.get(f.id), "src"):
            helper = fn.__globals__[f.id]
            counts += 1 if _is_dot_wrapper(helper) else dot_calls(helper)
    return counts


def _is_dot_wrapper(fn) -> bool:
    tree = ast.parse(fn.src)
    returned = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Return)}
    dots = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "dot"]
    return bool(dots) and all(id(n) in returned for n in dots)


def _ptxas_usage(ptx: str, capability: int):
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([*_ptxas_command(capability), src, "-o", os.path.join(tmp, "k.cubin")],
                             check=True, capture_output=True, text=True)
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


def compile_kernels(capability: int = 80, variants=VARIANTS, shapes=(DIT_XL, DIT_S), roles=None):
    """Compile every kernel for ``GPUTarget("cuda", capability, 32)`` at each shape and variant -> [KernelRecord].

    ``variants``: (dtype, allow_tf32) pairs; fp32 kernels get the tl.dot precision the runtime picks under
    that ``torch.backends.cuda.matmul.allow_tf32`` (``_triton.precision``). ``roles``: compile
    only the kernels of these roles (default all).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    records = []
    for shape in shapes:
        for dtype, tf32 in variants:
            with allow_tf32(tf32):
                launches = _launches(shape, dtype)
            for role, launch in launches:
                if roles is not None and role not in roles:
                    continue
                compiled = triton.compile(_source(launch), target=target,
                                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
                ptx = compiled.asm["ptx"]
                regs, spill_st, spill_ld = _ptxas_usage(ptx, capability)
                n_dots = dot_calls(launch.kernel)
                precision = launch.constexprs.get("PRECISION") or ("native" if n_dots else "-")
                records.append(KernelRecord(
                    kernel=role, function=launch.kernel.__name__, shape=shape.name,
                    arch=_arch(capability), dtype=str(dtype).replace("torch.", ""),
                    precision=precision, num_warps=launch.num_warps, num_stages=launch.num_stages,
                    registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
                    shared_bytes=compiled.metadata.shared,
                    mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)),
                    wgmma=len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
                    dot_calls=n_dots, tt_dots=len(re.findall(r"\btt\.dot\s", compiled.asm["ttir"])),
                ))
    return records


def format_table(records) -> str:
    """A plain-text table of records, one kernel per line."""
    cols = ("kernel", "shape", "arch", "dtype", "precision", "num_warps", "registers", "spills", "shared_bytes",
            "dot_calls", "tt_dots", "tensor_core_ops")
    rows = [cols] + [tuple(str(getattr(r, c)) for c in cols) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)


if __name__ == "__main__":
    for cc in (80, 90):
        print(format_table(compile_kernels(cc)))
