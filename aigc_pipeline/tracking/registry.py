"""The MLflow model registry: champion history, promotion, rollback, and what the registry holds.

Alias changes are single ``set_registered_model_alias`` calls (one upsert in the store): a reader
resolving ``models:/NAME@champion`` sees the old version or the new one, never no version. Every
decision about an alias and its move happen under the registered model's lock
(:mod:`aigc_pipeline.tracking.locks`): a gate decision, :func:`promote`, :func:`restore_previous_champion`,
:func:`undo_registration`, :func:`undo_moves`. So the read-modify-write tags cannot lose entries:
the champion history (``aigc.champion_history``: versions, oldest first; ``restore_previous_champion`` moves the
alias back along it) and the decision history (``aigc.decision_history``: every gate decision,
with the champion it was compared with, in the order they were made).

Before :func:`move_alias` moves an alias to a version it tags that version with where the alias
pointed before (``aigc.alias_moved.ALIAS``). Undoing a registration restores exactly those
aliases, and only those that still point at the version (compare-and-set under the lock): a
promotion made since is left alone.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aigc_pipeline.errors import AigcError
from aigc_pipeline.evaluation.gate import REJECTED, Score
from aigc_pipeline.evaluation.metrics import names
from aigc_pipeline.evaluation.protocol import metric_key

HISTORY_TAG = "aigc.champion_history"
DECISIONS_TAG = "aigc.decision_history"  # VERSION:DECISION:COMPARED_WITH entries, oldest first
DECISION_TAG = "aigc.decision"
MOVED_PREFIX = "aigc.alias_moved."  # + alias, on the version the alias was moved to: where it pointed before
_HISTORY_MAX = 200  # entries kept; tag values are limited in size
_TAG_MAX_CHARS = 4000  # registered-model tag values are VARCHAR(5000) in MLflow's SQL stores


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


@dataclass
class Restored:
    """What undoing a version's alias moves did."""

    restored: dict[str, str] = field(default_factory=dict)  # alias -> the version it points to again
    removed: list[str] = field(default_factory=list)  # aliases that pointed at the version and now point nowhere
    left: dict[str, str] = field(default_factory=dict)  # moved by the version, moved again since: left there

    def describe(self) -> str:
        parts = [f"{a} back to v{v}" for a, v in self.restored.items()]
        parts += [f"{a} removed" for a in self.removed]
        parts += [f"{a} left at v{v} (moved since)" for a, v in self.left.items()]
        return ", ".join(parts) or "no alias pointed at it"


def store_uri(client: Any) -> str:
    """The registry URI ``client`` writes to: what the registered model's lock is keyed on."""
    return str(client._registry_uri)  # MlflowClient keeps it only as this attribute


@contextlib.contextmanager
def locked(client: Any, name: str) -> Iterator[Any]:
    """Hold registered model ``name``'s lock (re-entrant); yields its :class:`~.locks.LockPlan`."""
    from aigc_pipeline.tracking.locks import registry_lock

    with registry_lock(store_uri(client), name) as plan:
        yield plan


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
    """Point ``alias`` at ``version`` in one call (under the lock); append to the champion history when asked.

    Returns the version it pointed to before (None if none). First ``version`` is tagged with that
    previous version (``aigc.alias_moved.ALIAS``: what an undo puts back), then the history is
    written: if the alias call then fails, the history has one extra entry, which
    ``champion_history`` tolerates, and the tag is ignored (the alias does not point at ``version``).
    """
    version = str(version)
    with locked(client, name):
        previous = alias_version(client, name, alias)
        if previous == version:
            return previous
        client.set_model_version_tag(name, version, MOVED_PREFIX + alias, previous or "none")
        if record_history:
            history = champion_history(client, name, alias)
            if not history or history[-1] != version:
                history.append(version)
            client.set_registered_model_tag(name, HISTORY_TAG, _join(history[-_HISTORY_MAX:]))
        client.set_registered_model_alias(name, alias, version)
        return previous


def decision_history(client: Any, name: str) -> list[tuple[str, str, str | None]]:
    """Gate decisions in the order they were made: (version, decision, champion compared with or None)."""
    raw = (client.get_registered_model(name).tags or {}).get(DECISIONS_TAG, "")
    out = []
    for entry in filter(None, raw.split(",")):
        version, decision, against = (entry.split(":") + ["", ""])[:3]
        out.append((version, decision, None if against in ("", "-") else against))
    return out


def record_decision(client: Any, name: str, version: str, decision: str, compared_with: str | None) -> None:
    """Append a gate decision to the decision history (under the lock); a version decided again
    (a retry) moves to the end with its new decision."""
    with locked(client, name):
        kept = [e for e in decision_history(client, name) if e[0] != str(version)]
        kept.append((str(version), decision, compared_with))
        entries = [f"{v}:{d}:{c or '-'}" for v, d, c in kept]
        client.set_registered_model_tag(name, DECISIONS_TAG, _join(entries[-_HISTORY_MAX:]))


def _join(entries: list[str]) -> str:
    """Comma-joined, oldest entries dropped until the value fits in a registered-model tag."""
    while entries and len(",".join(entries)) > _TAG_MAX_CHARS:
        entries = entries[1:]
    return ",".join(entries)


