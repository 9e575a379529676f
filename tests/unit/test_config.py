"""params.yaml loading: defaults, typed validation, errors naming the key, --set overrides."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from aigc_pipeline.config import load_config, write_overrides_to_params
from aigc_pipeline.errors import ConfigError
from tests.conftest import REPO


def test_repo_params_load_with_stable_names() -> None:
    cfg = load_config(REPO)
    # Names users and tests rely on (issue: keep these stable).
    for key in ("model", "epochs", "batch_size", "seed", "checkpoint_every"):
        assert hasattr(cfg.train, key)
    assert cfg.evaluate.num_samples >= 2
    assert cfg.active_dataset.source == "sklearn-digits"
    assert cfg.model_name == f"{cfg.dataset}-{cfg.train.model}"
    assert cfg.registered_model == cfg.dataset  # one registered model per dataset, every family in it
    assert load_config(REPO, ["register.model_name=digits-prod"]).registered_model == "digits-prod"


def test_config_is_frozen() -> None:
    cfg = load_config(REPO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.datasets["x"] = cfg.active_dataset  # type: ignore[index]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "train.epoch: unknown key"),
        ("trian.epochs=3", "trian: unknown key"),
        ("train.epochs=abc", "train.epochs: expected an integer"),
        ("train.epochs=0", "train.epochs: must be >= 1"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.device=gpu", "train.device: 'gpu' is not one of auto | cpu | cuda"),
        ("augment.hflip=maybe", "augment.hflip: expected true or false"),
        ("datasets.digits.size=33", "datasets.digits.size: must be a power of two"),
        ("datasets.digits.colour=1", "datasets.digits.colour: unknown key"),
        ("dataset=cats", "dataset: 'cats' is not an entry of `datasets`"),
        ("evaluate.reference_split=test", "evaluate.reference_split"),
        ("augment=3", "augment: expected a mapping"),
        (
            "train.diffaugment=color,blur",
            "train.diffaugment: unknown policy .*blur.*known: color, translation, cutout",
        ),
    ],
)
def test_invalid_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("`", ".")):
        load_config(REPO, [override])


def test_checking_params_loads_neither_torch_nor_mlflow_nor_prefect() -> None:
    """`aigc ingest` and `aigc augment` check params.yaml and never need torch: loading the config
    in a fresh interpreter leaves it unimported (importing torch costs every such process seconds)."""
    code = (
        "import sys; from aigc_pipeline.config import load_config; load_config(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["[]"], out.stdout


def test_overrides_parse_yaml_scalars() -> None:
    cfg = load_config(
        REPO, ["train.epochs=3", "train.lr=1e-3", "augment.hflip=true", "evaluate.inception_weights=null"]
    )
    assert (cfg.train.epochs, cfg.train.lr, cfg.augment.hflip, cfg.evaluate.inception_weights) == (3, 1e-3, True, None)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(REPO, ["train.epochs"])


def test_missing_or_broken_params_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params.yaml: not found"):
        load_config(tmp_path)
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_config(tmp_path)


def test_write_overrides_keeps_comments_and_rejects_bad_values(tmp_path: Path) -> None:
    original = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    write_overrides_to_params(tmp_path, ["train.epochs=2", "train.model=vae"])
    text = (tmp_path / "params.yaml").read_text()
    assert "# seeds weights, data order and noise" in text  # comments survive
    cfg = load_config(tmp_path)
    assert (cfg.train.epochs, cfg.train.model) == (2, "vae")

    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="train.epochs"):
        write_overrides_to_params(tmp_path, ["train.epochs=-1"])
    assert (tmp_path / "params.yaml").read_text() == before  # nothing stored is lost


def test_optimiser_settings_default_to_the_models_recipe() -> None:
    from aigc_pipeline.models.families import resolve_hparams

    # The EMA decay is set here: its `auto` needs the image size (tests/unit/test_budget.py).
    dcgan = resolve_hparams(load_config(REPO, ["train.model=dcgan", "train.ema_decay=0.999"]).train)
    sngan = resolve_hparams(load_config(REPO, ["train.model=sngan", "train.ema_decay=0.999"]).train)
    assert (dcgan.lr, dcgan.beta1, dcgan.beta2) == (2e-4, 0.5, 0.999)
    assert (sngan.lr, sngan.beta1, sngan.beta2) == (4e-4, 0.0, 0.9)
    mine = resolve_hparams(load_config(REPO, ["train.model=sngan", "train.lr=1e-4", "train.ema_decay=0.9"]).train)
    assert (mine.lr, mine.beta1) == (1e-4, 0.0)  # an explicit value wins, the rest stays auto
    with pytest.raises(ConfigError, match="train.beta1: must be in"):
        load_config(REPO, ["train.beta1=1.5"])
