"""Run dvc.yaml's stages one at a time, the way ``dvc repro`` would, but in this process.

DVC decides whether a stage is stale and records what ran (dvc.lock); this module only
runs the stage's own ``cmd`` (an ``aigc ...`` command) through :func:`cli.run_command` and
then commits the stage. So after a flow run ``dvc status`` is clean, ``dvc repro`` is a no-op,
and a retried task never re-runs a stage DVC already holds as done.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from aigc_pipeline.errors import AigcError

STAGES = ("ingest", "augment", "train", "evaluate", "register")


class PipelineError(AigcError, RuntimeError):
    """dvc.yaml does not describe a stage this runner can execute."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool  # False: DVC held it as up to date, nothing was run
    outputs: tuple[str, ...]  # out and metric paths, relative to the project
    result: Any = field(default=None, compare=False)  # what the stage's command returned, when it ran


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


def run_stage(project_dir: str | Path, name: str, *, extra_env: dict[str, str] | None = None) -> StageOutcome:
    """Run stage ``name`` of ``project_dir/dvc.yaml`` if DVC says it is stale, then ``dvc commit`` it."""
    from dvc.repo import Repo

    from aigc_pipeline import cli

    project = Path(project_dir).resolve()
    with Repo(str(project)) as repo:
        # An absolute target: DVC resolves a bare stage name against the cwd's dvc.yaml.
        stages = repo.stage.collect(f"{project / 'dvc.yaml'}:{name}")
        if len(stages) != 1:
            raise PipelineError(f"dvc.yaml: '{name}' names {len(stages)} stages, expected one")
        stage = stages[0]
        outputs = tuple(str(Path(o.fs_path).relative_to(project)) for o in stage.outs)
        if not repo.status(targets=[f"{project / 'dvc.yaml'}:{name}"]):
            return StageOutcome(name, ran=False, outputs=outputs)
        argv = shlex.split(stage.cmd)
        if not argv or argv[0] != "aigc":
            raise PipelineError(f"dvc.yaml: stage '{name}' runs {stage.cmd!r}; the flow can only run `aigc` commands")
        with _env(extra_env or {}):
            result = cli.run_command(["--project", str(project), *argv[1:]])
        repo.commit(f"{project / 'dvc.yaml'}:{name}", force=True)
    return StageOutcome(name, ran=True, outputs=outputs, result=result)


def summarize(project_dir: str | Path, register: StageOutcome, evaluate: StageOutcome) -> dict[str, Any]:
    """The run's summary from the files the stages left (so it is the same whether they ran or were skipped)."""
    project = Path(project_dir)
    receipt = json.loads((project / _one(register.outputs, ".json")).read_text())
    metrics = json.loads((project / _one(evaluate.outputs, "metrics.json")).read_text())
    protocol = metrics["protocol"]["id"]
    verdict = "champion" if receipt["champion"] else "not promoted"
    where = receipt["tracking_uri"]
    line = (
        f"{receipt['name']} v{receipt['version']}: FID {receipt['fid']:.3f} [{protocol}], {verdict} "
        f"({receipt['reason']}). MLflow: {where} (run {receipt['run_id']})"
    )
    return {"line": line, "receipt": receipt, "metrics": metrics}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary as markdown, for a Prefect artifact (and anyone reading it later)."""
    r, m = summary["receipt"], summary["metrics"]
    p = m["protocol"]
    isc = m.get("isc_unavailable") or "computed"
    return "\n".join([
        f"# {r['name']} v{r['version']}",
        "",
        f"- **decision**: {'champion' if r['champion'] else 'not promoted'} ({r['reason']})",
        f"- **FID**: {r['fid']:.4f} under protocol `{p['id']}`",
        f"  - extractor `{p['extractor']}`, weights sha256 `{p['weights_sha256'][:16]}…`",
        f"  - {p['num_samples']} generated vs {p['num_reference']} real images ({p['reference_split']} split, "
        f"digest `{p['reference_digest'][:16]}…`), {p['size']}px",
        f"- **Inception Score**: {isc}",
        f"- **model / dataset**: {m['model']} on {m['dataset']}",
        f"- **MLflow**: run `{r['run_id']}` in `{r['tracking_uri']}`",
    ])


def _one(paths: tuple[str, ...], suffix: str) -> str:
    found = [p for p in paths if p.endswith(suffix)]
    if len(found) != 1:
        raise PipelineError(f"dvc.yaml: expected one output ending in {suffix!r}, found {found}")
    return found[0]
