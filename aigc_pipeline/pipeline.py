"""Run dvc.yaml's stages one at a time, the way ``dvc repro`` would, but in this process.

DVC decides whether a stage is stale and records what ran (dvc.lock); this module only
calls the stage's function (:data:`commands.STAGE_FUNCTIONS`) with the arguments of the stage
table (:mod:`aigc_pipeline.stages.table`), which are those of dvc.yaml's ``cmd``, and then commits
the stage. So after a flow run ``dvc status`` is clean, ``dvc repro`` is a no-op,
and a retried task never re-runs a stage DVC already holds as done.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aigc_pipeline.compute import RUN_COMPUTE_TAG, Meter, run_totals
from aigc_pipeline.errors import AigcError, ConfigError
from aigc_pipeline.evaluation.metrics import entries

# dvc.yaml's stages, as the table declares them: ingest and augment once per registered dataset
# (``ingest@NAME``, a DVC ``foreach`` over params.yaml's ``datasets``), the others on the active ``dataset``.
from aigc_pipeline.stages.table import MODEL_STAGES, PER_DATASET_STAGES

if TYPE_CHECKING:
    from aigc_pipeline.config import Config


class PipelineError(AigcError, RuntimeError):
    """dvc.yaml does not describe a stage this runner can execute."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool  # False: DVC held it as up to date, nothing was run
    outputs: tuple[str, ...]  # out and metric paths, relative to the project
    result: Any = field(default=None, compare=False)  # what the stage's command returned, when it ran
    compute: dict[str, float] | None = field(default=None, compare=False)  # wall/CPU seconds, when it ran


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_stage(
    project_dir: str | Path, name: str, *, extra_env: dict[str, str] | None = None, observer: Any = None
) -> StageOutcome:
    """Run stage ``name`` of ``project_dir/dvc.yaml`` if DVC says it is stale, then ``dvc commit`` it.

    The stage's function is called in this process with the arguments dvc.yaml's ``cmd`` gives the
    CLI, taken from the stage table; ``observer`` goes to the train stage's function (a
    :class:`~aigc_pipeline.stages.train.TrainingObserver`: its plan and epochs). Raises
    :class:`PipelineError` when dvc.yaml's ``cmd`` is not the table's: ``dvc repro`` would run
    something else than this flow.
    """
    from dvc.parsing.context import Context
    from dvc.repo import Repo

    from aigc_pipeline import env
    from aigc_pipeline.commands import STAGE_FUNCTIONS
    from aigc_pipeline.stages.table import stage as table_stage

    project = Path(project_dir).resolve()
    entry = table_stage(name)
    with Repo(str(project)) as repo:
        # An absolute target: DVC resolves a bare stage name against the cwd's dvc.yaml.
        target = f"{project / 'dvc.yaml'}:{name}"
        stages = repo.stage.collect(target)
        if len(stages) != 1:
            raise PipelineError(f"dvc.yaml: '{name}' names {len(stages)} stages, expected one")
        stage = stages[0]
        # DVC's own interpolation (params.yaml, and the foreach key), so the values are the ones
        # `dvc repro` would pass on the command line.
        context = Context.clone(stage.dvcfile.resolver.context)
        if entry.per_dataset:
            context["key"] = name.partition("@")[2]
        expected = context.resolve_str(entry.command_line)
        if " ".join(stage.cmd.split()) != expected:
            raise PipelineError(
                f"dvc.yaml: stage '{name}' runs {stage.cmd!r}, but the stage table "
                f"(aigc_pipeline/stages/table.py) runs {expected!r}: `dvc repro` and the flow would differ"
            )
        outputs = tuple(str(Path(o.fs_path).relative_to(project)) for o in stage.outs)
        if not repo.status(targets=[target]):
            return StageOutcome(name, ran=False, outputs=outputs)
        arguments = {option: context.resolve_str(value) for option, value in entry.arguments}
        meter = Meter()
        with _env(extra_env or {}):
            env.set_defaults(project)
            result = _call(STAGE_FUNCTIONS[entry.command], project, arguments, observer)
        repo.commit(target, force=True)
    return StageOutcome(name, ran=True, outputs=outputs, result=result, compute=meter.read())


def _call(function: Any, project: Path, arguments: dict[str, str], observer: Any) -> Any:
    """``function`` (a stage command's) with the command line's options as keyword arguments; the
    observer to the one stage that takes one."""
    kwargs: dict[str, Any] = dict(arguments)
    if observer is not None:
        kwargs["observer"] = observer
    return function(project, **kwargs)


