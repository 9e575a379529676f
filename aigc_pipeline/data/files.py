"""Listing files safely: hidden/system entries, symlinks, and paths that must stay inside a root.

Link rules:

- Folders are walked without following folder symlinks (no loops, no escape); such a link is
  listed in ``skipped``.
- A file symlink is read only when its target resolves inside the source root (the real path is
  then opened, never the link); a link to a target outside the root, or a broken link, is rejected
  and its target never opened.
- FIFOs, sockets and device files are rejected without being opened (reading a FIFO would block).
- Manifest paths must be relative, without ``..`` components, and resolve (symlinks included)
  inside the manifest's folder.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from aigc_pipeline.data.records import EncodedSample, Rejected, Skipped
from aigc_pipeline.data.validate import has_image_extension

_SYSTEM_NAMES = {
    "__macosx",
    "thumbs.db",
    "desktop.ini",
    "ehthumbs.db",
    "icon\r",
    "$recycle.bin",
    "system volume information",
}
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_ignored(rel: str) -> bool:
    """Hidden or system entry (any component): skipped silently, never counted as rejected."""
    return any(part.startswith(".") or part.lower() in _SYSTEM_NAMES for part in rel.split("/") if part)


def unsafe_path_reason(name: str) -> str | None:
    """Why a relative path from an archive or a manifest may not be used, or None when it is safe."""
    if not name.strip():
        return "empty path"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path (paths must be relative to the source root)"
    if ".." in name.split("/"):
        return "path leaves the source root ('..' component)"
    if "\x00" in name:
        return "path contains a NUL character"
    return None


def clean_relpath(name: str) -> str:
    """A relative path with "/" separators and no "." or empty components (call after the safety check)."""
    return str(PurePosixPath(*[p for p in name.split("/") if p not in ("", ".")]))


def folder_label(rel: str) -> str | None:
    """The class folder of ``rel`` (its first component), or None for a file at the root."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def inside(path: Path, root: Path) -> bool:
    """True when the real ``path`` is ``root`` or below it (both already resolved)."""
    return path == root or root in path.parents


def walk_images(root: Path, *, labels: str) -> Iterator[EncodedSample | Rejected | Skipped]:
    """Yield every non-hidden file under ``root`` in sorted order, checked against the link rules.

    ``labels="folders"`` labels each image with its first path component and rejects images at
    the root; ``labels="none"`` leaves them unlabelled.
    """
    root = root.resolve()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listing = sorted(entries, key=lambda e: e.name)
        except OSError as e:
            if folder == root:
                raise
            yield Rejected(folder.relative_to(root).as_posix() + "/", f"cannot list folder: {e.strerror or e}")
            continue
        subfolders = []
        for entry in listing:
            rel = Path(entry.path).relative_to(root).as_posix()
            if is_ignored(entry.name):
                continue
            if entry.is_symlink():
                item = _link(Path(entry.path), rel, root, labels)
                if item is not None:
                    yield item
            elif entry.is_dir(follow_symlinks=False):
                subfolders.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield _file(entry.path, rel, labels)
            else:
                yield Rejected(rel, "not a regular file (FIFO, socket or device)")
        stack.extend(reversed(subfolders))  # depth-first, in name order


def _file(real: str, rel: str, labels: str) -> EncodedSample | Rejected | Skipped:
    if not has_image_extension(rel):
        return Skipped(rel, f"not an image file name (extension {os.path.splitext(rel)[1] or 'none'!r})")
    label = folder_label(rel) if labels == "folders" else None
    if labels == "folders" and label is None:
        return Rejected(rel, "not inside a class folder (labels: folders)")
    return EncodedSample(rel, label, file=real)


def _link(link: Path, rel: str, root: Path, labels: str) -> EncodedSample | Rejected | Skipped | None:
    target = link.resolve()
    if not inside(target, root):
        return Rejected(rel, "symbolic link to a path outside the source root (not followed)")
    try:
        st = target.stat()
    except OSError:
        return Rejected(rel, "broken symbolic link")
    if stat.S_ISDIR(st.st_mode):
        return Skipped(rel, "symbolic link to a folder (not followed)")
    if not stat.S_ISREG(st.st_mode):
        return Rejected(rel, "symbolic link to a FIFO, socket or device")
    return _file(str(target), rel, labels)


def resolve_relative(root: Path, name: str) -> tuple[str, Path] | Rejected:
    """Check a manifest path: returns ``(clean relative path, real file path)`` or a rejection.

    ``root`` must be resolved; the rejection's key is the path as written.
    """
    name = name.replace("\\", "/")  # manifests written on Windows
    reason = unsafe_path_reason(name)
    if reason:
        return Rejected(name, reason)
    rel = clean_relpath(name)  # hidden names are read too: a manifest lists its files explicitly
    full = root / rel
    real = full.resolve()
    if not inside(real, root):
        return Rejected(rel, "resolves outside the manifest's folder (symbolic link)")
    try:
        st = real.stat()
    except FileNotFoundError:
        return Rejected(rel, "file not found" if not full.is_symlink() else "broken symbolic link")
    except OSError as e:
        return Rejected(rel, f"cannot read: {e.strerror or e}")
    if not stat.S_ISREG(st.st_mode):
        return Rejected(rel, "not a regular file")
    return rel, real
