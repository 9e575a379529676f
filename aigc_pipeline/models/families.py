"""Model registry: ``train.model`` names a family here. A new family is a module plus one line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from aigc_pipeline.errors import ConfigError
from aigc_pipeline.models.base import Arch, Family, Hparams, Recipe
from aigc_pipeline.models.dcgan import DCGAN
from aigc_pipeline.models.ddpm import DDPM
from aigc_pipeline.models.resgan import ResGAN
from aigc_pipeline.models.sngan import SNGAN
from aigc_pipeline.models.vae import VAE

if TYPE_CHECKING:
    from aigc_pipeline.config import TrainConfig

MODELS: dict[str, type[Family]] = {
    "dcgan": DCGAN,
    "sngan": SNGAN,
    "resgan": ResGAN,
    "vae": VAE,
    "ddpm": DDPM,
}


def _family_class(name: str) -> type[Family]:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"train.model: unknown model {name!r} (known: {', '.join(MODELS)})") from None


def build_family(arch: Arch, hp: Hparams) -> Family:
    """Instantiate the family named by ``arch.family``."""
    return _family_class(arch.family)(arch, hp)


def generator_spec(family: Family) -> dict[str, Any]:
    """What the family's exported generator needs beyond the :class:`Arch` to be rebuilt (model.json)."""
    spec = getattr(family, "generator_spec", None)
    return spec() if spec is not None else {}


def build_generator(arch: Arch, spec: dict[str, Any]) -> nn.Module:
    """An untrained exported generator of ``arch.family`` (load the saved weights into it)."""
    return _family_class(arch.family).build_generator(arch, spec)


DEFAULT_RECIPE = Recipe(lr=2e-4, beta1=0.5, beta2=0.999)


def recipe_for(name: str) -> Recipe:
    """The optimiser settings ``train.lr``/``beta1``/``beta2: auto`` stand for with model ``name``."""
    return getattr(_family_class(name), "recipe", DEFAULT_RECIPE)


def resolve_hparams(tcfg: TrainConfig) -> Hparams:
    """The family's hyper-parameters from ``train:``, with ``auto`` lr/betas replaced by the model's recipe."""
    recipe = recipe_for(tcfg.model)
    if tcfg.ema_decay == "auto":
        # Resolved with the image size by the train stage (stages/train.py resolve_auto).
        raise ConfigError("train.ema_decay: auto must be resolved for the image size before the recipe is built")
    return Hparams(
        lr=recipe.lr if tcfg.lr == "auto" else tcfg.lr,
        beta1=recipe.beta1 if tcfg.beta1 == "auto" else tcfg.beta1,
        beta2=recipe.beta2 if tcfg.beta2 == "auto" else tcfg.beta2,
        vae_beta=tcfg.vae_beta,
        ema_decay=tcfg.ema_decay,
        diffaugment=tcfg.diffaugment,
        sampling_steps=tcfg.sampling_steps,
    )
