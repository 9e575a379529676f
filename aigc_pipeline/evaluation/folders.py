"""``aigc fid DIR_A DIR_B``: the pipeline's evaluation protocol between two folders of images.

DIR_A plays the generated side, DIR_B the reference (its statistics are cached by content, so
comparing many sample folders against one reference pays for it once). Images are read as they
are (no resize unless ``size`` is given: torch-fidelity's extractor resizes to 299x299 itself);
all images of a folder must share one size. A folder of grayscale images stays 1-channel (fed
as three equal channels); any colour image makes the folder RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
from aigc_pipeline.evaluation.inception import InceptionWeights
from aigc_pipeline.evaluation.protocol import Protocol, metric_key
from aigc_pipeline.evaluation.reference import pixel_digest

__all__ = ["IMAGE_SUFFIXES", "compare_folders", "copies_in_folders", "image_files", "load_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (the order of :func:`load_folder`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_folder(folder: Path, *, size: int | None = None) -> np.ndarray:
    """uint8 [N, C, H, W] of the images directly in ``folder`` (sorted by name; C is 1 or 3)."""
    folder = Path(folder)
    files = image_files(folder)
    if len(files) < 2:
        raise EvaluationError(f"{folder}: {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); FID needs at least 2")
    images: list[Image.Image] = []
    for path in files:
        try:
            with Image.open(path) as opened:
                opened.load()
                images.append(
                    opened.convert("L") if opened.mode in ("1", "L", "I", "I;16", "F") else opened.convert("RGB")
                )
        except (UnidentifiedImageError, OSError) as exc:
            raise EvaluationError(f"{path}: cannot be read as an image ({exc})") from exc
    mode = "L" if all(img.mode == "L" for img in images) else "RGB"
    arrays = []
    for path, img in zip(files, images):
        img = img.convert(mode)
        if size is not None:
            from aigc_pipeline.data.normalize import normalize_image

            arrays.append(normalize_image(img, size=size, channels=1 if mode == "L" else 3))
            continue
        if img.size != images[0].size:
            raise EvaluationError(
                f"{path}: {img.size[0]}x{img.size[1]} px, but {files[0].name} is "
                f"{images[0].size[0]}x{images[0].size[1]};"
                " all images of a folder must share one size (or pass --size N to resize them)"
            )
        arr = np.asarray(img, dtype=np.uint8)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(arrays))


def compare_folders(
    dir_a: Path,
    dir_b: Path,
    *,
    weights: InceptionWeights,
    size: int | None = None,
    batch_size: int = 50,
    device: str = "cpu",
    bootstrap: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID, precision/recall (and the FID's bootstrap spread, FID-infinity) of DIR_A against
    DIR_B, with the protocol; keys ``fid``, ``fid_std``, ``fid_inf``, ``fid_inf_std``, ``kid``,
    ``kid_std``, ``precision``, ``recall``, ``protocol``."""
    a, b = load_folder(dir_a, size=size), load_folder(dir_b, size=size)
    digest = pixel_digest(b)
    scores = compute_fidelity_metrics(
        a,
        b,
        reference_key=f"dir-{digest[:16]}",
        weights=weights,
        batch_size=batch_size,
        device=device,
        kid=True,
        prc=True,
        isc=len(a) >= 10,
        bootstrap=bootstrap,
        bootstrap_seed=seed,
        extrapolate=len(a) >= 4,
    )
    # The side of square images; the larger side otherwise (the exact shapes are recorded too).
    protocol = Protocol(
        scores["extractor"]["name"], weights.sha256, len(a), "dir", digest, len(b), int(max(a.shape[-2:]))
    )
    out: dict[str, Any] = {
        "fid": scores["fid"],
        "fid_std": scores.get("fid_bootstrap", {}).get("std"),
        "fid_inf": scores.get("fid_inf", {}).get("value"),
        "fid_inf_std": scores.get("fid_inf", {}).get("std"),
        "kid": scores["kid_mean"],
        "kid_std": scores["kid_std"],
        "precision": scores["precision"],
        "recall": scores["recall"],
        "metric_names": {k: metric_key(k, protocol.id) for k in ("fid", "fid_inf", "kid", "precision", "recall")},
        "protocol": {
            **protocol.to_dict(),
            "dir_a": str(dir_a),
            "dir_b": str(dir_b),
            "shape_a": list(a.shape[1:]),
            "shape_b": list(b.shape[1:]),
        },
        "extractor": scores["extractor"],
        "reference_cached": scores["reference_cached"],
    }
    if "isc_mean" in scores:
        out["isc"], out["isc_std"] = scores["isc_mean"], scores["isc_std"]
    else:
        out["isc_unavailable"] = scores.get("isc_unavailable", "fewer than 10 images in DIR_A")
    if "fid_bootstrap" in scores:
        out["bootstrap"] = {k: scores["fid_bootstrap"][k] for k in ("replicas", "seed", "mean")}
    return out


def copies_in_folders(
    generated: Path,
    train: Path,
    heldout: Path | None = None,
    *,
    weights: InceptionWeights,
    size: int | None = None,
    batch_size: int = 50,
    device: str = "cpu",
    seed: int = 0,
    shown: int = 8,
) -> dict[str, Any]:
    """The data-copying check (:mod:`aigc_pipeline.evaluation.copying`) of the images in ``generated``
    against those in ``train``, calibrated on ``heldout`` (None: on ``train``, each image left out of
    its own search). Keys: the copying figures, how they were measured, and the ``most_copied``
    samples with their nearest training image (file names) and distance."""
    from aigc_pipeline.evaluation.copying import copying_report
    from aigc_pipeline.evaluation.features import FEATURE_LAYER, extract_features
    from aigc_pipeline.evaluation.reference import reference_statistics

    g, t = load_folder(generated, size=size), load_folder(train, size=size)
    h = load_folder(heldout, size=size) if heldout is not None else None
    if g.shape[1:] != t.shape[1:]:
        raise EvaluationError(
            f"{generated} holds {g.shape[1]}x{g.shape[2]}x{g.shape[3]} images but {train} "
            f"{t.shape[1]}x{t.shape[2]}x{t.shape[3]}: pass --size N to bring both to one size"
        )

    def cached(images: np.ndarray) -> Any:  # a folder's features, cached by its pixels
        return reference_statistics(
            images,
            reference_key=f"dir-{pixel_digest(images)[:16]}",
            weights=weights,
            batch_size=batch_size,
            device=device,
        ).features

    features = extract_features(g, weights, batch_size=batch_size, device=device)[FEATURE_LAYER]
    report = copying_report(features, g, cached(t), t, cached(h) if h is not None else None, h, seed=seed)
    g_names, t_names = image_files(generated), image_files(train)
    order = np.argsort(report.ratios, kind="stable")[:shown]
    return {
        **report.metrics(),
        **report.details(),
        "calibration": "held-out folder"
        if heldout is not None
        else "the training folder, each image left out "
        "of its own search (pass --heldout for images the model never saw)",
        "most_copied": [
            {
                "generated": g_names[i].name,
                "train": t_names[report.nearest[i]].name,
                "distance": float(report.distances[i]),
                "distance_over_threshold": float(report.ratios[i]),
            }
            for i in order
        ],
        "folders": {
            "generated": str(generated),
            "train": str(train),
            "heldout": str(heldout) if heldout is not None else None,
        },
        "weights_sha256": weights.sha256,
    }
