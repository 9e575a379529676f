"""How long training runs: ``train.kimg`` (thousands of images shown, as StyleGAN counts) or
``train.epochs``, resolved to whole epochs before the first step; and the plan printed from it.

The loop trains whole epochs (every epoch's record, grid and FID point is complete), so a kimg
budget is rounded up to whole epochs of ``training images // batch_size`` full batches; the
images actually shown are what ``model.json``'s ``budget`` and the MLflow param ``train.kimg``
record. ``train.epochs``, when set, wins over ``train.kimg``.

``train.kimg: auto`` reads :data:`AUTO_KIMG` (RGB data :data:`AUTO_KIMG_RGB` first): per image size,
per family, the length that ``bench/`` measured as worth training on this project's reference CPU
(bench/RESULTS.md says which run); ``train.width``, ``train.ema_decay`` and ``train.lr: auto`` read :data:`AUTO_WIDTH`,
:data:`AUTO_EMA_DECAY` and :data:`AUTO_LR` the same way; ``train.model: auto`` reads :data:`AUTO_MODEL`, the family
measured best for the size on the device. A size without an entry takes the nearest measured
size's value.

Importable with the standard library alone (the plan is shown before torch has done anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# Image side -> family -> kimg, measured on this project's reference CPU (2-core AMD EPYC, fp32).
# 8 px: the length `make run` trained before kimg existed (180 epochs of 22 batches of 64 over the
# 1,437 training digits = 253.44 kimg) for every family; bench/results/quality.md measures them at
# equal wall-clock budgets. 32 px: what each family trained in the 10 minutes of
# `python -m bench datasets` on 5,000 MNIST digits on that CPU (the run committed in fe67203),
# where FID was still falling (sngan with its auto width and EMA decay below). sngan keeps it on the
# Intel Xeon, where it is about 5 minutes: a first run on a dataset also spends about 7 minutes
# evaluating, most of it on the Inception features of every training image (the data-copying check;
# cached afterwards), and 640 kimg (10,000 steps, where the recipe levels off) made that run 18 minutes
# (bench/results/trials/README.md). A family not measured at a size takes the value of the nearest
# size it was measured at.
AUTO_KIMG: dict[int, dict[str, float]] = {
    8: {"dcgan": 253.44, "sngan": 253.44, "resgan": 253.44, "vae": 253.44, "ddpm": 253.44},
    32: {"dcgan": 130.752, "sngan": 348.224},
}

# Image side -> family -> kimg for RGB data (3 channels), where it differs from AUTO_KIMG. 32 px, sngan:
# 1,000 kimg: colour images keep gaining long after the digits level off (the emoji trials of
# bench/results/trials/README.md: 2.4x the floor after 700-870 kimg, 2.1x after 1,836). At the Intel
# Xeon's usual 900-1,250 images/s that is 13-19 minutes, which with a first run's Inception pass over
# the training images (about 6 minutes) keeps a first run on 3,800 emoji within half an hour; on a
# night at 640 images/s it took 35 minutes (the trials' last bullet).
AUTO_KIMG_RGB: dict[int, dict[str, float]] = {
    32: {"sngan": 1000.0},
}

# Image side -> family -> base channel count (train.width: auto). 8 px: 64, what every family was
# measured with in bench/results/quality.md. 32 px: sngan 32. In single-knob trials of 10 minutes
# on the 5,000 MNIST digits of `python -m bench datasets` (one seed each, the bench's protocol),
# width 32 trained twice the steps of width 64 to the same FID ratio (2.35x) with better precision
# and recall; width 16 tied with 32, and batch 32 or DiffAugment reduced or off did no better.
# dcgan keeps the 64 it was measured with.
_FAMILIES = ("dcgan", "sngan", "resgan", "vae", "ddpm")
AUTO_WIDTH: dict[int, dict[str, int]] = {
    8: dict.fromkeys(_FAMILIES, 64),
    32: {"dcgan": 64, "sngan": 32},
}

# Image side -> family -> decay of the exported generator's moving average (train.ema_decay: auto;
# read by sngan, resgan and ddpm). 8 px: 0.999, measured there. 32 px, sngan: 0.99, a half-life of
# 69 steps instead of 693: in those trials the 0.999 average still held the blurred generator of a
# 10-minute training's first minutes (2.16x against 2.35x at width 32). The auto recipe beside the
# width-64 one: `sngan` and `sngan-w64` of bench/results/datasets.md as committed in fe67203.
AUTO_EMA_DECAY: dict[int, dict[str, float]] = {
    8: dict.fromkeys(_FAMILIES, 0.999),
    32: {"sngan": 0.99},
}

# Image side -> family -> learning rate (train.lr: auto); None: the family's own recipe (the Recipe in
# its module, what 8 px trains with), also for a family the table does not name. 32 px, sngan: 8e-4, twice
# its recipe's 4e-4: in the learning-rate trials of bench/results/trials/README.md (where the figures
# live) it led 4e-4 on the MNIST digits and the RGB emoji set and 2e-4 on the digits; 1.6e-3 tied with it.
AUTO_LR: dict[int, dict[str, float | None]] = {
    8: dict.fromkeys(_FAMILIES, None),
    32: {"sngan": 8e-4},
}

# Image side -> device type -> the family ``train.model: auto`` trains. 8 px: resgan, the best GAN
# after 4 minutes in bench/results/quality.md (ddpm scores better but samples with 50 network
# passes). 32 px: sngan, ahead of every other family measured on both real datasets of
# bench/results/datasets.md after 5 and 10 minutes (dcgan and sngan on two CPUs, the AMD EPYC run
# of fe67203 and the Intel Xeon one published; resgan and, on mnist, ddpm there too: on a CPU at
# 32 px they show a fifth of sngan's images or fewer in the same time and draw worse; vae, measured
# there since, draws blurred shapes, far behind sngan on both datasets). No GPU has measured them
# yet: a GPU takes the CPU's choice.
AUTO_MODEL: dict[int, dict[str, str]] = {
    8: {"cpu": "resgan"},
    32: {"cpu": "sngan"},
}

# Plans longer than this on a CPU get a warning naming what shortens them.
CPU_WARNING_SECONDS = 3600.0


@dataclass(frozen=True)
class Budget:
    """The resolved length of one training."""

    epochs: int
    steps_per_epoch: int
    batch_size: int
    source: str  # what set it: "train.epochs", "train.kimg" or "train.kimg auto (<family>, <size> px)"
    requested_kimg: float | None = None  # the kimg asked for (None when train.epochs set the length)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def images(self) -> int:
        """Images shown in all (global batch x steps)."""
        return self.steps * self.batch_size

    @property
    def kimg(self) -> float:
        return self.images / 1000.0

    def describe(self) -> str:
        asked = f"{self.requested_kimg:g} kimg asked, " if self.requested_kimg is not None else ""
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        return (
            f"{self.kimg:g} kimg ({asked}{self.source}) = {self.steps} steps = {epochs} of "
            f"{self.steps_per_epoch} batches of {self.batch_size}"
        )


def auto_kimg(family: str, size: int, channels: int = 1) -> tuple[float, int]:
    """``(kimg, measured size)`` that ``train.kimg: auto`` stands for with ``family`` at ``size`` px:
    the value measured at the nearest size that has one for ``family`` (for RGB, in
    :data:`AUTO_KIMG_RGB` when it has the family, else in :data:`AUTO_KIMG`)."""
    value, measured, _ = _auto_kimg(family, size, channels)
    return value, measured


def _auto_kimg(family: str, size: int, channels: int) -> tuple[float, int, bool]:
    """:func:`auto_kimg`'s answer, and whether :data:`AUTO_KIMG_RGB` gave it."""
    rgb = _lookup(AUTO_KIMG_RGB, family, size) if channels == 3 else None
    if rgb is not None:
        return rgb[0], rgb[1], True
    value, measured = _auto(AUTO_KIMG, "train.kimg", family, size, fix="train.kimg or train.epochs")
    return value, measured, False


