"""Undo a registration that did not finish, so a failed run leaves nothing half-registered.

There is one undo path: a flow run's registrations are undone by :func:`undo_flow_run`, one version
at a time through :func:`aigc_pipeline.tracking.registry.undo_registration` (the register stage
calls that too, for its own half-made version), whose alias restore is
:func:`~aigc_pipeline.tracking.registry.undo_moves`. Putting a previous champion back on purpose
(``aigc rollback``) is not an undo but a move of the alias:
:func:`~aigc_pipeline.tracking.registry.restore_previous_champion`.

Before a flow run registers, :func:`snapshot` records the registered model's aliases. If the
register step then fails (an MLflow call fails after the run or the version exists, say),
:func:`undo_flow_run` deletes the model versions and MLflow runs tagged with that flow run's id and
puts back the aliases those versions had taken, each only if it still points where the failed
attempt left it (compare-and-set, under the registered model's lock): an ``aigc promote`` or
another registration made since is left alone. The snapshot is only the fallback for an alias
that points at a deleted version with no record of where it was before. The flow run id tag is
set when the MLflow run starts (by the train stage, or by register when it creates the run), so
even a run that died early is found. A run the train stage opened (``aigc.training=live``) is the
record of the training, not of the registration: it is kept (tagged ``aigc.registration=rolled
back``), only the versions registered from it are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FLOW_RUN_TAG = "prefect.flow_run_id"
TRAINING_TAG = "aigc.training"  # = aigc_pipeline.tracking.runs.TRAINING_TAG; "live": opened by the train stage


@dataclass(frozen=True)
class Snapshot:
    """A registered model's state before a registration: whether it existed, and its aliases."""

    name: str
    exists: bool
    aliases: dict[str, str]


@dataclass
class UndoReport:
    deleted_versions: list[str] = field(default_factory=list)
    deleted_runs: list[str] = field(default_factory=list)
    kept_runs: list[str] = field(default_factory=list)  # training runs: their versions deleted, the runs kept
    restored_aliases: dict[str, str] = field(default_factory=dict)
    removed_aliases: list[str] = field(default_factory=list)
    left_aliases: dict[str, str] = field(default_factory=dict)  # moved by the attempt, moved again since
    deleted_model: bool = False

    @property
    def changed(self) -> bool:
        return bool(
            self.deleted_versions
            or self.deleted_runs
            or self.restored_aliases
            or self.removed_aliases
            or self.deleted_model
        )

    def describe(self) -> str:
        if not self.changed:
            return "nothing to undo"
        parts = []
        if self.deleted_versions:
            parts.append(f"deleted model version(s) {', '.join(self.deleted_versions)}")
        if self.deleted_runs:
            parts.append(f"deleted MLflow run(s) {', '.join(self.deleted_runs)}")
        if self.kept_runs:
            parts.append(f"kept training run(s) {', '.join(self.kept_runs)}")
        if self.restored_aliases:
            parts.append("restored " + ", ".join(f"{a}=v{v}" for a, v in self.restored_aliases.items()))
        if self.removed_aliases:
            parts.append(f"removed alias(es) {', '.join(self.removed_aliases)}")
        if self.left_aliases:
            parts.append(
                "left "
                + ", ".join(f"{a}=v{v}" for a, v in self.left_aliases.items())
                + " alone (moved since the failed attempt)"
            )
        if self.deleted_model:
            parts.append("deleted the registered model it had created")
        return "; ".join(parts)


def _get_model(client: Any, name: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def snapshot(client: Any, name: str) -> Snapshot:
    """The registered model ``name``'s aliases now (``exists=False`` when there is no such model)."""
    model = _get_model(client, name)
    if model is None:
        return Snapshot(name, False, {})
    return Snapshot(name, True, {a: str(v) for a, v in (model.aliases or {}).items()})


def flow_run_mlflow_runs(client: Any, experiment: str, flow_run_id: str) -> list[str]:
    """Ids of the MLflow runs in ``experiment`` tagged with ``flow_run_id`` (deleted ones excluded)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1000
    )
    return [r.info.run_id for r in runs]


def undo_flow_run(
    client: Any, before: Snapshot, experiment: str, flow_run_id: str, *, champion_alias: str = "champion"
) -> UndoReport:
    """Remove what flow run ``flow_run_id`` registered and put back the aliases it moved, where they
    still point at its versions (``before``'s aliases only where nothing records more;
    ``champion_alias`` falls back along the champion history)."""
    from aigc_pipeline.tracking import registry

    report = UndoReport()
    run_ids = set(flow_run_mlflow_runs(client, experiment, flow_run_id))
    with registry.locked(client, before.name):
        model = _get_model(client, before.name)
        if model is not None:
            versions = client.search_model_versions(f"name='{before.name}'")
            for v in sorted(versions, key=lambda v: int(v.version)):
                if v.run_id in run_ids:
                    done = registry.undo_registration(
                        client, before.name, str(v.version), alias=champion_alias, fallback=before.aliases
                    )
                    report.deleted_versions.append(str(v.version))
                    report.restored_aliases.update(done.restored)
                    report.removed_aliases += done.removed
                    report.left_aliases.update(done.left)
            if not before.exists and not client.search_model_versions(f"name='{before.name}'"):
                client.delete_registered_model(before.name)
                report.deleted_model = True
    for run_id in sorted(run_ids):
        run = client.get_run(run_id)
        if run.data.tags.get(TRAINING_TAG) == "live":
            client.set_tag(run_id, "aigc.registration", "rolled back")
            if run.info.status == "RUNNING":
                client.set_terminated(run_id, status="FAILED")
            report.kept_runs.append(run_id)
            continue
        client.set_terminated(run_id, status="FAILED")
        client.delete_run(run_id)
        report.deleted_runs.append(run_id)
    return report