def stage_names(project_dir: str | Path) -> list[str]:
    """Every stage of ``project_dir/dvc.yaml``, foreach items expanded (``ingest@digits``), in file order."""
    from dvc.repo import Repo

    project = Path(project_dir).resolve()
    with Repo(str(project)) as repo:
        return [s.name for s in repo.stage.collect(str(project / "dvc.yaml"))]


def dataset_stages(project_dir: str | Path) -> list[str]:
    """The per-dataset stages (``ingest@NAME``, ``augment@NAME``) of dvc.yaml, in its order.

    DVC expands them over every registered dataset, so running all of them (not only the active
    dataset's) is what leaves ``dvc status`` clean, as ``dvc repro`` would.
    """
    names = stage_names(project_dir)
    found = [n for n in names if n.partition("@")[0] in PER_DATASET_STAGES and "@" in n]
    missing = [s for s in MODEL_STAGES if s not in names]
    if missing or not found:
        raise PipelineError(
            f"{Path(project_dir) / 'dvc.yaml'}: expected per-dataset stages "
            f"{'/'.join(PER_DATASET_STAGES)}@NAME and stages {', '.join(MODEL_STAGES)}; found {names}"
        )
    return found


def check_dvc_inputs(cfg: Config) -> None:
    """Fail early, naming the key, when a dataset entry lacks the ``path`` that dvc.yaml's ingest stage watches.

    DVC itself would stop with "Could not find 'item.path'" while parsing dvc.yaml.
    """
    for name, dcfg in cfg.datasets.items():
        if dcfg.path is None:
            hint = (
                " (for sklearn-digits: uv.lock, which pins the scikit-learn that ships the digits)"
                if dcfg.source == "sklearn-digits"
                else ""
            )
            raise ConfigError(
                f"datasets.{name}.path: required by dvc.yaml, whose ingest@{name} stage depends on it{hint}"
            )


def summarize(
    project_dir: str | Path, register: StageOutcome, evaluate: StageOutcome, stages: Sequence[StageOutcome] = ()
) -> dict[str, Any]:
    """The run's summary from the files the stages left (so it is the same whether they ran or were
    skipped), and what this run's ``stages`` cost (those DVC ran; a skipped one cost nothing)."""
    from aigc_pipeline.evaluation.results import read_evaluation

    project = Path(project_dir)
    receipt = json.loads((project / _one(register.outputs, ".json")).read_text())
    evaluation_dir = (project / _one(evaluate.outputs, "metrics.json")).parent
    ran = [{"stage": s.stage, **s.compute} for s in stages if s.ran and s.compute]
    scored = read_evaluation(evaluation_dir)
    protocol = scored.protocol_id or "no protocol"
    verdict = receipt.get("decision") or ("champion" if receipt["champion"] else "not promoted")
    std = receipt.get("fid_std")
    noise = f" ± {std:.3f}" if isinstance(std, (int, float)) else ""
    floor = scored.value("floor_fid")
    against = f", floor {floor:.1f} = {receipt['fid'] / floor:.2f}x" if floor else ""
    family = receipt.get("family") or scored.details.get("model", "")
    champion = receipt.get("champion_version")
    serving = f"champion: v{champion}" if champion else "NO CHAMPION: no version has passed the gate yet"
    line = (
        f"{receipt['name']} v{receipt['version']} ({family}): FID {receipt['fid']:.3f}{noise}{against} [{protocol}], "
        f"{verdict} ({receipt['reason']}); {serving}. "
        + (f"Cost: {receipt['compute']}. " if receipt.get("compute") else "")
        + (f"This run: {run_cost(ran)}. " if ran else "")
        + f"MLflow: {receipt['tracking_uri']} (run {receipt['run_id']})"
    )
    return {
        "line": line,
        "receipt": receipt,
        "metrics": scored.metrics,
        "details": scored.details,
        "champion_version": champion,
        "evaluation_dir": str(evaluation_dir),
        "stages": ran,
    }


def run_cost(stages: list[dict[str, Any]]) -> str:
    """``12.0 wall-minutes, 20.1 CPU-minutes in 3 stages (train 9.5, evaluate 2.3, register 0.2 wall-minutes)``."""
    total = run_totals(stages)
    each = ", ".join(f"{s['stage']} {s['wall_seconds'] / 60:.1f}" for s in stages)
    return (
        f"{total['wall_seconds'] / 60:.1f} wall-minutes, {total['cpu_seconds'] / 60:.1f} CPU-minutes in "
        f"{len(stages)} stage{'s' if len(stages) != 1 else ''} ({each} wall-minutes)"
    )


