"""`maxmin-jax fit-rewards ARGS...`, killed with SIGKILL by itself at POINT: an abrupt death (no cleanup runs) at a
known place. Used by tests/test_faults_runs.py.

    python killed_fit.py POINT ARGS...

POINT: `fitted` (EM done and its rounds streamed, its state not yet saved) or `publishing` (the outputs complete in
their staging directory, one of them renamed into place, the others not).
"""

import os
import signal
import sys

from maxmin_jax.cli import main
from maxmin_jax.metrics import MetricsWriter
from maxmin_jax.pipeline import outdir


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    if point == "fitted":
        write = MetricsWriter.write

        def write_then_die(self, stage, *args, **kwargs):
            record = write(self, stage, *args, **kwargs)
            if stage == "rewards/mixture":
                die()
            return record

        MetricsWriter.write = write_then_die
    elif point == "publishing":
        move, moved = outdir._move_in, []

        def move_then_die(*args):
            if moved:
                die()
            moved.append(move(*args))

        outdir._move_in = move_then_die
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    kill_at(sys.argv[1])
    sys.exit(main(["fit-rewards", *sys.argv[2:]]))
