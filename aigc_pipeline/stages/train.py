"""Train: fit the configured model family on the augmented dataset; export the generator.

With ``train.devices: N > 1`` the stage starts ``torchrun --nproc_per_node N`` on
:mod:`aigc_pipeline.stages.train_worker`, which runs this same function in every process
(data parallel, DDP); rank 0 writes the outputs and this process reports them.

With a ``project_dir`` the training is an MLflow run as it goes (:mod:`aigc_pipeline.tracking.live`,
through the trainer's callbacks: the trainer itself knows nothing of MLflow): params and dataset
inputs when it starts, losses, per-epoch stats, FID over training, sample grids (images with a step
slider) and system metrics while it runs, the weights' sha256 when the model is written (evaluate
and register find the run by it). A training that diverges or raises ends its run FAILED (the
losses up to the failure, the error as tags) and re-raises, so a flow stops before anything is
registered; an interrupted one (Ctrl-C, SIGTERM) ends it KILLED.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import numpy as np

from aigc_pipeline.compute import COMPUTE_FILE, Meter
from aigc_pipeline.config import Config, TrainConfig, config_digest
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.errors import ConfigError, DataError, TrainingDiverged
from aigc_pipeline.images import make_grid, png_bytes
from aigc_pipeline.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.models.export import save_generator
from aigc_pipeline.models.families import generator_spec, resolve_hparams
from aigc_pipeline.training import distributed
from aigc_pipeline.training.budget import (
    Budget,
    Estimate,
    auto_ema_decay,
    auto_lr,
    auto_width,
    evaluation_warning,
    format_duration,
    plan_warning,
    resolve_budget,
    resolve_model,
)
from aigc_pipeline.training.loop import Callbacks, train
from aigc_pipeline.training.speed import resolve_device

if TYPE_CHECKING:  # the stage imports it when a reference is given: torch-fidelity only then
    from aigc_pipeline.evaluation.work import InceptionWork

# Settings that change how fast training runs but not what it computes (beyond floating-point
# order): left out of the checkpoint folder's key, so changing them resumes instead of restarting.
_OPERATIONAL = ("devices", "data_placement", "keep_checkpoints", "checkpoint_every", "sample_grid", "sample_every")


@dataclass(frozen=True)
class TrainStageResult:
    out: Path
    model: str
    steps: int
    resumed_from: int
    images_per_second: float
    final_losses: dict[str, float]
    speed: str = ""  # device, precision, memory format, compile
    world_size: int = 1
    stopped: bool = False  # should_stop ended training at ``steps``, before the configured epochs
    kimg: float = 0.0  # the planned length: thousands of images shown at the last step
    estimated_seconds: float = float("nan")  # the plan's wall time of this call's training (after its warm-up)
    seconds: float = float("nan")  # the wall time this call's training took


class TrainingObserver(Protocol):
    """What a caller in this process (a Prefect task) is told while the train stage runs."""

    def plan(self, text: str) -> None:
        """The plan: its length, then with the estimated time once the warm-up was measured."""

    def epoch(self, epoch: int, epochs: int, step: int, total: int, seconds_left: float | None) -> None:
        """An epoch ended at ``step`` of ``total``; ``seconds_left``: None before the first step."""


def run(
    cfg: Config,
    data: Path,
    out: Path,
    checkpoints: Path,
    *,
    reference: Path | None = None,
    quiet: bool = False,
    project_dir: Path | None = None,
    should_stop: Callable[[int], bool] | None = None,
    observer: TrainingObserver | None = None,
) -> TrainStageResult:
    """Train on the prepared dataset at ``data``; write the model folder ``out``.

    With ``reference`` (a prepared dataset), FID over training is measured every
    ``evaluate.progress_every`` epochs and written to ``fid_progress.csv``.

    Checkpoints go to ``checkpoints/<config hash>/``: a rerun with the same config and data
    resumes, a changed config starts fresh instead of resuming someone else's state.
    ``project_dir`` locates the MLflow store the training is logged to live (None, or
    ``AIGC_LIVE_TRACKING=0``: no MLflow; register logs it afterwards from the model folder;
    a resumed training continues its run, see :mod:`aigc_pipeline.tracking.live`). ``should_stop(step)``
    (single process only) ends training early but cleanly: the model folder holds the generator
    as it is at that step (``steps`` in model.json says how far it got), and a later run with
    the same config resumes from there (``bench/quality.py`` measures training budgets this way).
    ``observer`` hears the plan and each epoch (rank 0 of this process only: a data-parallel
    training launched from here runs its ranks in other processes).
    """
    tcfg = cfg.train
    if tcfg.devices > 1 and should_stop is not None:
        raise ConfigError("train.devices > 1: stopping at a budget (should_stop) works with one process only")
    if tcfg.devices > 1 and not distributed.under_torchrun():
        return _launch_data_parallel(
            cfg, data, out, checkpoints, reference=reference, quiet=quiet, project_dir=project_dir
        )
    meter = Meter()
    dist_info = distributed.init_from_env(resolve_device(tcfg.device).type)
    prepared = load_prepared(data)
    num_classes = 0
    if tcfg.conditional:
        if not prepared.classes or (prepared.labels < 0).any():
            raise ConfigError(
                f"train.conditional: dataset '{cfg.dataset}' at {data} is not labelled "
                "(every image needs a class); set train.conditional=false"
            )
        num_classes = len(prepared.classes)
    size, device = prepared.images.shape[-1], resolve_device(tcfg.device)
    family = resolve_model(tcfg.model, size=size, device=device.type)
    budget = plan_budget(
        cfg, family=family, train_images=len(prepared.images), size=size, channels=prepared.images.shape[1]
    )
    # The family, length, width and EMA as the auto settings resolved, for the checkpoint key, the
    # recipe, FID over training and the trainer; ``cfg`` stays the settings, as model.json's
    # ``train`` and the MLflow params record them (beside the resolved values).
    resolved = dataclasses.replace(
        cfg, train=dataclasses.replace(resolve_auto(tcfg, family=family, size=size), epochs=budget.epochs)
    )
    tcfg = resolved.train
    assert tcfg.epochs is not None and tcfg.width != "auto"  # budget.epochs and resolve_auto, just above
    arch = Arch(
        family=family,
        size=size,
        channels=prepared.images.shape[1],
        latent_dim=tcfg.latent_dim,
        width=tcfg.width,
        num_classes=num_classes,
    )
    hp = resolve_hparams(tcfg)
    key_cfg = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in _OPERATIONAL}
    run_key = config_digest({"train": key_cfg, "arch": arch.__dict__, "data": prepared.digest})[:16]
    ckpt_dir = Path(checkpoints) / run_key
    # Epoch grids are written beside the checkpoints as they come, so a resumed run still
    # publishes the grids of the epochs an interrupted process finished.
    grid_dir = ckpt_dir / "samples"
    show = not quiet and dist_info.is_main
    fid_progress = None
    if reference is not None and dist_info.is_main:
        from aigc_pipeline.evaluation.progress import progress_hook  # torch-fidelity only when asked for

        fid_progress = progress_hook(resolved, reference, arch, device=device)
    fid_epochs: list[int] = []
    fid_rate = None
    if fid_progress is not None:
        fid_epochs = [e for e in range(1, tcfg.epochs + 1) if fid_progress.due(e)]
        # Before training, so that a cold cache's Inception pass is neither inside the first
        # point nor missing from the estimate: its measured rate prices the points to come.
        fid_rate = fid_progress.prepare()
        if fid_rate is not None and show:
            count = len(fid_progress.reference)
            print(
                f"  train: reference statistics for FID over training: {count} images in "
                f"{format_duration(fid_rate * count)} (cached; the evaluation reuses them)",
                file=sys.stderr,
                flush=True,
            )
    evaluation = None
    if reference is not None and dist_info.is_main:
        from aigc_pipeline.evaluation.work import inception_work

        weights = fid_progress.weights if fid_progress is not None else None  # already resolved: not hashed again
        evaluation = inception_work(cfg.evaluate, Path(reference), weights=weights)
    progress = Progress(
        tcfg.epochs,
        enabled=show,
        budget=budget,
        device=device.type,
        fid_epochs=fid_epochs,
        fid_samples=fid_progress.samples if fid_progress is not None else 0,
        fid_seconds_per_sample=fid_rate,
        evaluation=evaluation,
        observer=observer if dist_info.is_main else None,
    )

    tracker = None
    if project_dir is not None and dist_info.is_main:
        from aigc_pipeline.tracking import live

        if live.enabled():
            tracker = live.TrainingRun(
                project_dir, cfg, key=run_key, hparams=resolved_settings(hp, budget, family, arch.width)
            )

    def on_start(info: dict[str, Any]) -> None:
        progress.start(info)
        if tracker is not None:
            tracker.start(info)

    def on_progress(step: int, total: int, epoch: int) -> None:
        progress.step(step, total, epoch)
        if tracker is not None:
            tracker.progress(step, total, epoch)

    def on_epoch_end(epoch: int, grid: np.ndarray | None, stats: dict[str, float]) -> None:
        if grid is not None:
            atomic_write_bytes(grid_dir / f"epoch-{epoch:03d}.png", png_bytes(make_grid(grid)))
        progress.epoch(epoch, stats)
        if tracker is not None:
            tracker.epoch(epoch, grid, stats)

    def on_epoch_generator(epoch: int, generator: Any) -> None:
        assert fid_progress is not None  # only installed when FID over training is measured
        measured = len(fid_progress.rows)
        fid_progress(epoch, generator)
        if tracker is not None and len(fid_progress.rows) > measured:
            tracker.fid(fid_progress.metric, fid_progress.rows[-1][fid_progress.metric])

    with tracker if tracker is not None else contextlib.nullcontext():
        try:
            result = train(
                prepared.images,
                labels=prepared.labels if num_classes else None,
                arch=arch,
                hparams=hp,
                epochs=tcfg.epochs,
                batch_size=tcfg.batch_size,
                seed=tcfg.seed,
                checkpoint_dir=ckpt_dir,
                checkpoint_every=tcfg.checkpoint_every,
                keep_checkpoints=tcfg.keep_checkpoints,
                device=tcfg.device,
                sample_grid=tcfg.sample_grid,
                sample_every=tcfg.sample_every,
                max_grad_norm=tcfg.max_grad_norm,
                precision=tcfg.precision,
                channels_last=tcfg.channels_last,
                compile=tcfg.compile,
                data_placement=tcfg.data_placement,
                callbacks=Callbacks(
                    on_start=on_start,
                    on_progress=on_progress,
                    on_epoch_end=on_epoch_end,
                    on_metrics=tracker.metrics if tracker is not None else None,
                    on_epoch_generator=on_epoch_generator if fid_progress is not None else None,
                    should_stop=should_stop,
                    save_state=fid_progress.state if fid_progress is not None else None,
                    restore_state=fid_progress.restore if fid_progress is not None else None,
                ),
            )
        except TrainingDiverged as e:
            progress.close()
            print(f"  train: {e}; nothing registered", file=sys.stderr, flush=True)
            raise
        finally:
            progress.close()  # idempotent
        seconds = progress.elapsed()
        final = {k: v for k, v in result.history[-1].items() if k != "step"}
        if dist_info.is_main:
            fid_csv = fid_progress.csv_text() if fid_progress is not None and fid_progress.rows else None
            compute = {
                **meter.read(),
                "device": result.speed,
                "devices": dist_info.world,
                "images_shown": result.steps * tcfg.batch_size,
                "steps": result.steps,
                "resumed_from_step": result.resumed_from,
            }
            _write_model(
                out,
                result,
                arch,
                cfg,
                hp,
                budget,
                prepared.digest,
                list(prepared.classes),
                final,
                grid_dir,
                fid_csv,
                compute,
            )
        if tracker is not None:
            tracker.finish(model=out, steps=result.steps, stopped=result.stopped)
    return TrainStageResult(
        out=out,
        model=tcfg.model,
        steps=result.steps,
        resumed_from=result.resumed_from,
        images_per_second=result.images_per_second,
        final_losses=final,
        speed=result.speed,
        world_size=dist_info.world,
        stopped=result.stopped,
        kimg=budget.kimg,
        estimated_seconds=progress.planned_seconds,
        seconds=seconds,
    )


def _write_model(
    out: Path,
    result: Any,
    arch: Arch,
    cfg: Config,
    hp: Hparams,
    budget: Budget,
    digest: str,
    classes: list[str],
    final: dict[str, float],
    grid_dir: Path,
    fid_csv: str | None,
    compute: dict[str, Any],
) -> None:
    with atomic_dir(out) as tmp:
        save_generator(
            tmp,
            result.family.generator,
            arch,
            {
                "model": arch.family,  # the family trained (train.model, or what its auto resolved to)
                "dataset": cfg.dataset,
                "data_digest": digest,
                "classes": classes,
                "steps": result.steps,
                "train": dataclasses.asdict(cfg.train),  # the settings, as params.yaml says them
                # With the values used where the config says auto (the recipe's lr/betas, the length).
                "hparams": resolved_settings(hp, budget, arch.family, arch.width),
                "budget": {
                    "kimg": budget.kimg,
                    "images": budget.images,
                    "steps": budget.steps,
                    "epochs": budget.epochs,
                    "source": budget.source,
                    "requested_kimg": budget.requested_kimg,
                },
                "speed": result.speed,
                "source_size": cfg.active_dataset.size,
                "final_losses": final,
            },
            generator_spec(result.family),
        )
        # The grids of the epochs completed (all of them, unless should_stop ended training early).
        grids = [g for e in range(1, len(result.epoch_log) + 1) if (g := grid_dir / f"epoch-{e:03d}.png").exists()]
        for grid in grids:
            atomic_write_bytes(tmp / "samples" / grid.name, grid.read_bytes())
        if grids:
            atomic_write_bytes(tmp / "samples.png", grids[-1].read_bytes())
        atomic_write_text(tmp / "history.csv", _csv(result.history))
        atomic_write_text(tmp / "epochs.csv", _csv(result.epoch_log))
        # Wall-clock figures of the epochs this process ran: the one output that is not reproducible.
        atomic_write_text(tmp / TIMING_FILE, _csv(result.timing))
        atomic_write_json(tmp / COMPUTE_FILE, compute)  # what this training cost (not reproducible either)
        if fid_csv is not None:  # FID over training (every point: they travel in the checkpoints)
            atomic_write_text(tmp / "fid_progress.csv", fid_csv)


def plan_budget(cfg: Config, *, family: str, train_images: int, size: int, channels: int = 1) -> Budget:
    """The length ``train.epochs``/``train.kimg`` resolve to for ``family`` on ``train_images``
    images of ``size`` px and ``channels`` channels."""
    tcfg = cfg.train
    try:
        return resolve_budget(
            family=family,
            size=size,
            train_images=train_images,
            batch_size=tcfg.batch_size,
            epochs=tcfg.epochs,
            kimg=tcfg.kimg,
            channels=channels,
        )
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None


def resolve_auto(tcfg: TrainConfig, *, family: str, size: int) -> TrainConfig:
    """``tcfg`` with the family, ``width``, ``ema_decay`` and ``lr`` that ``auto`` stands for at
    ``size`` px (the tables of :mod:`aigc_pipeline.training.budget`); a set value stays as it is, and
    an ``lr`` the table leaves to the family stays ``auto`` (its recipe's)."""
    try:
        width = auto_width(family, size)[0] if tcfg.width == "auto" else tcfg.width
        ema = auto_ema_decay(family, size)[0] if tcfg.ema_decay == "auto" else tcfg.ema_decay
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    lr = tcfg.lr
    if lr == "auto":
        lr = auto_lr(family, size) or "auto"
    return dataclasses.replace(tcfg, model=family, width=width, ema_decay=ema, lr=lr)


def resolved_settings(hp: Hparams, budget: Budget, family: str, width: int) -> dict[str, Any]:
    """The settings training used where params.yaml may say auto: the family, the recipe's (lr,
    betas, EMA decay, ...), the width and the length (``epochs``, ``kimg``: images shown / 1000).
    model.json's ``hparams``; the MLflow params."""
    return {"model": family, **dataclasses.asdict(hp), "width": width, "epochs": budget.epochs, "kimg": budget.kimg}


def _csv(rows: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: int(v) if k in ("step", "epoch") else v for k, v in row.items()})
    return buf.getvalue()


