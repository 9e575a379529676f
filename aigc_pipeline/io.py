"""Atomic file and folder writes: readers see the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# mkstemp/mkdtemp create private files; published artifacts get the usual umask-based modes.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` as a whole.

    The swap never leaves ``path`` missing: on Linux the two folders trade names in one
    ``renameat2(RENAME_EXCHANGE)`` call, then the old version (now under the temp name) is
    removed. Where that call is unavailable (another OS, a file system without it) the old
    version is first renamed to ``.NAME.old-PID``, then the new one takes its name: a kill between
    those two renames leaves no ``path``, and the next ``atomic_dir`` on it (or
    :func:`recover_dir`) puts the old version back before anything else.

    On any error (or a kill) before the swap the previous ``path`` is left untouched and the temp
    folder is removed (or left as ``.NAME.tmp-PID-*``, which the next run removes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    if path.exists() or path.is_symlink():
        if _rename_exchange(tmp, path):
            _fsync_dir(path.parent)
            shutil.rmtree(tmp)  # now the previous version
            return
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def recover_dir(path: Path | str) -> None:
    """Repair what a killed :func:`atomic_dir` on ``path`` left behind.

    ``.NAME.old-PID`` (the fallback swap's previous version) is renamed back to ``path`` when
    ``path`` is missing, and removed when ``path`` exists; ``.NAME.tmp-PID-*`` folders (unfinished
    new versions, or the previous version after an exchange) are removed. Leftovers of a process
    that is still running are left alone: it may be in the middle of its own swap.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    olds = sorted(
        (p for p in parent.glob(f".{path.name}.old-*") if not _owner_alive(p, ".old-")),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    if olds and not (path.exists() or path.is_symlink()):
        os.replace(olds.pop(0), path)  # the newest previous version: the one that lost its name
        _fsync_dir(parent)
    for stale in olds:
        shutil.rmtree(stale)
    for stale in parent.glob(f".{path.name}.tmp-*"):
        if not _owner_alive(stale, ".tmp-"):
            shutil.rmtree(stale)


def _owner_alive(leftover: Path, marker: str) -> bool:
    """Whether the process whose id is in ``leftover``'s name (``.NAME.old-PID``,
    ``.NAME.tmp-PID-xxxx``) is still running; names without a readable id count as dead."""
    pid_text = leftover.name.rsplit(marker, 1)[-1].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _libc_renameat2() -> Any:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.?
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` atomically; False where the system cannot (nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a} and {b}: {os.strerror(err)}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a crash after it cannot bring the old entry back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush the new version's files and folders before it takes the name: after a power loss
    the name must not point at empty files."""
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder) / name
            if file.is_symlink():
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def compute_once(lock: Path | str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (created if missing) while a cache entry is
    looked up and, when missing, computed and written: of several processes that need the same
    entry at once, one computes it and the others wait, then read it. The kernel drops the lock of
    a killed holder.
    """
    import fcntl

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
