"""What the check runs on, how it compiles, and how long it may take."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import subprocess
import time

import torch


def versions(device: torch.device) -> dict:
    """torch, Triton, CUDA (runtime and the driver's), the driver, the GPU: every number a result depends on."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(torch=torch.__version__, triton=triton_version, cuda_runtime=torch.version.cuda,
               python=platform.python_version(), device=str(device.type))
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count,
                   driver=_driver_version(), cuda_driver_api=_cuda_driver_api())
    else:
        env.update(gpu=None, capability=None, driver=None, cuda_driver_api=None, cpu=platform.processor() or None)
    return env


def _driver_version():
    """The NVIDIA driver, e.g. "570.124.06", from nvidia-smi (None where it is missing)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cuda_driver_api():
    """The CUDA version the driver supports (cuDriverGetVersion, e.g. "13.0"), None without libcuda."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        value = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(value)) != 0:
            return None
    except OSError:
        return None
    return f"{value.value // 1000}.{value.value % 1000 // 10}"


def describe(err: BaseException) -> str:
    """An exception in one line (its type and the first line of its message), for the JSON."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


@contextlib.contextmanager
def full_fp32():
    """fp32 matmuls and convolutions without TF32 (cuBLAS, cuDNN, and the Triton kernels, which follow torch's
    matmul setting) inside the block: for comparisons against float64."""
    from tp_kernels._aot import allow_tf32

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # on by default: a DiT's patch embedding is a convolution
    try:
        with allow_tf32(False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_dynamo():
    """Let one code object hold many compiled entries (one per model, variant, dtype): dynamo's default limit of 8
    would otherwise run the rest eagerly without a word (the setting was renamed in torch 2.7; set either).
    Identical blocks share one compiled graph as they are: dynamo takes modules' parameters as graph inputs by
    default from torch 2.5 (``inline_inbuilt_nn_modules``, fixed on in later versions)."""
    import torch._dynamo.config as dynamo_config

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))


def compile_fn(fn, backend: str):
    """torch.compile with the options every compiled case uses (static shapes: each case has one). Backend
    "none" returns ``fn`` itself: the compiled cases' code path without compiling (the CPU tests' plumbing run)."""
    return fn if backend == "none" else torch.compile(fn, backend=backend, dynamic=False)


def blocks_of(model) -> torch.nn.ModuleList:
    """The transformer blocks of our DiT (``blocks``) or a diffusers transformer (``transformer_blocks``)."""
    return model.blocks if hasattr(model, "blocks") else model.transformer_blocks


@contextlib.contextmanager
def compiled_blocks(model, backend: str):
    """Regional compilation: every transformer block replaced by its torch.compile'd self within the ``with``, as
    diffusers recommends for repeated blocks (identical blocks share one compiled graph, so compile time is that of
    a block or two, not of the model); the eager blocks come back on exit."""
    blocks = blocks_of(model)
    eager = list(blocks)
    for i, block in enumerate(eager):
        blocks[i] = compile_fn(block, backend)
    try:
        yield model
    finally:
        for i, block in enumerate(eager):
            blocks[i] = block


class Budget:
    """The run's wall-clock budget: sections ask before starting work that takes ``need`` seconds."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.skipped = []  # what was left out, and why

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str, need: float = 0.0) -> bool:
        left = self.seconds - self.elapsed()
        if left >= need:
            return True
        self.skipped.append(f"{what}: needs ~{need:.0f} s, {max(left, 0):.0f} s of the {self.seconds:.0f} s "
                            "budget left")
        return False
