"""`maxmin-jax run CONFIG --out OUT`, killed with SIGKILL by itself right after it streams the metrics of STAGE at
STEP, once the checkpoint of STEP - 1 is on disk: an abrupt death at a known point (no cleanup runs, STEP's
checkpoint is not written). Used by tests/test_pipeline.py.

    python killed_run.py CONFIG OUT STAGE STEP
"""

import os
import signal
import sys
import time
from pathlib import Path

from maxmin_jax.cli import main
from maxmin_jax.metrics import MetricsWriter


def kill_after(out: Path, stage: str, step: int) -> None:
    write = MetricsWriter.write

    def write_then_die(self, name, at, metrics, **kwargs):
        record = write(self, name, at, metrics, **kwargs)
        if (name, at) == (stage, step):
            previous = out / stage / "checkpoints" / str(step - 1)  # Orbax renames it into place when complete
            deadline = time.monotonic() + 60
            while step > 1 and not previous.is_dir() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    MetricsWriter.write = write_then_die


if __name__ == "__main__":
    config, out, stage, step = sys.argv[1:]
    kill_after(Path(out), stage, int(step))
    sys.exit(main(["run", config, "--out", out]))
