"""Register: log the run to MLflow (params, losses, every metric under its short name and its
protocol-named key, plots, grids, the model card and the pyfunc model), register the version in
the dataset's registered model (every family competes for the same ``champion``) and apply the
promotion gate, quality bar included.

Logging the run and the model needs no lock; creating the version, reading the champion, deciding
and moving the alias happen in one section under the registered model's lock
(``tracking/locks.py``), so two registrations at once are decided one after the other, the second
against the champion the first left.

A registration goes through states tagged on the version (``aigc.registration``: pending ->
decided -> done) under a key hashing the model, its evaluation and the register settings. If
anything fails after the version exists, the version is discarded (the aliases it moved put back
where they still point at it, champion history restored) and the run ends FAILED; a process
killed midway leaves a pending version, which the next attempt with the same key discards, or a
decided one, which it decides again against the champion of the moment (the aliases the killed
attempt took are put back first). So a retry is always safe, and a retry after success returns
the version already registered instead of registering a duplicate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from aigc_pipeline.compute import COMPUTE_TAG, compute_metrics, describe, read_compute
from aigc_pipeline.config import Config
from aigc_pipeline.evaluation.gate import CHALLENGER, CHAMPION, Score, Verdict, check_evaluation, decide, quality_bar
from aigc_pipeline.evaluation.protocol import metric_key
from aigc_pipeline.evaluation.results import DETAILS_FILE, METRICS_FILE, Evaluation, read_evaluation
from aigc_pipeline.io import atomic_write_json, sha256_file
from aigc_pipeline.models.export import META_FILE, WEIGHTS_FILE, read_model_meta
from aigc_pipeline.tracking.runs import FLOW_RUN_ENV, flat_params  # FLOW_RUN_ENV: re-exported for flows/


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    run_id: str
    champion: bool  # became champion at registration
    decision: str  # champion | challenger | rejected
    reason: str
    tracking_uri: str
    fid: float
    fid_std: float | None
    protocol: str
    reused: bool  # an earlier attempt had already registered exactly this; nothing new was created
    family: str = ""  # train.model of this version
    floor_fid: float | None = None  # the data's own FID under the same protocol
    fid_ratio: float | None = None  # fid / floor_fid
    champion_version: str | None = None  # who holds the champion alias after this registration (None: nobody)
    compute: str | None = None  # what training it cost ("trained in 3.1 CPU-minutes (...)"); None: not recorded


@dataclass(frozen=True)
class _Candidate:
    """What the gate needs of the model being registered, read once from its folders."""

    scored: Evaluation
    meta: dict[str, Any]
    problems: list[str]  # why its evaluation cannot be trusted (empty: it can)
    below_bar: list[str]  # the quality bars it misses
    score: Score | None  # None when there are problems
    key: str  # the registration key: model, evaluation and register settings


def run(cfg: Config, model: Path, evaluation: Path, receipt: Path, *, project_dir: Path = Path(".")) -> RegisterResult:
    """Log and register the model in ``model`` scored in ``evaluation``; write a JSON ``receipt``.

    The state an earlier attempt with the same key left on its version decides what happens:
    none: log the run and register (pending -> decided -> done); ``done``: the receipt again;
    ``decided``: decide again (the champion may have changed); ``pending``: discard the half-made
    version, then register anew.
    """
    import mlflow
    from mlflow import MlflowClient

    from aigc_pipeline.tracking import registry
    from aigc_pipeline.tracking.store import use_store

    rcfg = cfg.register
    cand = _candidate(cfg, Path(model), Path(evaluation))
    logging.getLogger("mlflow.utils.uv_utils").setLevel(logging.WARNING)
    with use_store(project_dir, rcfg.experiment) as experiment_id:
        uri = mlflow.get_tracking_uri()
        client = MlflowClient()
        earlier = registry.find_registration(client, cfg.registered_model, cand.key)
        state = (earlier.tags or {}).get(registry.STATE_TAG) if earlier is not None else None
        if earlier is not None and state == registry.DONE:
            result = _result_from_version(client, earlier, uri, cand.scored, rcfg, reused=True)
        elif earlier is not None and state == registry.DECIDED:  # killed after the decision
            result = _decide_again(client, cfg, cand, earlier, uri)
        else:
            if earlier is not None:  # pending: killed before the decision
                registry.undo_registration(
                    client, cfg.registered_model, str(earlier.version), alias=rcfg.champion_alias
                )
            result = _register(client, cfg, cand, Path(model), Path(evaluation), project_dir, experiment_id, uri)
    return _finish(receipt, result)


def _candidate(cfg: Config, model: Path, evaluation: Path) -> _Candidate:
    rcfg = cfg.register
    scored = read_evaluation(evaluation)
    meta = read_model_meta(model)
    problems = check_evaluation(scored, meta)
    below_bar = (
        []
        if problems
        else quality_bar(
            scored,
            max_fid_ratio=rcfg.max_fid_ratio,
            min_precision=rcfg.min_precision,
            min_recall=rcfg.min_recall,
            max_copy_share=rcfg.max_copy_share,
            min_copy_ct=rcfg.min_copy_ct,
        )
    )
    score = None if problems else Score(float(scored.metrics["fid"]), scored.value("fid_std"))
    key = _registration_key(cfg.registered_model, model, evaluation, dataclasses.asdict(rcfg))
    return _Candidate(scored, meta, problems, below_bar, score, key)


def _decide_again(client: Any, cfg: Config, cand: _Candidate, earlier: Any, uri: str) -> RegisterResult:
    """A version left ``decided``: decide again against the champion of the moment."""
    from aigc_pipeline.tracking import registry

    name, version = cfg.registered_model, str(earlier.version)
    with registry.locked(client, name):
        _decide_and_apply(
            client,
            name,
            version,
            earlier.run_id,
            cand.scored,
            candidate=cand.score,
            problems=cand.problems,
            below_bar=cand.below_bar,
            rcfg=cfg.register,
            again=True,
        )
        return _result_from_version(
            client, client.get_model_version(name, version), uri, cand.scored, cfg.register, reused=True
        )


def _register(
    client: Any,
    cfg: Config,
    cand: _Candidate,
    model: Path,
    evaluation: Path,
    project_dir: Path,
    experiment_id: str,
    uri: str,
) -> RegisterResult:
    """Log the run (no lock), then create the version and decide (pending -> decided -> done)."""
    import mlflow

    from aigc_pipeline.tracking import registry, runs
    from aigc_pipeline.tracking.datasets import log_dataset_inputs
    from aigc_pipeline.tracking.store import ui_url

    name, rcfg, scored, meta = cfg.registered_model, cfg.register, cand.scored, cand.meta
    lineage = _lineage(project_dir)
    compute = read_compute(model)
    tags = {
        "aigc.dataset": cfg.dataset,
        "aigc.model": meta["model"],
        "aigc.family": meta["model"],
        "aigc.data_digest": meta["data_digest"],
        **runs.protocol_tags(scored),
        **_config_tags(meta),
        **lineage,
        **({COMPUTE_TAG: describe(compute)} if compute else {}),
    }
    params = flat_params(cfg, resolved=meta.get("hparams"))
    ui = ui_url(uri)
    digest = runs.evaluation_digest(evaluation)
    # The run that trained this model (found by its weights' sha256), or a fresh one holding the
    # training from the model folder: see aigc_pipeline.tracking.runs.
    run_id, _ = runs.pipeline_run(
        client,
        experiment_id,
        cfg,
        project_dir,
        model,
        stage="register",
        evaluation=digest,
        extra_params=runs.evaluation_params(scored),
        ui=ui,
    )
    with mlflow.start_run(run_id=run_id, tags={**tags, runs.STAGE_TAG: "register"}):
        log_dataset_inputs(client, run_id, project_dir, cfg.dataset, cfg.evaluate.reference_split, ui=ui)
        if client.get_run(run_id).data.tags.get(runs.EVALUATION_TAG) != digest:  # evaluate ran without MLflow
            runs.log_evaluation(client, run_id, scored, evaluation, step=int(meta.get("steps") or 0))
        _log_plots(client, run_id, model)
        if compute:
            mlflow.log_metrics(compute_metrics(compute, "train"))
        if cand.problems:
            mlflow.set_tag("aigc.problems", "; ".join(cand.problems)[:5000])
        mlflow.log_artifact(str(model / "samples.png"), "training")
        with tempfile.TemporaryDirectory(prefix="aigc-register-") as tmp:
            info, description = _log_model(
                Path(tmp),
                model,
                {**meta, "compute": compute},
                name=name,
                evaluation=scored,
                params=params,
                lineage=lineage,
                problems=cand.problems,
                run_id=run_id,
                ui=ui,
                limits={
                    "max_images_per_request": rcfg.max_images_per_request,
                    "max_images_per_row": rcfg.max_images_per_row,
                },
            )
        version: str | None = None
        left = "failed"
        try:
            # Creating the version, deciding and moving its alias: one locked section per registered model,
            # so two registrations never compare against the same champion (tracking/locks.py).
            with registry.locked(client, name):
                try:
                    mv = mlflow.register_model(
                        info.model_uri,
                        name,
                        tags={**tags, registry.KEY_TAG: cand.key, registry.STATE_TAG: registry.PENDING},
                    )
                    version = str(mv.version)
                    client.update_model_version(name, version, description=description)  # the model card
                    verdict = _decide_and_apply(
                        client,
                        name,
                        version,
                        run_id,
                        scored,
                        candidate=cand.score,
                        problems=cand.problems,
                        below_bar=cand.below_bar,
                        rcfg=rcfg,
                    )
                    champion_now = registry.alias_version(client, name, rcfg.champion_alias)
                except BaseException:
                    if version is not None:
                        left = f"failed: version {version} left {registry.PENDING}/{registry.DECIDED} for a retry"
                        registry.undo_registration(client, name, version, alias=rcfg.champion_alias)
                        left = "failed: version discarded"
                    raise
        except BaseException:
            mlflow.set_tag("aigc.registration", left)
            raise
        mlflow.set_tag("aigc.registration", f"done: version {version}")  # (a rolled-back attempt said otherwise)
    fid = scored.value("fid")
    return RegisterResult(
        name=name,
        version=version,
        run_id=run_id,
        champion=verdict.promote,
        decision=verdict.decision,
        reason=verdict.reason,
        tracking_uri=uri,
        fid=float("nan") if fid is None else fid,
        fid_std=cand.score.fid_std if cand.score else None,
        protocol=scored.protocol_id or "none",
        reused=False,
        family=meta["model"],
        floor_fid=scored.value("floor_fid"),
        fid_ratio=scored.value("fid_ratio"),
        champion_version=champion_now,
        compute=tags.get(COMPUTE_TAG),
    )


def _decide_and_apply(
    client: Any,
    name: str,
    version: str,
    run_id: str,
    scored: Evaluation,
    *,
    candidate: Score | None,
    problems: list[str],
    below_bar: list[str],
    rcfg: Any,
    again: bool = False,
) -> Verdict:
    """Under the registered model's lock: compare ``version`` with the champion as it is now, tag the
    decision on the version and its run, move the alias it calls for, append it to the decision
    history; the version ends ``done``. ``again``: a retry of a version decided before: unless it
    holds the champion alias (that decision stands), the aliases it took are put back first
    (compare-and-set) and its old ``aigc.gate.*`` tags replaced."""
    from aigc_pipeline.tracking import registry

    pid = scored.protocol_id or "none"
    champion_version, champion = registry.champion_score(client, name, rcfg.champion_alias, pid)
    if champion_version == version:
        # Only a retry gets here: the earlier attempt had made it champion, and nobody has replaced it
        # since (everyone after it compared against it): that decision stands.
        tags = client.get_model_version(name, version).tags or {}
        verdict = Verdict(tags.get(registry.DECISION_TAG, CHAMPION), tags.get("aigc.decision_reason", ""))
        compared_with = tags.get("aigc.gate.champion_version")
    else:
        if again:  # e.g. the challenger alias it took, when it may now beat the champion
            registry.undo_moves(client, name, version, champion_alias=rcfg.champion_alias)
        # Not comparable: the champion's recorded protocol says what differs.
        champion_protocol = (
            _version_protocol(client, name, champion_version)
            if champion_version is not None and champion is None
            else None
        )
        verdict = decide(
            candidate,
            problems,
            champion=champion,
            champion_version=champion_version,
            margin=rcfg.gate_margin,
            noise_sigmas=rcfg.gate_noise_sigmas,
            protocol_id=pid,
            below_bar=below_bar,
            candidate_protocol=scored.details.get("protocol"),
            champion_protocol=champion_protocol,
        )
        new_tags = _decision_tags(verdict)
        if again:
            stale = [
                k
                for k in (client.get_model_version(name, version).tags or {})
                if k.startswith("aigc.gate.") and k not in new_tags
            ]
            for k in stale:
                client.delete_model_version_tag(name, version, k)
                client.delete_tag(run_id, k)
        for k, v in new_tags.items():
            client.set_tag(run_id, k, v)
            client.set_model_version_tag(name, version, k, v)
        compared_with = champion_version
        client.set_model_version_tag(name, version, registry.STATE_TAG, registry.DECIDED)
        _apply(client, name, version, verdict.decision, rcfg)
    registry.record_decision(client, name, version, verdict.decision, compared_with)
    client.set_model_version_tag(name, version, registry.STATE_TAG, registry.DONE)
    return verdict


def _apply(client: Any, name: str, version: str, decision: str, rcfg: Any) -> None:
    """Move the alias the decision calls for (idempotent: safe to repeat on a retry)."""
    from aigc_pipeline.tracking import registry

    if decision == CHAMPION:
        if registry.alias_version(client, name, rcfg.champion_alias) != version:
            registry.move_alias(client, name, rcfg.champion_alias, version, record_history=True)
    elif decision == CHALLENGER:
        if registry.alias_version(client, name, rcfg.challenger_alias) != version:
            registry.move_alias(client, name, rcfg.challenger_alias, version, record_history=False)


def _decision_tags(verdict: Verdict) -> dict[str, str]:
    tags = {"aigc.decision": verdict.decision, "aigc.decision_reason": verdict.reason[:5000]}
    for k, v in verdict.details.items():
        tags[f"aigc.gate.{k}"] = f"{v:.6g}" if isinstance(v, float) else str(v)
    return tags


def _finish(receipt: Path, result: RegisterResult) -> RegisterResult:
    atomic_write_json(receipt, dataclasses.asdict(result))
    return result


def _result_from_version(
    client: Any, mv: Any, uri: str, scored: Evaluation, rcfg: Any, *, reused: bool
) -> RegisterResult:
    from aigc_pipeline.tracking import registry

    tags = mv.tags or {}
    pid = scored.protocol_id or "none"
    metrics = client.get_run(mv.run_id).data.metrics
    return RegisterResult(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        champion=tags.get("aigc.decision") == CHAMPION,
        decision=tags.get("aigc.decision", "unknown"),
        reason=tags.get("aigc.decision_reason", ""),
        tracking_uri=uri,
        fid=metrics.get(metric_key("fid", pid), float("nan")),
        fid_std=metrics.get(metric_key("fid_std", pid)),
        protocol=pid,
        reused=reused,
        family=tags.get("aigc.family", tags.get("aigc.model", "")),
        floor_fid=scored.value("floor_fid"),
        fid_ratio=scored.value("fid_ratio"),
        champion_version=registry.alias_version(client, mv.name, rcfg.champion_alias),
        compute=tags.get(COMPUTE_TAG),
    )


def _registration_key(name: str, model: Path, evaluation: Path, settings: dict[str, Any]) -> str:
    """Same model, same evaluation, same register settings -> same key."""
    h = hashlib.sha256(json.dumps({"name": name, "settings": settings}, sort_keys=True).encode())
    for path in (model / WEIGHTS_FILE, model / META_FILE, evaluation / METRICS_FILE, evaluation / DETAILS_FILE):
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def _version_protocol(client: Any, name: str, version: str) -> dict[str, str]:
    """The protocol a registered version was evaluated under, from its ``aigc.protocol.*`` tags."""
    tags = client.get_model_version(name, version).tags or {}
    prefix = "aigc.protocol."
    protocol = {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)}
    if "aigc.protocol" in tags:
        protocol.setdefault("id", tags["aigc.protocol"])
    return protocol


def _config_tags(meta: dict[str, Any]) -> dict[str, str]:
    """The family and the training config the version was made with (resolved hyperparameters
    included), as tags of the run and the version: versions of every family share one registered
    model, so these tell them apart."""
    return {
        "aigc.train_config": json.dumps(meta.get("train") or {}, sort_keys=True)[:5000],
        "aigc.hparams": json.dumps(meta.get("hparams") or {}, sort_keys=True)[:5000],
    }


def _log_plots(client: Any, run_id: str, model: Path) -> None:
    """Loss curves and FID over training as charts (``plots/``), with their CSVs. The numbers
    themselves are the run's metrics, at their global steps (logged live or from the model folder)."""
    from aigc_pipeline.evaluation.plots import line_chart, loss_chart
    from aigc_pipeline.evaluation.progress import PROGRESS_FILE, read_progress

    with tempfile.TemporaryDirectory(prefix="aigc-plots-") as tmp:
        out = Path(tmp)
        history = model / "history.csv"
        if history.is_file():
            shutil.copy2(history, out / "history.csv")
            png = loss_chart(history)
            if png is not None:
                (out / "losses.png").write_bytes(png)
        name, rows = read_progress(model / PROGRESS_FILE)
        if rows:
            shutil.copy2(model / PROGRESS_FILE, out / PROGRESS_FILE)
            (out / "fid_progress.png").write_bytes(
                line_chart(
                    {name: ([e for e, _ in rows], [v for _, v in rows])},
                    title=f"FID over training (small sample; not comparable with the evaluation's FID)\n{name}",
                    xlabel="epoch",
                    ylabel="FID",
                )
            )
        if any(out.iterdir()):
            client.log_artifacts(run_id, str(out), "plots")


