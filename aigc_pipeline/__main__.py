"""``python -m aigc_pipeline`` and the ``aigc`` script; the only place that exits the process."""

import sys

from aigc_pipeline.cli import main


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
