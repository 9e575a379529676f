"""Registry decisions: whether a new version becomes champion, and what the registry holds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    previous_champion: str | None  # version that held the alias before, if any


def decide_champion(client: Any, name: str, alias: str, metric_key: str, value: float) -> Decision:
    """Promote when there is no champion yet, or when ``value`` (a lower-is-better FID under
    the protocol named by ``metric_key``) beats the champion's value under the same key."""
    from mlflow.exceptions import MlflowException

    if not math.isfinite(value):
        return Decision(False, f"{metric_key} is {value}: a non-finite score is never promoted", None)
    try:
        champ = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return Decision(True, f"first model: no '{alias}' yet", None)
    champ_metrics = client.get_run(champ.run_id).data.metrics if champ.run_id else {}
    if metric_key not in champ_metrics:
        return Decision(
            False,
            f"'{alias}' v{champ.version} has no {metric_key}: measured under another protocol, not comparable",
            champ.version,
        )
    best = champ_metrics[metric_key]
    if value < best:
        return Decision(True, f"FID {value:.4f} < {alias} v{champ.version}'s {best:.4f} on the same protocol", champ.version)
    return Decision(False, f"FID {value:.4f} >= {alias} v{champ.version}'s {best:.4f} on the same protocol", champ.version)


def list_models(client: Any) -> list[dict[str, Any]]:
    """Registered models with their aliases and the latest version's metrics."""
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        latest = max(versions, key=lambda v: int(v.version)) if versions else None
        metrics = client.get_run(latest.run_id).data.metrics if latest is not None and latest.run_id else {}
        out.append(
            {
                "name": rm.name,
                "aliases": {a: str(v) for a, v in sorted((rm.aliases or {}).items())},
                "latest_version": str(latest.version) if latest is not None else None,
                "metrics": dict(sorted(metrics.items())),
            }
        )
    return sorted(out, key=lambda m: m["name"])
