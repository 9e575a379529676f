"""One MLflow run per pipeline run: how train, evaluate and register find the same run.

The train stage opens the run when training starts (:mod:`aigc_pipeline.tracking.live`) and tags
it with the training's key (``aigc.train_key``: the checkpoint folder's config hash) and, once
the model folder is written, with the sha256 of its weights (``aigc.weights_sha256``). Nothing
about the run goes into a DVC output: evaluate and register hash the weights file they are given
and look the run up by that tag (:func:`find_run`), so both front doors (``dvc repro``,
``aigc run``) and a clone that trained elsewhere find the run that trained exactly this model.

A run is reused only when it can hold what the stage logs:

- its params agree with the stage's config (a key both have with different values means the run
  was made under another config: MLflow params are write-once);
- it holds no other evaluation (``aigc.evaluation_sha256``, the digest of ``metrics.json`` and
  ``evaluation.json``): a registered version is judged by its run's metrics, so one run holds one
  evaluation.

A stage claims the run it picked before it logs into it: the evaluation's digest goes into the
write-once param ``evaluate.evaluation_sha256``. The store refuses a second value for a param
(a unique key in MLflow's SQL stores), so of two stages that picked the same run at once for
different evaluations (two ``aigc register`` of one model, at the same moment) one claim fails,
and that stage looks again, skipping the claimed run. Without the claim both would log their
metrics into one run and a version would be judged by the other one's FID. A fresh run gets its
``aigc.weights_sha256`` tag only once it is claimed and filled, so nobody else finds it half made.

When no run qualifies (training ran with ``AIGC_LIVE_TRACKING=0`` or on a machine without MLflow
access, the store was reset, the model is re-evaluated under other settings), the stage creates a
fresh run and logs the training into it from the model folder (:func:`create_run_from_files`):
the same params, per-step losses, per-epoch stats, FID over training and sample grids, under the
same names and steps as the live run, only with the timestamps of that moment.

Every curve uses one step unit, the global training step: ``train/*`` (per-step losses and
gradient norms), ``train_epoch/*`` (per-epoch means, learning rates, images/s, and
``train_epoch/epoch`` to read the epoch off a step), ``fid_progress_<protocol>`` (FID over
training), the ``samples`` image grids, and the evaluation's metrics (logged at the model's last
step).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

from aigc_pipeline.config import Config
from aigc_pipeline.errors import AigcError

FLOW_RUN_ENV = "AIGC_FLOW_RUN_ID"  # set by the Prefect flow; tagged for lineage
_MAX_TAG = 5000  # MLflow's tag value limit is 8000 characters; keep room
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
_METRICS_PER_BATCH = 900  # under MLflow's 1000

TRAIN_KEY_TAG = "aigc.train_key"  # the training configuration + data (the checkpoint folder's key)
WEIGHTS_TAG = "aigc.weights_sha256"  # sha256 of generator.safetensors, once the model is written
EVALUATION_TAG = "aigc.evaluation_sha256"  # digest of the evaluation this run holds (once logged)
EVALUATION_PARAM = "evaluate.evaluation_sha256"  # the same digest, claimed before logging (write-once)
TRAINING_TAG = "aigc.training"  # "live" (streamed by the train stage) or "from model folder"
STAGE_TAG = "aigc.stage"  # the last stage that wrote to the run: train, evaluate, register
SAMPLES_KEY = "samples"  # mlflow.log_image key of the fixed-noise grids (the charts' image grid)
EVALUATION_KEY = "evaluation"  # ... and of the evaluation's sample grid
PROTOCOL_PARAM = "evaluate.protocol"  # the protocol id beside the short metric names
CLASSIFIER_PARAM = "evaluate.classifier_protocol"


class RunClaimError(AigcError, RuntimeError):
    """The store did not keep a run's claim for an evaluation (see the module docstring)."""


# train.* settings that may say "auto": the model's recipe decides (aigc_pipeline.models.families.recipe_for).
RESOLVED_KEYS = ("model", "lr", "beta1", "beta2", "ema_decay", "width", "epochs", "kimg")


