"""Model families, the training loop's determinism and exact resume, and the divergence guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aigc_pipeline.errors import TrainingDiverged
from aigc_pipeline.models import registry
from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.models.dcgan import DCGAN
from aigc_pipeline.models.export import generate, load_generator, save_generator
from aigc_pipeline.training.checkpoint import list_checkpoints
from aigc_pipeline.training.loop import Callbacks, train

HP = Hparams(lr=2e-4, beta1=0.5, beta2=0.999, vae_beta=1.0)


def _images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


@pytest.mark.parametrize("family", sorted(registry.MODELS))
@pytest.mark.parametrize(("size", "channels"), [(16, 1), (32, 3)])
def test_every_model_trains_at_several_shapes(family: str, size: int, channels: int) -> None:
    arch = Arch(family=family, size=size, channels=channels, latent_dim=8, width=8)
    res = train(_images(16, channels, size), arch=arch, hparams=HP, epochs=1, batch_size=8, seed=0,
                checkpoint_dir=None, checkpoint_every=100, sample_grid=4)
    assert res.steps == 2 and len(res.history) == 2
    assert all(np.isfinite(v) for row in res.history for v in row.values())
    out = generate(res.family.generator.eval(), arch, 5, seed=1)
    assert out.shape == (5, channels, size, size) and out.dtype == np.uint8


@pytest.mark.parametrize("family", sorted(registry.MODELS))
def test_conditional_variants_train_and_sample_a_requested_class(family: str) -> None:
    arch = Arch(family=family, size=16, channels=1, latent_dim=8, width=8, num_classes=3)
    labels = np.arange(16) % 3
    res = train(_images(16, 1, 16), labels=labels, arch=arch, hparams=HP, epochs=1, batch_size=8, seed=0,
                checkpoint_dir=None, checkpoint_every=100, sample_grid=6)
    g = res.family.generator.eval()
    sevens = generate(g, arch, 4, seed=2, label=2)
    assert sevens.shape == (4, 1, 16, 16)
    # The label changes the output for the same latent vectors.
    assert not (generate(g, arch, 4, seed=2, label=0) == sevens).all()
    with pytest.raises(ValueError, match="out of range"):
        generate(g, arch, 1, seed=0, label=3)
    with pytest.raises(ValueError, match="needs a label"):
        train(_images(16, 1, 16), arch=arch, hparams=HP, epochs=1, batch_size=8, seed=0,
              checkpoint_dir=None, checkpoint_every=100)


def test_unconditional_model_refuses_a_label() -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    res = train(_images(16, 1, 16), arch=arch, hparams=HP, epochs=1, batch_size=8, seed=0,
                checkpoint_dir=None, checkpoint_every=100)
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(res.family.generator.eval(), arch, 2, seed=0, label=1)


def test_same_seed_same_weights_other_seed_differs() -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    kw = dict(arch=arch, hparams=HP, epochs=2, batch_size=8, checkpoint_dir=None, checkpoint_every=100)
    a = train(_images(32, 1, 16), seed=5, **kw).family.generator.state_dict()
    b = train(_images(32, 1, 16), seed=5, **kw).family.generator.state_dict()
    c = train(_images(32, 1, 16), seed=6, **kw).family.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("family", ["dcgan", "sngan", "vae"])
def test_resume_after_interruption_is_bitwise_identical(family: str, tmp_path: Path) -> None:
    arch = Arch(family=family, size=16, channels=1, latent_dim=8, width=8)
    data = _images(40, 1, 16)
    kw = dict(arch=arch, hparams=HP, epochs=3, batch_size=8, seed=11, checkpoint_every=3)
    full = train(data, checkpoint_dir=tmp_path / "full", **kw)

    def abort_after(n: int):
        calls = {"n": 0}

        def should_abort() -> bool:
            calls["n"] += 1
            return calls["n"] > n

        return should_abort

    with pytest.raises(KeyboardInterrupt):
        train(data, checkpoint_dir=tmp_path / "cut", callbacks=Callbacks(should_abort=abort_after(8)), **kw)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3, 6]
    resumed = train(data, checkpoint_dir=tmp_path / "cut", **kw)
    assert resumed.resumed_from == 6
    for name, module in full.family.modules.items():
        a, b = module.state_dict(), resumed.family.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    assert [h["step"] for h in resumed.history] == list(range(1, full.steps + 1))


def test_checkpoints_keep_only_the_last_few(tmp_path: Path) -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    train(_images(32, 1, 16), arch=arch, hparams=HP, epochs=3, batch_size=8, seed=0,
          checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 12]


class _NanAtStep3(DCGAN):
    step = 0

    def train_step(self, real, labels, gen):
        losses = super().train_step(real, labels, gen)
        self.step += 1
        if self.step == 3:
            losses["loss_g"] = losses["loss_g"] * float("nan")
        return losses


def test_diffaugment_is_seeded_and_shape_preserving() -> None:
    from aigc_pipeline.training.diffaugment import diff_augment

    x = torch.rand(6, 3, 16, 16) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = diff_augment(x, "color,translation,cutout", g1)
    b = diff_augment(x, "color,translation,cutout", g2)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    cut = diff_augment(torch.ones(4, 1, 16, 16), "cutout", torch.Generator().manual_seed(0))
    assert ((cut == 0).sum(dim=(1, 2, 3)) > 0).all()  # every image lost a patch
    assert torch.equal(diff_augment(x, "", g1), x)


def test_nan_loss_stops_training_naming_the_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(registry.MODELS, "nan-gan", _NanAtStep3)
    arch = Arch(family="nan-gan", size=16, channels=1, latent_dim=8, width=8)
    with pytest.raises(TrainingDiverged, match="step 3: non-finite loss_g"):
        train(_images(48, 1, 16), arch=arch, hparams=HP, epochs=1, batch_size=8, seed=0,
              checkpoint_dir=tmp_path, checkpoint_every=2)
    # The checkpoint at step 2 is the last good state; no diverged state was saved.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_exported_generator_round_trip(tmp_path: Path) -> None:
    arch = Arch(family="dcgan", size=16, channels=3, latent_dim=8, width=8)
    res = train(_images(16, 3, 16), arch=arch, hparams=HP, epochs=1, batch_size=8, seed=0,
                checkpoint_dir=None, checkpoint_every=100)
    save_generator(tmp_path, res.family.generator, arch, {"model": "dcgan"})
    g, arch2 = load_generator(tmp_path)
    assert arch2 == arch
    a = generate(res.family.generator.eval(), arch, 6, seed=3)
    b = generate(g, arch2, 6, seed=3, batch_size=4)  # batch size must not change the images
    assert (a == b).all()
