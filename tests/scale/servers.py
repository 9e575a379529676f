"""Real servers on 127.0.0.1 for the scale test and the scale benchmark.

PostgreSQL (Debian's package, installed when missing), an MLflow tracking server on it with
proxied artifacts, a Prefect server, Prefect process workers, a bare git repository standing
in for the project's remote and a local folder as the DVC remote. Every process is started in
a session of its own, so stopping it also stops what it started (a worker's flow runs), and
only processes started here are ever signalled.

Importable by ``bench/`` as ``tests.scale.servers``: nothing here depends on pytest.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: prefect, mlflow, dvc, aigc

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PYTHONUNBUFFERED": "1",
}

# Variables of the caller that would point a started process at some other server or home, or
# (PYTHONPATH) make a flow run import the package from somewhere else than its own clone.
FOREIGN_VARS = (
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_PROFILES_PATH",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_UI_URL",
    "PYTHONPATH",
)


class ServerError(RuntimeError):
    """A server could not be installed, started or reached; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without the caller's server settings, telemetry off, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_VARS}
    env.update(TELEMETRY_OFF)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Proc:
    """A started process (the leader of its own session) and its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the process and every descendant, as a lost machine would lose them.

        A Prefect process worker starts each flow run in a session of its own, so killing the
        worker's process group alone would leave the flow run going.
        """
        tree = [self.popen.pid, *descendants(self.popen.pid)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the session, then SIGKILL it and its descendants (e.g. flow runs started in sessions
        of their own) once it has exited or ``timeout`` seconds have passed."""
        tree = descendants(self.popen.pid) if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (from /proc), children first."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue  # exited between listing and reading
            parent[int(entry)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def start(name: str, argv: Sequence[str], *, cwd: Path, env: dict[str, str], log_dir: Path) -> Proc:
    """Start ``argv`` in a new session with stdout and stderr in ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def wait_http(url: str, proc: Proc, timeout: float) -> None:
    """Wait until ``url`` answers 200, failing early (with the log) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServerError(f"{proc.name} exited with {proc.popen.returncode} before {url} answered:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise ServerError(f"{proc.name}: {url} did not answer within {timeout:.0f} s ({last}):\n{proc.tail()}")


# --- PostgreSQL ---------------------------------------------------------------------------------


def postgres_bin_dir(install: bool = True) -> Path:
    """The folder holding initdb/pg_ctl/postgres; installs Debian's ``postgresql`` when missing.

    Raises :class:`ServerError` when it is missing and cannot be installed (not root, no apt-get,
    or apt-get failed), with what to do.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    if not install:
        raise ServerError("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH)")
    apt_install("postgresql", what="PostgreSQL", needed_by="the scale test", error=ServerError, timeout=900)
    return postgres_bin_dir(install=False)


def apt_install(package: str, *, what: str, needed_by: str, error: type[Exception], timeout: float) -> None:
    """Install Debian's ``package`` (``apt-get update`` + ``install``, as root), or raise ``error``
    saying why it cannot be or what apt-get printed."""
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        why = "apt-get is not available" if apt is None else "not running as root"
        raise error(
            f"{what} is not installed and cannot be installed here ({why}): install the `{package}` "
            f"package (Debian/Ubuntu: `apt-get install {package}`) and re-run"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # another apt-get on the machine: wait for it
    # Test processes running side by side (pytest-xdist) take turns: `apt-get update` fails on a held lists lock.
    with open(Path(tempfile.gettempdir()) / "aigc-tests-apt.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for argv in (
            [apt, "update", "-q", *lock],
            [apt, "install", "-y", "-q", "--no-install-recommends", *lock, package],
        ):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise error(
                    f"`{' '.join(argv)}` failed with exit code {proc.returncode}; {what} is needed by "
                    f"{needed_by}:\n{(proc.stdout + proc.stderr)[-3000:]}"
                )


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port``, trust authentication, user ``postgres``.

    Postgres refuses to run as root, so as root the cluster belongs to the ``postgres`` system
    user and lives in a folder of its own under the system temp dir (pytest's temp folders are
    private to root).
    """

    log_dir: Path
    port: int = field(default_factory=free_port)
    data: Path | None = None
    bindir: Path | None = None

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            # runuser lives in /usr/sbin, which a minimal PATH (a CI job's, say) may leave out.
            search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
            runuser = shutil.which("runuser", path=search)
            if runuser is None:
                raise ServerError(
                    "running as root, PostgreSQL must run as the `postgres` user, and `runuser` "
                    "(util-linux) was not found on PATH, /usr/sbin or /sbin"
                )
            return [runuser, "-u", "postgres", "--", *argv]
        return argv

    def _run(self, argv: list[str], timeout: float = 120) -> None:
        proc = subprocess.run(
            self._as_owner(argv), capture_output=True, text=True, timeout=timeout, env=clean_env(LC_ALL="C.UTF-8")
        )
        if proc.returncode != 0:
            raise ServerError(f"`{' '.join(argv)}` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")

    def start(self) -> Postgres:
        self.bindir = postgres_bin_dir()
        root = Path(tempfile.mkdtemp(prefix="aigc-pg-"))
        self.data = root / "data"
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' -c fsync=off"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.data / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        return self

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its SQLAlchemy URL (psycopg2 driver)."""
        self._run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name])
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.data is None or self.bindir is None:
            return
        log = self.data / "server.log"
        if log.exists():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, self.log_dir / "postgres.log")
        with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], timeout=60)
        shutil.rmtree(self.data.parent, ignore_errors=True)
        self.data = None


