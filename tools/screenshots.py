"""``make screenshots``: PNGs of what a user sees in the Prefect and MLflow UIs, for docs/ and the README.

    python -m tools.screenshots                  # aigc run (default settings) in a temp copy, then shoot
    python -m tools.screenshots --quick          # the tests' QUICK settings (a minute; noise, not digits)
    python -m tools.screenshots --project .      # the stores an earlier `make run` left here
    python -m tools.screenshots --set train.epochs=15   # a shorter run (repeatable, as aigc run --set)

Starts ``mlflow ui`` and ``prefect server start`` (with ``PREFECT_SERVER_API_PORT``) on free
127.0.0.1 ports over the project's stores, drives Debian's Chromium with playwright (installed
by tests/ui/pages.py when missing) through the same pages the browser tests check, and writes
``docs/screenshots/*.png``. Each page is shot once what it is about has been drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"


def _run_pipeline(project: Path, quick: bool, sets: list[str], mlflow_url: str) -> None:
    from tests.conftest import QUICK, copy_project
    from tests.scale.servers import BIN, clean_env

    copy_project(project)
    sets = [a for s in (QUICK if quick else []) + sets for a in ("--set", s)]
    env = clean_env(
        PREFECT_HOME=str(project / ".prefect"),
        AIGC_MLFLOW_UI_URL=mlflow_url,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    print(f"aigc run in {project}{' (QUICK settings)' if quick else ''} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([str(BIN / "aigc"), "run", *sets], cwd=project, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"aigc run in {project} failed with exit code {proc.returncode} (output above)")


def _latest_flow_run(prefect_url: str) -> dict[str, Any]:
    body = json.dumps(
        {"sort": "START_TIME_DESC", "limit": 20, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    ).encode()
    request = urllib.request.Request(
        f"{prefect_url}/api/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        runs = json.loads(r.read())
    if not runs:
        raise RuntimeError(f"no completed flow run in the Prefect database of {prefect_url}: run `make run` first")
    return runs[0]


def shoot(project: Path, out: Path, *, mlflow_port: int | None = None) -> list[Path]:
    """Start both UIs over ``project``'s stores and write the screenshots to ``out``."""
    from mlflow import MlflowClient

    from aigc_pipeline.config import load_config
    from aigc_pipeline.tracking.runs import SAMPLES_KEY, logged_image_steps
    from aigc_pipeline.tracking.store import tracking_uri
    from tests.scale.servers import stopping
    from tests.ui import pages

    logs = Path(tempfile.mkdtemp(prefix="aigc-screens-"))
    ml_url, ml = pages.start_mlflow_ui(project, log_dir=logs, port=mlflow_port, wait=False)
    pf_url, pf = pages.start_prefect_ui(project, log_dir=logs, wait=False)
    written: list[Path] = []
    with stopping(ml, pf):
        pages.wait_ready(ml_url, ml)
        pages.wait_ready(pf_url, pf)
        cfg = load_config(project)
        receipt = json.loads((project / "registry" / f"{cfg.model_name}.json").read_text())
        uri = tracking_uri(project)
        run = MlflowClient(tracking_uri=uri).get_run(receipt["run_id"]).info
        flow_run = _latest_flow_run(pf_url)
        key = lambda what: f"{receipt['name']}-{what}"  # noqa: E731  (flows.describe.artifact_key)
        out.mkdir(parents=True, exist_ok=True)

        def save(page: Any, name: str, *, full: bool = False) -> None:
            path = out / f"{name}.png"
            page.wait_for_timeout(1500)  # let late layout (fonts, chart transitions) settle
            page.screenshot(path=str(path), full_page=full)
            written.append(path)
            print(f"wrote {path}", file=sys.stderr)

        with pages.chromium() as browser:
            page = pages.new_page(browser)
            pages.prefect_flow_run(page, pf_url, flow_run["name"])
            page.get_by_text("Finished in state").first.wait_for()
            save(page, "prefect-flow-run")
            for what in ("summary", "samples", "metrics"):
                pages.prefect_flow_run(page, pf_url, flow_run["name"])
                pages.prefect_artifact(page, key(what))
                if what == "samples":
                    pages.wait_image(page, "data:image/png")
                save(page, f"prefect-{what}", full=what != "summary")

            page = pages.new_page(browser, quiet_mlflow=True)
            experiment = f"{ml_url}/#/experiments/{run.experiment_id}?workflowType=machine_learning"
            pages.mlflow_experiment(page, experiment, run.run_name)
            save(page, "mlflow-experiment")
            pages.mlflow_run_charts(page, ml_url, run.experiment_id, run.run_id)
            save(page, "mlflow-run-charts")
            client = MlflowClient(tracking_uri=uri)
            steps = logged_image_steps(client, run.run_id, SAMPLES_KEY)
            if steps and pages.mlflow_image_chart(page, SAMPLES_KEY, max(steps)):
                # MLflow prints the run's params above the picture: scroll the card to the grid.
                page.locator(f"img[src*='{SAMPLES_KEY}%2Bstep%2B{max(steps)}%2B']").first.scroll_into_view_if_needed()
                save(page, "mlflow-run-samples")
            pages.mlflow_model_version(page, ml_url, receipt["name"], str(receipt["version"]))
            save(page, "mlflow-model-version")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--project",
        type=Path,
        help="use this project's stores (after `make run`) instead of a fresh run in a temporary copy",
    )
    parser.add_argument("--quick", action="store_true", help="the fresh run uses the tests' QUICK settings")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml override for the fresh run, as `aigc run --set` (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for the PNGs (default {OUT})")
    args = parser.parse_args(argv)
    for var in ("DO_NOT_TRACK", "DVC_NO_ANALYTICS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from tests.scale.servers import free_port

    if args.project is not None:
        if args.quick or args.sets:
            parser.error("--quick and --set apply to a fresh run, not to --project")
        shoot(args.project.resolve(), args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="aigc-screens-") as tmp:
        project, port = Path(tmp) / "project", free_port()
        _run_pipeline(project, args.quick, args.sets, f"http://127.0.0.1:{port}")
        shoot(project, args.out, mlflow_port=port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
