"""The Prefect artifacts every retraining flow run publishes, keyed per registered model.

For registered model ``digits`` (keys: lowercase letters, digits and dashes, see
:func:`flows.describe.artifact_key`):

- ``digits-summary`` (markdown): model version, decision and reason, FID with its protocol and
  the data's floor, dataset and its content digest, and the lineage the MLflow run carries;
- ``digits-samples`` (markdown): the evaluation's sample grid, inline as a ``data:`` PNG, so it
  renders in the Prefect UI with no other server running;
- ``digits-metrics`` (table): FID, KID, precision and recall of the model against the floor
  (real training images scored exactly like the samples: what a perfect model would get);
- ``digits-mlflow-run`` (link): the MLflow run (its tags link back with ``prefect.flow_run_id``);
- ``digits-training`` (progress): created by the train task while it trains (flows/stage_logs.py).

Runs of another registered model keep their own latest artifacts. The MLflow links point at
``make mlflow-ui`` (http://127.0.0.1:5000) for the embedded SQLite store, or at
``AIGC_MLFLOW_UI_URL`` when set; nothing else in the artifacts needs a server.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from aigc_pipeline.evaluation.metrics import copying_text, entries
from aigc_pipeline.evaluation.results import COPIES_GRID
from aigc_pipeline.pipeline import summary_markdown
from flows.describe import artifact_key

UI_ENV = "AIGC_MLFLOW_UI_URL"
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`
# MLflow 3.17's UI opens every experiment on its GenAI overview (traces, tokens, cost) unless the
# browser's workflow toggle says "Model training"; the experiment's `mlflow.experimentKind` tag
# does not change that. Links carry the toggle, so they open on the training runs.
TRAINING_VIEW = "workflowType=machine_learning"
GRID_FILE = "samples.png"  # the evaluation's sample grid, beside its metrics.json
GRID_MIN_WIDTH = 384  # smaller grids are enlarged (nearest neighbour, integer factor) to be legible
LINEAGE_PREFIXES = ("git.", "dvc.", "prefect.", "aigc.run_ref", "aigc.data_digest")


def mlflow_ui(tracking_uri: str) -> str:
    """Base URL of the MLflow UI for ``tracking_uri``."""
    if os.environ.get(UI_ENV):
        return os.environ[UI_ENV].rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def links(receipt: dict[str, Any], experiment_id: str) -> dict[str, str]:
    """MLflow UI links for a register receipt: experiment, run and model version."""
    base = mlflow_ui(receipt["tracking_uri"])
    return {
        "experiment": f"{base}/#/experiments/{experiment_id}?{TRAINING_VIEW}",
        "run": f"{base}/#/experiments/{experiment_id}/runs/{receipt['run_id']}?{TRAINING_VIEW}",
        "version": f"{base}/#/models/{quote(receipt['name'])}/versions/{receipt['version']}?{TRAINING_VIEW}",
    }


def run_details(receipt: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The MLflow run's experiment id and tags (one MLflow call; the caller retries it)."""
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=receipt["tracking_uri"]).get_run(receipt["run_id"])
    return run.info.experiment_id, dict(run.data.tags)


def summary_with_lineage(
    summary: dict[str, Any], tags: dict[str, str], urls: dict[str, str], extra: dict[str, str] | None = None
) -> str:
    """The run summary (decision, metrics with protocol) plus dataset version and lineage."""
    lines = [summary_markdown(summary), ""]
    digest = tags.get("aigc.data_digest")
    if digest:
        dataset = summary["details"].get("dataset")  # evaluation.json's (metrics.json holds numbers only)
        lines.append(f"- **dataset version**: `{dataset}` content digest `{digest}`")
    lines.append(
        f"- **MLflow**: [experiment]({urls['experiment']}), [run]({urls['run']}), [model version]({urls['version']})"
    )
    lineage = {k: v for k, v in sorted(tags.items()) if k.startswith(LINEAGE_PREFIXES)}
    lineage.update(extra or {})
    if lineage:
        lines += ["", "## Lineage", "", "| tag | value |", "| --- | --- |"]
        lines += [f"| `{k}` | `{v}` |" for k, v in lineage.items()]
    return "\n".join(lines)


