"""What a user sees in the MLflow and Prefect UIs after a real pipeline run, in a real Chromium.

One QUICK ``aigc run`` in a fresh copy of the project, then ``mlflow ui`` and ``prefect server
start`` on 127.0.0.1 over the stores it left (as ``make mlflow-ui`` / ``make prefect-ui`` do, on
free ports), and Debian's Chromium driven by playwright (tests/ui/pages.py). Without Chromium
and no way to install it the tests skip, except under ``CI=true``, where they fail.

The run is told where the MLflow UI will be (``AIGC_MLFLOW_UI_URL``), so the links in its Prefect
artifacts are the ones a user follows.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import QUICK, REGISTERED, copy_project, run_cli
from tests.scale.servers import free_port, stopping
from tests.ui import pages

pytestmark = pytest.mark.slow
RUN_NAME = re.compile(r"digits-resgan-\d{8}-\d{6}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        pages.chromium_path()
    except pages.BrowserUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no browser: {e}")
        pytest.skip(str(e))
    with pages.chromium() as b:
        yield b


@pytest.fixture(scope="module")
def uis(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A QUICK pipeline run, and both UIs over its stores."""
    base = tmp_path_factory.mktemp("ui")
    project = copy_project(base / "project")
    mlflow_port = free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_MLFLOW_UI_URL", mlflow_url)
        proc = run_cli(project, "aigc", "run", *[a for s in QUICK for a in ("--set", s)], timeout=1200)
    assert proc.returncode == 0, f"aigc run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    logs = base / "logs"
    ml_url, ml = pages.start_mlflow_ui(project, log_dir=logs, port=mlflow_port, wait=False)
    pf_url, pf = pages.start_prefect_ui(project, log_dir=logs, wait=False)
    with stopping(ml, pf):
        pages.wait_ready(ml_url, ml)
        pages.wait_ready(pf_url, pf)
        receipt = json.loads(next((project / "registry").glob("*.json")).read_text())
        runs = _post_json(f"{pf_url}/api/flow_runs/filter", {})
        (flow_run,) = [r for r in runs if r["flow_id"] and r["name"].startswith("digits-")]
        yield {
            "project": project,
            "mlflow": ml_url,
            "prefect": pf_url,
            "receipt": receipt,
            "flow_run": flow_run,
            "shots": base / "screens",
        }


def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def page(browser: Any, uis: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page in a fresh browser profile; its last state is saved as a PNG for a failing test."""
    p = pages.new_page(browser)
    yield p
    uis["shots"].mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(uis["shots"] / f"{request.node.name}.png"), full_page=True)
    p.context.close()


def _visible(page: Any, text: str | re.Pattern[str], within: str = "body") -> bool:
    """Wait for ``text`` to be drawn inside ``within`` (a CSS selector), up to pages.TIMEOUT_MS;
    False when it never is (the assertion then says what is missing)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(within).get_by_text(text).first.wait_for(state="visible")
        return True
    except PlaywrightTimeout:
        return False


def _mlflow_run(uis: dict[str, Any]) -> Any:
    """The registered version's MLflow run, read from the store (its experiment id and name)."""
    from mlflow import MlflowClient

    from aigc_pipeline.tracking.store import tracking_uri

    uri = tracking_uri(uis["project"])
    return MlflowClient(tracking_uri=uri).get_run(uis["receipt"]["run_id"]).info


# --- Prefect -----------------------------------------------------------------------------------


def test_prefect_flow_run_is_named_and_tagged_after_what_it_trained(page: Any, uis: dict[str, Any]) -> None:
    name = uis["flow_run"]["name"]
    assert RUN_NAME.fullmatch(name), name
    pages.prefect_flow_run(page, uis["prefect"], name)  # found by name in the Runs list
    # Waiting, not is_visible(): the page can redraw its header just after the helper saw it (CI).
    assert _visible(page, re.compile(rf"^{re.escape(name)}$")), f"{name} is not the page's title"
    for tag in ("dataset:digits", "model:resgan"):
        assert _visible(page, tag), f"tag {tag} not shown on the flow run page"
    pages.prefect_tab(page, "Task Runs")
    for task in ("params", "ingest@digits", "augment@digits", "train", "evaluate", "register", "publish-summary"):
        # Stable names: the stage's, with no random suffix (Prefect's default is "train-a1b").
        assert _visible(page, re.compile(rf"^{re.escape(task)}$"), "#task-runs-content"), (
            f"task run {task!r} not listed"
        )


def test_prefect_flow_run_parameters_show_dataset_model_and_overrides(page: Any, uis: dict[str, Any]) -> None:
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])
    pages.prefect_tab(page, "Parameters")
    for text in ('"dataset": "digits"', '"model": "resgan"', '"train.epochs=1"'):
        assert _visible(page, text), f"{text} not in the Parameters tab"