def flat_params(cfg: Config, resolved: dict[str, Any] | None = None) -> dict[str, str]:
    """The active dataset's entry and every stage section, as dotted keys -> strings.

    With ``resolved`` (the settings training used, model.json's ``hparams``), ``train.model``,
    ``train.lr``, ``train.beta1``, ``train.beta2``, ``train.ema_decay``, ``train.width``, ``train.epochs`` and
    ``train.kimg`` hold the values used, so a
    params diff shows the real difference between two families' recipes and lengths; the setting
    itself (``auto``, ``None`` or a number) stays beside them as ``train.lr_setting`` etc.
    """
    d = cfg.to_dict()
    out: dict[str, Any] = {"dataset": cfg.dataset}
    for k, v in d["datasets"][cfg.dataset].items():
        out[f"datasets.{cfg.dataset}.{k}"] = v
    for section in ("ingest", "augment", "train", "evaluate", "register"):
        for k, v in d[section].items():
            out[f"{section}.{k}"] = v
    if resolved is None:
        from aigc_pipeline.models.families import resolve_hparams

        resolved = dataclasses.asdict(resolve_hparams(cfg.train))
    for k in RESOLVED_KEYS:
        if k in resolved:
            out[f"train.{k}_setting"] = out[f"train.{k}"]
            out[f"train.{k}"] = resolved[k]
    return {k: str(v) for k, v in out.items()}


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log ``params`` in batches (values a run already holds are logged again, which MLflow allows)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + _PARAMS_PER_BATCH])


def log_step_metrics(
    client: Any,
    run_id: str,
    rows: Iterable[Mapping[str, Any]],
    prefix: str = "train/",
    *,
    after: int = 0,
    upto: float = math.inf,
    held: Mapping[str, Container[int]] | None = None,
) -> None:
    """Log per-step records (``{"step": s, name: value, ...}``) as metrics ``<prefix><name>`` at
    step ``s``, in batches; only steps in (``after``, ``upto``], and not the (metric, step) pairs
    in ``held`` (metric -> steps the run already holds)."""
    from mlflow.entities import Metric

    held = held or {}
    now = int(time.time() * 1000)
    batch: list[Metric] = []
    for row in rows:
        step = int(float(row["step"]))
        if not after < step <= upto:
            continue
        batch += [
            Metric(f"{prefix}{k}", float(v), now, step)
            for k, v in row.items()
            if k != "step" and v != "" and step not in held.get(f"{prefix}{k}", ())
        ]
        if len(batch) >= _METRICS_PER_BATCH:
            client.log_batch(run_id, metrics=batch)
            batch = []
    if batch:
        client.log_batch(run_id, metrics=batch)


