"""Holding Ctrl-C (SIGINT) and SIGTERM across a few statements that must happen together (a training step's update
and the bookkeeping it belongs to), then acting on them as their handlers would."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then act on them as their handlers would: a step's
    update and its bookkeeping happen together, so the checkpoint written on the interrupt resumes exactly.
    Outside the main thread (no signals there) a no-op; a signal whose handler was set outside Python is left
    alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not None:
                previous[signum] = signal.signal(signum, lambda number, frame: caught.append(number))
    except ValueError:  # signals unavailable here (an embedded interpreter)
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():  # every handler back before any of them runs
            signal.signal(signum, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):  # Python's SIGINT handler raises KeyboardInterrupt; the CLI's SIGTERM one too
                handler(caught[0], sys._getframe())
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])
