"""Training length (train.kimg / train.epochs) and the plan printed before the wait."""

from __future__ import annotations

import io

import pytest

from aigc_pipeline.config import load_config
from aigc_pipeline.errors import ConfigError
from aigc_pipeline.models.families import recipe_for, resolve_hparams
from aigc_pipeline.stages.train import Progress, plan_budget, resolve_auto
from aigc_pipeline.training.budget import (
    AUTO_EMA_DECAY,
    AUTO_KIMG,
    AUTO_KIMG_RGB,
    AUTO_LR,
    AUTO_MODEL,
    AUTO_WIDTH,
    CPU_WARNING_SECONDS,
    auto_kimg,
    evaluation_warning,
    format_duration,
    plan_warning,
    resolve_budget,
    resolve_model,
)
from tests.conftest import REPO


def test_the_8px_default_is_the_180_epochs_make_run_trained_before_kimg() -> None:
    """1,437 training digits, batch 64: 22 full batches an epoch; 253.44 kimg is exactly 180 epochs."""
    b = resolve_budget(family="resgan", size=8, train_images=1437, batch_size=64, epochs=None, kimg="auto")
    assert (b.epochs, b.steps_per_epoch, b.steps, b.images) == (180, 22, 3960, 253_440)
    assert b.source == "train.kimg auto (resgan, 8 px)" and b.requested_kimg == 253.44


def test_kimg_rounds_up_to_whole_epochs_and_epochs_wins() -> None:
    b = resolve_budget(family="dcgan", size=32, train_images=1000, batch_size=64, epochs=None, kimg=10)
    # 15 batches of 64 = 960 images an epoch; 10,000 images need 11 epochs (10,560 shown).
    assert (b.epochs, b.steps, b.kimg, b.source) == (11, 165, 10.56, "train.kimg")
    e = resolve_budget(family="dcgan", size=32, train_images=1000, batch_size=64, epochs=3, kimg=10)
    assert (e.epochs, e.steps, e.source, e.requested_kimg) == (3, 45, "train.epochs", None)
    tiny = resolve_budget(family="dcgan", size=32, train_images=1000, batch_size=64, epochs=None, kimg=0.001)
    assert tiny.epochs == 1  # at least one epoch


def test_auto_takes_the_nearest_measured_size_and_says_so() -> None:
    assert auto_kimg("dcgan", 16)[1] in AUTO_KIMG
    b = resolve_budget(family="sngan", size=64, train_images=5000, batch_size=64, epochs=None, kimg="auto")
    assert b.source == "train.kimg auto (sngan, 32 px) for 64 px"
    assert b.requested_kimg == AUTO_KIMG[32]["sngan"]
    # A family measured at 8 px only takes its 8 px value at 32 px, and says so.
    unmeasured = [f for f in AUTO_KIMG[8] if f not in AUTO_KIMG[32]]
    if unmeasured:
        c = resolve_budget(family=unmeasured[0], size=32, train_images=5000, batch_size=64, epochs=None, kimg="auto")
        assert c.source == f"train.kimg auto ({unmeasured[0]}, 8 px) for 32 px"
    with pytest.raises(KeyError, match="no value for model 'nope'"):
        auto_kimg("nope", 32)


