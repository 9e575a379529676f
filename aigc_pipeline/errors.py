"""User-facing error types: the CLI turns these into a one-line message and exit code 2."""


class AigcError(Exception):
    """Base class for errors caused by user input (config, data, arguments), not by a bug."""


class ConfigError(AigcError, ValueError):
    """params.yaml or a --set override is invalid; the message names the key."""


class DataError(AigcError, ValueError):
    """An input dataset or a stage's input files are missing or unusable; the message names the file."""


class TrainingDiverged(AigcError, RuntimeError):
    """Training produced a non-finite loss; the message names the step."""
