"""Process-wide defaults for the embedded, offline, telemetry-free set-up.

Called by the CLI before Prefect, MLflow or DVC are imported. Only fills in variables the
user has not set, so ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` still point the same code
at real servers.
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "HF_HUB_OFFLINE": "1",
}


def set_defaults(project_dir: Path | str) -> None:
    """Telemetry off; Prefect's home and embedded server inside the project."""
    project = Path(project_dir).resolve()
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(project / ".prefect"))
    # The embedded server takes ~17 s to start on a new database here; Prefect's default wait is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # MLflow spends ~15 s inferring requirements and warns in uv venvs; we pass them explicitly.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
