"""Shared fixtures: an isolated, telemetry-free environment and a throwaway copy of the project."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: aigc, dvc, mlflow

# Under pytest-xdist (`make test`: a worker per core and one more) the workers share the cores: each worker,
# and every process it starts, gets its share of threads; a thread per core each would
# oversubscribe the CPU, and OpenMP's spinning threads slow everyone down. Set before torch loads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Quick settings for pipeline tests: a 200-image slice of digits at 16 px, one short epoch.
QUICK = [
    "datasets.digits.limit=200",
    "augment.copies=1",  # the default adds none for the 8 px digits; the tests exercise the augment stage
    "datasets.digits.size=16",
    "train.model=resgan",  # the 8 px default's family, whatever train.model: auto picks at 16 px
    "train.epochs=1",
    "train.batch_size=32",
    "train.width=16",
    "train.latent_dim=16",
    "train.sample_grid=16",
    "evaluate.num_samples=24",
    "evaluate.progress_samples=16",
    # No FID over training (an Inception pass per training): the tests of it turn it on (PROGRESS).
    "evaluate.progress_every=0",
    # One epoch at 16 px draws no digits: tests of the plumbing register it anyway (the quality bar
    # itself is tested with it on, tests/stages/test_stages.py).
    "register.max_fid_ratio=null",
    # 24 samples fill no k-means cell to C_T's 20 per cell, and the gate refuses what it cannot check.
    "register.min_copy_ct=null",
]


# FID over training at the last epoch of a QUICK run (its one epoch).
PROGRESS = "evaluate.progress_every=1"


def _quick_names() -> tuple[str, str]:
    from aigc_pipeline.config import load_config

    cfg = load_config(REPO, QUICK)
    return cfg.model_name, cfg.registered_model


# What a QUICK run of the default family writes: its model folder name (models/, eval/, registry/)
# and the registered model it registers into (one per dataset).
MODEL_DIR, REGISTERED = _quick_names()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scale files first, then the other files holding slow tests, each file's tests kept
    together and in order: under pytest-xdist the long files start early and the quick ones fill
    the workers' gaps at the end, instead of a long file starting last while the others idle. The
    scale files are the longest and spend much of their time waiting (server starts, a crashed
    run's missing heartbeat), which the other workers' end-to-end files fill."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    scale_files = {item.path for item in items if item.get_closest_marker("scale")}
    items.sort(key=lambda item: (item.path not in scale_files, item.path not in slow_files))


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Telemetry off, caches and Prefect's home in a temp folder, no tracking server from the caller.

    The cache folder is the session's, shared by the pytest-xdist workers: its entries are keyed by
    content and written atomically, so a worker reads what another computed (the Inception features
    of the QUICK digits, the converted weights) instead of computing it again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # .../pytest-N/popen-gwK: the session's folder is the workers' parent
    os.environ.update(
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        # As `make mlflow-ui` does: no job runner and huey consumers (eight processes importing
        # MLflow, for GenAI jobs the pipeline never submits) beside every `mlflow server` / `ui`.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        AIGC_CACHE_DIR=str(root / "aigc-cache"),
        GIT_AUTHOR_NAME="aigc tests",
        GIT_AUTHOR_EMAIL="tests@aigc.invalid",
        GIT_COMMITTER_NAME="aigc tests",
        GIT_COMMITTER_EMAIL="tests@aigc.invalid",
    )
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        os.environ.pop(var, None)


@pytest.fixture(autouse=True)
def _restore_mlflow_uris():
    """A test that calls ``mlflow.set_tracking_uri`` (which also exports ``MLFLOW_TRACKING_URI``)
    must not send later tests to its store."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def project_files() -> list[str]:
    """Files a clone of this repo would hold (tracked + untracked-but-not-ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    return [f for f in out if f and (REPO / f).is_file()]


def copy_project(dest: Path) -> Path:
    """A fresh git + DVC checkout of the project (its source, params and DAG) in ``dest``."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    git = ["git", "-C", str(dest)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "test copy"], check=True)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


