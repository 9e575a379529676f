"""Decoding rules: every bad kind of file is rejected with its reason; colour modes, alpha and
16-bit images convert by the documented rules; hidden/system files are ignored, not counted."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc_pipeline.config import DatasetConfig
from aigc_pipeline.data.files import walk_images
from aigc_pipeline.data.records import Accepted, EncodedSample, Rejected, Skipped
from aigc_pipeline.data.validate import DecodeSpec, ImageRejected, decode_image, process
from aigc_pipeline.stages import ingest


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(h: int = 24, w: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def outcome(data: bytes, spec: DecodeSpec | None = None) -> Accepted | Rejected:
    return process(EncodedSample("x.png", None, data=data), spec or DecodeSpec(size=8, channels=3))


# --- bad files --------------------------------------------------------------------------------


def _truncated(fmt: str) -> bytes:
    data = encode(noise(64, 64), fmt)
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file (0 bytes)"),
        (_truncated("PNG"), "truncated"),
        (_truncated("JPEG"), "truncated"),
        (b"just some notes, not a picture\n" * 20, "not a recognised image"),
        (encode(Image.new("RGB", (4, 30))), "too small: 4x30"),
        (encode(Image.new("F", (16, 16)), "TIFF"), "mode F"),
    ],
    ids=["zero-byte", "truncated-png", "truncated-jpeg", "text-named-png", "too-small", "float"],
)
def test_bad_files_are_rejected_with_a_reason(data: bytes, reason: str) -> None:
    result = outcome(data, DecodeSpec(size=8, channels=3) if reason != "mode F" else DecodeSpec(size=8, channels=1))
    assert isinstance(result, Rejected), result
    assert reason in result.reason


def test_corrupt_png_checksum_is_rejected() -> None:
    data = bytearray(encode(noise()))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # flip bits inside the compressed pixels: the chunk CRC no longer matches
    assert isinstance(outcome(bytes(data)), Rejected)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # 4000x4000 zeros: a 16 MP image in a few kilobytes, the shape of a real decompression bomb.
    bomb = encode(Image.new("L", (4000, 4000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageRejected, match="max_pixels=1000000"):
        decode_image(bomb, DecodeSpec(size=8, channels=1, max_pixels=1_000_000))
    # The limit is configurable: a tiny one refuses an ordinary image; the default accepts it.
    small = encode(noise(20, 20))
    assert "decompression bomb" in outcome(small, DecodeSpec(size=8, channels=3, max_pixels=100)).reason
    assert isinstance(outcome(small), Accepted)


def test_min_side_is_configurable() -> None:
    data = encode(noise(10, 40))
    assert isinstance(outcome(data), Accepted)
    assert "under min_side=16" in outcome(data, DecodeSpec(size=8, channels=3, min_side=16)).reason


# --- colour modes ----------------------------------------------------------------------------


def pixel(img: Image.Image, *, channels: int, background: str = "white", fmt: str = "PNG") -> tuple[int, ...]:
    """Decode ``img`` (uniform colour, 8x8: no resampling) and return its one pixel value."""
    result = outcome(encode(img, fmt), DecodeSpec(size=8, channels=channels, background=background))
    assert isinstance(result, Accepted), result
    values = {tuple(int(v) for v in result.image[:, y, x]) for y in range(8) for x in range(8)}
    assert len(values) == 1, values
    return values.pop()


def test_alpha_is_composited_over_the_background() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    r, g, b = pixel(rgba, channels=3)
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    r, g, b = pixel(rgba, channels=3, background="black")
    assert abs(r - 128) <= 1 and g == 0 and b == 0
    clear = Image.new("LA", (8, 8), (30, 0))  # fully transparent gray
    assert pixel(clear, channels=1) == (255,)
    assert pixel(clear, channels=1, background="black") == (0,)
    opaque = Image.new("LA", (8, 8), (30, 255))
    assert pixel(opaque, channels=3) == (30, 30, 30)


def test_palette_with_and_without_transparency() -> None:
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert pixel(pal, channels=3) == (10, 200, 30)
    pal.info["transparency"] = 1  # index 1 is transparent
    assert pixel(pal, channels=3) == (255, 255, 255)
    assert pixel(pal, channels=3, background="black") == (0, 0, 0)


def test_cmyk_bilevel_rgb_and_luma() -> None:
    assert pixel(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), channels=3, fmt="JPEG") in {
        (254, 0, 0),
        (255, 0, 0),
        (255, 0, 1),
        (254, 0, 1),
    }  # JPEG may round by one
    assert pixel(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), channels=3, fmt="TIFF") == (255, 255, 255)
    assert pixel(Image.new("1", (8, 8), 1), channels=1) == (255,)
    assert pixel(Image.new("RGB", (8, 8), (0, 255, 0)), channels=1) == (150,)  # ITU-R 601: 0.587 * 255
    assert pixel(Image.new("L", (8, 8), 77), channels=3) == (77, 77, 77)


def test_sixteen_bit_keeps_the_high_byte() -> None:
    for value, expected in ((0x1234, 0x12), (65535, 255), (255, 0), (256, 1)):
        img = Image.fromarray(np.full((8, 8), value, dtype=np.uint16))
        assert img.mode == "I;16"
        assert pixel(img, channels=1) == (expected,)
    assert pixel(Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16)), channels=3) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("L", (16, 8), 0)
    img.paste(255, (0, 0, 8, 8))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95), DecodeSpec(size=8, channels=1))
    assert decoded.size == (8, 16)
    arr = np.asarray(decoded)
    assert arr[:8].mean() > 200 and arr[8:].mean() < 50  # the white half is now on top


# --- hidden, system and non-image files ------------------------------------------------------


def test_hidden_and_system_files_are_ignored_not_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "__MACOSX" / "cats").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "cats").mkdir()
    noise(seed=1).save(root / "cats" / "a.png")
    noise(seed=2).save(root / "b.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cats" / "._a.png").write_bytes(b"AppleDouble junk")
    (root / "__MACOSX" / "cats" / "._a.png").write_bytes(b"junk")
    (root / ".git" / "config.png").write_bytes(b"junk")
    (root / "Thumbs.db").write_bytes(b"junk")
    (root / "desktop.ini").write_text("[.ShellClassInfo]")
    (root / ".hidden.png").write_bytes(b"junk")
    (root / "notes.txt").write_text("not an image")
    items = list(walk_images(root, labels="none"))
    assert [i.key for i in items if isinstance(i, EncodedSample)] == ["b.png", "cats/a.png"]
    assert [(i.key, type(i)) for i in items if not isinstance(i, EncodedSample)] == [("notes.txt", Skipped)]

    res = ingest.prepare(
        DatasetConfig(source="image-folder", path=str(root), size=8),
        tmp_path / "out",
        name="data",
        max_rejected_fraction=0.0,
        workers=1,
    )
    assert (res.accepted, res.rejected, res.skipped) == (2, 0, 1)


def test_every_bad_file_is_in_the_report(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    noise(seed=3).save(root / "good.png")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello")
    (root / "cut.jpg").write_bytes(_truncated("JPEG"))
    os.mkfifo(root / "pipe.png")  # must be refused without being opened (opening would block)
    res = ingest.prepare(
        DatasetConfig(source="image-folder", path=str(root), size=8),
        tmp_path / "out",
        name="data",
        max_rejected_fraction=1.0,
        workers=1,
    )
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert res.accepted == 1 and report["accepted"] == 1
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"empty.png", "text.png", "cut.jpg", "pipe.png"}
    assert "0 bytes" in reasons["empty.png"] and "truncated" in reasons["cut.jpg"]
    assert "FIFO" in reasons["pipe.png"]


# --- decoding at reduced scale --------------------------------------------------------------


def _photo(w: int, h: int) -> Image.Image:
    """A smooth picture with some texture, as a camera would give (not pure noise)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0), (x + y) % 256], axis=-1)
    noise_ = np.random.default_rng(0).normal(0, 4, size=arr.shape)
    return Image.fromarray(np.clip(arr + noise_, 0, 255).astype(np.uint8))