def auto_width(family: str, size: int) -> tuple[int, int]:
    """``(width, measured size)`` that ``train.width: auto`` stands for (as :func:`auto_kimg`)."""
    return _auto(AUTO_WIDTH, "train.width", family, size)


def auto_ema_decay(family: str, size: int) -> tuple[float, int]:
    """``(decay, measured size)`` that ``train.ema_decay: auto`` stands for (as :func:`auto_kimg`)."""
    return _auto(AUTO_EMA_DECAY, "train.ema_decay", family, size)


def auto_lr(family: str, size: int) -> float | None:
    """The learning rate ``train.lr: auto`` stands for with ``family`` at ``size`` px (the nearest
    measured size's); None: the family's recipe."""
    found = _lookup(AUTO_LR, family, size)
    return found[0] if found else None


def _auto(table: dict[int, dict[str, T]], setting: str, family: str, size: int, fix: str = "") -> tuple[T, int]:
    found = _lookup(table, family, size)
    if found is None:
        known = sorted({f for t in table.values() for f in t})
        raise KeyError(
            f"{setting}: auto has no value for model {family!r} (known: {', '.join(known)}); set {fix or setting}"
        )
    return found


def _lookup(table: dict[int, dict[str, T]], family: str, size: int) -> tuple[T, int] | None:
    """``(value, measured size)`` of ``family`` at the measured size nearest ``size``; None when the
    table has no size for ``family``."""
    sizes = {s: t for s, t in table.items() if family in t}
    if not sizes:
        return None
    measured = _nearest_size(sizes, size)
    return sizes[measured][family], measured


