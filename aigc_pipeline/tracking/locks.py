"""One lock per registered model, around every decision about and move of its aliases.

Whoever moves ``champion``/``challenger`` (a registration's gate decision, ``aigc promote``,
``aigc rollback``, the rollback of a failed flow run) reads the aliases, decides and writes them
while holding the lock of that registered model, so two of them never decide from the same
state. MLflow has no compare-and-set on aliases, so the lock has to be held by a component that
every writer reaches. Which one depends on the deployment (``AIGC_REGISTRY_LOCK``, default
``auto``):

- **an embedded store** (``sqlite:`` or a ``file:`` folder; the default ``mlflow/mlflow.db``):
  an exclusive ``flock`` on a file beside it (``mlflow.db.aigc-locks/NAME-HASH.lock``). Every
  process that can write the store can open a file beside it; the kernel drops the lock when
  its holder dies, so a killed registration never blocks the next one.
- **a database the client connects to** (``MLFLOW_TRACKING_URI=postgresql://...``): a session
  advisory lock (``pg_advisory_lock``) in that database, released by PostgreSQL when the
  holder's connection ends.
- **an MLflow tracking server** (``http(s)://``): clients have no connection to its backend
  store, so the lock is a Prefect **global concurrency limit** ``aigc-registry-NAME`` of one slot
  on the Prefect server every worker and user already talks to (``PREFECT_API_URL``); it is
  created on first use and held under a lease that the holder renews (a killed holder's slot
  returns after the lease, 60 s). Set ``AIGC_REGISTRY_LOCK=postgresql://USER@HOST/DB`` (the
  server's backend store) instead where every client may reach that database; with neither,
  moving an alias of a tracking server is refused rather than done unlocked.

``AIGC_REGISTRY_LOCK`` may also be ``file`` (a lock file on this machine, for a tracking server
that only this machine writes to) or ``prefect``. Every writer of one registry must use the same
kind: the ``auto`` choice depends only on the tracking URI and whether a Prefect API is set.
The lock is re-entrant within a thread (a promotion inside a locked section does not wait for
itself). ``AIGC_REGISTRY_LOCK_TIMEOUT`` (seconds, default 600) bounds the wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from aigc_pipeline.errors import AigcError

LOCK_ENV = "AIGC_REGISTRY_LOCK"
TIMEOUT_ENV = "AIGC_REGISTRY_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds; a registration holds the lock for about a second
PREFECT_LEASE_SECONDS = 60.0  # Prefect's minimum; renewed every 45 s while held
LIMIT_PREFIX = "aigc-registry-"  # Prefect global concurrency limit per registered model
FILE, POSTGRES, PREFECT = "file", "postgres", "prefect"

_held = threading.local()  # re-entrancy: lock identities held by this thread -> depth


class RegistryLockError(AigcError, RuntimeError):
    """No lock can be taken for this registry (unknown ``AIGC_REGISTRY_LOCK``, no component that
    every writer reaches, a misconfigured Prefect limit); the message says what to set."""


class RegistryLockTimeout(RegistryLockError, TimeoutError):
    """The registered model's lock was not obtained in time; the message names its holder where known."""


@dataclass(frozen=True)
class LockPlan:
    """Which lock guards registered model ``name`` of the store ``store_uri``, and where it lives."""

    kind: str  # file | postgres | prefect
    name: str
    where: str  # the lock file, the database URL (password masked), or the Prefect API URL
    identity: str  # the same string for every process taking this lock
    dsn: str = field(default="", repr=False)  # postgres: the URL to connect with (password and all; never shown)

    def describe(self) -> str:
        what = {FILE: "lock file", POSTGRES: "PostgreSQL advisory lock in", PREFECT: "Prefect global concurrency limit"}
        if self.kind == PREFECT:
            return f"{what[PREFECT]} {limit_name(self.name)} on {self.where}"
        return f"{what[self.kind]} {self.where}"


