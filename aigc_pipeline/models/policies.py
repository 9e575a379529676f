"""The names of DiffAugment's policies (``train.diffaugment``), importable without torch:
params.yaml is checked before anything loads torch, and ``aigc ingest`` and ``aigc augment``
never do. :mod:`.diffaugment` holds a function of each name."""

from __future__ import annotations

POLICY_NAMES: tuple[str, ...] = ("color", "translation", "cutout")