def test_prefect_flow_run_logs_show_training_the_fid_and_the_decision(page: Any, uis: dict[str, Any]) -> None:
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])  # opens on its logs
    assert _visible(page, re.compile(r"^train epoch 1/1 +step 10/10 +loss_d")), "no per-epoch training line"
    assert _visible(page, re.compile(r"^evaluate: FID [\d.]+ .*\(floor [\d.]+ = [\d.]+x\).*\[incv3-\w+_n24_eval-")), (
        "no FID with its floor and protocol"
    )
    assert _visible(page, re.compile(rf"^register: {REGISTERED} v1: champion \(.+\)")), "no decision with its reason"


def test_prefect_summary_artifact_is_rendered(page: Any, uis: dict[str, Any]) -> None:
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])
    pages.prefect_artifact(page, f"{REGISTERED}-summary")
    heading = page.get_by_role("heading", name=f"{REGISTERED} v1 (resgan)")
    heading.wait_for(state="visible")  # the markdown drawn, not raw; raises with the locator if never
    assert _visible(page, re.compile(r"^decision")) and _visible(page, "real data (the floor)")
    assert page.get_by_text("**decision**").count() == 0


def test_prefect_sample_grid_artifact_renders_without_another_server(page: Any, uis: dict[str, Any]) -> None:
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])
    pages.prefect_artifact(page, f"{REGISTERED}-samples")
    images = pages.wait_image(page, "data:image/png;base64,")
    assert images and all(i["width"] > 0 and i["height"] > 0 for i in images), images
    assert images[0]["width"] >= 384  # enlarged to be legible


def test_prefect_metrics_table_and_training_progress_artifacts(page: Any, uis: dict[str, Any]) -> None:
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])
    pages.prefect_artifact(page, f"{REGISTERED}-metrics")
    assert page.locator("table th").all_inner_texts()[:3] == ["metric", "model", "floor (real data)"]
    assert page.locator("table td", has_text=re.compile(r"^FID$")).count() == 1 and _visible(page, "lower is better")
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])
    pages.prefect_artifact(page, f"{REGISTERED}-training")
    assert _visible(page, "Progress: 100%") and _visible(page, "epoch 1/1, step 10/10")


# --- MLflow (each feature its own test) --------------------------------------------------------


def test_mlflow_experiment_opens_on_training_runs(page: Any, uis: dict[str, Any]) -> None:
    """The MLflow experiment link of the Prefect summary opens on the runs table, in a browser
    that never chose MLflow's "Model training" view, not on the GenAI overview (traces, tokens)."""
    pages.prefect_flow_run(page, uis["prefect"], uis["flow_run"]["name"])
    pages.prefect_artifact(page, f"{REGISTERED}-summary")
    href = page.get_by_role("link", name="experiment", exact=True).get_attribute("href")
    assert href and href.startswith(uis["mlflow"]), href
    run = _mlflow_run(uis)
    assert pages.mlflow_experiment(page, href, run.run_name), (
        f"the experiment did not open on its runs table (listing run {run.run_name!r})"
    )


def test_mlflow_run_shows_an_image_chart(page: Any, uis: dict[str, Any]) -> None:
    """The fixed-noise grids logged with ``mlflow.log_image`` are an image chart on the run's Model
    metrics tab: searching ``samples`` and stepping its slider to the last logged step shows that grid."""
    from mlflow import MlflowClient

    from aigc_pipeline.tracking.runs import SAMPLES_KEY, logged_image_steps
    from aigc_pipeline.tracking.store import tracking_uri

    run = _mlflow_run(uis)
    steps = logged_image_steps(MlflowClient(tracking_uri=tracking_uri(uis["project"])), run.run_id, SAMPLES_KEY)
    assert steps, f"run {run.run_id} logged no '{SAMPLES_KEY}' image"
    pages.mlflow_run_charts(page, uis["mlflow"], run.experiment_id, run.run_id)
    images = pages.mlflow_image_chart(page, SAMPLES_KEY, max(steps))
    assert images, f"no '{SAMPLES_KEY}' grid of step {max(steps)} shown in the run's image chart"
    assert all(i["width"] > 0 for i in images), images


def test_mlflow_model_version_shows_its_description(page: Any, uis: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from aigc_pipeline.tracking.store import tracking_uri

    r = uis["receipt"]
    uri = tracking_uri(uis["project"])
    stored = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(r["name"], r["version"]).description
    pages.mlflow_model_version(page, uis["mlflow"], r["name"], str(r["version"]))
    shown = pages.mlflow_version_description(page)
    assert stored, f"model version {r['name']} v{r['version']} has no description"
    first = next(line.lstrip("# ").strip() for line in stored.splitlines() if line.strip())
    assert first in shown, f"description not shown: {shown!r}"


def test_mlflow_model_version_shows_the_champion_alias(page: Any, uis: dict[str, Any]) -> None:
    r = uis["receipt"]
    pages.mlflow_model_version(page, uis["mlflow"], r["name"], str(r["version"]))
    assert "champion" in pages.mlflow_version_aliases(page)
