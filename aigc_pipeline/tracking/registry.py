"""The MLflow model registry: champion history, promotion, rollback, and what the registry holds.

Alias changes are single ``set_registered_model_alias`` calls (one upsert in the store): a reader
resolving ``models:/NAME@champion`` sees the old version or the new one, never no version. The
champion history is a registered-model tag (``aigc.champion_history``: versions, oldest first);
``rollback`` moves the alias back along it. The history tag is a read-modify-write: two
promotions of the same model at the same instant can lose an entry (the alias itself cannot).
"""

from __future__ import annotations

import getpass
import math
import time
from dataclasses import dataclass
from typing import Any

from aigc_pipeline.errors import AigcError
from aigc_pipeline.evaluation.gate import REJECTED, Score
from aigc_pipeline.evaluation.protocol import metric_key

HISTORY_TAG = "aigc.champion_history"
DECISION_TAG = "aigc.decision"
_HISTORY_MAX = 200  # entries kept; tag values are limited in size


class RegistryError(AigcError, ValueError):
    """A registry request that cannot be carried out (unknown version, nothing to roll back to, ...)."""


@dataclass(frozen=True)
class Change:
    """An alias move: ``previous`` (or None) -> ``version``."""

    name: str
    alias: str
    version: str
    previous: str | None
    reason: str


