"""Counting a function's calls while a block runs: that a kernel, not a fallback, computed a result."""

import contextlib

import pytest


@contextlib.contextmanager
def counted_calls(owner, name):
    """Yields a list that grows by one per call of ``owner.<name>`` inside the block (the function still runs)."""
    calls = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, counting)
        yield calls
