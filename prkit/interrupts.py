"""Holding Ctrl-C (SIGINT) and SIGTERM across a few statements that must happen together (a training step's update
and the bookkeeping it belongs to), then acting on them as their handlers would; and SIGTERM taken as Ctrl-C while
training runs."""

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


def _interrupted(signum, frame):
    raise KeyboardInterrupt  # a job scheduler's SIGTERM: the training loop writes its checkpoint as on Ctrl-C


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (a job scheduler's stop, ``kill``) raises KeyboardInterrupt in the block, as Ctrl-C does: training
    writes its checkpoint and can be resumed instead of dying without one. The previous handler is back when the
    block ends. Only in the main thread (no signals elsewhere), and only over the default handler: a handler of the
    caller's own, an ignored SIGTERM or one set outside Python is left as it is."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                previous = signal.signal(signal.SIGTERM, _interrupted)
        except ValueError:  # signals unavailable here (an embedded interpreter)
            pass
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
