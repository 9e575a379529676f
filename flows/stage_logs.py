"""A stage's own output in its Prefect task run's log, and training progress as a progress artifact.

The stages know nothing of Prefect: they print their progress and results to stderr/stdout
(``train epoch 3/180  step 30/1800  loss_d ...``, ``evaluate: FID ... (floor ...) [protocol]``,
``register: digits v2: champion (...)``) and log warnings through ``logging``. While a task runs
a stage, :func:`stage_output` copies each complete line it writes into the run's log on the
Prefect server, and records of the ``aigc_pipeline`` loggers too. The terminal keeps seeing
exactly what it saw before: lines still go to the real stream, and go to the Prefect API only
(not to Prefect's console handler, which would print them a second time).

Only writes from the thread that runs the stage are copied (Prefect's own threads write to
stderr too). A training on several processes (``train.devices`` > 1) writes to the file
descriptor directly, so its per-epoch lines reach the terminal or worker log, not the run log.

:class:`TrainingProgress` is the train stage's observer (handed to it in this process through
:func:`aigc_pipeline.pipeline.run_stage`): it keeps a Prefect progress artifact at the share of
steps done, with the plan and the time left. Nothing here reads the stage's terminal lines
for their content.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

STAGE_LOGGER = "aigc.stage"  # its records go to the Prefect API only; the stage's name is the child
PACKAGE_LOGGER = "aigc_pipeline"  # the stages' `logging` records (warnings of the evaluation, ...)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def clean_line(raw: str) -> str:
    """What a terminal would show of ``raw``: the text after its last carriage return
    (a redrawn progress bar), without ANSI escapes and surrounding blanks."""
    return _ANSI.sub("", raw.rsplit("\r", 1)[-1]).strip()


class LineTee:
    """A text stream that writes through to ``target`` and hands every complete line written by
    the thread that created it to ``on_line`` (cleaned by :func:`clean_line`; blank lines dropped)."""

    def __init__(self, target: TextIO, on_line: Callable[[str], None]) -> None:
        self._target = target
        self._on_line = on_line
        self._owner = threading.get_ident()
        self._pending = ""
        self._busy = threading.local()  # on_line may itself write to this stream: no recursion

    def write(self, text: str) -> int:
        n = self._target.write(text)
        if threading.get_ident() == self._owner and not getattr(self._busy, "on", False):
            self._feed(text)
        return len(text) if n is None else n

    def _feed(self, text: str) -> None:
        self._pending += text
        *lines, rest = self._pending.split("\n")
        # A bar redrawn with "\r" and no newline would grow without bound: keep its last state.
        self._pending = rest[rest.rfind("\r") :] if "\r" in rest else rest
        for raw in lines:
            line = clean_line(raw)
            if line:
                self._busy.on = True
                try:
                    self._on_line(line)
                finally:
                    self._busy.on = False

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:  # the stage draws its progress bar only on a terminal
        return self._target.isatty()

    def fileno(self) -> int:  # subprocesses given this stream write to the real descriptor
        return self._target.fileno()

    def close_pending(self) -> None:
        """Hand over a last line written without a newline."""
        if self._pending:
            self._feed("\n")

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self._target, name)


def _api_logger(stage: str) -> logging.Logger:
    """``aigc.stage.<stage>``: records reach the Prefect API handler only, not the console."""
    from prefect.logging.handlers import APILogHandler

    base = logging.getLogger(STAGE_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in base.handlers):
        base.addHandler(APILogHandler())
        base.setLevel(logging.INFO)
        base.propagate = False  # the terminal already saw the line on the real stream
    # "ingest@digits" -> "aigc.stage.ingest-digits" (a dot would make it a grandchild)
    return base.getChild(re.sub(r"[^\w-]+", "-", stage))


@contextlib.contextmanager
def _package_records_to_api() -> Iterator[None]:
    """Send the ``aigc_pipeline`` loggers' records to the run's log while the stage runs, unless
    Prefect already does (``PREFECT_LOGGING_EXTRA_LOGGERS=aigc_pipeline``, as prefect.yaml sets)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        yield
        return
    handler = APILogHandler()
    handler.setLevel(logging.INFO)
    owner = threading.get_ident()  # another thread has no run context to send its records with
    handler.addFilter(lambda record: record.thread == owner)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def stage_output(stage: str) -> Iterator[None]:
    """While the block runs, copy each line the current thread writes to stdout/stderr into the
    Prefect run's log (logger ``aigc.stage.<stage>``).

    Must be entered in a flow or task run; the streams are restored however the block ends.
    """
    from prefect import get_run_logger
    from prefect.logging.loggers import PrefectLogAdapter

    run_logger = get_run_logger()
    log = PrefectLogAdapter(_api_logger(stage), extra=dict(getattr(run_logger, "extra", None) or {}))

    out, err = sys.stdout, sys.stderr
    tees = LineTee(out, log.info), LineTee(err, log.info)
    sys.stdout, sys.stderr = tees
    try:
        with _package_records_to_api():
            yield
    finally:
        sys.stdout, sys.stderr = out, err
        for tee in tees:
            tee.close_pending()


class TrainingProgress:
    """A Prefect progress artifact (``key``) at the share of training steps done, created at the
    train stage's plan (its length, then its estimated time once measured) or first epoch, and
    updated at most every ``every`` seconds (and always at the last step), its description saying
    the time left. The train stage's :class:`~aigc_pipeline.stages.train.TrainingObserver`: pass
    it as ``observer`` of :func:`aigc_pipeline.pipeline.run_stage`."""

    def __init__(self, key: str, model_name: str, *, every: float = 1.0) -> None:
        self.key = key
        self.model_name = model_name
        self.every = every
        self.artifact_id: Any = None
        self.progress: float | None = None  # percent, as last published
        self.plan_text = ""  # the train stage's plan (length, then the estimated time), as last heard
        self._last = 0.0

    def plan(self, text: str) -> None:
        self.plan_text = text
        self._publish(self.progress or 0.0, f"Training {self.model_name}: {text}")

    def epoch(self, epoch: int, epochs: int, step: int, total: int, seconds_left: float | None) -> None:
        from aigc_pipeline.training.budget import format_duration

        percent = 100.0 * step / total if total else 100.0
        eta = f", about {format_duration(seconds_left)} left" if seconds_left is not None and step < total else ""
        text = f"Training {self.model_name}: epoch {epoch}/{epochs}, step {step}/{total}{eta}"
        now = time.monotonic()
        if self.artifact_id is not None and step < total and now - self._last < self.every:
            return
        self._publish(percent, text)

    def _publish(self, percent: float, text: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=percent, key=self.key, description=text)
        else:
            update_progress_artifact(self.artifact_id, percent, description=text)
        self.progress, self._last = percent, now
