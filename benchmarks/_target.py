"""Which tp_kernels the benchmarks time, chosen before anything imports it, and the line that says so.

The suite runs from the repository root, where ``import tp_kernels`` finds the checkout. Right after
``pip install .`` the checkout has no compiled CPU extension (it was built into the installed copy), so the suite
would time the composed-torch fallback instead of the kernels that were installed. In that case the installed
``tp_kernels`` (and the ``thinking_pixel`` installed beside it) is imported instead of the checkout's. A checkout
whose extension is built in place (``python setup.py build_ext --inplace``, the development setup) is timed as
it is. Either way :func:`describe` names the copy, the backend and the instruction set being timed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tp_kernels", "thinking_pixel")


def _has_extension(package_dir: Path) -> bool:
    return any(package_dir.glob("_cpu_kernels*.so"))


def select() -> None:
    """Import the installed packages in place of the checkout's when only the installed copy has the extension."""
    if any(name in sys.modules for name in PACKAGES) or _has_extension(ROOT / "tp_kernels"):
        return
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    specs = {name: importlib.machinery.PathFinder.find_spec(name, elsewhere) for name in PACKAGES}
    installed = specs["tp_kernels"]
    if installed is None or installed.origin is None or not _has_extension(Path(installed.origin).parent):
        return
    for name, spec in specs.items():
        if spec is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def describe(device: str = "cpu") -> str:
    """One line: which tp_kernels is timed, its backend on ``device``, and the CPU extension's instruction set."""
    import torch

    import tp_kernels
    from tp_kernels import _ext

    where = Path(tp_kernels.__file__).resolve().parent
    origin = "this checkout" if where.parent == ROOT else "installed copy"
    backend = tp_kernels.resolve_backend(torch.device(device))
    isa = _ext.isa()
    if isa is not None:
        cpu = f"CPU extension, ISA {isa}"
    elif _ext.disabled():
        cpu = "composed-torch CPU path (TP_KERNELS_NO_EXT is set)"
    else:
        cpu = "composed-torch CPU path: no CPU extension built (python setup.py build_ext --inplace)"
    return f"timing tp_kernels from {where} ({origin}): backend {backend} on {device}; {cpu}"