def record_run_cost(summary: dict[str, Any]) -> None:
    """Put what this run's stages cost on the MLflow run (``compute.run_*``, ``compute.stage.<stage>_*``)
    and the model version (tag ``aigc.compute_run``)."""
    from mlflow import MlflowClient

    stages, receipt = summary.get("stages") or [], summary["receipt"]
    if not stages:
        return  # nothing ran: the version's cost was recorded by the run that made it
    client = MlflowClient(tracking_uri=receipt["tracking_uri"], registry_uri=receipt["tracking_uri"])
    metrics = {f"compute.run_{k.split('_')[0]}_s": v for k, v in run_totals(stages).items()}
    for s in stages:
        name = s["stage"].replace("@", "_")
        metrics[f"compute.stage.{name}_wall_s"] = s["wall_seconds"]
        metrics[f"compute.stage.{name}_cpu_s"] = s["cpu_seconds"]
    for key, value in metrics.items():
        client.log_metric(receipt["run_id"], key, float(value))
    text = run_cost(stages)
    client.set_tag(receipt["run_id"], RUN_COMPUTE_TAG, text)
    client.set_model_version_tag(receipt["name"], str(receipt["version"]), RUN_COMPUTE_TAG, text)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary as markdown, for a Prefect artifact (and anyone reading it later)."""
    r, m, d = summary["receipt"], summary["metrics"], summary["details"]
    p = d.get("protocol") or {}
    pid = p.get("id", "")
    isc = d.get("isc_unavailable") or "computed"
    decision = r.get("decision") or ("champion" if r["champion"] else "not promoted")
    std = r.get("fid_std")
    champion = summary.get("champion_version")
    lines = [
        f"# {r['name']} v{r['version']} ({r.get('family') or d.get('model')})",
        "",
        f"- **decision**: {decision} ({r['reason']})",
        f"- **compute**: {r.get('compute') or 'not recorded'}"
        + (f"; this run: {run_cost(summary['stages'])}" if summary.get("stages") else ""),
        "- **serving**: "
        + (
            f"`models:/{r['name']}@champion` = v{champion}"
            if champion
            else "no champion: no version has passed the gate yet"
        ),
        f"- **FID**: {r['fid']:.4f}"
        + (f" ± {std:.4f} (bootstrap sd)" if isinstance(std, (int, float)) else "")
        + f" under protocol `{pid}`",
        f"  - extractor `{p.get('extractor')}`, weights sha256 `{str(p.get('weights_sha256'))[:16]}…`",
        f"  - {p.get('num_samples')} generated vs {p.get('num_reference')} real images ({p.get('reference_split')} "
        f"split, digest `{str(p.get('reference_digest'))[:16]}…`), {p.get('size')}px",
        "",
        "| metric | this model | real data (the floor) |",
        "| --- | ---: | ---: |",
    ]
    for entry in entries("table"):
        value, floor = m.get(entry.name), m.get(entry.floor) if entry.floor else None
        if isinstance(value, (int, float)):
            lines.append(
                f"| {entry.row} | {value:.4f} | " + (f"{floor:.4f}" if isinstance(floor, (int, float)) else "") + " |"
            )
    if isinstance(m.get("fid_ratio"), (int, float)):
        lines += ["", f"FID is **{m['fid_ratio']:.2f}x** the data's floor."]
    lines.append("")
    if isinstance(m.get("classifier_score"), (int, float)):
        clf = d.get("classifier") or {}
        lines.append(
            f"- **classifier score** (not IS): {m['classifier_score']:.3f} under `{clf.get('id')}` "
            f"(classifier accuracy on real eval {m.get('classifier_accuracy', float('nan')):.3f})"
        )
    lines += [
        f"- **Inception Score**: {isc}",
        f"- **model / dataset**: {d.get('model')} on {d.get('dataset')}",
        f"- **MLflow**: run `{r['run_id']}` in `{r['tracking_uri']}`",
    ]
    return "\n".join(lines)


class NoChampion(AigcError, RuntimeError):
    """The run finished but its registered model has no champion: nothing serves."""


def require_champion(summary: dict[str, Any]) -> None:
    """Raise :class:`NoChampion` (naming the candidate's verdict) when nothing holds the champion alias."""
    if not summary.get("champion_version"):
        r = summary["receipt"]
        raise NoChampion(
            f"{r['name']} has no champion: v{r['version']} ({r.get('family')}) was {r['decision']} "
            f"({r['reason']}); no version has passed the gate yet, so `models:/{r['name']}@champion` "
            "does not resolve. Train longer or another model (train.epochs, train.model), or relax "
            "the register.* bar the reason names"
        )


def _one(paths: tuple[str, ...], suffix: str) -> str:
    found = [p for p in paths if p.endswith(suffix)]
    if len(found) != 1:
        raise PipelineError(f"dvc.yaml: expected one output ending in {suffix!r}, found {found}")
    return found[0]