def test_rgb_data_takes_its_own_auto_length_where_one_was_measured() -> None:
    """An RGB 32 px sngan trains the RGB table's length and says so; grayscale, and a family the RGB
    table does not name, keep AUTO_KIMG's."""
    rgb = resolve_budget(
        family="sngan", size=32, train_images=3000, batch_size=64, epochs=None, kimg="auto", channels=3
    )
    gray = resolve_budget(family="sngan", size=32, train_images=3000, batch_size=64, epochs=None, kimg="auto")
    assert AUTO_KIMG_RGB[32]["sngan"] != AUTO_KIMG[32]["sngan"]
    assert (rgb.requested_kimg, rgb.source) == (AUTO_KIMG_RGB[32]["sngan"], "train.kimg auto (sngan, 32 px RGB)")
    assert (gray.requested_kimg, gray.source) == (AUTO_KIMG[32]["sngan"], "train.kimg auto (sngan, 32 px)")
    assert (rgb.epochs > gray.epochs) == (AUTO_KIMG_RGB[32]["sngan"] > AUTO_KIMG[32]["sngan"])
    assert rgb.kimg >= AUTO_KIMG_RGB[32]["sngan"] > rgb.kimg - 64 * 46 / 1000  # rounded up to whole epochs
    assert "dcgan" not in AUTO_KIMG_RGB[32]
    dcgan = resolve_budget(
        family="dcgan", size=32, train_images=3000, batch_size=64, epochs=None, kimg="auto", channels=3
    )
    assert (dcgan.requested_kimg, dcgan.source) == (AUTO_KIMG[32]["dcgan"], "train.kimg auto (dcgan, 32 px)")
    # A set length wins over either table.
    assert (
        resolve_budget(
            family="sngan", size=32, train_images=3000, batch_size=64, epochs=3, kimg="auto", channels=3
        ).epochs
        == 3
    )
    cfg = load_config(REPO, ["train.epochs=null", "train.kimg=auto"])
    assert (
        plan_budget(cfg, family="sngan", train_images=3000, size=32, channels=3).requested_kimg
        == AUTO_KIMG_RGB[32]["sngan"]
    )


def test_model_auto_picks_the_tables_family_for_the_size_and_device() -> None:
    assert resolve_model("dcgan", size=32, device="cpu") == "dcgan"  # a family is itself
    assert resolve_model("auto", size=8, device="cpu") == AUTO_MODEL[8]["cpu"]
    assert resolve_model("auto", size=32, device="cpu") == AUTO_MODEL[32]["cpu"]
    assert resolve_model("auto", size=64, device="cpu") == AUTO_MODEL[32]["cpu"]  # nearest measured size
    assert resolve_model("auto", size=32, device="cuda") == AUTO_MODEL[32].get("cuda", AUTO_MODEL[32]["cpu"])


def test_width_and_ema_auto_resolve_per_family_and_size_and_a_set_value_wins() -> None:
    tcfg = load_config(REPO).train
    assert (tcfg.width, tcfg.ema_decay) == ("auto", "auto")
    # 8 px: what the default champion was trained with before these were auto, so `make run` is unchanged.
    at8 = resolve_auto(tcfg, family="resgan", size=8)
    assert (at8.model, at8.width, at8.ema_decay) == ("resgan", 64, 0.999)
    at32 = resolve_auto(tcfg, family="sngan", size=32)
    assert (at32.width, at32.ema_decay) == (AUTO_WIDTH[32]["sngan"], AUTO_EMA_DECAY[32]["sngan"])
    assert resolve_auto(tcfg, family="sngan", size=64).width == AUTO_WIDTH[32]["sngan"]  # nearest measured size
    # A family measured at 8 px only keeps its 8 px values at 32 px.
    assert resolve_auto(tcfg, family="vae", size=32).width == AUTO_WIDTH[8]["vae"]
    mine = resolve_auto(load_config(REPO, ["train.width=48", "train.ema_decay=0.9"]).train, family="sngan", size=32)
    assert (mine.width, mine.ema_decay) == (48, 0.9)
    assert resolve_hparams(at32).ema_decay == AUTO_EMA_DECAY[32]["sngan"]
    with pytest.raises(ConfigError, match="train.ema_decay: auto must be resolved"):
        resolve_hparams(load_config(REPO, ["train.model=sngan"]).train)
    with pytest.raises(ConfigError, match="train.width: must be >= 4"):
        load_config(REPO, ["train.width=2"])
    with pytest.raises(ConfigError, match="train.ema_decay: must be in"):
        load_config(REPO, ["train.ema_decay=1.5"])


