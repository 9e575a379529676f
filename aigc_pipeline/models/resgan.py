"""ResNet SNGAN: the residual generator and discriminator of SNGAN's CIFAR-10 model (Miyato et
al., 2018; :mod:`.resnet`) trained with the :class:`~aigc_pipeline.models.sngan.SNGAN` recipe:
hinge loss, spectral norm on every discriminator layer, one discriminator step per generator
step, DiffAugment on everything the discriminator sees, an EMA of the generator as the exported
model. Adam betas 0/0.9 as in the paper's ResNet runs, lr 4e-4: on the 8 px digits at 1000, 2000
and 4000 steps it gave FID 31.0 / 27.1 / 25.3 against 31.5 / 27.8 / 27.0 with the paper's 2e-4 (one
seed each). Measured against the other families in bench/quality.py."""

from __future__ import annotations

from typing import Any

from torch import nn

from aigc_pipeline.models.base import Arch, Recipe
from aigc_pipeline.models.resnet import ResDiscriminator, ResGenerator
from aigc_pipeline.models.sngan import SNGAN
from aigc_pipeline.models.spectral import spectral_norm_all


class ResGAN(SNGAN):
    recipe = Recipe(lr=4e-4, beta1=0.0, beta2=0.9)

    @classmethod
    def networks(cls, arch: Arch) -> tuple[nn.Module, nn.Module]:
        # PyTorch's default initialisation (as the reference implementations use), not DCGAN's.
        g = cls.build_generator(arch, {})
        d = spectral_norm_all(ResDiscriminator(arch.size, arch.channels, arch.width, arch.num_classes))
        return g, d

    @staticmethod
    def build_generator(arch: Arch, spec: dict[str, Any]) -> nn.Module:
        return ResGenerator(arch.latent_dim, arch.size, arch.channels, arch.width, arch.num_classes)