def lock_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds to wait for the lock: ``AIGC_REGISTRY_LOCK_TIMEOUT`` or 600."""
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RegistryLockError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def plan_lock(store_uri: str, name: str, env: Mapping[str, str] | None = None) -> LockPlan:
    """The lock that guards ``name``'s aliases in the registry at ``store_uri`` (see the module docstring)."""
    env = os.environ if env is None else env
    choice = env.get(LOCK_ENV, "").strip() or "auto"
    scheme = _scheme(store_uri)
    if choice.startswith(("postgresql:", "postgres:", "postgresql+")):
        return _postgres_plan(choice, name)
    if choice not in ("auto", FILE, PREFECT):
        raise RegistryLockError(
            f"{LOCK_ENV}={choice!r}: expected auto, file, prefect or a postgresql:// URL "
            "(the tracking server's backend database)"
        )
    if choice == PREFECT:
        return _prefect_plan(name, env)
    if choice == FILE or scheme in ("sqlite", "file", ""):
        return _file_plan(store_uri, scheme, name)
    if scheme in ("postgresql", "postgres"):
        return _postgres_plan(store_uri, name)
    if _prefect_api_url(env):
        return _prefect_plan(name, env)
    raise RegistryLockError(
        f"the registry at {_mask(store_uri)} is shared ({scheme} store), and registered model aliases are only moved "
        f"under a lock every writer reaches: set PREFECT_API_URL (the lock is a Prefect global concurrency limit), or "
        f"{LOCK_ENV}=postgresql://USER@HOST/DB (the tracking server's backend database, for pg_advisory_lock), or "
        f"{LOCK_ENV}=file if this machine is the only one writing to it"
    )


@contextlib.contextmanager
def registry_lock(
    store_uri: str, name: str, *, timeout: float | None = None, env: Mapping[str, str] | None = None
) -> Iterator[LockPlan]:
    """Hold registered model ``name``'s lock for the ``with`` block (re-entrant within a thread).

    Raises :class:`RegistryLockTimeout` after ``timeout`` seconds (default ``lock_timeout()``),
    :class:`RegistryLockError` when no lock can be planned.
    """
    plan = plan_lock(store_uri, name, env)
    held = _held.__dict__.setdefault("depth", {})
    if held.get(plan.identity):
        held[plan.identity] += 1
        try:
            yield plan
        finally:
            held[plan.identity] -= 1
        return
    wait = lock_timeout(env) if timeout is None else timeout
    with contextlib.ExitStack() as stack:
        # Only the acquisition is inside the try: an error of the locked block must pass unchanged.
        acquire = {FILE: _file_lock, POSTGRES: _postgres_lock, PREFECT: _prefect_lock}[plan.kind]
        stack.enter_context(acquire(plan, wait))
        held[plan.identity] = 1
        try:
            yield plan
        finally:
            held.pop(plan.identity, None)


def limit_name(name: str) -> str:
    """The Prefect global concurrency limit guarding registered model ``name``."""
    return LIMIT_PREFIX + _slug(name)


# --- planning ----------------------------------------------------------------------------------


def _scheme(uri: str) -> str:
    return urlparse(uri).scheme.split("+")[0].lower()


