"""SIGTERM and Ctrl-C during training: finish the step, write a checkpoint, stop (a second Ctrl-C aborts).

Clusters send SIGTERM before killing a job (SLURM, Kubernetes, torchrun forwarding its own SIGTERM); the run
should lose no more than the step in flight. The handler only records the request: the training loop checks
it between steps (and agrees on it across ranks) and saves from there.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = ["StopRequests"]


class StopRequests:
    """While active (a context manager), SIGTERM and SIGINT set :attr:`signal_name` instead of stopping the
    process. Outside the main thread signals cannot be caught, and nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.signal_name: str | None = None
        self.signum: int | None = None
        self.announce = announce
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now (the last complete checkpoint stays)
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        if self.announce:
            print(f"\nthinking-pixel: {self.signal_name} received: saving a checkpoint after this step "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, handler)
        self._previous.clear()
        return False
