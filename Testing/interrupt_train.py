"""`python interrupt_train.py STAGE STEP progidiff-arguments...`: runs the progidiff command line
with a Ctrl-C at that training step, as a user's Ctrl-C would stop it. The resume tests launch it
under `accelerate launch`, where every process stops at the same step.

With INTERRUPT_SIGNAL=SIGTERM and INTERRUPT_PROCESS=K in the environment, only process K sends
itself that signal at that step instead, as a scheduler's signal may reach one process first."""
import functools
import os
import signal
import sys

import progidiff.train
from progidiff import cli


def _interrupt_at(stage: int, step: int):
    sig = os.environ.get("INTERRUPT_SIGNAL")

    def on_step(s: int, k: int, loss: float) -> None:
        if (s, k) != (stage, step):
            return
        if sig is None:
            raise KeyboardInterrupt
        from accelerate import PartialState

        if PartialState().process_index == int(os.environ.get("INTERRUPT_PROCESS", "0")):
            os.kill(os.getpid(), getattr(signal, sig))
    return on_step


if __name__ == "__main__":
    progidiff.train.train = functools.partial(progidiff.train.train, on_step=_interrupt_at(int(sys.argv[1]), int(sys.argv[2])))
    sys.exit(cli.main(sys.argv[3:]))
