"""Model registry: ``train.model`` names a family here. A new family is a module plus one line."""

from __future__ import annotations

from typing import Callable

from aigc_pipeline.errors import ConfigError
from aigc_pipeline.models.base import Arch, Family, Hparams
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
