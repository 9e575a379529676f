"""The MLflow and Prefect UIs over a project's own stores, driven in a real Chromium.

Used by the browser tests (tests/ui/test_browser.py) and by ``make screenshots``
(tools/screenshots.py); nothing here depends on pytest.

- :func:`chromium_path` finds Debian's ``chromium`` (installing it with apt-get when missing,
  as tests/scale/servers.py does for PostgreSQL); the ``playwright`` package drives it through
  ``executable_path``: ``playwright install`` (a browser download) is never needed.
- :func:`start_mlflow_ui` is ``make mlflow-ui`` on a free port; :func:`start_prefect_ui` is
  ``make prefect-ui`` on a free port: ``PREFECT_HOME`` is the project's ``.prefect`` (the
  embedded server's database, where ``aigc run`` recorded its flow runs) and
  ``PREFECT_SERVER_API_PORT`` is that port too, or the UI would call the API on 4200.
- The page functions open what a user opens and wait for what a user waits for; the React UIs
  load lazily, so each waits for the element it is about, never for a fixed time alone.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.scale.servers import BIN, Proc, ServerError, apt_install, clean_env, free_port, start, wait_http

CHROMIUM = Path("/usr/bin/chromium")  # Debian's `chromium` package
TIMEOUT_MS = 90_000  # a page of a lazily loaded UI on a busy 2-core machine
# The MLflow assistant panel opens by itself on a first visit and covers a third of the page.
MLFLOW_QUIET = """
try {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}
"""


class BrowserUnavailable(ServerError):
    """Chromium or the playwright package is missing and cannot be installed here."""


def chromium_path(install: bool = True) -> Path:
    """Debian's Chromium; installs the ``chromium`` package with apt-get when it is missing.

    Raises :class:`BrowserUnavailable` (what to install) when it is missing and cannot be
    installed (not root, no apt-get, apt-get failed), or when playwright is not importable.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        raise BrowserUnavailable(
            f"the playwright package is missing ({e}): `make install` installs the dev "
            "group (pyproject.toml), which holds it"
        ) from None
    if CHROMIUM.exists():
        return CHROMIUM
    if not install:
        raise BrowserUnavailable(f"{CHROMIUM} not found: install Debian's `chromium` package")
    apt_install(
        "chromium", what=f"Chromium ({CHROMIUM})", needed_by="the browser tests", error=BrowserUnavailable, timeout=1800
    )
    return chromium_path(install=False)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright ``Browser``), closed afterwards."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as p:
        # --no-sandbox: Chromium refuses to sandbox as root (CI containers).
        browser = p.chromium.launch(executable_path=str(path), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, *, quiet_mlflow: bool = False) -> Any:
    """A page in a fresh profile (nothing remembered from earlier visits), 1400x1000."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    if quiet_mlflow:
        context.add_init_script(MLFLOW_QUIET)
    return context.new_page()


# --- the servers -------------------------------------------------------------------------------


def start_mlflow_ui(
    project: Path, *, log_dir: Path, port: int | None = None, timeout: float = 300, wait: bool = True
) -> tuple[str, Proc]:
    """``mlflow ui`` on the project's store (``make mlflow-ui``), one worker, on 127.0.0.1;
    with ``wait``, returns once it answers (else call :func:`wait_ready`)."""
    from aigc_pipeline.tracking.store import tracking_uri

    port = port or free_port()
    proc = start(
        "mlflow-ui",
        [
            str(BIN / "mlflow"),
            "ui",
            "--backend-store-uri",
            tracking_uri(project),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=project,
        env=clean_env(),
        log_dir=log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_ready(url, proc, timeout)
    return url, proc


def start_prefect_ui(
    project: Path, *, log_dir: Path, port: int | None = None, timeout: float = 300, wait: bool = True
) -> tuple[str, Proc]:
    """``prefect server start`` with its UI on the project's ``.prefect`` (``make prefect-ui``)."""
    port = port or free_port()
    env = clean_env(
        PREFECT_HOME=str(project / ".prefect"), PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port)
    )  # the port the UI's JavaScript calls
    proc = start(
        "prefect-ui",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
        cwd=project,
        env=env,
        log_dir=log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_ready(url, proc, timeout)
    return url, proc


def wait_ready(url: str, proc: Proc, timeout: float = 300) -> None:
    """Wait for a UI started by this module to answer its health check; stop it if it does not."""
    health = f"{url}/api/health" if proc.name == "prefect-ui" else f"{url}/health"
    try:
        wait_http(health, proc, timeout)
    except BaseException:
        proc.stop()
        raise


# --- Prefect pages -----------------------------------------------------------------------------


def prefect_flow_run(page: Any, base: str, name: str) -> None:
    """From the Runs list, open the flow run called ``name`` (waits for its page header)."""
    page.goto(f"{base}/runs")
    page.get_by_role("link", name=name, exact=True).first.click()
    page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]{36}.*"))
    page.get_by_text(name, exact=True).first.wait_for()