TIMING_FILE = "timing.csv"


# ---------------------------------------------------------------------------
# Data parallel: this process starts torchrun and reports what rank 0 wrote.


def _launch_data_parallel(
    cfg: Config,
    data: Path,
    out: Path,
    checkpoints: Path,
    *,
    reference: Path | None,
    quiet: bool,
    project_dir: Path | None,
) -> TrainStageResult:
    import aigc_pipeline

    n = cfg.train.devices
    with tempfile.TemporaryDirectory(prefix="aigc-train-") as tmp:
        config_file, result_file = Path(tmp) / "config.json", Path(tmp) / "result.json"
        atomic_write_json(config_file, cfg.to_dict())
        cmd = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                "-m",
                "aigc_pipeline.stages.train_worker",
                str(config_file),
                str(Path(data).resolve()),
                str(Path(out).resolve()),
                str(Path(checkpoints).resolve()),
                str(Path(project_dir or ".").resolve()),
                str(result_file),
            ]
            + (["--quiet"] if quiet else [])
            + (["--no-tracking"] if project_dir is None else [])
            + (["--reference", str(Path(reference).resolve())] if reference is not None else [])
        )
        # The workers import the same package as this process, wherever the command runs.
        package_root = str(Path(aigc_pipeline.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        if not quiet:
            print(f"  train: data parallel on {n} processes: {' '.join(cmd[:6])} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            cmd,
            env=env,
            stdout=sys.stderr if not quiet else subprocess.DEVNULL,
            stderr=None if not quiet else subprocess.PIPE,
            text=True,
        )
        doc = json.loads(result_file.read_text()) if result_file.exists() else {}
    if proc.returncode != 0 or "error" in doc or not doc:
        raise _worker_error(doc, proc.returncode, getattr(proc, "stderr", None))
    return TrainStageResult(
        out=Path(doc["out"]),
        model=doc["model"],
        steps=doc["steps"],
        resumed_from=doc["resumed_from"],
        images_per_second=doc["images_per_second"],
        final_losses=doc["final_losses"],
        speed=doc["speed"],
        world_size=doc["world_size"],
    )


def _worker_error(doc: dict[str, Any], returncode: int, stderr: str | None) -> Exception:
    """Re-create the error rank 0 reported (same type for user errors), else a RuntimeError."""
    kinds = {"TrainingDiverged": TrainingDiverged, "ConfigError": ConfigError, "DataError": DataError}
    if doc.get("error") in kinds:
        return kinds[doc["error"]](doc["message"])
    tail = (stderr or "")[-3000:]
    detail = doc.get("message") or f"see the output above{': ' + tail if tail else ''}"
    return RuntimeError(f"data-parallel training failed (torchrun exited with {returncode}): {detail}")


def report_for_parent(result_file: Path, result: TrainStageResult | None, error: BaseException | None) -> None:
    """Rank 0 of a data-parallel run: tell the launching process what happened (a JSON file)."""
    if error is not None:
        doc: dict[str, Any] = {"error": type(error).__name__, "message": str(error)}
    else:
        assert result is not None  # the worker passes its result or its error
        doc = {**dataclasses.asdict(result), "out": str(result.out)}
    atomic_write_json(result_file, doc)


# ---------------------------------------------------------------------------
# Terminal output


class Progress:
    """The plan before the wait, a progress bar on a terminal (redrawn at most 10 times a second)
    and one line per epoch (on a terminal or not): losses, images/s, learning rate, time left.

    The plan line comes twice: at the start (steps, images, epochs), then with the estimated wall
    time once a short warm-up has been measured: the seconds per step of the first steps after
    :attr:`WARMUP_SKIP` (which pay for allocation and kernel selection), times the steps left, plus
    the FID-over-training points to come; then the model's evaluation (``evaluation``), priced at
    the same Inception rate. Later estimates use the average since the start.
    """

    WIDTH = 24
    WARMUP_SKIP = 2  # steps left out of the warm-up measurement
    WARMUP_STEPS = 20  # steps measured, at most ...
    WARMUP_SECONDS = 5.0  # ... or until this much time has passed (at least 3 steps)
    # A FID-over-training point's Inception pass per sample, when it was not measured on this
    # device (the reference statistics came from the cache): this project's 2-core reference CPU;
    # GPUs: negligible beside training.
    FID_SECONDS_PER_SAMPLE_CPU = 0.13

    def __init__(
        self,
        epochs: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        budget: Budget | None = None,
        device: str = "cpu",
        fid_epochs: Sequence[int] = (),
        fid_samples: int = 64,
        fid_seconds_per_sample: float | None = None,
        evaluation: InceptionWork | None = None,
        observer: TrainingObserver | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.observer = observer
        self.tty = enabled and self.stream.isatty()
        self.epochs = epochs
        self.budget = budget
        self.device = device
        self.fid_epochs = tuple(fid_epochs)  # the epochs that end with a FID-over-training point
        if fid_seconds_per_sample is None:
            fid_seconds_per_sample = self.FID_SECONDS_PER_SAMPLE_CPU if device == "cpu" else 0.0
        self.fid_seconds_per_point = fid_samples * fid_seconds_per_sample
        self.evaluation = evaluation  # what the model's evaluation will put through Inception, priced in the plan
        self.evaluation_seconds = evaluation.images * fid_seconds_per_sample if evaluation is not None else 0.0
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.first_step = None
        self.step_no = self.total = 0
        self.drawn = False
        self.warmup: tuple[int, float] | None = None  # (step, time) where the warm-up measurement began
        self.estimate: Estimate | None = None  # the plan's, once the warm-up has been measured
        self.planned_seconds = float("nan")  # the plan's wall time of the whole call: warm-up + estimate

    def start(self, info: dict[str, Any]) -> None:
        self.first_step, self.total = info["resumed_from"], info["total_steps"]
        self.t0 = time.perf_counter()
        self.warmup, self.estimate = None, None
        plan = None
        if self.budget is not None:
            plan = f"{self.budget.describe()}; measuring a warm-up for the time estimate"
        if plan is not None and self.observer is not None:
            self.observer.plan(plan)
        if self.enabled:
            resumed = f", resumed from step {info['resumed_from']}" if info["resumed_from"] else ""
            world = f", {info['world_size']} processes" if info["world_size"] > 1 else ""
            print(
                f"  train: {info['speed']}, data on {info['data_placement']}{world}{resumed}",
                file=self.stream,
                flush=True,
            )
            if plan is not None:
                print(f"  train plan: {plan}", file=self.stream, flush=True)

    def step(self, step: int, total: int, epoch: int) -> None:
        self.step_no, self.total = step, total
        now = time.perf_counter()
        self._measure_warmup(step, total, now)
        if self.tty and (now - self.last_draw >= 0.1 or step == total):
            self.last_draw = now
            done = step / total if total else 1.0
            bar = "#" * int(done * self.WIDTH) + "-" * (self.WIDTH - int(done * self.WIDTH))
            rate = (step - (self.first_step or 0)) / max(now - self.t0, 1e-9)
            print(
                f"\r  train [{bar}] {step}/{total} epoch {epoch}/{self.epochs}  {rate:.1f} it/s  "
                f"eta {_duration_or_unknown(self._seconds_left(step, now))} ",
                end="",
                file=self.stream,
                flush=True,
            )
            self.drawn = True

    def _measure_warmup(self, step: int, total: int, now: float) -> None:
        if self.estimate is not None or self.first_step is None:
            return
        if self.warmup is None:
            if step - self.first_step >= self.WARMUP_SKIP or step == total:
                self.warmup = (step, now)
            return
        measured, seconds = step - self.warmup[0], now - self.warmup[1]
        if not (step == total or measured >= self.WARMUP_STEPS or (measured >= 3 and seconds >= self.WARMUP_SECONDS)):
            return
        per_step = seconds / measured
        # The points still ahead (a resumed training has made the earlier ones); epoch e ends at step e * per epoch.
        per_epoch = self.budget.steps_per_epoch if self.budget is not None else max(total // max(self.epochs, 1), 1)
        points = sum(1 for e in self.fid_epochs if e * per_epoch > step)
        # Steps before the warm-up window are part of the run too (their time has passed already).
        self.estimate = Estimate(per_step, total - step, points * self.fid_seconds_per_point)
        self.planned_seconds = now - self.t0 + self.estimate.seconds
        plan = self.budget.describe() if self.budget is not None else f"{total} steps"
        plan += (
            f"; estimated {format_duration(self.estimate.seconds)} left on {self.device} ({per_step:.3g} s/step "
            f"over {measured} warm-up steps"
            + (f", {points} FID-over-training point{'s' if points != 1 else ''}" if points else "")
            + ")"
        )
        if self.evaluation is not None:
            plan += f"; then its evaluation: {self.evaluation.describe()}"
            if self.evaluation_seconds > 0:  # 0: a GPU where no pass was measured (negligible)
                plan += f", about {format_duration(self.evaluation_seconds)}"
        if self.observer is not None:
            self.observer.plan(plan)
        if not self.enabled:
            return
        prefix = "\r\033[K" if self.drawn else ""
        self.drawn = False
        print(f"{prefix}  train plan: {plan}", file=self.stream, flush=True)
        warning = plan_warning(self.estimate.seconds + (now - self.t0), self.device)
        if warning:
            print(f"  train: warning: {warning}", file=self.stream, flush=True)
        if self.evaluation is not None:
            warning = evaluation_warning(
                self.evaluation_seconds,
                self.device,
                images=self.evaluation.images,
                copying=self.evaluation.copying,
            )
            if warning:
                print(f"  train: warning: {warning}", file=self.stream, flush=True)

    def elapsed(self) -> float:
        """Seconds since training started (the trainer's ``on_start``)."""
        return time.perf_counter() - self.t0

    def _seconds_left(self, step: int, now: float) -> float | None:
        """Time left, from the average seconds per step since the start (FID points included)."""
        done = step - (self.first_step or 0)
        if done <= 0:
            return None
        return (self.total - step) * (now - self.t0) / done

    def epoch(self, epoch: int, stats: dict[str, float]) -> None:
        left = self._seconds_left(self.step_no, time.perf_counter())
        if self.observer is not None:
            self.observer.epoch(epoch, self.epochs, self.step_no, self.total, left)
        if not self.enabled:
            return
        rate = stats.get("images_per_s", float("nan"))
        lrs = " ".join(f"{k} {v:.2g}" for k, v in stats.items() if k.startswith("lr_"))
        losses = "  ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.startswith(("loss", "recon", "kl")))
        prefix = "\r\033[K" if self.drawn else ""
        self.drawn = False
        print(
            f"{prefix}  train epoch {epoch}/{self.epochs}  step {self.step_no}/{self.total}  {losses}  "
            f"{rate:.0f} img/s  {lrs}  eta {_duration_or_unknown(left)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.drawn:
            print(file=self.stream, flush=True)
            self.drawn = False


def _duration_or_unknown(seconds: float | None) -> str:
    return "?" if seconds is None else format_duration(seconds)