def promote(
    client: Any,
    name: str,
    version: str,
    *,
    reason: str,
    user: str | None = None,
    alias: str = "champion",
    challenger_alias: str | None = "challenger",
    force: bool = False,
) -> Change:
    """Make ``version`` the champion by hand, recording who and why on the version and its run.

    A version the gate rejected (diverged, partial or non-finite evaluation) is refused unless
    ``force``.
    """
    if not reason or not reason.strip():
        raise RegistryError("promote: give a reason (--reason TEXT); it is recorded on the model version")
    with locked(client, name):  # the same lock as registrations: decided and moved from one state
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
        tags = {
            "aigc.promoted_by": user,
            "aigc.promoted_reason": reason.strip()[:4000],
            "aigc.promoted_at": now,
            "aigc.promoted_from": previous or "none",
        }
        _tag_version_and_run(client, mv, tags)
        move_alias(client, name, alias, str(version), record_history=True)
        if challenger_alias and alias_version(client, name, challenger_alias) == str(version):
            client.delete_registered_model_alias(name, challenger_alias)
    return Change(name, alias, str(version), previous, f"promoted by {user}: {reason.strip()}")


def restore_previous_champion(
    client: Any, name: str, *, reason: str | None = None, user: str | None = None, alias: str = "champion"
) -> Change:
    """Put the previous champion back: the alias moves to the history entry before the current one
    (skipping versions deleted since), and the current one leaves the history."""
    with locked(client, name):
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
            raise RegistryError(
                f"{name}: no previous '{alias}' to roll back to (history: {','.join(history) or 'empty'})"
            )
        target = history[-2]
        now = _now()
        why = (reason or "").strip() or "no reason given"
        _tag_version_and_run(
            client,
            _version(client, name, target),
            {
                "aigc.rollback_from": current,
                "aigc.rollback_by": user,
                "aigc.rollback_at": now,
                "aigc.rollback_reason": why[:4000],
            },
        )
        _tag_version_and_run(
            client,
            _version(client, name, current),
            {"aigc.rolled_back_by": user, "aigc.rolled_back_at": now, "aigc.rolled_back_reason": why[:4000]},
        )
        # History first (the current champion leaves it), then the one atomic alias move.
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
        client.set_registered_model_alias(name, alias, target)
    return Change(name, alias, target, current, f"rolled back by {user}: {why}")


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
        "metrics": {k: metrics[k] for k in names("summary") if k in metrics and math.isfinite(metrics[k])},
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


def undo_moves(
    client: Any, name: str, version: str, *, champion_alias: str = "champion", fallback: Mapping[str, str] | None = None
) -> Restored:
    """Put back the aliases ``version`` took, each only if it still points at ``version`` (under the lock).

    An alias goes back to the version its ``aigc.alias_moved.ALIAS`` tag recorded (removed if it
    recorded none). An alias pointing at ``version`` with no record (moved by an older release)
    goes to ``fallback[alias]``. Where that version no longer exists, or for a champion alias with
    no record, the champion alias goes back along the champion history; any other alias is
    removed. Aliases moved again since are left where they are. The records are dropped: the
    version no longer holds what they describe.
    """
    version = str(version)
    with locked(client, name):
        tags = _version(client, name, version).tags or {}
        journal = {k[len(MOVED_PREFIX) :]: v for k, v in tags.items() if k.startswith(MOVED_PREFIX)}
        aliases = {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
        history = champion_history(client, name, champion_alias)
        done = Restored()
        for alias in sorted(set(journal) | {a for a, v in aliases.items() if v == version}):
            now = aliases.get(alias)
            if now != version:
                if now is not None:
                    done.left[alias] = now
                continue
            if journal.get(alias) == "none":  # it pointed nowhere before this version took it
                candidates = []
            else:
                candidates = [journal[alias]] if alias in journal else [(fallback or {}).get(alias)]
                if alias == champion_alias:  # the recorded one deleted since, or no record: the one before
                    candidates += [v for v in reversed(history) if v != version]
            target = next((c for c in candidates if c and c != version and _exists(client, name, c)), None)
            if target is not None:
                client.set_registered_model_alias(name, alias, target)
                done.restored[alias] = target
            else:
                client.delete_registered_model_alias(name, alias)
                done.removed.append(alias)
        for alias in journal:
            client.delete_model_version_tag(name, version, MOVED_PREFIX + alias)
        return done


def undo_registration(
    client: Any, name: str, version: str, *, alias: str = "champion", fallback: Mapping[str, str] | None = None
) -> Restored:
    """Remove a half-registered version so that nothing points at it (under the lock): the aliases
    it moved go back (:func:`undo_moves`; ``alias`` is the champion alias, whose history is the
    last resort), the version leaves the champion history, and the version is deleted."""
    version = str(version)
    with locked(client, name):
        # The history first, read before any alias moves back (champion_history appends the holder).
        history = champion_history(client, name, alias)
        kept: list[str] = []
        for v in history:
            if v != version and (not kept or kept[-1] != v):  # no entry twice in a row once it is gone
                kept.append(v)
        if kept != history:
            client.set_registered_model_tag(name, HISTORY_TAG, ",".join(kept))
        done = undo_moves(client, name, version, champion_alias=alias, fallback=fallback)
        client.delete_model_version(name, version)
        return done