def _log_model(
    tmp: Path,
    model: Path,
    meta: dict[str, Any],
    *,
    name: str,
    evaluation: Evaluation,
    params: dict[str, str],
    lineage: dict[str, str],
    problems: list[str],
    run_id: str,
    ui: str,
    limits: dict[str, int] | None = None,
) -> tuple[Any, str]:
    """The pyfunc, from code (nothing pickled): safetensors weights + model.json, the model card,
    a copy of this package for the model's code, and its serving ``limits`` as ``model_config``.
    Returns the model info and the card's short form (the version's description), whose images
    are linked relative to the MLflow UI (the logged card's by the UI's address ``ui``)."""
    import mlflow

    from aigc_pipeline.tracking import pyfunc
    from aigc_pipeline.tracking.card import CARD_FILE, model_card
    from aigc_pipeline.tracking.datasets import artifact_url

    pictures = [
        ("Evaluation samples", "evaluation/samples.png"),
        ("Training samples (fixed noise, last grid)", "training/samples.png"),
    ]
    if evaluation.value("copy_share") is not None:
        pictures.append(
            (
                "Data copying: the samples nearest a training image (top) above that image (bottom)",
                "evaluation/copies.png",
            )
        )

    weights = tmp / "generator"
    weights.mkdir()
    for f in (WEIGHTS_FILE, META_FILE):
        shutil.copy2(model / f, weights / f)
    card = tmp / CARD_FILE
    facts: dict[str, Any] = dict(
        name=name,
        meta=meta,
        evaluation=evaluation,
        params=params,
        lineage={**lineage, "mlflow.run_id": run_id},
        problems=problems,
    )
    card.write_text(model_card(**facts, images=[(c, artifact_url(ui, run_id, p)) for c, p in pictures]))
    description = model_card(**facts, images=[(c, artifact_url("", run_id, p)) for c, p in pictures], short=True)
    mlflow.log_artifact(str(card))
    package = Path(__file__).resolve().parents[1]
    code = tmp / "code" / package.name
    shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(pyfunc.__file__).with_name("pyfunc_model.py")),
        artifacts={pyfunc.WEIGHTS_ARTIFACT: str(weights), pyfunc.CARD_ARTIFACT: str(card)},
        code_paths=[str(code)],
        signature=pyfunc.signature_for(meta["arch"]["channels"], meta["arch"]["size"]),
        input_example=pyfunc.input_example(),
        model_config=pyfunc.model_config(
            **(
                limits
                or {
                    "max_images_per_request": pyfunc.DEFAULT_MAX_IMAGES_PER_REQUEST,
                    "max_images_per_row": pyfunc.DEFAULT_MAX_IMAGES_PER_ROW,
                }
            )
        ),
        pip_requirements=_requirements(),
    )
    return info, description


def _lineage(project_dir: Path) -> dict[str, str]:
    """Git commit, DVC stage hashes from dvc.lock and the Prefect flow run id, when known."""
    tags: dict[str, str] = {}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True
        )
        tags["git.commit"] = commit.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            check=True,
        )
        tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.CalledProcessError):
        tags["git.commit"] = "unknown (not a git checkout)"
    lock = Path(project_dir) / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage, entry in stages.items():
            if stage == "register":  # its own entry is the previous registration's
                continue
            outs = [o.get("md5", "") for o in entry.get("outs", [])]
            if outs:
                # MLflow tag keys may not hold "@" (foreach stages: ingest@digits -> dvc.lock.ingest.digits).
                tags[f"dvc.lock.{stage.replace('@', '.')}"] = ",".join(outs)
    if os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = os.environ[FLOW_RUN_ENV]
    return tags


def _requirements() -> list[str]:
    reqs = []
    for dist in ("mlflow", "torch", "safetensors", "numpy", "pandas", "pyyaml"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"warning: {dist} is not installed; left out of the model's requirements", file=sys.stderr)
    return reqs
