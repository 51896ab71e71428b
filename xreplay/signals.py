"""Ctrl-C and SIGTERM turned into a polite stop request for the length of a run.

A recorder (live or under QEMU's rr) must finish its file and leave the target as found,
so the signals only ask it to stop; the previous handlers come back afterwards.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda *_: request_stop("interrupted"))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