def prefect_tab(page: Any, tab: str, tries: int = 5) -> None:
    """Click a tab of a flow run page (Logs, Task Runs, Artifacts, Details, Parameters...) until it
    is the active one."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # Prefect's tabs are <li class="p-tab"> in a role=tablist (no role=tab of their own); the active
    # one has the class p-tab__active. A click can be lost on a page still settling after its
    # header is drawn (seen in CI: the Logs tab stayed active and the artifact was never listed),
    # so the click is repeated until the tab is active.
    name = re.compile(rf"^{re.escape(tab)}$")
    for _ in range(tries):
        page.locator("[role=tablist] li", has_text=name).click()
        try:
            page.locator("[role=tablist] li.p-tab__active", has_text=name).wait_for(timeout=5_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the {tab!r} tab of {page.url} did not become active after {tries} clicks")


def prefect_artifact(page: Any, key: str) -> None:
    """From a flow run page, open its artifact ``key`` (Artifacts tab, then its card)."""
    prefect_tab(page, "Artifacts")
    page.locator("#artifacts-content a", has=page.get_by_text(key, exact=True)).click()
    page.wait_for_url(re.compile(r".*/artifacts/artifact/[0-9a-f-]{36}.*"))
    page.get_by_role("button", name="Show raw data").wait_for()  # the artifact's content is drawn


def loaded_images(page: Any, src_part: str) -> list[dict[str, Any]]:
    """The page's ``<img>`` whose src contains ``src_part``, with their natural size (0: broken)."""
    return page.evaluate(
        """(part) => [...document.images].filter(i => i.src.includes(part))
             .map(i => ({src: i.src.slice(0, 120), width: i.naturalWidth, height: i.naturalHeight,
                         complete: i.complete}))""",
        src_part,
    )


def wait_image(page: Any, src_part: str, *, within_ms: int = TIMEOUT_MS) -> list[dict[str, Any]]:
    """Wait up to ``within_ms`` for an ``<img>`` whose src contains ``src_part`` to finish loading
    (or failing); returns those on the page then (none when none appeared in time)."""
    page.wait_for_function(
        """([part, deadline]) => performance.now() > deadline ||
             [...document.images].some(i => i.src.includes(part) && i.complete)""",
        arg=[src_part, page.evaluate("performance.now()") + within_ms],
        timeout=within_ms + 30_000,
    )
    return loaded_images(page, src_part)


# --- MLflow pages ------------------------------------------------------------------------------


def mlflow_experiment(page: Any, url: str, run_name: str) -> bool:
    """Open an experiment at ``url``; True when it shows its training runs (the runs table lists
    ``run_name``), False when it shows anything else (MLflow's GenAI overview: traces, tokens)."""
    page.goto(url)
    runs = page.get_by_role("link", name=run_name).first
    overview = page.get_by_text("Token Usage").first
    page.wait_for_function(
        "(name) => document.body.innerText.includes('Token Usage') || "
        "[...document.querySelectorAll('a')].some(a => a.innerText.trim() === name)",
        arg=run_name,
    )
    return runs.is_visible() and not overview.is_visible()


def mlflow_run_charts(page: Any, base: str, experiment_id: str, run_id: str) -> None:
    """Open the run's "Model metrics" tab (its charts) and wait for the charts to be drawn."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning")
    page.get_by_role("tab", name="Model metrics", selected=True).wait_for()
    page.get_by_role("button", name="Add chart").first.wait_for()  # a chart section is drawn


def mlflow_image_chart(page: Any, key: str, step: int) -> list[dict[str, Any]]:
    """On an open Model metrics tab, do what a user does to see image ``key`` at ``step``: type the
    key in the chart search, then step the card's slider (MLflow starts it at step 0) to ``step``.
    Returns the card's images of that step once loaded (none when none appeared in time)."""
    page.get_by_placeholder("Search metric charts").fill(key)
    slider = page.locator(
        f"xpath=//*[normalize-space(text())='{key}']/ancestor::*[.//*[@role='slider']][1]//*[@role='slider']"
    ).first
    slider.wait_for()
    now = int(float(slider.get_attribute("aria-valuenow") or 0))
    # One logged step: the slider is disabled (Radix's data-disabled) and the card shows that step.
    if now != step and slider.get_attribute("data-disabled") is None:
        slider.click()
        last = None
        for _ in range(1000):  # one arrow key moves to the next logged step
            now = int(float(slider.get_attribute("aria-valuenow") or 0))
            if now == step or now == last:
                break
            last = now
            page.keyboard.press("ArrowRight" if now < step else "ArrowLeft")
    return wait_image(page, f"{key}%2Bstep%2B{step}%2B")


def mlflow_model_version(page: Any, base: str, name: str, version: str) -> None:
    """Open the registered model version page and wait for its details."""
    page.goto(f"{base}/#/models/{name}/versions/{version}?workflowType=machine_learning")
    page.get_by_role("heading", name=f"Version {version}").wait_for()
    page.get_by_text("Aliases", exact=True).first.wait_for()


def mlflow_version_description(page: Any) -> str:
    """The model version's description as the page draws it ('' when it has none): the text of
    the collapsible "Description" section, below its header button."""
    header = page.get_by_role("button", name=re.compile(r"^Description")).first
    header.wait_for()
    head, section = header.evaluate("e => [e.innerText, e.parentElement.innerText]")
    return section.removeprefix(head).strip()


def mlflow_version_aliases(page: Any) -> list[str]:
    """The aliases the model version page shows (``@ champion`` chips)."""
    found = re.search(r"Aliases\s*:\s*(.*?)\n(?:Stage|Source|Tags|Description)", page.inner_text("body"), re.S)
    return re.findall(r"@\s*([\w.-]+)", found.group(1)) if found else []
