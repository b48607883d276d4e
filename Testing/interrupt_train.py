"""`python interrupt_train.py STAGE STEP progidiff-arguments...`: runs the progidiff command line
with a Ctrl-C at that training step, as a user's Ctrl-C would stop it. The resume tests launch it
under `accelerate launch`, where every process stops at the same step."""
import functools
import sys

import progidiff.train
from progidiff import cli


def _interrupt_at(stage: int, step: int):
    def on_step(s: int, k: int, loss: float) -> None:
        if (s, k) == (stage, step):
            raise KeyboardInterrupt
    return on_step


if __name__ == "__main__":
    progidiff.train.train = functools.partial(progidiff.train.train, on_step=_interrupt_at(int(sys.argv[1]), int(sys.argv[2])))
    sys.exit(cli.main(sys.argv[3:]))
