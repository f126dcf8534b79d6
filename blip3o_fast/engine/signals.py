"""SIGTERM/SIGINT as a request to stop: the loop saves a checkpoint and exits at the next step boundary."""

from __future__ import annotations

import signal


class StopRequest:
    """A context manager that installs the handlers and restores the previous ones on exit."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signum = signum
