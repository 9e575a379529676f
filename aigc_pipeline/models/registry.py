"""Model registry: ``train.model`` names a family here. A new family is a module plus one line."""

from __future__ import annotations

from typing import Callable

from aigc_pipeline.errors import ConfigError
from aigc_pipeline.models.base import Arch, Family, Hparams, Recipe
from aigc_pipeline.models.dcgan import DCGAN
from aigc_pipeline.models.sngan import SNGAN
from aigc_pipeline.models.vae import VAE

MODELS: dict[str, Callable[[Arch, Hparams], Family]] = {
    "dcgan": DCGAN,
    "sngan": SNGAN,
    "vae": VAE,
}


def build_family(arch: Arch, hp: Hparams) -> Family:
    """Instantiate the family named by ``arch.family``."""
    try:
        factory = MODELS[arch.family]
    except KeyError:
        raise ConfigError(f"train.model: unknown model {arch.family!r} (known: {', '.join(MODELS)})") from None
    return factory(arch, hp)


DEFAULT_RECIPE = Recipe(lr=2e-4, beta1=0.5, beta2=0.999)


def recipe_for(name: str) -> Recipe:
    """The optimiser settings ``train.lr``/``beta1``/``beta2: auto`` stand for with model ``name``."""
    if name not in MODELS:
        raise ConfigError(f"train.model: unknown model {name!r} (known: {', '.join(MODELS)})")
    return getattr(MODELS[name], "recipe", DEFAULT_RECIPE)
