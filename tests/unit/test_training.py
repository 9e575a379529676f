"""Model families, the training loop's determinism and exact resume, and the divergence guard."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from aigc_pipeline.errors import TrainingDiverged
from aigc_pipeline.models import families as registry
from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.models.dcgan import DCGAN
from aigc_pipeline.models.export import generate, load_generator, save_generator
from aigc_pipeline.randomness import BatchRandom
from aigc_pipeline.training.checkpoint import encode_state, list_checkpoints, read_checkpoint
from aigc_pipeline.training.data import Batches
from aigc_pipeline.training.loop import Callbacks, train

HP = Hparams(lr=2e-4, beta1=0.5, beta2=0.999, vae_beta=1.0, sampling_steps=3)  # few DDIM steps: plumbing tests


def _images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


@pytest.mark.parametrize("family", sorted(registry.MODELS))
@pytest.mark.parametrize("size", [16, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_trains_at_several_shapes(family: str, size: int, channels: int) -> None:
    arch = Arch(family=family, size=size, channels=channels, latent_dim=8, width=8)
    res = train(
        _images(16, channels, size),
        arch=arch,
        hparams=HP,
        epochs=1,
        batch_size=8,
        seed=0,
        checkpoint_dir=None,
        checkpoint_every=100,
        sample_grid=4,
    )
    assert res.steps == 2 and len(res.history) == 2
    assert all(np.isfinite(v) for row in res.history for v in row.values())
    out = generate(res.family.generator.eval(), arch, 5, seed=1)
    assert out.shape == (5, channels, size, size) and out.dtype == np.uint8


@pytest.mark.parametrize("family", sorted(registry.MODELS))
def test_conditional_variants_train_and_sample_a_requested_class(family: str) -> None:
    arch = Arch(family=family, size=16, channels=1, latent_dim=8, width=8, num_classes=3)
    labels = np.arange(16) % 3
    res = train(
        _images(16, 1, 16),
        labels=labels,
        arch=arch,
        hparams=HP,
        epochs=1,
        batch_size=8,
        seed=0,
        checkpoint_dir=None,
        checkpoint_every=100,
        sample_grid=6,
    )
    g = res.family.generator.eval()
    sevens = generate(g, arch, 4, seed=2, label=2)
    assert sevens.shape == (4, 1, 16, 16)
    # The label changes the output for the same latent vectors.
    assert not (generate(g, arch, 4, seed=2, label=0) == sevens).all()
    with pytest.raises(ValueError, match="out of range"):
        generate(g, arch, 1, seed=0, label=3)
    with pytest.raises(ValueError, match="needs a label"):
        train(
            _images(16, 1, 16),
            arch=arch,
            hparams=HP,
            epochs=1,
            batch_size=8,
            seed=0,
            checkpoint_dir=None,
            checkpoint_every=100,
        )


def test_unconditional_model_refuses_a_label() -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    res = train(
        _images(16, 1, 16),
        arch=arch,
        hparams=HP,
        epochs=1,
        batch_size=8,
        seed=0,
        checkpoint_dir=None,
        checkpoint_every=100,
    )
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


class _GlobalRandomGAN(DCGAN):
    """A DCGAN whose step also draws from the *global* torch, numpy and Python generators (as a
    model with dropout or a user transform would): exact resume needs those states restored."""

    def train_step(self, real, labels, rnd):
        noise = torch.rand(()) + float(np.random.rand()) + random.random()
        real = F.dropout(real, p=0.1) + 1e-3 * noise
        return super().train_step(real, labels, rnd)


def _abort_after(n: int):
    calls = {"n": 0}

    def should_abort() -> bool:
        calls["n"] += 1
        return calls["n"] > n

    return should_abort


def _weights(result) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v for m, mod in result.family.modules.items() for k, v in mod.state_dict().items()}


@pytest.mark.parametrize(
    ("family", "precision", "channels_last", "placement"),
    [
        ("dcgan", "fp32", False, "device"),
        ("dcgan", "bf16", True, "stream"),  # the GPU paths (bf16 autocast, channels_last, streaming) on the CPU
        ("sngan", "auto", "auto", "device"),
        ("vae", "auto", "auto", "device"),
        ("global-random", "fp32", False, "device"),
    ],
)
def test_resume_after_interruption_is_bitwise_identical(
    family: str, precision: str, channels_last, placement: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.MODELS, "global-random", _GlobalRandomGAN)
    arch = Arch(family=family, size=16, channels=1, latent_dim=8, width=8)
    data = _images(40, 1, 16)
    kw = dict(
        arch=arch,
        hparams=HP,
        epochs=3,
        batch_size=8,
        seed=11,
        checkpoint_every=3,
        precision=precision,
        channels_last=channels_last,
        data_placement=placement,
    )
    full = train(data, checkpoint_dir=tmp_path / "full", **kw)

    # Stopped mid-epoch (step 8 of 15; epochs are 5 steps), after the checkpoint at step 6.
    with pytest.raises(KeyboardInterrupt):
        train(data, checkpoint_dir=tmp_path / "cut", callbacks=Callbacks(should_abort=_abort_after(8)), **kw)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3, 6]
    # The caller's process keeps drawing from the global generators in between.
    torch.rand(5), np.random.rand(5), random.random()
    resumed = train(data, checkpoint_dir=tmp_path / "cut", **kw)
    assert resumed.resumed_from == 6
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "weights differ after resume"
    assert resumed.history == full.history
    assert [h["step"] for h in resumed.history] == list(range(1, full.steps + 1))
    assert [e["epoch"] for e in resumed.epoch_log] == [1, 2, 3]


def test_checkpoint_holds_rng_data_order_and_augmentation_state(tmp_path: Path) -> None:
    arch = Arch(family="sngan", size=16, channels=1, latent_dim=8, width=8)
    train(
        _images(40, 1, 16),
        arch=arch,
        hparams=HP,
        epochs=1,
        batch_size=8,
        seed=2,
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
    )
    (_, path), _ = list_checkpoints(tmp_path)  # steps 3 and 5 (the end)
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: no pickle anywhere
        assert "aigc" in f.metadata() and len(list(f.keys())) > 20
    state = read_checkpoint(path)
    assert state["step"] == 3
    assert set(state["rng"]) == {"torch", "numpy", "python", "cuda"}
    assert state["rng"]["torch"].dtype == torch.uint8
    order = state["data"]["order"]
    assert sorted(order.tolist()) == list(range(40)) and state["data"]["position"] == 3
    assert state["augmentation"]["policy"] == HP.diffaugment and state["augmentation"]["next_step"] == 3
    assert set(state["modules"]) == {"generator", "discriminator", "generator_ema", "ema_state"}
    assert float(state["modules"]["ema_state"]["updates"]) == 3.0
    assert set(state["optimizers"]["generator"]["state"]) == set(
        range(len(state["optimizers"]["generator"]["param_groups"][0]["params"]))
    )


def test_checkpoint_codec_round_trips_types() -> None:
    state = {
        "ints": {0: 1, 5: (2, 3.5)},
        "f": 0.1,
        "inf": float("inf"),
        "none": None,
        "s": "x",
        "b": True,
        "t": [
            torch.arange(3, dtype=torch.int64),
            torch.ones((), dtype=torch.bfloat16),
            torch.zeros(2, 2, dtype=torch.uint8),
        ],
    }
    path_bytes = encode_state(state)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(path_bytes)
        f.flush()
        back = read_checkpoint(f.name)
    assert back["ints"] == {0: 1, 5: (2, 3.5)} and back["f"] == 0.1 and back["inf"] == float("inf")
    assert back["none"] is None and back["s"] == "x" and back["b"] is True
    assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(state["t"], back["t"]))


def test_a_killed_checkpoint_write_is_ignored_and_cleaned_up(tmp_path: Path) -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    kw = dict(arch=arch, hparams=HP, epochs=2, batch_size=8, seed=0, checkpoint_every=2)
    data = _images(32, 1, 16)
    with pytest.raises(KeyboardInterrupt):
        train(data, checkpoint_dir=tmp_path, callbacks=Callbacks(should_abort=_abort_after(5)), **kw)
    # What a kill during the write of step 6 leaves: a truncated temp file.
    (tmp_path / ".step-000000006.safetensors.abc123.tmp").write_bytes(b"\x00" * 100)
    resumed = train(data, checkpoint_dir=tmp_path, **kw)
    assert resumed.resumed_from == 4
    assert not list(tmp_path.glob(".step-*.tmp"))


def test_streamed_data_gives_the_same_weights_as_data_on_the_device() -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8, num_classes=3)
    kw = dict(
        labels=np.arange(32) % 3,
        arch=arch,
        hparams=HP,
        epochs=2,
        batch_size=8,
        seed=4,
        checkpoint_dir=None,
        checkpoint_every=100,
    )
    on_device = train(_images(32, 1, 16), data_placement="device", **kw)
    streamed = train(_images(32, 1, 16), data_placement="stream", **kw)
    a, b = _weights(on_device), _weights(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_split_the_global_batch_between_ranks() -> None:
    images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    batches = Batches(images, None, torch.device("cpu"), placement="stream")
    whole = [x for x, _ in batches.epoch(order, 0, 2, 6)]
    halves = [[x for x, _ in batches.epoch(order, 0, 2, 6, rank=r, world=2)] for r in (0, 1)]
    for i in range(2):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), whole[i])


def test_batch_random_ranks_draw_their_rows_of_the_global_batch() -> None:
    def draw(rank: int, world: int) -> tuple[torch.Tensor, ...]:
        rnd = BatchRandom(torch.Generator().manual_seed(7), rank, world)
        b = 4 // world
        return rnd.randn((b, 3), device=torch.device("cpu")), rnd.randint(0, 9, (b,), device=torch.device("cpu"))

    whole = draw(0, 1)
    parts = [draw(r, 2) for r in (0, 1)]
    for i in range(2):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), whole[i])
    assert not torch.equal(parts[0][0], parts[1][0])  # ranks never share noise


def test_checkpoints_keep_only_the_last_few(tmp_path: Path) -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    train(
        _images(32, 1, 16),
        arch=arch,
        hparams=HP,
        epochs=3,
        batch_size=8,
        seed=0,
        checkpoint_dir=tmp_path,
        checkpoint_every=2,
        keep_checkpoints=2,
    )
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
    from aigc_pipeline.models.diffaugment import diff_augment

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
        train(
            _images(48, 1, 16),
            arch=arch,
            hparams=HP,
            epochs=1,
            batch_size=8,
            seed=0,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
        )
    # The checkpoint at step 2 is the last good state; no diverged state was saved.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_exploding_gradient_stops_training_naming_the_step(tmp_path: Path) -> None:
    arch = Arch(family="dcgan", size=16, channels=1, latent_dim=8, width=8)
    with pytest.raises(
        TrainingDiverged,
        match=r"step (\d): exploding gradient \(grad_norm_\w=[\d.e+]+.*, over "
        r"train.max_grad_norm=100000\)",
    ) as info:
        train(
            _images(48, 1, 16),
            arch=arch,
            hparams=Hparams(lr=1e6, beta1=0.5, beta2=0.999),
            epochs=1,
            batch_size=8,
            seed=0,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
    step = info.value.step
    assert step <= 3 and f"step {step}:" in str(info.value) and len(info.value.history) == step - 1
    # Only the good steps before it were checkpointed.
    assert [s for s, _ in list_checkpoints(tmp_path)] == list(range(1, step))[-3:]


class _SpikeAtStep7(DCGAN):
    """Reports a gradient norm of 1e9 at step 7 (the loop must catch it although it fetches
    values only every 25 steps)."""

    step = 0

    def train_step(self, real, labels, rnd):
        out = super().train_step(real, labels, rnd)
        self.step += 1
        if self.step == 7:
            out["grad_norm_g"] = out["grad_norm_g"] * 0 + 1e9
        return out


def test_gradient_limit_is_checked_for_every_step_though_fetched_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.MODELS, "spike-gan", _SpikeAtStep7)
    arch = Arch(family="spike-gan", size=16, channels=1, latent_dim=8, width=8)
    kw = dict(arch=arch, hparams=HP, epochs=2, batch_size=8, seed=1, checkpoint_dir=None, checkpoint_every=100)
    data = _images(96, 1, 16)
    with pytest.raises(
        TrainingDiverged,
        match=r"step 7: exploding gradient \(grad_norm_g=1e\+09, over "
        r"train.max_grad_norm=1000\)",
    ) as info:
        train(data, max_grad_norm=1000, **kw)
    assert info.value.step == 7
    unguarded = train(data, max_grad_norm=0, **kw)  # 0 = no limit: the spike passes
    assert unguarded.steps == 24 and unguarded.history[6]["grad_norm_g"] == 1e9
    assert info.value.history == unguarded.history[:6]  # the partial losses a failed run records


def test_exported_generator_round_trip(tmp_path: Path) -> None:
    arch = Arch(family="dcgan", size=16, channels=3, latent_dim=8, width=8)
    res = train(
        _images(16, 3, 16),
        arch=arch,
        hparams=HP,
        epochs=1,
        batch_size=8,
        seed=0,
        checkpoint_dir=None,
        checkpoint_every=100,
    )
    save_generator(tmp_path, res.family.generator, arch, {"model": "dcgan"})
    g, arch2 = load_generator(tmp_path)
    assert arch2 == arch
    a = generate(res.family.generator.eval(), arch, 6, seed=3)
    b = generate(g, arch2, 6, seed=3, batch_size=4)  # batch size must not change the images
    assert (a == b).all()
