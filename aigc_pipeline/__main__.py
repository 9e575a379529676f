"""``python -m aigc_pipeline`` and the ``aigc`` script; the only place that exits the process."""

import signal
import sys

from aigc_pipeline.cli import main
from aigc_pipeline.errors import Terminated


def _terminate(signum, frame) -> None:
    raise Terminated(f"terminated by signal {signum}")


def entry() -> None:
    # SIGTERM unwinds like Ctrl-C (a training's MLflow run ends KILLED instead of staying RUNNING).
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())


if __name__ == "__main__":
    entry()
