"""Tests of the Triton kernels on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported, so these run in
their own process (tests/test_triton_interpret.py starts it); collected in any
other process they are skipped.
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