def test_large_jpeg_decodes_at_reduced_scale_close_to_a_full_decode() -> None:
    from aigc_pipeline.data.normalize import normalize_image

    data = encode(_photo(800, 600), "JPEG", quality=92)
    spec = DecodeSpec(size=32, channels=3)
    decoded = decode_image(data, spec)
    assert decoded.size == (100, 75)  # 1/8 scale: the shorter side (75) still >= twice the output (64)
    ours = normalize_image(decoded, size=32, channels=3).astype(int)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((43, 32), Image.Resampling.BICUBIC, reducing_gap=None)
    reference = np.asarray(full.crop((5, 0, 37, 32))).transpose(2, 0, 1).astype(int)
    assert np.abs(ours - reference).mean() < 3.0  # same picture, within JPEG/resampling noise

    # The whole bitstream is still decoded: a truncated large JPEG is rejected, not padded.
    result = outcome(data[: len(data) * 3 // 4], spec)
    assert isinstance(result, Rejected) and "truncated" in result.reason
    # Small files are decoded at full scale.
    assert decode_image(encode(_photo(60, 40), "JPEG"), spec).size == (60, 40)


# --- bombs and absurd sizes, through a folder as a data team would hand it over ---------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with a few bytes of pixel data: a bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_bombs_and_absurd_sizes_are_rejected_without_decoding(tmp_path: Path) -> None:
    import json

    from aigc_pipeline.data.validate import MAX_FILE_BYTES

    root = tmp_path / "data"
    root.mkdir()
    noise(seed=4).save(root / "good.png")
    (root / "bomb.png").write_bytes(_png_header_only(9000, 7000))  # 63 M pixels > max_pixels (50 M)
    (root / "huge-bomb.png").write_bytes(_png_header_only(100_000, 100_000))  # past Pillow's own hard limit
    with open(root / "huge-file.jpg", "wb") as f:  # sparse: 512 MiB + 1 byte on paper, nothing on disk
        f.truncate(MAX_FILE_BYTES + 1)
    Image.new("L", (4000, 1), 128).save(root / "sliver.png")  # absurd aspect: a side under min_side
    res = ingest.prepare(
        DatasetConfig(source="image-folder", path=str(root), size=8),
        tmp_path / "out",
        name="data",
        max_rejected_fraction=1.0,
        workers=1,
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert res.accepted == 1 and set(reasons) == {"bomb.png", "huge-bomb.png", "huge-file.jpg", "sliver.png"}
    assert "9000x7000 = 63000000 pixels > max_pixels=50000000" in reasons["bomb.png"]
    assert "decompression bomb" in reasons["huge-bomb.png"]
    assert reasons["huge-file.jpg"] == f"file too large: {MAX_FILE_BYTES + 1} bytes > {MAX_FILE_BYTES}"
    assert "too small: 4000x1" in reasons["sliver.png"]
