"""The MLflow run of a training, written while it trains: the train stage's side of the trainer's callbacks.

The trainer (:mod:`aigc_pipeline.training.loop`) knows nothing of MLflow; the train stage hands
it callbacks that call a :class:`TrainingRun`:

- ``on_start`` opens the run (:meth:`TrainingRun.start`): params (resolved hyperparameters
  included), the dataset inputs, tags (``aigc.train_key`` among them), system metrics on
  (``log_system_metrics=True``: CPU, memory, disk, network, and GPUs through ``nvidia-ml-py``);
- ``on_metrics`` streams the per-step losses and gradient norms (``train/*``), sent every
  couple of seconds, with the time they were measured;
- ``on_epoch_end`` logs the epoch's means, learning rates and images/s (``train_epoch/*``) and
  the fixed-noise grid as an MLflow image (``mlflow.log_image(key="samples", step=...)``: the
  charts view shows it in an image grid with a step slider);
- FID over training (``fid_progress_<protocol>``) is logged as each point is measured.

Every curve is indexed by the global training step. When the model folder is written,
:meth:`TrainingRun.finish` tags the run with the weights' sha256 (how evaluate and register find
it: :mod:`aigc_pipeline.tracking.runs`) and ends it FINISHED. A training that raises ends the run
FAILED (TrainingDiverged: with the losses up to the bad step and the error as tags) or KILLED
(Ctrl-C, SIGTERM), never leaving it RUNNING; only a process killed outright (SIGKILL, a lost
machine) can leave it RUNNING. A Ctrl-C or SIGTERM that arrives while a record is being written
to the store takes effect when that write is done.

**Resume continues the run.** A training that resumes from a checkpoint (``resumed_from`` > 0)
continues the newest run with the same training key that has no weights yet (killed, failed or
still marked RUNNING because its process died), if its params agree: the run goes back to
RUNNING, what it already holds (a metric at a step, a grid at a step) is not logged again, what it
lacks up to the checkpoint (the steps between what it holds and the checkpoint, or a record the
killed process did not get to send, such as the grid of an epoch whose losses it had sent) is
logged from the checkpoint's records when training ends, and it ends as this session ends. A
training that starts from step 0 opens a new run; a run with its key still marked RUNNING is then
set KILLED and tagged ``aigc.superseded_by`` with the new run's id.

``AIGC_LIVE_TRACKING=0`` turns this off (training where MLflow cannot be reached): register then
creates the run and logs the training from the model folder.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aigc_pipeline.config import Config
from aigc_pipeline.tracking import runs

if TYPE_CHECKING:
    from mlflow import MlflowClient

LIVE_ENV = "AIGC_LIVE_TRACKING"
_FLUSH_SECONDS = 2.0  # per-step metrics are sent at most this often (and at every epoch's end)
_FLUSH_METRICS = 900  # ... or when this many are waiting (MLflow's log_batch takes 1000)


def enabled() -> bool:
    """Live tracking is on unless ``AIGC_LIVE_TRACKING=0``."""
    return os.environ.get(LIVE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block's writes to the store are done, then deliver them
    (a ``with`` block, or a decorator for a method that writes).

    Their handlers raise in the main thread wherever it is; inside a store transaction that loses
    the batch being written and can leave the process's own connection holding the SQLite lock, so
    that recording the run as KILLED waits on itself and the run stays RUNNING.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only: nothing can land here
        return
    wanted = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.getsignal(s) for s in wanted}
    if any(h is None for h in handlers.values()):  # a handler installed from C: leave it alone
        yield
        return
    held: list[int] = []
    for s in wanted:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if held:
            signal.raise_signal(held[0])  # the restored handler runs now, outside the write


class TrainingRun:
    """The MLflow side of one training session; a context manager around the trainer's call.

    ``key`` is the training key (the checkpoint folder's config hash), ``hparams`` the resolved
    hyperparameters (model.json's ``hparams``). On leaving the ``with`` block through an
    exception the run ends FAILED or KILLED; the exception always propagates.
    """

    def __init__(self, project_dir: Path | str, cfg: Config, *, key: str, hparams: Mapping[str, Any]) -> None:
        self.project_dir, self.cfg, self.key = Path(project_dir), cfg, key
        self.params = runs.flat_params(cfg, resolved=dict(hparams))
        self.family = hparams.get("model")  # what train.model (perhaps auto) resolved to
        self.run_id: str | None = None
        self.step = 0
        self.resumed_from = 0
        self._streamed_until = 0  # the last step whose per-step records this session was given
        self._held: dict[str, set[int]] = {}  # metric -> the steps the run held it at before this session
        self._images: set[int] = set()  # steps of the run's grids
        self._pending: list[Any] = []
        self._last_send = 0.0
        self._store: AbstractContextManager[str] | None = None
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._ended = False

    # -- the with block ------------------------------------------------------------------------

    def __enter__(self) -> TrainingRun:
        from mlflow import MlflowClient

        from aigc_pipeline.tracking.store import use_store

        self._store = use_store(self.project_dir, self.cfg.register.experiment)
        self._experiment_id = self._store.__enter__()
        self._client = MlflowClient()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        try:
            if exc is not None and self.run_id is not None and not self._ended:
                try:
                    self.fail(exc)
                except Exception as record_error:  # the training's own error stays the one raised
                    exc.add_note(f"also: recording the failure in MLflow run {self.run_id} failed: {record_error!r}")
            elif self.run_id is not None and not self._ended:
                # A bug in the caller, not a training outcome: say so rather than leave it RUNNING.
                self.fail(RuntimeError("the train stage ended without finishing its MLflow run"))
        finally:
            assert self._store is not None  # __exit__ runs only after __enter__ succeeded
            self._store.__exit__(None, None, None)
        return False

    # -- trainer callbacks ---------------------------------------------------------------------

    @_uninterrupted()
    def start(self, info: Mapping[str, Any]) -> None:
        """``on_start``: open (or continue) the run."""
        import mlflow

        client = self._client
        assert client is not None and self._experiment_id is not None  # set by __enter__
        self.resumed_from = self.step = int(info.get("resumed_from") or 0)
        tags = {
            **runs.run_tags(self.cfg, "train", self.family),
            runs.TRAIN_KEY_TAG: self.key,
            runs.TRAINING_TAG: "live",
            "aigc.resumed_from": str(self.resumed_from),
            "aigc.speed": str(info.get("speed", ""))[:500],
        }
        newest = client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{runs.TRAIN_KEY_TAG}` = '{self.key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        previous = newest[0] if newest else None
        if (
            previous is not None
            and self.resumed_from > 0
            and runs.WEIGHTS_TAG not in previous.data.tags
            and not runs.params_conflict(previous.data.params, self.params)
        ):
            run = mlflow.start_run(run_id=previous.info.run_id, tags=tags, log_system_metrics=True)
            self.run_id = run.info.run_id
            # Held record by record: a process killed between sending an epoch's losses and its
            # grid leaves that step's losses in the run but not its grid.
            self._held = runs.logged_metric_steps(client, self.run_id)
            self._images = runs.logged_image_steps(client, self.run_id, runs.SAMPLES_KEY)
            last = max(
                (max(s) for k, s in self._held.items() if k.startswith(("train/", "train_epoch/")) and s), default=0
            )
            print(
                f"  train: continuing MLflow run {self.run_id} (it holds steps up to {last})",
                file=sys.stderr,
                flush=True,
            )
        else:
            run = mlflow.start_run(
                experiment_id=self._experiment_id,
                run_name=f"{self.cfg.model_name}-{self.key[:8]}",
                tags=tags,
                log_system_metrics=True,
            )
            self.run_id = run.info.run_id
            if previous is not None and previous.info.status == "RUNNING":
                client.set_tag(previous.info.run_id, "aigc.superseded_by", self.run_id)
                client.set_terminated(previous.info.run_id, status="KILLED")
        runs.log_params(client, self.run_id, self.params)
        from aigc_pipeline.tracking.datasets import log_dataset_inputs
        from aigc_pipeline.tracking.store import ui_url

        log_dataset_inputs(
            client,
            self.run_id,
            self.project_dir,
            self.cfg.dataset,
            self.cfg.evaluate.reference_split,
            ui=ui_url(mlflow.get_tracking_uri()),
        )

    def progress(self, step: int, total: int, epoch: int) -> None:
        """``on_progress``: where training is (the step the epoch records and grids are logged at)."""
        self.step = step

    def metrics(self, step: int, scalars: Mapping[str, float]) -> None:
        """``on_metrics``: one step's losses and gradient norms, sent in batches."""
        self._queue({f"train/{k}": v for k, v in scalars.items()}, step)
        self._streamed_until = max(self._streamed_until, step)

    def epoch(self, epoch: int, grid: Any, stats: Mapping[str, float]) -> None:
        """``on_epoch_end``: the epoch's stats and, when drawn, its grid (an image at this step)."""
        step = self.step
        self._queue({"train_epoch/epoch": float(epoch), **{f"train_epoch/{k}": v for k, v in stats.items()}}, step)
        self.send()
        if grid is not None and step not in self._images:
            from aigc_pipeline.images import make_grid

            client, run_id = self._open_run()
            with _uninterrupted():
                runs.log_grid(client, run_id, make_grid(grid), runs.SAMPLES_KEY, step)
                self._images.add(step)

    def fid(self, name: str, value: float) -> None:
        """A point of FID over training, measured now (at the current step)."""
        if math.isfinite(value):
            self._queue({name: value}, self.step)
            self.send()

    # -- the end -------------------------------------------------------------------------------

    @_uninterrupted()
    def finish(self, *, model: Path, steps: int, stopped: bool) -> str:
        """The model folder is written: log what the run lacks up to the checkpoint this session
        resumed from (from the model folder's records), tag the weights, end the run FINISHED."""
        import mlflow

        from aigc_pipeline.io import sha256_file
        from aigc_pipeline.models.export import WEIGHTS_FILE

        self.send()
        client, run_id = self._open_run()
        if self.resumed_from > 0:
            runs.log_training_files(
                client,
                run_id,
                Path(model),
                upto=self.resumed_from,
                held=self._held,
                held_images=self._images,
            )
        tags = {runs.WEIGHTS_TAG: sha256_file(Path(model) / WEIGHTS_FILE), "aigc.steps": str(steps)}
        if stopped:
            tags["aigc.stopped_at_step"] = str(steps)
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        mlflow.end_run(status="FINISHED")
        self._ended = True
        return run_id

    @_uninterrupted()
    def fail(self, error: BaseException) -> None:
        """End the run KILLED (an interruption) or FAILED, with the error as tags; a diverged
        training's losses up to the bad step are logged first."""
        import mlflow

        from aigc_pipeline.errors import TrainingDiverged

        killed = isinstance(error, KeyboardInterrupt)
        try:
            self.send()
            client, run_id = self._open_run()
            if isinstance(error, TrainingDiverged) and error.history:
                runs.log_step_metrics(client, run_id, error.history, after=self._streamed_until, held=self._held)
            tags = {"aigc.error_type": type(error).__name__, "aigc.error": str(error)[: runs._MAX_TAG]}
            if isinstance(error, TrainingDiverged) and error.step is not None:
                tags["aigc.failed_step"] = str(error.step)
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
        finally:
            mlflow.end_run(status="KILLED" if killed else "FAILED")
            self._ended = True
        print(
            f"  train: recorded as {'KILLED' if killed else 'FAILED'} MLflow run {self.run_id}",
            file=sys.stderr,
            flush=True,
        )

    # -- batching ------------------------------------------------------------------------------

    def _queue(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # What the run held before this session is not logged again: a resumed training recomputes
        # the steps between its checkpoint and where the killed process had got to.
        self._pending += [
            Metric(k, float(v), now, int(step)) for k, v in values.items() if int(step) not in self._held.get(k, ())
        ]
        if len(self._pending) >= _FLUSH_METRICS or time.monotonic() - self._last_send >= _FLUSH_SECONDS:
            self.send()

    def send(self) -> None:
        """Send the waiting metrics now."""
        with _uninterrupted():
            while self._pending:
                batch, self._pending = self._pending[:_FLUSH_METRICS], self._pending[_FLUSH_METRICS:]
                client, run_id = self._open_run()
                client.log_batch(run_id, metrics=batch)
        self._last_send = time.monotonic()

    def _open_run(self) -> tuple[MlflowClient, str]:
        """The client and the run's id: set by ``__enter__`` and ``start``, which every later callback follows."""
        assert self._client is not None and self.run_id is not None
        return self._client, self.run_id