def grid_data_uri(path: Path, min_width: int = GRID_MIN_WIDTH) -> str:
    """The PNG at ``path`` as a ``data:image/png;base64,...`` URI, enlarged to ``min_width``."""
    from PIL import Image

    with Image.open(path) as opened:
        opened.load()
        factor = -(-min_width // opened.width) if opened.width < min_width else 1
        image: Image.Image = opened
        if factor > 1:
            image = opened.resize((opened.width * factor, opened.height * factor), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def samples_markdown(summary: dict[str, Any], grid: Path) -> str:
    """The evaluation's sample grid, inline, with what it was scored as."""
    r, d = summary["receipt"], summary["details"]
    protocol = (d.get("protocol") or {}).get("id", "no protocol")
    fid = f"FID {r['fid']:.2f}" + (
        f" (floor {summary['metrics']['floor_fid']:.2f})"
        if isinstance(summary["metrics"].get("floor_fid"), (int, float))
        else ""
    )
    return "\n".join(
        [
            f"# {r['name']} v{r['version']} ({r.get('family') or d.get('model')}): samples",
            "",
            f"![{r['name']} v{r['version']} samples]({grid_data_uri(grid)})",
            "",
            f"The evaluation's sample grid (`{grid.name}`), scored {fid} under protocol `{protocol}`; "
            f"decision: {r.get('decision')} ({r['reason']}).",
        ]
    )


def copies_markdown(summary: dict[str, Any], grid: Path) -> str:
    """The data-copying grid, inline, with the copying figures beside real data's."""
    r, copying = summary["receipt"], summary["details"].get("copying") or {}
    return "\n".join(
        [
            f"# {r['name']} v{r['version']}: data copying",
            "",
            f"![{r['name']} v{r['version']} copies]({grid_data_uri(grid)})",
            "",
            f"Top row: the samples nearest a training image (Inception features); bottom row: that training image. "
            f"{copying_text(summary['metrics'])}. {copying.get('what', '')}",
        ]
    )


def metrics_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: this model, the data's floor and model/floor (FID: how far from perfect)."""
    m = summary["metrics"]
    rows = []
    for entry in entries("table"):
        value, floor = m.get(entry.name), m.get(entry.floor) if entry.floor else None
        if not isinstance(value, (int, float)):
            continue
        floor_value = float(floor) if isinstance(floor, (int, float)) else None
        ratio = (
            round(float(value) / floor_value, 2)
            if floor_value is not None and floor_value > 0 and entry.ratio
            else None
        )
        rows.append(
            {
                "metric": entry.row,
                "model": round(float(value), 4),
                "floor (real data)": round(floor_value, 4) if floor_value is not None else None,
                "model / floor": ratio,
                "better": f"{entry.better} is better" if entry.better else None,
            }
        )
    return rows


def publish(summary: dict[str, Any], *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Create the summary, samples, metrics and MLflow link artifacts for the current flow run;
    returns the MLflow links used."""
    receipt = summary["receipt"]
    experiment_id, tags = run_details(receipt)
    urls = links(receipt, experiment_id)
    key = lambda what: artifact_key(receipt["name"], what)  # noqa: E731
    version = f"{receipt['name']} v{receipt['version']}"
    create_markdown_artifact(
        markdown=summary_with_lineage(summary, tags, urls, extra), key=key("summary"), description=summary["line"]
    )
    create_markdown_artifact(
        markdown=samples_markdown(summary, Path(summary["evaluation_dir"]) / GRID_FILE),
        key=key("samples"),
        description=f"{version}: the evaluation's sample grid",
    )
    copies = Path(summary["evaluation_dir"]) / COPIES_GRID
    if copies.is_file() and isinstance(summary["metrics"].get("copy_share"), (int, float)):
        create_markdown_artifact(
            markdown=copies_markdown(summary, copies),
            key=key("copies"),
            description=f"{version}: the samples nearest a training image, beside it",
        )
    create_table_artifact(
        table=metrics_table(summary),
        key=key("metrics"),
        description=f"{version}: metrics against the data's floor under protocol "
        f"{(summary['details'].get('protocol') or {}).get('id')}",
    )
    create_link_artifact(
        link=urls["run"],
        link_text=f"MLflow run {receipt['run_id']} ({version})",
        key=key("mlflow-run"),
        description=f"{version}: the MLflow run of this flow run",
    )
    return urls