# --- MLflow and Prefect servers ----------------------------------------------------------------


def start_mlflow(
    backend_uri: str, artifacts: Path, *, log_dir: Path, port: int | None = None, timeout: float = 180
) -> tuple[str, Proc]:
    """``mlflow server`` on ``backend_uri`` serving (proxying) artifacts stored in ``artifacts``."""
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    proc = start(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=artifacts.parent,
        env=clean_env(),
        log_dir=log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, timeout)
    except BaseException:
        proc.stop()
        raise
    return url, proc


def prefect_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    """Environment of a Prefect client (CLI, worker, flow run) talking to ``api_url``."""
    return clean_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(home), **extra)


def start_prefect_server(
    home: Path, *, log_dir: Path, database_url: str | None = None, port: int | None = None, timeout: float = 180
) -> tuple[str, Proc]:
    """``prefect server start`` on 127.0.0.1; SQLite in ``home`` unless ``database_url`` is given."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    extra = {"PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1"}
    if database_url:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    proc = start(
        "prefect-server",
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            "--no-ui",
        ],
        cwd=home,
        env=clean_env(**extra),
        log_dir=log_dir,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", proc, timeout)
    except BaseException:
        proc.stop()
        raise
    return api, proc


def start_worker(pool: str, clone: Path, env: dict[str, str], *, log_dir: Path, name: str | None = None) -> Proc:
    """``prefect worker start --pool POOL`` in ``clone``; its flow runs inherit ``env``."""
    name = name or f"worker-{pool}"
    return start(
        name,
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name],
        cwd=clone,
        env=env,
        log_dir=log_dir,
    )


# --- git and DVC -------------------------------------------------------------------------------


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run git in ``cwd``; returns stdout; raises with the output on failure."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ServerError(f"git {' '.join(args)} in {cwd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


def bare_repo_from(source: Path, bare: Path, *, branch: str = "main") -> str:
    """Push ``source``'s HEAD to a new bare repository ``bare`` as ``branch``; returns its URL."""
    bare.parent.mkdir(parents=True, exist_ok=True)
    git(bare.parent, "init", "-q", "--bare", f"--initial-branch={branch}", str(bare))
    git(source, "push", "-q", str(bare), f"HEAD:refs/heads/{branch}")
    return f"file://{bare}"


