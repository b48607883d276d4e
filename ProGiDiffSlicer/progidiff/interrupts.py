"""Ctrl-C and SIGTERM: ``segment``, ``evaluate``, ``refine`` and ``adapt`` are cancelled at once
(:func:`cancel_on_signals`; their outputs go through a staging folder, so nothing is half-written),
``train`` stops at a step's end with a checkpoint, not mid-step (:func:`stop_on_signals`).

A job scheduler (SLURM, a cloud's preemption, ``timeout``) ends a long run with SIGTERM and
kills it a while later; Python's default is to die at once, which loses every step since the
last periodic checkpoint and could cut the final model save in half. So while training runs a
first signal only *requests* a stop: the loop finishes the step it is in, writes a checkpoint
and raises :class:`KeyboardInterrupt`, and ``--resume`` goes on from exactly there. A second
Ctrl-C stops at once (the user insists); a second SIGTERM does not (``accelerate launch``'s
agent sends SIGTERM to workers that a terminal's Ctrl-C has already reached, and SIGKILL is the
way to insist). Outside the loop (reading the data, building the model) a signal stops at once,
as before.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator


class StopRequest:
    """Set by a signal; read by the training loop once per step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        #: True while the training loop can stop cleanly at a step's end.
        self.deferred = False

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def defer(self) -> None:
        """From now until the handlers are removed, a first signal waits for the loop's next check
        instead of raising (the loop is about to run, and the final save must not be cut)."""
        if self.is_set():  # asked for before any step ran: nothing to save, stop now
            raise KeyboardInterrupt
        self.deferred = True


@contextlib.contextmanager
def _handling(handler) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM within the block; the handlers that were there come back
    afterwards (the commands can run in-process, from a test, a script or a notebook)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def cancel_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt (staging folders are removed, outputs untouched) and
    also set the event given, which the engine checks before every denoiser batch: CPython prints and
    drops a KeyboardInterrupt raised while a finaliser runs, and one full-suite run saw a Ctrl-C during
    the locating pass lost so, the sampling going on for a minute after it."""
    cancel = threading.Event()

    def interrupted(*_) -> None:
        cancel.set()
        raise KeyboardInterrupt

    with _handling(interrupted):
        yield cancel


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """The SIGINT/SIGTERM handling described above, for the block."""
    stop = StopRequest()
    # Said once under `accelerate launch` (which sets RANK), by the process that says the rest.
    announce = os.environ.get("RANK", "0") == "0"

    def handler(sig: int, _frame) -> None:
        if not stop.deferred or (stop.is_set() and sig == signal.SIGINT):
            stop.set()
            raise KeyboardInterrupt
        if not stop.is_set() and announce:
            print(f"\nprogidiff: {signal.Signals(sig).name} received: stopping at the end of this step and saving a "
                  "checkpoint (Ctrl-C again to stop at once, without one).", file=sys.stderr, flush=True)
        stop.set()

    with _handling(handler):
        yield stop


def ignore_interrupts_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one thread per worker, and a terminal's Ctrl-C (sent to the
    whole process group) left to the main process. A worker that takes it exits, and the main
    process, finishing its step before it stops, then fails on the dead worker with a traceback."""
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
