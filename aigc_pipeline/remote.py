"""The DVC remote as the data channel between workers that share no disk.

A stage's inputs are pulled and its outputs pushed with DVC itself (content-addressed, what
``dvc pull`` in a fresh clone finds). Beside DVC's own store, under ``<remote>/aigc/``, live two
small things DVC has no notion of, written through the remote's own filesystem (so they go
wherever the remote is, local folder or object store, with the same credentials):

- ``runs/<flow run id>.json``: what a stage run on another worker produced (its ``dvc.lock``
  entry and its result), read back by the flow that asked for it;
- ``checkpoints/<key>/<folder>/step-N.safetensors`` + ``LATEST``: training checkpoints, mirrored while
  training runs, so that a retry on a fresh worker resumes where the lost one stopped.

Every function here is plain I/O (no Prefect): the flows wrap them in tasks with retries.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from aigc_pipeline.errors import AigcError
from aigc_pipeline.training.checkpoint import CHECKPOINT_GLOB, checkpoint_step, list_checkpoints
from aigc_pipeline.workspace import _repo, _target, lock_entry, stage_inputs

AREA = "aigc"
CHECKPOINTS = "checkpoints"  # the project folder the trainer writes checkpoints under (see dvc.yaml)
_LATEST = "LATEST"

log = logging.getLogger(__name__)


class RemoteError(AigcError, RuntimeError):
    """The DVC remote is missing, unreachable or lacks what a run needs; the message says which."""


def _remote(project: Path):
    from dvc.config import NoRemoteError

    with _repo(project) as repo:
        try:
            return repo.cloud.get_remote()
        except NoRemoteError:
            raise RemoteError(
                f"{project}: no default DVC remote; a distributed run exchanges data only through "
                "one: `dvc remote add -d storage s3://bucket/path` and commit .dvc/config"
            ) from None


def pull_stage_inputs(project: Path, stage: str) -> list[str]:
    """Pull the outputs of other stages that ``stage`` depends on; returns their paths."""
    paths = stage_inputs(project, stage)
    if paths:
        with _repo(project) as repo:
            repo.pull(targets=[str(Path(project).resolve() / p) for p in paths])
    return paths


def pull_stage_outputs(project: Path, stage: str) -> None:
    """Pull the outputs ``dvc.lock`` records for ``stage`` (they must be on the remote)."""
    with _repo(project) as repo:
        repo.pull(targets=[_target(project, stage)])


def restore_recorded_outputs(project: Path, stage: str) -> bool:
    """If this clone's ``dvc.lock`` records ``stage``, fetch those outputs when the remote has them.

    Returns whether they were checked out; when the remote lacks them (the lock came from a run
    that never pushed) the stage simply runs again.
    """
    from dvc.exceptions import CheckoutError, DownloadError

    if lock_entry(project, stage) is None:
        return False
    try:
        pull_stage_outputs(project, stage)
    except (CheckoutError, DownloadError) as e:
        log.info("stage %s: recorded outputs not on the remote (%s); it will run", stage, str(e).splitlines()[0])
        return False
    return True


def push_stage_outputs(project: Path, stage: str) -> None:
    """Push the stage's cached outputs to the default remote (uncached metrics travel in git)."""
    _remote(project)  # a clear error when there is no remote at all
    with _repo(project) as repo:
        repo.push(targets=[_target(project, stage)])