def clone(url: str, dest: Path, *, branch: str = "main") -> Path:
    """A fresh clone of ``url`` at ``branch`` in ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    git(dest.parent, "clone", "-q", "--branch", branch, url, str(dest))
    return dest


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[None]:
    """Stop ``procs`` (last started first) when the block ends, whatever happens in it."""
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()


# --- the whole set-up --------------------------------------------------------------------------


def project_files(source: Path) -> list[str]:
    """Files a clone of ``source`` would hold (tracked + untracked-but-not-ignored)."""
    out = git(source, "ls-files", "-co", "--exclude-standard").split("\n")
    return [f for f in out if f and (source / f).is_file()]


@dataclass
class Cluster:
    """PostgreSQL, MLflow server on it (proxied artifacts), Prefect server, a bare git repository
    holding the project with a DVC remote configured, and Prefect process workers, each in a
    clone of its own. Everything lives under ``base`` and listens on 127.0.0.1 only."""

    base: Path
    postgres: Postgres
    prefect_api: str
    mlflow_url: str
    repo_url: str
    dvc_remote: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @classmethod
    def start(cls, base: Path, source: Path, *, worker_env: dict[str, str] | None = None) -> Cluster:
        """Start everything but the workers; ``source`` is the project checkout to serve as the repo."""
        base.mkdir(parents=True, exist_ok=True)
        logs = base / "logs"
        pg = Postgres(logs).start()
        procs: dict[str, Proc] = {}
        try:
            mlflow_db = pg.create_database("mlflow")
            prefect_db = pg.create_database("prefect").replace("postgresql://", "postgresql+asyncpg://", 1)
            # Both servers take 10-20 s to start: start them side by side, then wait for both.
            pf_port, ml_port = free_port(), free_port()
            (base / "prefect-server").mkdir(parents=True, exist_ok=True)
            procs["prefect-server"] = start(
                "prefect-server",
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(pf_port),
                    "--log-level",
                    "WARNING",
                    "--no-ui",
                ],
                cwd=base / "prefect-server",
                log_dir=logs,
                env=clean_env(
                    PREFECT_HOME=str(base / "prefect-server"), PREFECT_API_DATABASE_CONNECTION_URL=prefect_db
                ),
            )
            (base / "mlflow-artifacts").mkdir(parents=True, exist_ok=True)
            procs["mlflow-server"] = start(
                "mlflow-server",
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    mlflow_db,
                    "--artifacts-destination",
                    str(base / "mlflow-artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ml_port),
                    "--workers",
                    "1",
                ],
                cwd=base,
                env=clean_env(),
                log_dir=logs,
            )
            prefect_api, mlflow_url = f"http://127.0.0.1:{pf_port}/api", f"http://127.0.0.1:{ml_port}"
            wait_http(f"{prefect_api}/health", procs["prefect-server"], 240)
            wait_http(f"{mlflow_url}/health", procs["mlflow-server"], 240)
            repo_url, remote = cls._make_repo(base, source)
        except BaseException:
            for p in reversed(list(procs.values())):
                p.stop()
            pg.stop()
            raise
        cluster = cls(base, pg, prefect_api, mlflow_url, repo_url, remote, procs)
        cluster.worker_env = dict(worker_env or {})
        return cluster

    @staticmethod
    def _make_repo(base: Path, source: Path) -> tuple[str, Path]:
        """A git repo of ``source``'s files with a local DVC remote, pushed to a bare repo."""
        work = base / "publish"
        for rel in project_files(source):
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, target)
        git(work, "init", "-q", "--initial-branch=main")
        remote = base / "dvc-remote"
        remote.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [str(BIN / "dvc"), "remote", "add", "-d", "storage", str(remote)],
            cwd=work,
            capture_output=True,
            text=True,
            env=clean_env(),
        )
        if proc.returncode != 0:
            raise ServerError(f"dvc remote add failed: {proc.stdout}{proc.stderr}")
        git(work, "add", "-A")
        git(work, "commit", "-qm", "project with a DVC remote")
        return bare_repo_from(work, base / "repo.git"), remote

    def client_env(self, home: Path, **extra: str) -> dict[str, str]:
        """Environment for a Prefect/MLflow client (CLI, test code, worker) of this cluster."""
        home.mkdir(parents=True, exist_ok=True)
        return prefect_env(
            self.prefect_api,
            home,
            MLFLOW_TRACKING_URI=self.mlflow_url,
            PREFECT_UI_URL=self.prefect_api[: -len("/api")],
            **extra,
        )

    def clone(self, name: str) -> Path:
        return clone(self.repo_url, self.base / "clones" / name)

    def start_worker(self, pool: str, name: str, **env_extra: str) -> Proc:
        """A process worker for ``pool`` in a fresh clone, with a home and caches of its own
        (``env_extra`` overrides, e.g. a cache directory to share)."""
        where = self.base / "workers" / name
        checkout = clone(self.repo_url, where / "clone")
        own = {
            "AIGC_CACHE_DIR": str(where / "cache"),
            "TORCH_HOME": str(where / "torch"),
            **self.worker_env,
            **env_extra,
        }
        env = self.client_env(where / "prefect-home", **own)
        proc = start_worker(pool, checkout, env, log_dir=self.logs, name=name)
        self.procs[name] = proc
        return proc

    def stop(self) -> None:
        """Stop workers first (they may otherwise report to a dead server), then the servers."""
        names = list(self.procs)
        for name in sorted(names, key=lambda n: n in ("prefect-server", "mlflow-server")):
            self.procs[name].stop(timeout=10)
        self.postgres.stop()
