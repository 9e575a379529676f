"""What a source yields and what decoding returns: small, picklable, frozen records.

A source yields, in a deterministic order, one of:

- :class:`RawSample`: pixels already in memory (``sklearn-digits``, ``torchvision``);
- :class:`EncodedSample`: an image file still to be decoded, as the path of a regular file already
  checked to lie inside the source root, or as the bytes of an archive member;
- :class:`Rejected`: an entry the source refused before decoding (unsafe archive member, missing
  file, empty label, ...); it counts towards ``ingest.max_rejected_fraction``;
- :class:`Skipped`: an entry that is not meant to be an image (e.g. ``README.txt`` beside the
  images); listed in ``report.json`` ``skipped`` but not counted as rejected.

Hidden and system files (``.DS_Store``, ``__MACOSX/``, ``Thumbs.db``, dotfiles) are not yielded at all.
Decoding turns each record into an :class:`Accepted` or a :class:`Rejected`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RawSample:
    """One source image before normalisation."""

    key: str  # stable identifier within the source (a relative path or an index)
    pixels: np.ndarray  # uint8, HxW or HxWxC
    label: str | None = None


@dataclass(frozen=True)
class EncodedSample:
    """An encoded image (PNG, JPEG, ...) to decode: exactly one of ``file`` and ``data`` is set."""

    key: str  # path relative to the source root, with "/" separators
    label: str | None = None
    file: str | None = None  # real path of a regular file inside the source root
    data: bytes | None = None  # the encoded bytes (an archive member read in place)


@dataclass(frozen=True)
class Rejected:
    """A bad entry: listed in ``report.json`` ``rejected`` as ``{"path": key, "reason": reason}``."""

    key: str
    reason: str


@dataclass(frozen=True)
class Skipped:
    """Not an image by its name (e.g. ``notes.txt``): listed in ``skipped``, not counted as rejected."""

    key: str
    reason: str


@dataclass(frozen=True)
class Accepted:
    """A decoded, validated and normalised image."""

    key: str
    label: str | None
    image: np.ndarray  # uint8 [C, size, size]
    sha256: str  # of ``image.tobytes()``: the duplicate check and the content-hash split use it


SourceItem = RawSample | EncodedSample | Rejected | Skipped
Outcome = Accepted | Rejected | Skipped