def evaluated_project(dest: Path, overrides: list[str] = QUICK, *, until: str = "evaluate") -> Path:
    """A project copy left as ``dvc repro evaluate`` leaves it (model trained, evaluated, dvc.lock
    committed), for tests of what comes after; ``until="register"``: as ``dvc repro`` leaves it.
    The stages run in this process through ``pipeline.run_stage``, the flow's door
    (tests/flows/test_retrain_flow.py checks that after it ``dvc status`` is clean and ``dvc repro``
    a no-op): four stage interpreters fewer, each importing torch and MLflow again. The environment
    the stages set (``env.set_defaults``) is restored afterwards."""
    from aigc_pipeline.config import load_config, write_overrides_to_params
    from aigc_pipeline.pipeline import run_stage
    from aigc_pipeline.stages.table import MODEL_STAGES, PER_DATASET_STAGES

    project = copy_project(dest)
    mlflow_store(project)
    write_overrides_to_params(project, overrides)
    dataset = load_config(project).dataset
    # The stage table's order, up to `until`: the active dataset's stages, then the model's.
    stages = [f"{s}@{dataset}" for s in PER_DATASET_STAGES] + list(MODEL_STAGES[: MODEL_STAGES.index(until) + 1])
    saved = dict(os.environ)
    try:
        with contextlib.chdir(project):  # where `aigc run` and `dvc repro` run them
            for stage in stages:
                run_stage(project, stage)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return project


def prefect_home(project: Path) -> Path:
    """The project's ``PREFECT_HOME`` (``.prefect``), its database already migrated.

    The embedded server of a first ``aigc run`` spends ~5 s of CPU migrating a new database: the
    session migrates one with ``prefect server database upgrade`` and each project starts from a
    copy (the same empty database Prefect would create there)."""
    home = project / ".prefect"
    _start_from(home / "prefect.db", _migrated_prefect_db)
    return home


def mlflow_store(project: Path) -> Path:
    """The project's embedded MLflow store (``mlflow/mlflow.db``), created if missing.

    The first process to open a new store spends ~2.5 s of CPU running MLflow's migrations: as for
    Prefect (``prefect_home``), the session migrates one and each project starts from a copy (the
    same empty store MLflow would create there)."""
    db = project / "mlflow" / "mlflow.db"
    _start_from(db, _migrated_mlflow_db)
    return db


def _start_from(db: Path, migrated: Callable[[], Path]) -> None:
    # A project's database, when it has none yet: a copy of the session's migrated one.
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(migrated(), db)


def _migrated_prefect_db() -> Path:
    return _built_once(
        "prefect.db",
        lambda build: subprocess.run(
            [str(BIN / "prefect"), "server", "database", "upgrade", "-y"],
            env={**os.environ, "PREFECT_HOME": str(build)},
            check=True,
            capture_output=True,
            timeout=600,
        ),
    )


def _migrated_mlflow_db() -> Path:
    return _built_once(
        "mlflow.db",
        lambda build: subprocess.run(
            [sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"]
            + [f"sqlite:///{build / 'mlflow.db'}"],
            cwd=build,  # the Default experiment's artifact folder (unused: the pipeline makes its own)
            check=True,
            capture_output=True,
            timeout=600,
        ),
    )


def _built_once(name: str, build: Callable[[Path], object]) -> Path:
    """The session's ``name``, which ``build(folder)`` writes into an empty folder, built once.

    In the session's folder beside the shared cache; the lock keeps two workers from building it at once."""
    from aigc_pipeline.io import compute_once

    folder = Path(os.environ["AIGC_CACHE_DIR"]).parent / name.replace(".", "-")  # prefect-db, mlflow-db
    built = folder / name
    with compute_once(folder / ".lock"):
        if not built.exists():
            scratch = folder / f"build-{os.getpid()}"
            scratch.mkdir(parents=True, exist_ok=True)
            build(scratch)
            (scratch / name).replace(built)
    return built


def run_cli(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command from the project's venv (``aigc``, ``dvc``) in ``project``; output captured."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(prefect_home(project)),
    }
    mlflow_store(project)
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started: SIGTERM to
    its process group, SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str, log: Path, *, cwd: Path | None = None) -> Iterator[str]:
    """A real ``mlflow models serve`` of ``model_uri`` on a free 127.0.0.1 port; yields its base URL
    once /ping answers, and stops the server (and the uvicorn it started) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not server_alive(base):
            assert proc.poll() is None, f"server exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer on {base}/ping: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base
    finally:
        stop_group(proc)


def server_alive(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def invoke(base: str, rows: list[list[int]], columns: tuple[str, ...] = ("n", "seed")) -> tuple[int, dict]:
    """POST a ``dataframe_split`` request to a served model: (HTTP status, JSON body)."""
    body = json.dumps({"dataframe_split": {"columns": list(columns), "data": rows}}).encode()
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