def _slug(name: str) -> str:
    """A name safe in a file name and a Prefect limit name, still unique (a hash when changed)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _file_plan(store_uri: str, scheme: str, name: str) -> LockPlan:
    if scheme == "sqlite":
        db = urlparse(store_uri).path[1:] if store_uri.startswith("sqlite:///") else ""
        folder = (
            Path(unquote(db)).resolve().parent / (Path(db).name + ".aigc-locks") if db and db != ":memory:" else None
        )
    elif scheme in ("file", ""):
        root = unquote(urlparse(store_uri).path) if scheme == "file" else store_uri
        folder = Path(root).resolve() / ".aigc-locks"
    else:
        folder = None
    if folder is None:  # a store with no file of its own (a server, an in-memory DB): this machine's lock
        from aigc_pipeline.evaluation.cache import default_cache_dir

        digest = hashlib.sha256(store_uri.encode()).hexdigest()[:12]
        folder = default_cache_dir() / "registry-locks" / digest
    path = folder / f"{_slug(name)}.lock"
    return LockPlan(FILE, name, str(path), f"file:{path}")


def _postgres_plan(url: str, name: str) -> LockPlan:
    parsed = urlparse(url)
    db = f"{parsed.hostname or 'localhost'}:{parsed.port or 5432}{parsed.path}"
    return LockPlan(POSTGRES, name, _mask(url), f"postgres:{db}:{_advisory_key(name)}", dsn=_postgres_dsn(url))


def _prefect_plan(name: str, env: Mapping[str, str]) -> LockPlan:
    api = _prefect_api_url(env)
    if not api:
        raise RegistryLockError(
            f"{LOCK_ENV}=prefect, but no Prefect API is configured: set PREFECT_API_URL to the "
            "Prefect server every worker uses"
        )
    return LockPlan(PREFECT, name, api, f"prefect:{api}:{limit_name(name)}")


def _prefect_api_url(env: Mapping[str, str]) -> str | None:
    """The Prefect API configured by environment or profile (not an ephemeral server, which lives
    in one process and so cannot be a lock between processes)."""
    if env.get("PREFECT_API_URL"):
        return env["PREFECT_API_URL"]
    if env is not os.environ:
        return None
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def _mask(url: str) -> str:
    """``url`` with its password replaced by ``***`` (it goes into messages and logs)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def _advisory_key(name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, from the registered model's name (namespaced so
    other applications' advisory locks on the same database are unlikely to collide)."""
    digest = hashlib.sha256(b"aigc-pipeline registry\0" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _holder() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- the three locks ---------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(plan: LockPlan, timeout: float) -> Iterator[None]:
    path = Path(plan.where)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file is never deleted: a process that opened it just before a deletion would lock an
    # inode nobody else sees, and two holders would exist.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryLockTimeout(
                        f"registered model {plan.name!r}: its lock file {path} is still held after {timeout:g} s "
                        f"(by {_read_holder(path)}); raise {TIMEOUT_ENV} or stop that process"
                    ) from None
                time.sleep(0.05)
        # Who holds it, for the message of whoever times out waiting (not needed for correctness).
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that has not written its name yet"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


@contextlib.contextmanager
def _postgres_lock(plan: LockPlan, timeout: float) -> Iterator[None]:
    import psycopg2
    import psycopg2.errors

    url = plan.dsn
    key = _advisory_key(plan.name)
    try:
        conn = psycopg2.connect(
            url,
            connect_timeout=30,
            application_name=f"aigc registry lock {plan.name}"[:63],
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
    except psycopg2.OperationalError as exc:
        raise RegistryLockError(
            f"registered model {plan.name!r}: cannot connect to {plan.where} for its advisory lock: {str(exc).strip()}"
        ) from exc
    try:
        conn.autocommit = True  # a session-level lock, held across statements until unlocked or disconnected
        with conn.cursor() as cur:
            cur.execute("SET lock_timeout = %s", (f"{max(1, int(timeout * 1000))}ms",))
            try:
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg2.errors.LockNotAvailable:
                raise RegistryLockTimeout(
                    f"registered model {plan.name!r}: advisory lock {key} in {plan.where} is still held after "
                    f"{timeout:g} s (by {_pg_holder(url, key)}); raise {TIMEOUT_ENV} or end that session"
                ) from None
        try:
            yield
        finally:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()


def _postgres_dsn(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (``postgresql+psycopg2://`` -> ``postgresql://``)."""
    return re.sub(r"^postgres(?:ql)?(\+[^:]+)?://", "postgresql://", url)


def _pg_holder(url: str, key: int) -> str:
    import psycopg2

    unsigned = key & 0xFFFFFFFFFFFFFFFF
    try:
        with contextlib.closing(psycopg2.connect(url, connect_timeout=10)) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT a.pid, a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
                (unsigned >> 32, unsigned & 0xFFFFFFFF),
            )
            row = cur.fetchone()
    except psycopg2.Error as exc:
        return f"unknown: {str(exc).strip()}"
    if row is None:
        return "a session that has just released it"
    return f"backend pid {row[0]} ({row[1]!r} from {row[2]}, connected {row[3]:%Y-%m-%dT%H:%M:%S})"


@contextlib.contextmanager
def _prefect_lock(plan: LockPlan, timeout: float) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = limit_name(plan.name)
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another writer created it just now
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            found = client.read_global_concurrency_limit_by_name(limit)
    if not (found.active and found.limit == 1 and not found.slot_decay_per_second):
        raise RegistryLockError(
            f"Prefect global concurrency limit {limit} on {plan.where} must be active with limit 1 and no slot decay "
            f"to serve as registered model {plan.name!r}'s lock (it is {'active' if found.active else 'inactive'}, "
            f"limit {found.limit}, decay {found.slot_decay_per_second}): "
            f"`prefect gcl update {limit} --enable --limit 1 --slot-decay-per-second 0`"
        )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(
                    limit,
                    occupy=1,
                    timeout_seconds=timeout,
                    strict=True,
                    lease_duration=PREFECT_LEASE_SECONDS,
                    raise_on_lease_renewal_failure=True,
                )
            )
        except TimeoutError:
            raise RegistryLockTimeout(
                f"registered model {plan.name!r}: Prefect global concurrency limit {limit} on {plan.where} is still "
                f"held after {timeout:g} s; raise {TIMEOUT_ENV}, or if its holder is gone and the server lost its "
                f"lease (a restart with in-memory lease storage): `prefect gcl update {limit} --active-slots 0`"
            ) from None
        yield