def test_lr_auto_is_the_measured_value_where_there_is_one_and_the_recipe_elsewhere() -> None:
    tcfg = load_config(REPO).train
    assert tcfg.lr == "auto"
    at32 = resolve_auto(tcfg, family="sngan", size=32)
    assert at32.lr == AUTO_LR[32]["sngan"] != recipe_for("sngan").lr
    assert resolve_hparams(at32).lr == AUTO_LR[32]["sngan"]  # what the optimiser gets, model.json and MLflow record
    assert resolve_auto(tcfg, family="sngan", size=64).lr == AUTO_LR[32]["sngan"]  # nearest measured size
    # 8 px (make run's size) and families without a measured value keep their recipe's lr.
    for family, size in (("sngan", 8), ("resgan", 8), ("dcgan", 32), ("ddpm", 32)):
        used = resolve_auto(tcfg, family=family, size=size)
        assert used.lr == "auto" and resolve_hparams(used).lr == recipe_for(family).lr, (family, size)
    # A set value wins.
    assert resolve_auto(load_config(REPO, ["train.lr=1e-4"]).train, family="sngan", size=32).lr == 1e-4


def test_the_stage_resolves_from_params_and_names_the_key(tmp_path) -> None:
    cfg = load_config(REPO, ["train.epochs=null", "train.kimg=auto"])
    assert plan_budget(cfg, family="resgan", train_images=1437, size=8).epochs == 180
    with pytest.raises(ConfigError, match="train.kimg: must be > 0"):
        load_config(REPO, ["train.kimg=0"])
    with pytest.raises(ConfigError, match="train.epochs: must be >= 1"):
        load_config(REPO, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="larger than the training set"):
        plan_budget(load_config(REPO, ["train.batch_size=64"]), family="dcgan", train_images=10, size=8)


