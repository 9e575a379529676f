"""``aigc migrate``: carry the versions of a per-family registered model (``digits-dcgan``, the
naming before one registered model per dataset) into the dataset's model (``digits``).

Each version of the old model is copied, oldest first, as a new version of the new one
(``MlflowClient.copy_model_version``: same artifacts, same source run, so its metrics and lineage
come along), with the old version's tags plus ``aigc.migrated_from = OLD/vN``. If the new model has
no champion yet, the copy of the old champion becomes it (recorded in the champion history);
otherwise the champions stay as they are and the copies compete at the next registration. The old
model is left untouched: it stays readable, promotable and servable under its old name. Running it
again copies only the versions not copied before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aigc_pipeline.tracking.registry import RegistryError, alias_version, locked, move_alias

MIGRATED_TAG = "aigc.migrated_from"


@dataclass(frozen=True)
class Migration:
    source: str
    target: str
    copied: dict[str, str] = field(default_factory=dict)  # old version -> new version
    skipped: list[str] = field(default_factory=list)  # old versions copied by an earlier run
    champion: str | None = None  # the new model's champion after the migration
    champion_carried: bool = False  # the old champion's copy became it


def migrate(client: Any, source: str, target: str, *, alias: str = "champion") -> Migration:
    """Copy every version of ``source`` into ``target`` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    if source == target:
        raise RegistryError(f"migrate: {source} into itself; name another registered model (--to)")
    try:
        versions = sorted(client.search_model_versions(f"name='{source}'"), key=lambda v: int(v.version))
    except MlflowException as exc:
        raise RegistryError(f"migrate: {source} cannot be read ({exc.message})") from exc
    if not versions:
        raise RegistryError(f"migrate: {source} has no versions (see `aigc status` for the registered models)")
    done = _already_copied(client, target, source)
    old_champion = alias_version(client, source, alias)
    copied: dict[str, str] = {}
    for mv in versions:
        if str(mv.version) in done:
            continue
        new = client.copy_model_version(f"models:/{source}/{mv.version}", target)
        for k, v in {**(mv.tags or {}), MIGRATED_TAG: f"{source}/v{mv.version}"}.items():
            client.set_model_version_tag(target, str(new.version), k, v)
        copied[str(mv.version)] = str(new.version)
    all_copies = {**done, **copied}
    carried = False
    with locked(client, target):  # an alias move, decided on what the champion is now
        champion = alias_version(client, target, alias)
        if champion is None and old_champion is not None and old_champion in all_copies:
            champion = all_copies[old_champion]
            move_alias(client, target, alias, champion, record_history=True)
            carried = True
    return Migration(source, target, copied, sorted(done, key=int), champion, carried)


def _already_copied(client: Any, target: str, source: str) -> dict[str, str]:
    """Old version -> new version for the copies an earlier migration made."""
    from mlflow.exceptions import MlflowException

    try:
        existing = client.search_model_versions(f"name='{target}'")
    except MlflowException:
        return {}
    prefix = f"{source}/v"
    return {
        tags[MIGRATED_TAG][len(prefix) :]: str(v.version)
        for v in existing
        if (tags := v.tags or {}).get(MIGRATED_TAG, "").startswith(prefix)
    }
