"""Typed configuration loaded from params.yaml (plus ``--set key=value`` overrides).

Every section is a frozen dataclass. Loading rejects unknown keys, wrong types and
out-of-range values with a :class:`ConfigError` naming the dotted key, so a typo in
params.yaml fails loudly instead of silently using a default.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import io
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aigc_pipeline.errors import ConfigError
from aigc_pipeline.io import atomic_write_text

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class DatasetConfig:
    """One registered dataset: where images come from and how they are normalised.

    Source-specific fields (``path``, ``labels``, ``path_column``, ``label_column``, ``variant``,
    ``download``) are checked against what the source declares in the registry
    (:mod:`aigc_pipeline.data.sources`): a required one missing, or one the source does not read,
    fails with a message naming the key. ``background``, ``min_side`` and ``max_pixels`` apply to
    sources that decode files (see :mod:`aigc_pipeline.data.validate` for the rules).
    """

    source: str  # a name in aigc_pipeline.data.sources.SOURCES
    size: int = 32  # output side in pixels, a power of two
    channels: int = 1  # 1 grayscale, 3 RGB
    limit: int = 0  # keep at most this many images (0 = all)
    path: str | None = None  # what the source reads (relative to the project folder); DVC's ingest@NAME depends on it
    labels: Literal["folders", "none"] | None = None  # image-folder/archive: class from the first folder, or none
    path_column: str | None = None  # manifest: column of file paths (default "path")
    label_column: str | None = None  # manifest: column of labels (default: unlabelled)
    variant: str | None = None  # torchvision: MNIST | FashionMNIST | CIFAR10
    download: bool = False  # torchvision: download when the files are missing (never by default)
    background: Literal["white", "black"] = "white"  # what transparent pixels are composited over
    min_side: int = 8  # reject decoded images with a side under this many pixels
    max_pixels: int = 50_000_000  # reject images above this many pixels, from the header (decompression bombs)

    def __post_init__(self) -> None:
        _check(self.size in (8, 16, 32, 64, 128, 256), "size", "must be a power of two from 8 to 256")
        _check(self.channels in (1, 3), "channels", "must be 1 or 3")
        _check(self.limit >= 0, "limit", "must be >= 0")
        _check(self.min_side >= 1, "min_side", "must be >= 1")
        _check(self.max_pixels >= self.min_side**2, "max_pixels", "must be >= min_side squared")
        self._check_source()

    def _check_source(self) -> None:
        # Imported when an entry is checked, not with this module: the data layer brings numpy.
        from aigc_pipeline.data.sources import SOURCE_OPTIONS, SOURCE_SPECIFIC_FIELDS, SOURCES, TORCHVISION_VARIANTS

        _check(
            self.source in SOURCES, "source", f"unknown source {self.source!r} (known: {', '.join(sorted(SOURCES))})"
        )
        spec = SOURCE_OPTIONS[self.source]
        for name in spec.requires:
            _check(getattr(self, name) is not None, name, f"required for source {self.source}")
        for name in SOURCE_SPECIFIC_FIELDS:
            if name not in spec.options:
                unset = getattr(self, name) in (None, False)
                users = ", ".join(sorted(s for s, o in SOURCE_OPTIONS.items() if name in o.options)) or "none"
                _check(unset, name, f"not used by source {self.source} (used by: {users})")
        if self.source == "torchvision":
            _check(
                self.variant in TORCHVISION_VARIANTS, "variant", f"must be one of {' | '.join(TORCHVISION_VARIANTS)}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "") -> DatasetConfig:
        """Build and validate one entry; errors name ``<prefix><key>`` (e.g. ``datasets.pets.path``)."""
        return _build(cls, data, prefix)


@dataclass(frozen=True)
class IngestConfig:
    eval_fraction: float = 0.2
    max_rejected_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(0.0 < self.eval_fraction < 1.0, "eval_fraction", "must be between 0 and 1 (exclusive)")
        _check(0.0 <= self.max_rejected_fraction <= 1.0, "max_rejected_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class AugmentConfig:
    seed: int = 0
    copies: int = 1
    hflip: bool = False
    max_shift: int = 2
    max_rotation: float = 0.0  # degrees each way; 0 = off
    brightness: float = 0.0  # RGB only: factor drawn in [1 - x, 1 + x]; 0 = off
    contrast: float = 0.0  # RGB only
    saturation: float = 0.0  # RGB only

    def __post_init__(self) -> None:
        _check(self.copies >= 0, "copies", "must be >= 0")
        _check(self.max_shift >= 0, "max_shift", "must be >= 0")
        _check(0.0 <= self.max_rotation <= 180.0, "max_rotation", "must be in [0, 180] degrees")
        for name in ("brightness", "contrast", "saturation"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1] (0 = off)")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "dcgan"
    # Length of training: thousands of images shown (auto: the family's measured default for the
    # image size, aigc_pipeline.training.budget), rounded up to whole epochs; epochs, when set, wins.
    kimg: float | Literal["auto"] = "auto"
    epochs: int | None = None
    batch_size: int = 64
    seed: int = 0
    checkpoint_every: int = 200
    lr: float | Literal["auto"] = "auto"  # auto: training/budget.py AUTO_LR for the size, else the model's recipe
    beta1: float | Literal["auto"] = "auto"
    beta2: float | Literal["auto"] = "auto"
    latent_dim: int = 64
    width: int | Literal["auto"] = "auto"  # auto: measured per family and size (aigc_pipeline.training.budget)
    vae_beta: float = 1.0
    ema_decay: float | Literal["auto"] = "auto"  # auto: measured per family and size, as width
    conditional: bool = False
    diffaugment: str = "color,translation,cutout"  # comma-separated; "" = off
    sampling_steps: int = 50  # ddpm: DDIM steps of the exported sampler (the pyfunc's `steps` overrides it)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample_grid: int = 64
    sample_every: int = 1  # epochs between fixed-noise grids (and at the last epoch)
    devices: int = 1  # > 1: data parallel over this many processes (torchrun + DDP), global batch = batch_size
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the hardware has bf16
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False  # torch.compile the networks
    data_placement: Literal["auto", "device", "stream"] = "auto"  # stream: pinned host memory -> device per batch
    max_grad_norm: float = 1e5  # stop when a gradient norm exceeds this; 0 = only non-finite values stop
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs >= 1, "epochs", "must be >= 1 (or null: train.kimg sets the length)")
        _check(self.kimg == "auto" or self.kimg > 0, "kimg", "must be > 0 (thousands of images shown) or auto")
        _check(self.devices >= 1, "devices", "must be >= 1")
        _check(
            self.batch_size % self.devices == 0, "batch_size", f"must be divisible by train.devices ({self.devices})"
        )
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = off)")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.batch_size >= 2, "batch_size", "must be >= 2 (batch norm needs two samples)")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.lr == "auto" or self.lr > 0, "lr", "must be > 0 (or auto)")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(value == "auto" or 0.0 <= value < 1.0, name, "must be in [0, 1) (or auto)")
        _check(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        _check(self.width == "auto" or self.width >= 4, "width", "must be >= 4 (or auto)")
        _check(self.vae_beta >= 0, "vae_beta", "must be >= 0")
        _check(1 <= self.sample_grid <= 256, "sample_grid", "must be in 1..256")
        _check(self.sample_every >= 1, "sample_every", "must be >= 1 (epochs between sample grids)")
        _check(self.ema_decay == "auto" or 0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (or auto)")
        _check(
            1 <= self.sampling_steps <= 1000, "sampling_steps", "must be in 1..1000 (the training schedule's timesteps)"
        )
        from aigc_pipeline.models.policies import POLICY_NAMES

        unknown = [p for p in self.diffaugment.split(",") if p and p not in POLICY_NAMES]
        _check(not unknown, "diffaugment", f"unknown policy {unknown} (known: {', '.join(POLICY_NAMES)}; '' = off)")


@dataclass(frozen=True)
class EvaluateConfig:
    num_samples: int = 300
    seed: int = 1234
    batch_size: int = 50
    reference_split: Literal["eval", "train", "all"] = "eval"
    inception_weights: str | None = None  # null: found offline; a state dict file; "download": torch-fidelity's (IS)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bootstrap: int = 100  # FID noise: resamplings of the generated features (0 = off: the gate cannot promote)
    classifier_score: bool = True  # labelled datasets: score with a classifier trained on the real train split
    progress_every: int = 3  # FID over training every this many epochs (and at the last); 0 = off
    progress_samples: int = 64  # generated images per FID-over-training point (part of its metric name)
    copy_check: bool = True  # data copying: samples' nearest training images against held-out real ones

    def __post_init__(self) -> None:
        _check(self.num_samples >= 4, "num_samples", "must be >= 4 (precision/recall uses 3 nearest neighbours)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.bootstrap == 0 or self.bootstrap >= 10, "bootstrap", "must be 0 (off) or >= 10 replicas")
        _check(self.progress_every >= 0, "progress_every", "must be >= 0 (0 = off)")
        _check(self.progress_samples >= 4, "progress_samples", "must be >= 4")


@dataclass(frozen=True)
class RegisterConfig:
    experiment: str = "aigc-pipeline"
    model_name: str | None = None  # registered model; None = the dataset's name (every family competes in it)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"  # a complete candidate the gate did not promote
    gate_margin: float = 0.5  # FID points a candidate must win by (besides beating the noise)
    gate_noise_sigmas: float = 2.0  # ... and by this many standard deviations of the combined bootstrap noise
    max_fid_ratio: float | None = 3.0  # quality bar: FID <= this x the data's floor FID; None = no bar
    min_precision: float | None = None  # quality bar: precision >= this; None = no minimum
    min_recall: float | None = None  # quality bar: recall >= this; None = no minimum
    max_copy_share: float | None = 0.2  # refuse when more samples than this share copy training images; None = off
    min_copy_ct: float | None = -3.0  # refuse when the data-copying statistic C_T is below this; None = off
    max_images_per_request: int = 1024  # the served model refuses (HTTP 400) a request for more images in all
    max_images_per_row: int = 256  # ... or a row asking for more than this many

    def __post_init__(self) -> None:
        _check(self.gate_margin >= 0, "gate_margin", "must be >= 0")
        _check(self.gate_noise_sigmas >= 0, "gate_noise_sigmas", "must be >= 0")
        _check(
            self.max_fid_ratio is None or self.max_fid_ratio >= 1.0,
            "max_fid_ratio",
            "must be >= 1 (the floor is what real data scores) or null (no bar)",
        )
        for name in ("min_precision", "min_recall", "max_copy_share"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value <= 1.0, name, "must be in [0, 1] or null (no bar)")
        _check(
            self.model_name is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name) is not None,
            "model_name",
            "must start with a letter or digit and hold only letters, digits, '.', '_', '-'",
        )
        _check(self.max_images_per_request >= 1, "max_images_per_request", "must be >= 1")
        _check(
            1 <= self.max_images_per_row <= self.max_images_per_request,
            "max_images_per_row",
            f"must be in 1..max_images_per_request ({self.max_images_per_request})",
        )
        _check(self.champion_alias != self.challenger_alias, "challenger_alias", "must differ from champion_alias")


@dataclass(frozen=True)
class Config:
    """The whole of params.yaml."""

    dataset: str
    datasets: Mapping[str, DatasetConfig]
    ingest: IngestConfig = field(default_factory=IngestConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def __post_init__(self) -> None:
        if self.dataset not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError(f"dataset: '{self.dataset}' is not an entry of `datasets` (registered: {known})")
        # Freeze the mapping too, so no stage can mutate the config it was given.
        object.__setattr__(self, "datasets", types.MappingProxyType(dict(self.datasets)))

    @property
    def active_dataset(self) -> DatasetConfig:
        return self.datasets[self.dataset]

    @property
    def model_name(self) -> str:
        """The trained model's name, one per (dataset, model family): its folder (``models/NAME``),
        evaluation and receipt in dvc.yaml, and its MLflow run names."""
        return f"{self.dataset}-{self.train.model}"

    @property
    def registered_model(self) -> str:
        """The MLflow registered model its versions go to: one per dataset (``register.model_name``
        overrides), so versions of every family compete for the same champion alias."""
        return self.register.model_name or self.dataset

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["datasets"] = {k: dataclasses.asdict(v) for k, v in self.datasets.items()}
        # the sections are dataclass instances, never classes (the isinstance test narrows the type)
        return {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for k, v in d.items()
        }


# ---------------------------------------------------------------------------
# Loading


class _KeyError(ValueError):
    """Raised by _check inside __post_init__; re-raised with the section prefix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _KeyError(f"{key}: {message}")


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = " | ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; DVC's YAML 1.2 reads a float.
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or (not value and not key.endswith(".diffaugment")):
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
            f"{', '.join(fields)})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing required key")
            continue
        tp = hints[name]
        value = data[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a dataclass hint is a class
            kwargs[name] = _build(tp, value if value is not None else {}, f"{key}.")
        elif typing.get_origin(tp) in (collections.abc.Mapping, dict):
            if not isinstance(value, Mapping) or not value:
                raise ConfigError(f"{key}: expected a non-empty mapping of name -> entry")
            item_tp = typing.get_args(tp)[1]
            kwargs[name] = {str(k): _build(item_tp, v, f"{key}.{k}.") for k, v in value.items()}
        else:
            kwargs[name] = _convert(value, tp, key)
    try:
        return cls(**kwargs)
    except _KeyError as e:
        raise ConfigError(f"{prefix}{e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML (so 3, 0.5, true, null work)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``key.path=value`` override applied."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping."""
    return _build(Config, data, "")


def read_params(path: Path) -> dict[str, Any]:
    """Read params.yaml as a plain dict; errors name the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project root, or pass --project)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(project_dir: Path | str = ".", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params.yaml`` from ``project_dir`` and apply ``--set`` overrides."""
    path = Path(project_dir) / PARAMS_FILE
    data = apply_overrides(read_params(path), overrides)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if not overrides else f"{path} (with --set overrides): {e}") from None


def config_digest(obj: Any) -> str:
    """A stable sha256 of a JSON-able object (e.g. ``dataclasses.asdict(cfg.train)``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def yaml_round_trip() -> Any:
    """A ruamel.yaml round-trip loader/dumper that keeps comments, key order, quotes and ``null``."""
    from ruamel.yaml import YAML  # ships with DVC

    rt = YAML()
    rt.preserve_quotes = True
    # ruamel writes None as an empty value ("key:"): keep the file's own spelling, null.
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def write_overrides_to_params(project_dir: Path | str, overrides: list[str] | tuple[str, ...]) -> None:
    """Persist overrides into params.yaml, keeping its comments (what ``dvc exp run -S`` does).

    The whole result is validated before the file is replaced, so a bad override never
    leaves a broken params.yaml behind.
    """
    if not overrides:
        return
    path = Path(project_dir) / PARAMS_FILE
    load_config(project_dir, overrides)  # validate first; raises ConfigError naming the key
    rt = yaml_round_trip()
    doc = rt.load(path.read_text())
    for text in overrides:
        key, value = parse_override(text)
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
