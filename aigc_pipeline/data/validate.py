"""Decode, validate and normalise one image file; every bad file becomes a rejection with a reason.

Rules (documented in docs/datasets.md):

**Which files are read.** In a folder or an archive, files whose name has an image extension
(:data:`IMAGE_EXTENSIONS`, case-insensitive) are decoded; other files are listed in
``report.json`` ``skipped`` (not counted as rejected). Hidden and system entries are ignored
silently and not counted anywhere: any path component starting with ``.`` (``.DS_Store``,
``._x.png``, ``.git/``), ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, ``ehthumbs.db`` and
``Icon\\r``. A manifest's rows are all decoded: the manifest names them explicitly. The format is
taken from the content, not the extension (a JPEG named ``.png`` is accepted), and only these
decoders are used: :data:`FORMATS` (no EPS, whose decoder runs Ghostscript).

**Rejected, with a reason**: zero-byte files; files over :data:`MAX_FILE_BYTES`; content no
allowed decoder recognises ("not a recognised image"); truncated or corrupt files (every image is
fully decoded: ``Image.verify()`` then ``Image.load()``, truncated data is never padded);
images with a side under ``min_side`` pixels (default 8); images with more than ``max_pixels``
pixels (default 50 M): a decompression bomb is refused from its header, before any pixel is
decoded (Pillow's own hard limit, twice ``Image.MAX_IMAGE_PIXELS`` or about 179 M pixels, still
applies above that); colour modes with no defined 8-bit meaning (32-bit float ``F``).

**Frames and orientation.** Multi-frame files (animated GIF/WebP, multi-page TIFF) contribute their
first frame. The EXIF orientation tag is applied (the image is stored as viewers show it).

**Colour modes** (to the dataset's ``channels``, 1 = grayscale, 3 = RGB):

- ``1`` (bilevel): 0 or 255.
- 16-bit (``I;16``, ``I;16B``, ``I;16L``) and 32-bit integer ``I``: clipped to 0..65535, then the
  high byte is kept (``v >> 8``), the same rule Pillow applies to 16-bit RGB PNGs, so 65535 -> 255
  and 0x1234 -> 0x12.
- Alpha (``LA``, ``RGBA``, ``PA``, premultiplied ``La``/``RGBa``) and palette or single-colour
  transparency (``P``/``L``/``RGB`` with a ``transparency`` entry): composited over the dataset's
  ``background`` (``white`` by default, or ``black``), as a viewer shows the image on a page;
  e.g. RGBA (255, 0, 0, 128) over white -> (255, 127, 127).
- ``P`` without transparency: its palette colours. ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's
  conversion to RGB (CMYK naively, without an ICC profile).
- Then RGB -> grayscale by ITU-R 601 luma, grayscale -> RGB by repeating the channel, and the size
  policy of :mod:`aigc_pipeline.data.normalize` (shorter side scaled to ``size``, centre crop).

**Duplicates.** Two images with the same normalised pixels (sha256 of the uint8 array) are exact
duplicates: the first one in source order is kept, the others are listed in ``duplicates``.

**Links** (see :mod:`aigc_pipeline.data.files` and :mod:`aigc_pipeline.data.archive`): never
followed out of the source root; a folder symlink is not descended; archive link members are refused.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from aigc_pipeline.data.normalize import normalize, normalize_image
from aigc_pipeline.data.records import Accepted, EncodedSample, Outcome, RawSample, Rejected, Skipped, SourceItem

MAX_FILE_BYTES = 512 * 2**20  # an image file over 512 MiB is refused before it is read
# Archive members are read into this process's memory and shipped to the decoders, so they get
# a tighter limit: one over 128 MiB (by its header, or by its data when the header lies) is
# refused before it is read, and at most MEMBER_BYTES_IN_FLIGHT of members (plus the one being
# read) wait for or sit in the decoding workers at any time.
MAX_MEMBER_BYTES = 128 * 2**20
MEMBER_BYTES_IN_FLIGHT = 128 * 2**20
DRAFT_GAP = 2  # a JPEG is decoded at no less than this many times the output size (see _draft)
IMAGE_EXTENSIONS = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".bmp",
        ".dib",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".avif",
        ".jp2",
        ".j2k",
        ".qoi",
    }
)
_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM", "TGA", "AVIF", "JPEG2000", "QOI")
Image.init()
# Only decoders that this Pillow build has; never EPS (it shells out to Ghostscript) or exotic ones.
FORMATS: tuple[str, ...] = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
_BACKGROUNDS = {"white": (255, 255, 255, 255), "black": (0, 0, 0, 255)}


class ImageRejected(ValueError):
    """A file is not a usable image; the message is the reason recorded in report.json."""


@dataclass(frozen=True)
class DecodeSpec:
    """Everything decoding needs, picklable for worker processes."""

    size: int
    channels: int
    background: Literal["white", "black"] = "white"
    min_side: int = 8
    max_pixels: int = 50_000_000


def has_image_extension(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode_image(data: bytes, spec: DecodeSpec) -> Image.Image:
    """Fully decode ``data`` and convert it to mode "L" or "RGB" by the module's rules.

    Raises :class:`ImageRejected` with the reason for any unusable file.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own MAX_IMAGE_PIXELS; our explicit max_pixels check decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_size(img.size, spec)  # from the header, before any pixel is decoded
            if _has_verify(img):
                img.verify()  # structure and checksums (PNG CRCs)
                img = Image.open(io.BytesIO(data), formats=FORMATS)  # verify() leaves the image unusable
            _draft(img, spec)
            img.load()  # the full decode: truncated data raises here
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
            return _to_mode(img, spec)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not a recognised image (no decoder for its content)") from None
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"decompression bomb: {e}") from None
    except OSError as e:
        if "truncat" in str(e).lower():
            raise ImageRejected(f"truncated file: {e}") from None
        raise ImageRejected(f"cannot decode: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any decoder failure is this file's rejection
        raise ImageRejected(f"cannot decode: {type(e).__name__}: {e}") from None


def _draft(img: Image.Image, spec: DecodeSpec) -> None:
    """Let a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) that keeps its shorter side at least
    twice the output size: Pillow's thumbnail strategy. The whole bitstream is still decoded (a
    truncated file still fails); only the inverse DCT produces fewer pixels."""
    if img.format not in ("JPEG", "MPO"):
        return
    w, h = img.size
    k = DRAFT_GAP * spec.size / min(w, h)
    if k < 0.5:
        img.draft(None, (math.ceil(w * k), math.ceil(h * k)))


def _has_verify(img: Image.Image) -> bool:
    """Whether the format's plugin implements ``verify()`` (PNG does); elsewhere it is a no-op that
    would only cost a second parse of the header."""
    return type(img).verify not in (Image.Image.verify, ImageFile.ImageFile.verify)


def _check_size(size: tuple[int, int], spec: DecodeSpec) -> None:
    w, h = size
    if w * h > spec.max_pixels:
        raise ImageRejected(
            f"decompression bomb or oversized image: {w}x{h} = {w * h} pixels > max_pixels={spec.max_pixels}"
        )
    if min(w, h) < spec.min_side:
        raise ImageRejected(f"too small: {w}x{h}, a side is under min_side={spec.min_side} pixels")


def _to_mode(img: Image.Image, spec: DecodeSpec) -> Image.Image:
    mode = img.mode
    if mode == "F":
        raise ImageRejected("32-bit float pixels (mode F) have no defined 8-bit range; save as 8- or 16-bit")
    if mode in _SIXTEEN_BIT:
        arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        img = Image.fromarray(arr.astype(np.uint8), "L")
    elif mode == "1":
        img = img.convert("L")
    elif mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUNDS[spec.background])
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode not in ("L", "RGB"):
        img = img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV; ValueError for anything Pillow cannot convert
    target = "L" if spec.channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def read_file(path: str) -> bytes:
    """Read a regular file without following a symlink at its last component.

    The path was checked to lie inside the source root when listed; ``O_NOFOLLOW`` and the
    ``fstat`` check make sure it was not swapped for a link or a FIFO/device since.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageRejected(f"cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejected("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageRejected(f"file too large: {st.st_size} bytes > {MAX_FILE_BYTES}")
        return f.read(MAX_FILE_BYTES + 1)


def process(item: SourceItem, spec: DecodeSpec) -> Outcome:
    """Turn one source item into an :class:`Accepted` image or a :class:`Rejected`/:class:`Skipped` record."""
    if isinstance(item, (Rejected, Skipped)):
        return item
    if isinstance(item, RawSample):
        try:
            image = normalize(item.pixels, size=spec.size, channels=spec.channels)
        except (ValueError, OSError) as e:
            return Rejected(item.key, f"cannot normalise: {e}")
        return Accepted(item.key, item.label, image, hashlib.sha256(image.tobytes()).hexdigest())
    if isinstance(item, EncodedSample):
        try:
            data = item.data if item.data is not None else read_file(item.file or "")
            if len(data) > MAX_FILE_BYTES:
                raise ImageRejected(f"file too large: over {MAX_FILE_BYTES} bytes")
            image = normalize_image(decode_image(data, spec), size=spec.size, channels=spec.channels)
        except ImageRejected as e:
            return Rejected(item.key, str(e))
        return Accepted(item.key, item.label, image, hashlib.sha256(image.tobytes()).hexdigest())
    raise TypeError(f"a source yielded {type(item).__name__}, expected RawSample, EncodedSample, Rejected or Skipped")


def in_memory_bytes(item: SourceItem) -> int:
    """Bytes ``item`` holds in memory until it is decoded: an archive member's data (a file on disk
    is read by the worker itself, one at a time, and counts 0); the weight of ``ordered_map``'s budget."""
    if isinstance(item, EncodedSample) and item.data is not None:
        return len(item.data)
    if isinstance(item, RawSample):
        return int(item.pixels.nbytes)
    return 0


def process_chunk(items: list[SourceItem], spec: DecodeSpec) -> list[Outcome]:
    """:func:`process` over a chunk: the unit of work sent to a worker process."""
    return [process(item, spec) for item in items]
