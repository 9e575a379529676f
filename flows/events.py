"""Prefect events the data team's commands emit, which the ``retrain`` deployment's trigger answers.

``aigc dataset add NAME SOURCE`` (new or ``--force`` update) emits ``aigc.dataset.updated`` for
resource ``aigc.dataset.NAME`` when ``PREFECT_API_URL`` points at a Prefect server. The payload
carries the dataset's params.yaml entry as an override, so the triggered run uses it even before
the params.yaml change reaches the repository (its source must then be readable by the workers:
an object-store URL or a shared mount, not a path on the data team's laptop).
A sync job watching a source can emit the same event (``prefect event emit``, see docs/scaling.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

DATASET_EVENT = "aigc.dataset.updated"


def dataset_resource(name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"aigc.dataset.{name}", "prefect.resource.name": name}


def dataset_payload(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """What the trigger passes on: ``dataset`` and ``overrides`` parameters of ``retrain``."""
    return {"dataset": name, "entry": entry, "overrides": [f"datasets.{name}={json.dumps(entry, sort_keys=True)}"]}


def emit_dataset_updated(name: str, entry: dict[str, Any]) -> str | None:
    """Emit the event and wait until it is sent; returns its id, or None when no server is configured.

    Only an explicit ``PREFECT_API_URL`` counts: without one, Prefect would start its embedded
    server just to record an event nobody listens to.
    """
    if not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(event=DATASET_EVENT, resource=dataset_resource(name), payload=dataset_payload(name, entry))
    EventsWorker.drain_all(timeout=30)  # a CLI process exits right after; do not lose the event
    return str(event.id) if event is not None else None