def _nearest_size(table: dict[int, Any], size: int) -> int:
    """The measured size nearest to ``size`` on a log scale (the larger one on a tie)."""
    return min(table, key=lambda s: (abs(math.log2(s) - math.log2(size)), -s))


def resolve_model(model: str, *, size: int, device: str) -> str:
    """The family ``train.model`` names: itself, or for ``auto`` the table's choice for ``size`` px
    on ``device`` (``cpu``, ``cuda``; a device type without an entry takes the CPU's choice)."""
    if model != "auto":
        return model
    choices = AUTO_MODEL[_nearest_size(AUTO_MODEL, size)]
    return choices.get(device, choices["cpu"])


def resolve_budget(
    *,
    family: str,
    size: int,
    train_images: int,
    batch_size: int,
    epochs: int | None,
    kimg: float | str,
    channels: int = 1,
) -> Budget:
    """The whole epochs that ``train.epochs`` or ``train.kimg`` asks for on ``train_images`` images
    of ``channels`` channels."""
    if train_images < batch_size:
        raise ValueError(f"train.batch_size={batch_size} is larger than the training set ({train_images} images)")
    steps_per_epoch = train_images // batch_size  # the loop's rule: the last partial batch is dropped
    if epochs is not None:
        return Budget(epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, source="train.epochs")
    if kimg == "auto":
        value, measured, rgb = _auto_kimg(family, size, channels)
        source = f"train.kimg auto ({family}, {measured} px{' RGB' if rgb else ''})" + (
            f" for {size} px" if measured != size else ""
        )
    else:
        value, source = float(kimg), "train.kimg"
    per_epoch = steps_per_epoch * batch_size
    wanted = round(value * 1000)  # whole images: 253.44 kimg is exactly 253,440
    return Budget(
        epochs=max(1, -(-wanted // per_epoch)),
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        source=source,
        requested_kimg=value,
    )


def format_duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min 30 s``, ``45 s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


@dataclass(frozen=True)
class Estimate:
    """Wall time of the steps still to run, from the seconds per step measured so far."""

    seconds_per_step: float
    steps_left: int
    overhead_seconds: float = 0.0  # known extra work still to come (FID points, grids)

    @property
    def seconds(self) -> float:
        return self.seconds_per_step * self.steps_left + self.overhead_seconds


def evaluation_warning(estimate_seconds: float, device: str, *, images: int, copying: int) -> str | None:
    """A warning for an evaluation priced over :data:`CPU_WARNING_SECONDS` on a CPU (``images``
    through Inception, ``copying`` of them only for the copying check), naming what shortens it."""
    if device != "cpu" or estimate_seconds <= CPU_WARNING_SECONDS:
        return None
    return (
        f"its evaluation will take about {format_duration(estimate_seconds)} on this CPU"
        + (f", {copying} of its {images} images for the copying check" if copying else "")
        + ". To shorten it: "
        + ("skip the copying check (--set evaluate.copy_check=false), " if copying else "")
        + "fewer samples (--set evaluate.num_samples=N), or evaluate on the GPU work pool "
        + "(the retrain flow's remote_stages: docs/scaling.md)"
    )


def plan_warning(estimate_seconds: float, device: str) -> str | None:
    """A warning for a CPU plan over :data:`CPU_WARNING_SECONDS`, naming what shortens it; else None."""
    if device != "cpu" or estimate_seconds <= CPU_WARNING_SECONDS:
        return None
    return (
        f"this training will take about {format_duration(estimate_seconds)} on this CPU. To shorten it: "
        "fewer images shown (--set train.kimg=N), a cheaper family (aigc run --model dcgan), a smaller "
        "image size (datasets.NAME.size), or train on the GPU work pool (`aigc deploy`; docs/scaling.md)"
    )