def current_user() -> str:
    """Who is acting: the login name from the environment (``LOGNAME``, ``USER``, ...)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_history(client: Any, name: str, alias: str = "champion") -> list[str]:
    """Versions that held ``alias``, oldest first; the current holder last (seeded with it if untracked)."""
    tags = client.get_registered_model(name).tags or {}
    history = [v for v in tags.get(HISTORY_TAG, "").split(",") if v]
    current = alias_version(client, name, alias)
    if current is not None and (not history or history[-1] != current):
        history.append(current)  # moved outside these functions: record where it stands now
    return history


def champion_score(client: Any, name: str, alias: str, protocol_id: str) -> tuple[str | None, Score | None]:
    """(champion version, its FID and bootstrap spread under ``protocol_id``); (v, None) if it has no
    FID under that protocol; (None, None) if there is no champion."""
    version = alias_version(client, name, alias)
    if version is None:
        return None, None
    mv = client.get_model_version(name, version)
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    fid = metrics.get(metric_key("fid", protocol_id))
    if fid is None:
        return version, None
    std = metrics.get(metric_key("fid_std", protocol_id))
    return version, Score(float(fid), None if std is None else float(std))


def move_alias(client: Any, name: str, alias: str, version: str, *, record_history: bool) -> str | None:
    """Point ``alias`` at ``version`` in one call; append to the champion history when asked.

    Returns the version it pointed to before (None if none). The history is written first: if the
    alias call then fails, the history has one extra entry, which ``champion_history`` tolerates.
    """
    previous = alias_version(client, name, alias)
    if record_history:
        history = champion_history(client, name, alias)
        if not history or history[-1] != version:
            history.append(version)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-_HISTORY_MAX:]))
    client.set_registered_model_alias(name, alias, version)
    return previous


def promote(client: Any, name: str, version: str, *, reason: str, user: str | None = None,
            alias: str = "champion", challenger_alias: str | None = "challenger", force: bool = False) -> Change:
    """Make ``version`` the champion by hand, recording who and why on the version and its run.

    A version the gate rejected (diverged, partial or non-finite evaluation) is refused unless
    ``force``.
    """
    if not reason or not reason.strip():
        raise RegistryError("promote: give a reason (--reason TEXT); it is recorded on the model version")
    mv = _version(client, name, version)
    if (mv.tags or {}).get(DECISION_TAG) == REJECTED and not force:
        raise RegistryError(
            f"{name} v{version} was rejected at registration ({mv.tags.get('aigc.decision_reason', 'no reason')}); "
            "pass --force to promote it anyway"
        )
    user = user or current_user()
    previous = alias_version(client, name, alias)
    if previous == str(version):
        raise RegistryError(f"{name} v{version} is already '{alias}'")
    now = _now()
    tags = {"aigc.promoted_by": user, "aigc.promoted_reason": reason.strip()[:4000], "aigc.promoted_at": now,
            "aigc.promoted_from": previous or "none"}
    _tag_version_and_run(client, mv, tags)
    move_alias(client, name, alias, str(version), record_history=True)
    if challenger_alias and alias_version(client, name, challenger_alias) == str(version):
        client.delete_registered_model_alias(name, challenger_alias)
    return Change(name, alias, str(version), previous, f"promoted by {user}: {reason.strip()}")


def rollback(client: Any, name: str, *, reason: str | None = None, user: str | None = None,
             alias: str = "champion") -> Change:
    """Put the previous champion back: the alias moves to the history entry before the current one
    (skipping versions deleted since), and the current one leaves the history."""
    history = champion_history(client, name, alias)
    current = alias_version(client, name, alias)
    if current is None:
        raise RegistryError(f"{name} has no '{alias}' to roll back")
    user = user or current_user()
    while len(history) >= 2:
        candidate = history[-2]
        if _exists(client, name, candidate):
            break
        del history[-2]  # deleted since it was champion
    if len(history) < 2:
        raise RegistryError(f"{name}: no previous '{alias}' to roll back to (history: {','.join(history) or 'empty'})")
    target = history[-2]
    now = _now()
    why = (reason or "").strip() or "no reason given"
    _tag_version_and_run(client, _version(client, name, target),
                         {"aigc.rollback_from": current, "aigc.rollback_by": user, "aigc.rollback_at": now,
                          "aigc.rollback_reason": why[:4000]})
    _tag_version_and_run(client, _version(client, name, current),
                         {"aigc.rolled_back_by": user, "aigc.rolled_back_at": now, "aigc.rolled_back_reason": why[:4000]})
    # History first (the current champion leaves it), then the one atomic alias move.
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    client.set_registered_model_alias(name, alias, target)
    return Change(name, alias, target, current, f"rolled back by {user}: {why}")


# Short metric names shown per version (the evaluation's own names; see evaluation.results).
SUMMARY_METRICS = ("fid", "fid_std", "floor_fid", "fid_ratio", "kid", "precision", "recall", "floor_precision",
                   "floor_recall")


def list_models(client: Any) -> list[dict[str, Any]]:
    """Registered models: aliases, champion history, and for the latest and each aliased version
    its family, decision, protocol and headline metrics (with the data's floor)."""
    out = []
    for rm in client.search_registered_models():
        versions = {str(v.version): v for v in client.search_model_versions(f"name='{rm.name}'")}
        latest = max(versions, key=int) if versions else None
        aliases = {a: str(v) for a, v in sorted((rm.aliases or {}).items())}
        shown = sorted({*aliases.values(), *([latest] if latest else [])} & set(versions), key=int)
        metrics = client.get_run(versions[latest].run_id).data.metrics if latest and versions[latest].run_id else {}
        out.append(
            {
                "name": rm.name,
                "aliases": aliases,
                "champion_history": [v for v in (rm.tags or {}).get(HISTORY_TAG, "").split(",") if v],
                "latest_version": latest,
                "latest_decision": (versions[latest].tags or {}).get(DECISION_TAG) if latest else None,
                "metrics": {k: v for k, v in sorted(metrics.items()) if math.isfinite(v)},
                "versions": {v: _version_summary(client, versions[v], aliases) for v in shown},
            }
        )
    return sorted(out, key=lambda m: m["name"])


def _version_summary(client: Any, mv: Any, aliases: dict[str, str]) -> dict[str, Any]:
    tags = mv.tags or {}
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return {
        "aliases": [a for a, v in aliases.items() if v == str(mv.version)],
        "family": tags.get("aigc.family") or tags.get("aigc.model"),
        "decision": tags.get(DECISION_TAG),
        "reason": tags.get("aigc.decision_reason"),
        "protocol": tags.get("aigc.protocol"),
        "metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics and math.isfinite(metrics[k])},
    }


def _version(client: Any, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} v{version}: no such registered model version ({exc.message})") from exc


def _exists(client: Any, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
        return True
    except MlflowException:
        return False


def _tag_version_and_run(client: Any, mv: Any, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(mv.name, str(mv.version), k, v)
        if mv.run_id:
            client.set_tag(mv.run_id, k, v)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Registration state, tagged on the version: a retry finds what an earlier attempt left.
KEY_TAG = "aigc.registration_key"
STATE_TAG = "aigc.registration"
PENDING, DECIDED, DONE = "pending", "decided", "done"


def find_registration(client: Any, name: str, key: str) -> Any | None:
    """The newest version of ``name`` registered with ``key`` (None if none)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")):
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def discard_version(client: Any, name: str, version: str, *, alias: str = "champion") -> None:
    """Remove a half-registered version so that nothing points at it: the champion alias goes back
    to the previous champion (or away, if there was none), the version leaves the history, and the
    version is deleted (its other aliases with it)."""
    version = str(version)
    history = champion_history(client, name, alias)
    if alias_version(client, name, alias) == version:
        earlier = [v for v in history if v != version and _exists(client, name, v)]
        if earlier:
            client.set_registered_model_alias(name, alias, earlier[-1])
        else:
            client.delete_registered_model_alias(name, alias)
    kept = [v for v in history if v != version]
    if kept != history:
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(kept))
    client.delete_model_version(name, version)