def params_conflict(held: Mapping[str, str], wanted: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Keys both hold with different values: ``{key: (held, wanted)}`` (empty: the run can take them)."""
    return {k: (held[k], v) for k, v in wanted.items() if k in held and held[k] != v}


def evaluation_digest(evaluation: Path) -> str:
    """sha256 of an evaluation folder's two files (what ``aigc.evaluation_sha256`` holds)."""
    from aigc_pipeline.evaluation.results import DETAILS_FILE, METRICS_FILE

    h = hashlib.sha256()
    for name in (METRICS_FILE, DETAILS_FILE):
        h.update(hashlib.sha256((Path(evaluation) / name).read_bytes()).digest())
    return h.hexdigest()


def find_run(
    client: Any, experiment_id: str, weights_sha256: str, params: Mapping[str, str], evaluation: str | None = None
) -> Any | None:
    """The newest run that trained the model with these weights and can take ``params`` and
    ``evaluation`` (see the module docstring), or None. Deleted runs are never returned."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{WEIGHTS_TAG}` = '{weights_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        held = run.data.tags.get(EVALUATION_TAG)
        if held is not None and evaluation is not None and held != evaluation:
            continue
        if held is not None and evaluation is None:
            continue  # the stage brings no evaluation, so it cannot tell whether this one is its own
        if params_conflict(run.data.params, params):
            continue
        return run
    return None


def run_tags(cfg: Config, stage: str, family: str | None = None) -> dict[str, str]:
    """Tags every stage sets on the run: dataset, family (``family``: what ``train.model: auto``
    resolved to), the stage, the Prefect flow run."""
    tags = {
        "aigc.dataset": cfg.dataset,
        "aigc.model": family or cfg.train.model,
        "aigc.family": family or cfg.train.model,
        STAGE_TAG: stage,
    }
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def pipeline_run(
    client: Any,
    experiment_id: str,
    cfg: Config,
    project_dir: Path,
    model: Path,
    *,
    stage: str,
    evaluation: str | None = None,
    extra_params: Mapping[str, str] | None = None,
    ui: str,
) -> tuple[str, bool]:
    """``(run id, created)``: the run that trained the model in ``model`` (:func:`find_run`), or a
    fresh one filled from the model folder (:func:`create_run_from_files`)."""
    from aigc_pipeline.io import sha256_file
    from aigc_pipeline.models.export import WEIGHTS_FILE, read_model_meta

    meta = read_model_meta(model)
    params = {**flat_params(cfg, resolved=meta.get("hparams")), **(extra_params or {})}
    if evaluation is not None:
        params[EVALUATION_PARAM] = evaluation  # find_run skips runs claimed for another evaluation
    weights = sha256_file(Path(model) / WEIGHTS_FILE)
    tried: set[str] = set()
    while (found := find_run(client, experiment_id, weights, params, evaluation)) is not None:
        run_id = found.info.run_id
        if evaluation is None or claim_run(client, run_id, evaluation):
            return run_id, False
        if run_id in tried:  # claimed by another, yet still found: the store did not keep the claim
            raise RunClaimError(
                f"MLflow run {run_id}: claimed for another evaluation, yet its param "
                f"{EVALUATION_PARAM} does not say so; a store that does not keep params "
                "write-once cannot hold concurrent stages (use an SQL store or a tracking server)"
            )
        tried.add(run_id)
    run_id = create_run_from_files(
        client, experiment_id, cfg, project_dir, model, params=params, weights=weights, stage=stage, ui=ui
    )
    return run_id, True


def claim_run(client: Any, run_id: str, evaluation: str) -> bool:
    """Claim run ``run_id`` for the evaluation with digest ``evaluation`` (the write-once param
    ``evaluate.evaluation_sha256``): True if it is this evaluation's now (or was already), False if
    another evaluation claimed it first."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_param(run_id, EVALUATION_PARAM, evaluation)
        return True
    except MlflowException:
        held = client.get_run(run_id).data.params.get(EVALUATION_PARAM)
        if held is not None and held != evaluation:
            return False
        raise  # not a lost claim: the store refused for another reason


def create_run_from_files(
    client: Any,
    experiment_id: str,
    cfg: Config,
    project_dir: Path,
    model: Path,
    *,
    params: Mapping[str, str],
    weights: str,
    stage: str,
    ui: str,
) -> str:
    """A new (FINISHED) run holding the training of ``model`` as the live run would: params, dataset
    inputs, losses, per-epoch stats, FID over training and the sample grids at their global steps."""
    from aigc_pipeline.tracking.datasets import log_dataset_inputs

    tags = {
        **run_tags(cfg, stage, params.get("train.model")),
        "mlflow.runName": f"{cfg.model_name}-{weights[:8]}",
        TRAINING_TAG: "from model folder",
    }
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    try:
        log_params(client, run_id, params)  # the claim among them, if any (evaluate.evaluation_sha256)
        log_dataset_inputs(client, run_id, project_dir, cfg.dataset, cfg.evaluate.reference_split, ui=ui)
        log_training_files(client, run_id, Path(model))
        # Findable by its weights only now: claimed and filled, never picked up half made.
        client.set_tag(run_id, WEIGHTS_TAG, weights)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def epoch_steps(model: Path) -> dict[int, int]:
    """Epoch -> global step at its end, from the model folder's ``epochs.csv``."""
    return {int(float(r["epoch"])): int(float(r["step"])) for r in _read_csv(Path(model) / "epochs.csv")}


def log_training_files(
    client: Any,
    run_id: str,
    model: Path,
    *,
    after: int = 0,
    upto: float = math.inf,
    held: Mapping[str, Container[int]] | None = None,
    held_images: Container[int] = frozenset(),
) -> None:
    """The training records of a model folder as metrics and images at their global steps (steps in
    (``after``, ``upto``]): history.csv, epochs.csv, timing.csv, fid_progress.csv, samples/.

    ``held`` (metric -> steps) and ``held_images`` (grid steps) are what the run already holds:
    those are not logged again."""
    from aigc_pipeline.evaluation.progress import PROGRESS_FILE, read_progress

    steps = epoch_steps(model)
    window: dict[str, Any] = {"after": after, "upto": upto, "held": held}
    log_step_metrics(client, run_id, _read_csv(model / "history.csv"), **window)
    log_step_metrics(client, run_id, _read_csv(model / "epochs.csv"), prefix="train_epoch/", **window)
    timing = [
        {"step": steps[int(float(r["epoch"]))], "images_per_s": r["images_per_s"]}
        for r in _read_csv(model / "timing.csv")
        if int(float(r["epoch"])) in steps
    ]
    log_step_metrics(client, run_id, timing, prefix="train_epoch/", **window)
    name, rows = read_progress(model / PROGRESS_FILE)
    if rows:
        log_step_metrics(
            client,
            run_id,
            [{"step": steps[e], name: v} for e, v in rows if e in steps and math.isfinite(v)],
            prefix="",
            **window,
        )
    for epoch, step in sorted(steps.items()):
        grid = model / "samples" / f"epoch-{epoch:03d}.png"
        if grid.is_file() and after < step <= upto and step not in held_images:
            log_grid(client, run_id, grid, SAMPLES_KEY, step)


def log_grid(client: Any, run_id: str, image: Path | Any, key: str, step: int) -> None:
    """A sample grid (a PNG file or a uint8 array) as an MLflow image at ``step``: the run's
    charts show it in an image grid with a step slider."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(image)) if isinstance(image, (str, Path)) else image
    client.log_image(run_id, array, key=key, step=int(step))


def logged_image_steps(client: Any, run_id: str, key: str) -> set[int]:
    """Steps at which image ``key`` is already logged (from the ``images/`` artifact names)."""
    steps = set()
    for info in client.list_artifacts(run_id, "images"):
        name = info.path.rsplit("/", 1)[-1]
        for sep in ("+", "%"):  # MLflow 3.17 writes '+'; earlier versions '%'
            parts = name.split(sep)
            if len(parts) > 2 and parts[0] == key and parts[1] == "step" and parts[2].isdigit():
                steps.add(int(parts[2]))
    return steps


def logged_metric_steps(client: Any, run_id: str) -> dict[str, set[int]]:
    """Metric -> the steps the run holds it at (the run's own metrics; MLflow's ``system/`` ones,
    which it samples on its own clock, are left out)."""
    run = client.get_run(run_id)
    return {
        key: {m.step for m in client.get_metric_history(run_id, key)}
        for key in run.data.metrics
        if not key.startswith("system/")
    }


def protocol_tags(scored: Any) -> dict[str, str]:
    """The evaluation's protocol (``aigc.protocol`` and ``aigc.protocol.*``) and classifier as tags."""
    pid = scored.protocol_id or "none"
    tags = {
        "aigc.protocol": pid,
        **{f"aigc.protocol.{k}": str(v) for k, v in (scored.details.get("protocol") or {}).items()},
    }
    classifier = scored.details.get("classifier")
    if classifier:
        tags["aigc.classifier_protocol"] = str(classifier.get("id"))
        tags["aigc.classifier_accuracy"] = str(classifier.get("accuracy"))
    return tags


def evaluation_params(scored: Any) -> dict[str, str]:
    """The protocol ids as params (``evaluate.protocol``: a column beside ``fid``, ``kid``, ...)."""
    params = {PROTOCOL_PARAM: scored.protocol_id or "none"}
    if scored.classifier_id:
        params[CLASSIFIER_PARAM] = scored.classifier_id
    return params


def log_evaluation(client: Any, run_id: str, scored: Any, evaluation: Path, *, step: int) -> None:
    """An evaluation into run ``run_id``: every finite metric under its short name (``fid``,
    ``floor_fid``, ...: the columns a user compares) and its protocol-named key (what the gate
    compares), at ``step`` (the model's last training step); the protocol ids as params and tags;
    the two files and the sample grid (an artifact, and an image at ``step``)."""
    from mlflow.entities import Metric, RunTag

    from aigc_pipeline.evaluation.results import COPIES_GRID, DETAILS_FILE, METRICS_FILE, SAMPLES_GRID

    now = int(time.time() * 1000)
    values = {
        k: v
        for k, v in scored.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    values.update(scored.protocol_keys())
    tags = {**protocol_tags(scored), EVALUATION_TAG: evaluation_digest(evaluation)}
    if "isc_unavailable" in scored.details:
        tags["aigc.isc_unavailable"] = str(scored.details["isc_unavailable"])[:_MAX_TAG]
    log_params(client, run_id, evaluation_params(scored))
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, int(step)) for k, v in sorted(values.items())],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.log_artifact(run_id, str(Path(evaluation) / METRICS_FILE))
    client.log_artifact(run_id, str(Path(evaluation) / DETAILS_FILE))
    grid = Path(evaluation) / SAMPLES_GRID
    if grid.is_file():
        client.log_artifact(run_id, str(grid), "evaluation")
        log_grid(client, run_id, grid, EVALUATION_KEY, step)
    copies = Path(evaluation) / COPIES_GRID
    if copies.is_file() and scored.value("copy_share") is not None:  # blank tiles otherwise
        client.log_artifact(run_id, str(copies), "evaluation")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
