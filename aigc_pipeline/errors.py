"""User-facing error types: the CLI turns these into a one-line message and exit code 2."""


class AigcError(Exception):
    """Base class for errors caused by user input (config, data, arguments), not by a bug."""


class ConfigError(AigcError, ValueError):
    """params.yaml or a --set override is invalid; the message names the key."""


class DataError(AigcError, ValueError):
    """An input dataset or a stage's input files are missing or unusable; the message names the file."""


class TrainingDiverged(AigcError, RuntimeError):
    """Training produced a non-finite loss or an exploding gradient; the message names the step.

    ``step`` is the first bad step; ``history`` the per-step records of the steps before it
    (what a failed run's tracking logs as partial losses).
    """

    def __init__(self, message: str, *, step: int | None = None, history: list[dict[str, float]] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.history = list(history or [])


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (``kill``, a scheduler stopping it): raised in the main thread by
    the ``aigc`` command's handler, so a training records its MLflow run as KILLED on the way out.
    A KeyboardInterrupt, so everything that handles an interruption handles it alike."""
