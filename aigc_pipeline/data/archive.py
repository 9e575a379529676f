"""Read a .zip or .tar(.gz/.bz2/.xz) archive in place: members are read into memory, never extracted.

Member rules (each refused member is a rejection with its reason; nothing is ever written):

- absolute names (``/abs.png``, ``C:/x.png``) and names with a ``..`` component are refused
  (backslashes in zip names count as separators, as Windows tools mean them);
- symbolic links and hard links are refused (``tar``: symlink/hardlink members; ``zip``: entries
  whose Unix mode says symlink), as are devices, FIFOs and other special members;
- encrypted zip members and a second member with an already-seen name are refused;
- members over :data:`~aigc_pipeline.data.validate.MAX_MEMBER_BYTES` (128 MiB) are refused
  before they are read: from the size in their header, and for a zip member whose header lies
  (a zip bomb) after reading at most one byte more than the limit; members are read into memory,
  so this bounds what one member can cost (the decoding fan-out bounds how many are in flight:
  :data:`~aigc_pipeline.data.validate.MEMBER_BYTES_IN_FLIGHT`);
- folders are skipped silently, hidden/system members (``__MACOSX/``, ``.DS_Store``, ...) ignored,
  members without an image extension listed in ``skipped``;
- with ``labels: folders`` the label is the member's first path component.

Members come in archive order. A tar is read as a stream (one pass, any compression);
a structurally broken archive (not an archive, truncated) fails the ingest with a DataError.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from aigc_pipeline.data.files import clean_relpath, folder_label, is_ignored, unsafe_path_reason
from aigc_pipeline.data.records import EncodedSample, Rejected, Skipped
from aigc_pipeline.data.validate import MAX_MEMBER_BYTES, has_image_extension
from aigc_pipeline.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")


def is_archive_name(path: Path | str) -> bool:
    """True when the file name ends with a zip or tar suffix."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def read_archive(path: Path, *, labels: str) -> Iterator[EncodedSample | Rejected | Skipped]:
    """Yield the image members of the archive at ``path`` with their bytes, by the module's rules."""
    if not path.is_file():
        raise DataError(f"{path}: not found (expected a .zip or .tar archive)")
    if zipfile.is_zipfile(path):
        yield from _zip_members(path, labels)
    else:
        yield from _tar_members(path, labels)


def _member(
    name: str, labels: str, seen: set[str], refuse: str | None
) -> tuple[str, str | None] | Rejected | Skipped | None:
    """Common checks: ``(key, label)`` to read, a rejection/skip, or None to ignore silently.

    ``refuse`` is the reason a member's type (link, device, ...) is refused, checked before its name's
    extension so a link is never merely "skipped".
    """
    reason = unsafe_path_reason(name)
    if reason:
        return Rejected(name, reason)
    key = clean_relpath(name)
    if is_ignored(key):
        return None
    if refuse:
        return Rejected(key, refuse)
    if key in seen:
        return Rejected(key, "a second archive member with the same name")
    seen.add(key)
    if not has_image_extension(key):
        return Skipped(key, "not an image file name")
    label = folder_label(key) if labels == "folders" else None
    if labels == "folders" and label is None:
        return Rejected(key, "not inside a class folder (labels: folders)")
    return key, label


def _zip_members(path: Path, labels: str) -> Iterator[EncodedSample | Rejected | Skipped]:
    seen: set[str] = set()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive: {e}") from None
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            checked = _member(info.filename.replace("\\", "/"), labels, seen, _zip_refusal(info))
            if not isinstance(checked, tuple):
                if checked is not None:
                    yield checked
                continue
            key, label = checked
            try:
                with zf.open(info) as f:
                    data = f.read(MAX_MEMBER_BYTES + 1)  # bounded even if the header lies about the size
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:
                yield Rejected(key, f"corrupt archive member: {type(e).__name__}: {e}")
                continue
            if len(data) > MAX_MEMBER_BYTES:
                del data
                yield Rejected(
                    key,
                    f"member too large: more than {MAX_MEMBER_BYTES} bytes once decompressed "
                    f"(its header says {info.file_size}); {_TOO_LARGE_HINT}",
                )
                continue
            yield EncodedSample(key, label, data=data)


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    ftype = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # 3: Unix mode bits
    if ftype == stat.S_IFLNK:
        return "symbolic link member (not followed)"
    if ftype and ftype != stat.S_IFREG:
        return "device, FIFO or special-file member"
    if info.flag_bits & 0x1:
        return "encrypted member"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"member too large: {info.file_size} bytes > {MAX_MEMBER_BYTES}; {_TOO_LARGE_HINT}"
    return None


_TOO_LARGE_HINT = (
    "archive members are read into memory (limit 128 MiB); extract the archive and ingest the "
    "folder (files up to 512 MiB)"
)


def _tar_members(path: Path, labels: str) -> Iterator[EncodedSample | Rejected | Skipped]:
    seen: set[str] = set()
    try:
        tf = tarfile.open(path, mode="r|*")  # a stream: one sequential pass, whatever the compression
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable zip or tar archive: {e}") from None
    with tf:
        try:
            for m in tf:
                if m.isdir():
                    continue
                checked = _member(m.name, labels, seen, _tar_refusal(m))
                if not isinstance(checked, tuple):
                    if checked is not None:
                        yield checked
                    continue
                key, label = checked
                f = tf.extractfile(m)
                yield EncodedSample(key, label, data=f.read() if f is not None else b"")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            # Past this point the stream cannot be trusted: fail rather than silently stop early.
            raise DataError(f"{path}: corrupt or truncated archive after {len(seen)} members: {e}") from None


def _tar_refusal(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"symbolic link member (to {m.linkname!r}, not followed)"
    if m.islnk():
        return f"hard link member (to {m.linkname!r}, not followed)"
    if not m.isreg():
        return "device, FIFO or special-file member"
    if m.size > MAX_MEMBER_BYTES:  # refused from the header: the stream skips the data unread
        return f"member too large: {m.size} bytes > {MAX_MEMBER_BYTES}; {_TOO_LARGE_HINT}"
    return None
