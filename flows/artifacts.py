"""The Prefect artifacts every retraining flow run publishes, linking the run to MLflow.

- ``retrain-summary`` (markdown): model version, decision and reason, FID with its protocol,
  dataset and its content digest (the dataset version), and the lineage the MLflow run carries;
- ``mlflow-run`` (link): the MLflow run (its tags link back with ``prefect.flow_run_id``);
- ``sample-grid`` (image): the evaluation's sample grid, served by the MLflow server.

For the embedded SQLite store the links point at ``make mlflow-ui`` (http://127.0.0.1:5000),
or at ``AIGC_MLFLOW_UI_URL`` when set.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact

from aigc_pipeline.pipeline import summary_markdown

UI_ENV = "AIGC_MLFLOW_UI_URL"
LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`
GRID_ARTIFACT = "evaluation/samples.png"  # where stages/register.py logs the evaluation's grid
LINEAGE_PREFIXES = ("git.", "dvc.", "prefect.", "aigc.run_ref", "aigc.data_digest")


def mlflow_ui(tracking_uri: str) -> str:
    """Base URL of the MLflow UI for ``tracking_uri``."""
    if os.environ.get(UI_ENV):
        return os.environ[UI_ENV].rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def links(receipt: dict[str, Any], experiment_id: str) -> dict[str, str]:
    """MLflow UI links for a register receipt: run, model version and sample grid."""
    base = mlflow_ui(receipt["tracking_uri"])
    run_id = receipt["run_id"]
    return {
        "run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
        "version": f"{base}/#/models/{quote(receipt['name'])}/versions/{receipt['version']}",
        "grid": f"{base}/get-artifact?path={quote(GRID_ARTIFACT)}&run_uuid={run_id}",
    }


def run_details(receipt: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The MLflow run's experiment id and tags (one MLflow call; the caller retries it)."""
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=receipt["tracking_uri"]).get_run(receipt["run_id"])
    return run.info.experiment_id, dict(run.data.tags)


def summary_with_lineage(summary: dict[str, Any], tags: dict[str, str], urls: dict[str, str],
                         extra: dict[str, str] | None = None) -> str:
    """The run summary (decision, metrics with protocol) plus dataset version and lineage."""
    lines = [summary_markdown(summary), ""]
    digest = tags.get("aigc.data_digest")
    if digest:
        dataset = summary["details"].get("dataset")  # evaluation.json's (metrics.json holds numbers only)
        lines.append(f"- **dataset version**: `{dataset}` content digest `{digest}`")
    lines.append(f"- **MLflow**: [run]({urls['run']}), [model version]({urls['version']})")
    lineage = {k: v for k, v in sorted(tags.items()) if k.startswith(LINEAGE_PREFIXES)}
    lineage.update(extra or {})
    if lineage:
        lines += ["", "## Lineage", "", "| tag | value |", "| --- | --- |"]
        lines += [f"| `{k}` | `{v}` |" for k, v in lineage.items()]
    return "\n".join(lines)


def publish(summary: dict[str, Any], *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Create the three artifacts for the current flow run; returns the MLflow links used."""
    receipt = summary["receipt"]
    experiment_id, tags = run_details(receipt)
    urls = links(receipt, experiment_id)
    create_markdown_artifact(markdown=summary_with_lineage(summary, tags, urls, extra), key="retrain-summary",
                             description=summary["line"])
    create_link_artifact(link=urls["run"], link_text=f"MLflow run {receipt['run_id']} ({receipt['name']} "
                         f"v{receipt['version']})", key="mlflow-run", description="The MLflow run of this flow run")
    create_image_artifact(image_url=urls["grid"], key="sample-grid",
                          description=f"{receipt['name']} v{receipt['version']}: evaluation sample grid")
    return urls