class RemoteArea:
    """Files under ``<remote>/aigc/``, through the DVC remote's filesystem."""

    def __init__(self, project: Path) -> None:
        remote = _remote(project)
        self.fs = remote.fs
        self.root = self.fs.join(remote.path, AREA)
        self.url = remote.fs.unstrip_protocol(remote.path)

    def path(self, rel: str) -> str:
        return self.fs.join(self.root, *rel.split("/"))

    def put_json(self, rel: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "doc.json"
            local.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.put_file(local, rel)

    def get_json(self, rel: str) -> Any:
        if not self.fs.exists(self.path(rel)):
            raise RemoteError(f"{self.url}/{AREA}/{rel}: not found on the DVC remote")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "doc.json"
            self.fs.get_file(self.path(rel), str(local))
            return json.loads(local.read_text())

    def put_file(self, local: Path, rel: str) -> None:
        target = self.path(rel)
        self.fs.makedirs(self.fs.parent(target), exist_ok=True)
        self.fs.put_file(str(local), target)

    def find(self, rel: str) -> list[str]:
        """Files under ``rel``, as paths relative to the area."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        return sorted(self.fs.relpath(p, self.root).replace(self.fs.sep, "/") for p in self.fs.find(base))

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)


def record_path(flow_run_id: str) -> str:
    return f"runs/{flow_run_id}.json"


def write_record(project: Path, flow_run_id: str, record: dict[str, Any]) -> None:
    RemoteArea(project).put_json(record_path(flow_run_id), record)


def read_record(project: Path, flow_run_id: str) -> dict[str, Any]:
    return RemoteArea(project).get_json(record_path(flow_run_id))


class CheckpointMirror:
    """Mirror the newest checkpoint of every folder under ``project/checkpoints`` to the remote.

    Used as a context manager around a training: a background thread looks for new
    checkpoint files every ``interval`` seconds (the trainer writes them atomically, so a file
    that exists is complete) and uploads each, then a ``LATEST`` marker naming it, so a reader never
    sees a half-uploaded checkpoint as the newest. Watching the folder, rather than a callback in
    the trainer, also covers trainings run in other processes (torchrun ranks).

    Upload failures are logged and retried on the next pass: losing one mirror upload only means
    a later resume starts from an older checkpoint; it must not stop the training.
    """

    def __init__(self, project: Path, key: str, *, interval: float = 1.0) -> None:
        self.local = Path(project).resolve() / CHECKPOINTS
        self.area = RemoteArea(project)
        self.prefix = f"{CHECKPOINTS}/{key}"
        self.interval = interval
        self.uploaded: dict[str, str] = {}  # folder (relative) -> checkpoint file name on the remote
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def restore(self) -> dict[str, int]:
        """Download the newest mirrored checkpoint of each folder; returns ``{folder: step}``."""
        restored = {}
        for rel in self.area.find(self.prefix):
            if not rel.endswith(f"/{_LATEST}"):
                continue
            folder_remote = rel[: -len(_LATEST) - 1]
            folder = folder_remote[len(self.prefix) + 1 :]
            with tempfile.TemporaryDirectory() as tmp:
                marker = Path(tmp) / _LATEST
                self.area.fs.get_file(self.area.path(rel), str(marker))
                name = marker.read_text().strip()
            step = checkpoint_step(name)
            if step is None:
                raise RemoteError(f"{self.area.url}/{AREA}/{rel}: names {name!r}, not a checkpoint file")
            dest = self.local / folder / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dest = dest.with_name(f".{name}.download")
            self.area.fs.get_file(self.area.path(f"{folder_remote}/{name}"), str(tmp_dest))
            tmp_dest.replace(dest)  # the trainer only ever sees complete files
            self.uploaded[folder] = name
            restored[folder] = step
        return restored

    def sync(self) -> int:
        """Upload what is new since the last pass; returns how many checkpoints were uploaded."""
        if not self.local.is_dir():
            return 0
        sent = 0
        for folder in sorted({p.parent for p in self.local.rglob(CHECKPOINT_GLOB)}):
            found = list_checkpoints(folder)
            if not found:
                continue
            rel = folder.relative_to(self.local).as_posix()
            newest = found[-1][1]
            if self.uploaded.get(rel) == newest.name:
                continue
            remote_folder = f"{self.prefix}/{rel}"
            try:
                self.area.put_file(newest, f"{remote_folder}/{newest.name}")
            except FileNotFoundError:
                continue  # rotated away by the trainer meanwhile; a newer one is there next pass
            with tempfile.TemporaryDirectory() as tmp:
                marker = Path(tmp) / _LATEST
                marker.write_text(newest.name + "\n")
                self.area.put_file(marker, f"{remote_folder}/{_LATEST}")
            previous = self.uploaded.get(rel)
            self.uploaded[rel] = newest.name
            if previous and previous != newest.name:
                self.area.remove(f"{remote_folder}/{previous}")
            sent += 1
        return sent

    def discard(self) -> None:
        """Remove this key's checkpoints from the remote (the stage's outputs are pushed)."""
        self.area.remove(self.prefix)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - logged, counted and retried on the next pass
                self.failures += 1
                log.warning(
                    "checkpoint mirror: upload to %s failed (%s: %s); retrying", self.area.url, type(e).__name__, e
                )

    def __enter__(self) -> CheckpointMirror:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc[0] is None:
            self.sync()  # the final checkpoint, before anyone relies on the mirror
