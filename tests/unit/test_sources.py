"""Sources: image folders, archives, manifests and torchvision roots, read safely and
deterministically; sklearn-digits unchanged."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aigc_pipeline.config import DatasetConfig, config_from_dict, load_config
from aigc_pipeline.data.parallel import ordered_map
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.data.records import EncodedSample, Rejected
from aigc_pipeline.data.sources import get_source
from aigc_pipeline.data.validate import DecodeSpec, process_chunk
from aigc_pipeline.errors import ConfigError, DataError
from aigc_pipeline.stages import ingest
from tests.conftest import REPO


def noise(seed: int, h: int = 20, w: int = 24, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def prepare(tmp_path: Path, out: str = "out", **entry) -> tuple[ingest.IngestResult, dict, pd.DataFrame]:
    dcfg = DatasetConfig.from_dict({"size": 8, "channels": 3, **entry}, prefix="datasets.t.")
    res = ingest.prepare(dcfg, tmp_path / out, name="t", max_rejected_fraction=1.0, workers=1)
    report = json.loads((tmp_path / out / "report.json").read_text())
    return res, report, pd.read_parquet(tmp_path / out / "manifest.parquet")


def sha_of(img: Image.Image) -> str:
    """The sha256 the prepared manifest would hold for ``img`` (8 px, RGB)."""
    from aigc_pipeline.data.records import Accepted
    from aigc_pipeline.data.validate import process

    out = process(EncodedSample("x", None, data=png_bytes(img)), DecodeSpec(size=8, channels=3))
    assert isinstance(out, Accepted)
    return out.sha256


# --- sklearn-digits ----------------------------------------------------------------------------


def test_sklearn_digits_output_is_unchanged(tmp_path: Path) -> None:
    # Digest of this exact config from the implementation before file sources existed.
    cfg = load_config(REPO, ["datasets.digits.size=16", "datasets.digits.limit=200", "datasets.digits.channels=3"])
    res = ingest.run(cfg, tmp_path / "digits")
    assert res.digest == "0866c2f9d7a7835dd3373cd4d4aba83459f666714d3b6cf26ceb96ecc9886bc6"
    assert (res.accepted, res.rejected, res.skipped) == (200, 0, 0)


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"source": "image-folder"}, "datasets.pets.path: required for source image-folder"),
        ({"source": "archive", "path": "a.zip", "labels": "classes"}, "datasets.pets.labels: 'classes' is not one of"),
        (
            {"source": "manifest", "path": "m.csv", "labels": "folders"},
            "datasets.pets.labels: not used by source manifest",
        ),
        ({"source": "image-folder", "path": "p", "label_column": "y"}, "datasets.pets.label_column: not used by"),
        ({"source": "torchvision", "path": "tv", "variant": "SVHN"}, "datasets.pets.variant: must be one of MNIST"),
        ({"source": "torchvision", "path": "tv"}, "datasets.pets.variant: required"),
        ({"source": "sklearn-digits", "download": True}, "datasets.pets.download: not used by source sklearn-digits"),
        ({"source": "webdataset", "path": "x"}, "datasets.pets.source: unknown source 'webdataset'"),
        ({"source": "image-folder", "path": "p", "max_pixels": 10}, "datasets.pets.max_pixels: must be >= min_side"),
    ],
)
def test_source_options_are_validated_naming_the_key(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"dataset": "pets", "datasets": {"pets": entry}})


def test_relative_path_is_relative_to_the_project(tmp_path: Path) -> None:
    (tmp_path / "data" / "pets").mkdir(parents=True)
    noise(1).save(tmp_path / "data" / "pets" / "a.png")
    dcfg = DatasetConfig(source="image-folder", path="data/pets")
    keys = [i.key for i in get_source("image-folder")(dcfg, tmp_path)]
    assert keys == ["a.png"]
    with pytest.raises(DataError, match="not a folder"):
        list(get_source("image-folder")(dcfg, tmp_path / "elsewhere"))


# --- image folders -----------------------------------------------------------------------------


def test_flat_and_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for i, cls in enumerate(["dog", "cat", "cat", "bird"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        noise(i).save(root / cls / f"{i}.png")
    res, report, manifest = prepare(tmp_path, source="image-folder", path=str(root), labels="folders")
    assert manifest["key"].tolist() == ["bird/3.png", "cat/1.png", "cat/2.png", "dog/0.png"]  # sorted walk
    assert manifest["label"].tolist() == ["bird", "cat", "cat", "dog"]
    assert report["per_class"] == {"bird": 1, "cat": 2, "dog": 1}
    res, report, manifest = prepare(tmp_path, "out2", source="image-folder", path=str(root))  # labels: none
    assert manifest["label"].isna().all() and report["per_class"] == {}

    noise(9).save(root / "stray.png")  # not in a class folder
    res, report, _ = prepare(tmp_path, "out3", source="image-folder", path=str(root), labels="folders")
    assert report["rejected"] == [{"path": "stray.png", "reason": "not inside a class folder (labels: folders)"}]


def test_a_folder_like_a_real_data_teams(tmp_path: Path) -> None:
    root = tmp_path / "shared" / "animals"
    for cls in ("cats", "dogs", "cats/2019"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    # Mixed formats and modes.
    noise(1).save(root / "cats" / "a.jpg", quality=95)
    noise(2, mode="RGBA").save(root / "cats" / "b.png")
    noise(3, mode="P").save(root / "cats" / "c.gif")
    noise(4, mode="L").save(root / "cats" / "2019" / "d.bmp")
    noise(5, mode="CMYK").save(root / "dogs" / "e.tiff")
    noise(6).save(root / "dogs" / "f.webp", lossless=True)
    Image.fromarray(np.arange(480, dtype=np.uint16).reshape(20, 24) * 100).save(root / "dogs" / "g16.png")
    noise(7, h=600, w=9).save(root / "dogs" / "tall.png")  # unusual but valid
    # Duplicates: a byte copy and the same pixels re-encoded in another lossless format.
    shutil.copy(root / "cats" / "b.png", root / "cats" / "b2.png")
    noise(6).save(root / "dogs" / "f2.png")
    # Corrupt files.
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    data = (root / "cats" / "a.jpg").read_bytes()
    (root / "cats" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "dogs" / "notes.png").write_text("this is a text file")
    noise(8, h=5, w=5).save(root / "dogs" / "icon.png")
    # Junk from three operating systems and a README.
    (root / ".DS_Store").write_bytes(b"Bud1")
    (root / "__MACOSX" / "cats").mkdir(parents=True)
    (root / "__MACOSX" / "cats" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "dogs" / "Thumbs.db").write_bytes(b"junk")
    (root / "README.md").write_text("# animals")
    # Links: a valid image outside the root must never be read; one inside may be.
    outside = tmp_path / "shared" / "secret.png"
    noise(42).save(outside)
    os.symlink(outside, root / "dogs" / "escape.png")
    os.symlink(tmp_path / "shared", root / "dogs" / "up")  # a folder link leading out
    os.symlink(root / "cats", root / "dogs" / "more-cats")  # a folder link inside: not descended
    os.symlink(root / "cats" / "a.jpg", root / "dogs" / "alias.jpg")  # inside -> inside
    os.symlink(root / "nowhere.png", root / "dogs" / "broken.png")

    res, report, manifest = prepare(tmp_path, source="image-folder", path=str(root), labels="folders")

    assert set(manifest["key"]) == {
        "cats/a.jpg",
        "cats/b.png",
        "cats/c.gif",
        "cats/2019/d.bmp",
        "dogs/e.tiff",
        "dogs/f.webp",
        "dogs/g16.png",
        "dogs/tall.png",
    }
    assert report["per_class"] == {"cats": 4, "dogs": 4}
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {
        "cats/cut.jpg",
        "dogs/empty.jpg",
        "dogs/notes.png",
        "dogs/icon.png",
        "dogs/escape.png",
        "dogs/broken.png",
        "dogs/up",
    }
    assert "outside the source root" in reasons["dogs/escape.png"] and "outside" in reasons["dogs/up"]
    assert "too small" in reasons["dogs/icon.png"]
    dups = {d["path"]: d["duplicate_of"] for d in report["duplicates"]}
    assert dups == {"cats/b2.png": "cats/b.png", "dogs/f2.png": "dogs/f.webp", "dogs/alias.jpg": "cats/a.jpg"}
    assert {s["path"] for s in report["skipped"]} == {"README.md", "dogs/more-cats"}
    # Nothing outside the root was read: the outside image's pixels are not in the dataset.
    assert sha_of(Image.open(outside)) not in set(manifest["sha256"])
    assert res.rejected == 7 and res.duplicates == 3


# --- archives ----------------------------------------------------------------------------------


def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    zf.writestr(info, target)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def _snapshot(root: Path, exclude: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if exclude not in p.parents and p != exclude}


def test_zip_read_in_place_refuses_unsafe_members(tmp_path: Path) -> None:
    arc = tmp_path / "in" / "pets.zip"
    arc.parent.mkdir()
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("cats/a.png", png_bytes(noise(1)))
        zf.writestr("dogs/b.png", png_bytes(noise(2)))
        zf.writestr("cats/", b"")  # a folder entry
        zf.writestr("../evil.png", png_bytes(noise(3)))
        zf.writestr("/abs.png", png_bytes(noise(4)))
        zf.writestr("dogs\\..\\..\\win.png", png_bytes(noise(5)))
        _zip_symlink(zf, "dogs/link.png", "/etc/passwd")
        zf.writestr("__MACOSX/cats/._a.png", b"junk")
        zf.writestr("cats/.DS_Store", b"junk")
        zf.writestr("LICENSE", b"CC-BY")
        zf.writestr("stray.png", png_bytes(noise(6)))
    before = _snapshot(tmp_path, tmp_path / "out")

    res, report, manifest = prepare(tmp_path, source="archive", path=str(arc), labels="folders")

    assert manifest["key"].tolist() == ["cats/a.png", "dogs/b.png"]
    assert manifest["label"].tolist() == ["cats", "dogs"]
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {"../evil.png", "/abs.png", "dogs/../../win.png", "dogs/link.png", "stray.png"}
    assert "'..'" in reasons["../evil.png"] and "absolute" in reasons["/abs.png"]
    assert "symbolic link" in reasons["dogs/link.png"]
    assert report["skipped"] == [{"path": "LICENSE", "reason": "not an image file name"}]
    # Read in place: nothing was written anywhere but the output folder.
    assert _snapshot(tmp_path, tmp_path / "out") == before
    assert not (tmp_path / "evil.png").exists() and not Path("/abs.png").exists()


def test_zip_bomb_member_is_refused_from_its_header(tmp_path: Path) -> None:
    from aigc_pipeline.data.validate import MAX_FILE_BYTES

    arc = tmp_path / "bomb.zip"
    with zipfile.ZipFile(arc, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("a.png", png_bytes(noise(1)))
        with zf.open("zeros.png", "w", force_zip64=True) as member:  # ~0.5 MiB that inflates past the limit
            block = b"\0" * (16 * 2**20)
            for _ in range(MAX_FILE_BYTES // len(block) + 1):
                member.write(block)
    assert arc.stat().st_size < 4 * 2**20
    res, report, manifest = prepare(tmp_path, source="archive", path=str(arc))
    assert manifest["key"].tolist() == ["a.png"]
    (rejected,) = report["rejected"]
    assert rejected["path"] == "zeros.png" and rejected["reason"].startswith("member too large")


@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "tar.xz"])
def test_tar_refuses_traversal_links_and_devices(tmp_path: Path, suffix: str) -> None:
    arc = tmp_path / "in" / f"pets.{suffix}"
    arc.parent.mkdir()
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[suffix]
    with tarfile.open(arc, mode) as tf:
        _tar_add(tf, "./pets", type=tarfile.DIRTYPE)
        _tar_add(tf, "./pets/a.png", png_bytes(noise(1)))
        _tar_add(tf, "../evil.png", png_bytes(noise(2)))
        _tar_add(tf, "/abs.png", png_bytes(noise(3)))
        _tar_add(tf, "pets/sym.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _tar_add(tf, "pets/hard.png", type=tarfile.LNKTYPE, linkname="pets/a.png")
        _tar_add(tf, "pets/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _tar_add(tf, "pets/fifo.png", type=tarfile.FIFOTYPE)
        _tar_add(tf, "pets/b.png", png_bytes(noise(4)))
        _tar_add(tf, "pets/a.png", png_bytes(noise(5)))  # same name again: would overwrite on extraction
    before = _snapshot(tmp_path, tmp_path / "out")

    res, report, manifest = prepare(tmp_path, source="archive", path=str(arc))

    assert manifest["key"].tolist() == ["pets/a.png", "pets/b.png"]
    assert manifest["sha256"].tolist()[0] == sha_of(noise(1))  # the first member of that name, not the second
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == {
        "../evil.png",
        "/abs.png",
        "pets/sym.png",
        "pets/hard.png",
        "pets/dev.png",
        "pets/fifo.png",
        "pets/a.png",
    }
    assert "hard link" in reasons["pets/hard.png"] and "device" in reasons["pets/dev.png"]
    assert _snapshot(tmp_path, tmp_path / "out") == before


def test_broken_archive_fails_with_the_file_named(tmp_path: Path) -> None:
    bad = tmp_path / "data.tar.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="data.tar.gz"):
        prepare(tmp_path, source="archive", path=str(bad))
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.failed-report.json").read_text())["status"] == "failed"


# --- manifests ---------------------------------------------------------------------------------


def _manifest_folder(tmp_path: Path) -> Path:
    root = tmp_path / "project" / "images"
    (root / "sub").mkdir(parents=True)
    noise(1).save(root / "a.png")
    noise(2).save(root / "sub" / "b.png")
    noise(3).save(root / "c.png")
    noise(4).save(tmp_path / "project" / "outside.png")
    os.symlink(tmp_path / "project" / "outside.png", root / "sneaky.png")
    return root


def test_csv_manifest_rejects_missing_empty_and_escaping_rows(tmp_path: Path) -> None:
    root = _manifest_folder(tmp_path)
    (root / "labels.csv").write_text(
        "path,label\n"
        "a.png,01\n"
        "sub/b.png, cat \n"
        "missing.png,dog\n"
        ",dog\n"
        "c.png,\n"
        "../outside.png,dog\n"
        f"{tmp_path / 'project' / 'outside.png'},dog\n"
        "sneaky.png,dog\n"
    )
    res, report, manifest = prepare(tmp_path, source="manifest", path=str(root / "labels.csv"), label_column="label")
    assert manifest["key"].tolist() == ["a.png", "sub/b.png"]
    assert manifest["label"].tolist() == ["01", "cat"]  # read as text, stripped
    reasons = {r["path"]: r["reason"] for r in report["rejected"]}
    assert reasons["missing.png"] == "file not found"
    assert reasons["(row 4)"].startswith("empty path")
    assert reasons["c.png"].startswith("empty label")
    assert "'..'" in reasons["../outside.png"]
    assert "absolute path" in reasons[str(tmp_path / "project" / "outside.png")]
    assert "outside the manifest's folder" in reasons["sneaky.png"]
    assert len(reasons) == 6
    assert sha_of(noise(4)) not in set(manifest["sha256"])


def test_parquet_manifest_with_custom_columns(tmp_path: Path) -> None:
    root = _manifest_folder(tmp_path)
    pd.DataFrame({"file": ["a.png", "sub/b.png", "c.png"], "cls": pd.array([3, None, 7], dtype="Int64")}).to_parquet(
        root / "m.parquet"
    )
    res, report, manifest = prepare(
        tmp_path, source="manifest", path=str(root / "m.parquet"), path_column="file", label_column="cls"
    )
    assert manifest["label"].tolist() == ["3", "7"]
    assert [r["path"] for r in report["rejected"]] == ["sub/b.png"]
    with pytest.raises(DataError, match="no column 'filename'"):
        prepare(tmp_path, "out2", source="manifest", path=str(root / "m.parquet"), path_column="filename")


# --- torchvision -------------------------------------------------------------------------------


def test_torchvision_missing_files_never_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download: true"):
        prepare(tmp_path, source="torchvision", path=str(tmp_path / "tv"), variant="CIFAR10")
    assert not (tmp_path / "tv").exists() or not any((tmp_path / "tv").rglob("*.tar.gz"))


def _idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in MNIST's idx format."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_raw_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    res, report, manifest = prepare(tmp_path, source="torchvision", path=str(tmp_path / "tv"), variant="MNIST")
    assert manifest["key"].tolist()[:2] == ["mnist/train/00000", "mnist/train/00001"]
    assert manifest["key"].tolist()[-1] == "mnist/test/00002"
    assert manifest["label"].tolist() == ["0", "1", "2", "3", "4", "0", "1", "2"]


# --- streaming and parallel decoding -----------------------------------------------------------


def test_ordered_map_is_independent_of_workers(tmp_path: Path) -> None:
    items = [EncodedSample(f"{i}.png", str(i % 3), data=png_bytes(noise(i))) for i in range(10)]
    items.insert(4, Rejected("bad.png", "refused by the source"))
    items.append(EncodedSample("junk.png", None, data=b"junk"))
    fn = functools.partial(process_chunk, spec=DecodeSpec(size=8, channels=3))
    serial = list(ordered_map(fn, items, workers=1))
    parallel = list(ordered_map(fn, iter(items), workers=2, chunk=2, min_parallel=0))
    assert [o.key for o in parallel] == [i.key for i in items]
    assert [getattr(o, "sha256", o) for o in parallel] == [getattr(o, "sha256", o) for o in serial]
    assert isinstance(parallel[-1], Rejected) and "not a recognised image" in parallel[-1].reason


def test_ingest_is_identical_with_one_or_two_workers(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(72):  # more than ordered_map's min_parallel, so two workers really start
        (root / str(i % 4)).mkdir(parents=True, exist_ok=True)
        noise(i % 60, h=12, w=12).save(root / str(i % 4) / f"{i:03d}.png")  # 12 duplicates
    (root / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    dcfg = DatasetConfig(source="image-folder", path=str(root), labels="folders", size=8)
    one = ingest.prepare(dcfg, tmp_path / "one", name="m", workers=1)
    two = ingest.prepare(dcfg, tmp_path / "two", name="m", workers=2)
    assert one.digest == two.digest and (one.accepted, one.duplicates, one.rejected) == (60, 12, 1)
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r1 == r2
    assert (load_prepared(tmp_path / "one").images == load_prepared(tmp_path / "two").images).all()