def test_plan_warning_only_for_long_cpu_plans_and_names_what_shortens_them() -> None:
    assert plan_warning(CPU_WARNING_SECONDS - 1, "cpu") is None
    assert plan_warning(10 * CPU_WARNING_SECONDS, "cuda") is None
    text = plan_warning(CPU_WARNING_SECONDS + 600, "cpu")
    assert "1 h 10 min" in text and "train.kimg" in text and "--model" in text and "GPU work pool" in text
    assert [format_duration(s) for s in (45, 750, 3900)] == ["45 s", "12 min 30 s", "1 h 05 min"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Observer:
    """A TrainingObserver that records what it hears."""

    def __init__(self) -> None:
        self.plans: list[str] = []
        self.epochs: list[tuple] = []

    def plan(self, text: str) -> None:
        self.plans.append(text)

    def epoch(self, epoch: int, epochs: int, step: int, total: int, seconds_left: float | None) -> None:
        self.epochs.append((epoch, epochs, step, total, seconds_left))


def test_progress_prints_the_plan_then_a_warmup_estimate(monkeypatch) -> None:
    """The estimate is the warm-up's seconds per step (the first WARMUP_SKIP steps left out) times
    the steps left plus the FID points to come; the epoch line carries the time left."""
    clock = _Clock()
    monkeypatch.setattr("aigc_pipeline.stages.train.time.perf_counter", clock)
    budget = resolve_budget(family="resgan", size=8, train_images=1437, batch_size=64, epochs=None, kimg="auto")
    out, heard = io.StringIO(), _Observer()
    progress = Progress(
        budget.epochs,
        stream=out,
        budget=budget,
        device="cpu",
        fid_epochs=(45, 90, 135, 180),
        fid_samples=64,
        observer=heard,
    )
    progress.start(
        {"resumed_from": 0, "total_steps": budget.steps, "speed": "cpu", "data_placement": "device", "world_size": 1}
    )
    for step in range(1, 23):
        # The first two steps are slow (allocation), then 0.5 s a step.
        clock.now += 3.0 if step <= 2 else 0.5
        progress.step(step, budget.steps, 1)
    progress.epoch(1, {"loss_d": 0.5, "images_per_s": 128.0})
    lines = [line.strip() for line in out.getvalue().splitlines()]
    # The observer (a Prefect task's progress artifact) hears the plan the terminal shows, twice.
    assert [line for line in lines if line.startswith("train plan: ")] == [f"train plan: {p}" for p in heard.plans]
    assert [p.split(";")[0] for p in heard.plans] == [budget.describe()] * 2, lines
    # Warm-up: steps 3..12 (10 steps at 0.5 s; WARMUP_STEPS is 20, WARMUP_SECONDS 5 s reached first).
    assert progress.estimate is not None and progress.estimate.seconds_per_step == pytest.approx(0.5)
    steps_left = budget.steps - 12
    assert progress.estimate.seconds == pytest.approx(0.5 * steps_left + 4 * 64 * Progress.FID_SECONDS_PER_SAMPLE_CPU)
    assert f"estimated {format_duration(progress.estimate.seconds)} left on cpu" in lines[2], lines
    # About 33 min on a CPU: no warning.
    assert not any("warning" in line for line in lines)
    left = (budget.steps - 22) * 16.0 / 22
    assert heard.epochs == [(1, budget.epochs, 22, budget.steps, pytest.approx(left))]
    assert lines[-1].startswith(f"train epoch 1/{budget.epochs}  step 22/{budget.steps}  loss_d 0.5000")
    assert lines[-1].endswith(f"eta {format_duration(left)}"), lines[-1]


def test_a_measured_inception_rate_prices_the_fid_points(monkeypatch) -> None:
    """When the stage measured Inception's seconds per image (a cold reference pass before
    training), the FID points to come are priced with it, not with the CPU default."""
    clock = _Clock()
    monkeypatch.setattr("aigc_pipeline.stages.train.time.perf_counter", clock)
    budget = resolve_budget(family="resgan", size=8, train_images=1437, batch_size=64, epochs=None, kimg="auto")
    progress = Progress(
        budget.epochs,
        stream=io.StringIO(),
        budget=budget,
        device="cpu",
        fid_epochs=(45, 90, 135, 180),
        fid_samples=64,
        fid_seconds_per_sample=0.5,
    )
    progress.start(
        {"resumed_from": 0, "total_steps": budget.steps, "speed": "cpu", "data_placement": "device", "world_size": 1}
    )
    for step in range(1, 23):
        clock.now += 0.5
        progress.step(step, budget.steps, 1)
    assert progress.estimate is not None
    assert progress.estimate.overhead_seconds == pytest.approx(4 * 64 * 0.5)


def test_the_plan_prices_the_evaluation_that_follows_with_the_measured_rate(monkeypatch) -> None:
    """The evaluation's Inception work (its samples, and real images whose features are not cached
    yet) is named in the plan and priced at the measured seconds per image; on a GPU where no pass
    was measured it is named without a time."""
    from aigc_pipeline.evaluation.work import InceptionWork

    work = InceptionWork(samples=300, once=(("for the floor", 300), ("of the train split for the copying check", 4026)))
    assert work.images == 4626
    budget = resolve_budget(family="sngan", size=32, train_images=4026, batch_size=64, epochs=None, kimg="auto")
    for device, rate, priced in (("cpu", 0.08, True), ("cuda", None, False)):
        clock = _Clock()
        monkeypatch.setattr("aigc_pipeline.stages.train.time.perf_counter", clock)
        heard = _Observer()
        progress = Progress(
            budget.epochs,
            stream=io.StringIO(),
            budget=budget,
            device=device,
            fid_seconds_per_sample=rate,
            evaluation=work,
            observer=heard,
        )
        progress.start(
            {
                "resumed_from": 0,
                "total_steps": budget.steps,
                "speed": device,
                "data_placement": "device",
                "world_size": 1,
            }
        )
        for step in range(1, 23):
            clock.now += 0.5
            progress.step(step, budget.steps, 1)
        assert progress.estimate is not None and len(heard.plans) == 2
        expected = (
            "; then its evaluation: Inception features of 300 samples and, once per dataset version, of 4326 "
            "real images (300 for the floor, 4026 of the train split for the copying check)"
        )
        assert expected in heard.plans[1] and expected not in heard.plans[0]
        assert heard.plans[1].endswith(f"copying check), about {format_duration(4626 * 0.08)}") == priced, heard.plans
    # Nothing left to compute once: only the samples.
    assert InceptionWork(samples=300).describe() == "Inception features of 300 samples"
    # An evaluation over an hour on a CPU is warned about, naming what shortens it: here a 50,000-image
    # training split's first copying check.
    big = InceptionWork(samples=300, once=(("of the train split for the copying check", 50000),), copying=50000)
    out = io.StringIO()
    clock = _Clock()
    monkeypatch.setattr("aigc_pipeline.stages.train.time.perf_counter", clock)
    progress = Progress(budget.epochs, stream=out, budget=budget, fid_seconds_per_sample=0.1, evaluation=big)
    progress.start(
        {"resumed_from": 0, "total_steps": budget.steps, "speed": "cpu", "data_placement": "device", "world_size": 1}
    )
    for step in range(1, 23):
        clock.now += 0.05
        progress.step(step, budget.steps, 1)
    warnings = [line.strip() for line in out.getvalue().splitlines() if "warning" in line]
    expected = evaluation_warning(50300 * 0.1, "cpu", images=50300, copying=50000)
    assert expected is not None and warnings == [f"train: warning: {expected}"], out.getvalue()
    assert "about 1 h 23 min on this CPU, 50000 of its 50300 images for the copying check" in expected
    assert "--set evaluate.copy_check=false" in expected
    assert evaluation_warning(50300 * 0.1, "cuda", images=50300, copying=50000) is None
    assert evaluation_warning(4626 * 0.08, "cpu", images=4626, copying=4026) is None
    assert "copy_check" not in (evaluation_warning(4000.0, "cpu", images=40000, copying=0) or "")


def test_a_resumed_training_prices_only_the_fid_points_still_ahead(monkeypatch) -> None:
    """Resumed at epoch 100 of 180, the points of epochs 45 and 90 are made already: two are left."""
    clock = _Clock()
    monkeypatch.setattr("aigc_pipeline.stages.train.time.perf_counter", clock)
    budget = resolve_budget(family="resgan", size=8, train_images=1437, batch_size=64, epochs=None, kimg="auto")
    out = io.StringIO()
    progress = Progress(
        budget.epochs,
        stream=out,
        budget=budget,
        device="cpu",
        fid_epochs=(45, 90, 135, 180),
        fid_samples=64,
        fid_seconds_per_sample=0.5,
    )
    resumed = 100 * budget.steps_per_epoch
    progress.start(
        {
            "resumed_from": resumed,
            "total_steps": budget.steps,
            "speed": "cpu",
            "data_placement": "device",
            "world_size": 1,
        }
    )
    for step in range(resumed + 1, resumed + 23):
        clock.now += 0.5
        progress.step(step, budget.steps, 101)
    assert progress.estimate is not None
    assert progress.estimate.overhead_seconds == pytest.approx(2 * 64 * 0.5)
    assert "2 FID-over-training points)" in out.getvalue()


def test_a_long_cpu_plan_is_warned_about() -> None:
    budget = resolve_budget(family="resgan", size=32, train_images=5000, batch_size=64, epochs=100, kimg="auto")
    out = io.StringIO()
    progress = Progress(budget.epochs, stream=out, budget=budget, device="cpu")
    progress.start(
        {"resumed_from": 0, "total_steps": budget.steps, "speed": "cpu", "data_placement": "device", "world_size": 1}
    )
    progress.warmup = (0, progress.t0 - 10.0)  # as if the first 3 steps had taken 10 s
    progress.step(3, budget.steps, 1)
    assert "train: warning: this training will take about" in out.getvalue()
