"""The environment of the tests' subprocesses: they import the same thinking_pixel and tp_kernels as the test
process (the installed package in CI, the checkout in a development install), never the checkout by accident.

Run them with a ``cwd`` other than the repository root too: ``python -m`` puts the working directory first on
sys.path.
"""

import os
from pathlib import Path

import thinking_pixel

PACKAGE_ROOT = Path(thinking_pixel.__file__).resolve().parents[1]


def subprocess_env(*extra_paths) -> dict:
    paths = [str(PACKAGE_ROOT), *(str(p) for p in extra_paths)]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
