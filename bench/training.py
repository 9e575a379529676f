"""The training benchmark: our trainer against the classic PyTorch DCGAN example, the stronger
GAN's FID against DCGAN's at the same budget, the speed options on this CPU, checkpoint cost.

Measured in one run, on data prepared by the project's own ingest stage from the default
dataset (scikit-learn's digits):

1. **throughput**: the same DCGAN (nz 100, ngf = ndf = 64, 64x64 RGB, batch 128, Adam 2e-4)
   trained by our trainer (``train.precision``/``channels_last`` on ``auto``, and in plain fp32)
   and by a loop written like https://github.com/pytorch/examples/blob/main/dcgan/main.py:
   ``ImageFolder`` over PNG files (written to bench/.work), ``DataLoader`` with its 2 workers,
   Resize/CenterCrop/ToTensor/Normalize, fp32, separate D passes, ``.item()`` statistics and a
   log line every step. Steady-state images/s after warm-up steps, interleaved rounds, medians.
   On a GPU (when one is present) the same comparison runs on it, recorded with its name.
2. **speed options**: the default model and data (dcgan, digits 32 px, batch 64) with
   fp32 / channels_last / bf16 autocast / both (and, outside ``--quick``, ``torch.compile``):
   what ``auto`` turns on for this CPU is what measured faster here.
3. **quality at equal budget**: ``sngan`` and ``dcgan`` with params.yaml as committed (same
   data, epochs, batch and steps), FID from the project's evaluate stage (real Inception weights,
   torch-fidelity), over several training seeds.
4. **checkpoint cost**: time from the step's end to the checkpoint file being written (flush,
   state capture, safetensors encoding, fsync, rename) against the step time, as a share of
   training time at the default ``train.checkpoint_every``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.report import SCHEMA_VERSION, row
from bench.workspace import Phases, fresh_dir, import_from_snapshot, isolate_environment, result_doc

NAME = "training"
TITLE = "Training: our trainer vs. the classic DCGAN example; sngan vs. dcgan FID; checkpoint cost"
COMMAND = "python -m bench training"
CONTENDED_CORES = 0.25


@dataclass(frozen=True)
class Sizes:
    """How much each phase runs (``--quick`` is a smoke test: its figures prove nothing)."""

    warmup: int  # steps before timing starts
    steps: int  # timed steps per round
    rounds: int  # interleaved rounds of (baseline, ours, ours fp32)
    option_steps: int  # timed steps per speed option
    compile: bool  # also time torch.compile (about a minute of compilation on 2 cores)
    seeds: tuple[int, ...]  # training seeds of the quality comparison
    quality_overrides: tuple[str, ...]  # on top of params.yaml
    checkpoint_steps: int


FULL = Sizes(
    warmup=3,
    steps=15,
    rounds=2,
    option_steps=60,
    compile=True,
    seeds=(0, 1, 2),
    quality_overrides=(),
    checkpoint_steps=40,
)
QUICK = Sizes(
    warmup=1,
    steps=4,
    rounds=1,
    option_steps=10,
    compile=False,
    seeds=(0,),
    quality_overrides=("train.epochs=1", "evaluate.num_samples=60"),
    checkpoint_steps=12,
)

# The classic example's settings.
NZ, NGF, NDF, CLASSIC_BATCH, CLASSIC_SIZE, CLASSIC_WORKERS = 100, 64, 64, 128, 64, 2


def log(msg: str) -> None:
    print(f"[bench training] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The baseline: the classic PyTorch DCGAN example's loop, kept as it is written there.


def classic_nets(nc: int):
    """The example's Generator and Discriminator (nz=100, ngf=ndf=64, 64x64, sigmoid + BCELoss)."""
    from torch import nn

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Sequential(
                nn.ConvTranspose2d(NZ, NGF * 8, 4, 1, 0, bias=False),
                nn.BatchNorm2d(NGF * 8),
                nn.ReLU(True),
                nn.ConvTranspose2d(NGF * 8, NGF * 4, 4, 2, 1, bias=False),
                nn.BatchNorm2d(NGF * 4),
                nn.ReLU(True),
                nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(NGF * 2),
                nn.ReLU(True),
                nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False),
                nn.BatchNorm2d(NGF),
                nn.ReLU(True),
                nn.ConvTranspose2d(NGF, nc, 4, 2, 1, bias=False),
                nn.Tanh(),
            )

        def forward(self, x):
            return self.main(x)

    class Discriminator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Sequential(
                nn.Conv2d(nc, NDF, 4, 2, 1, bias=False),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(NDF * 2),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(NDF * 2, NDF * 4, 4, 2, 1, bias=False),
                nn.BatchNorm2d(NDF * 4),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(NDF * 4, NDF * 8, 4, 2, 1, bias=False),
                nn.BatchNorm2d(NDF * 8),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(NDF * 8, 1, 4, 1, 0, bias=False),
                nn.Sigmoid(),
            )

        def forward(self, x):
            return self.main(x).view(-1, 1).squeeze(1)

    def weights_init(m) -> None:
        name = m.__class__.__name__
        if name.find("Conv") != -1:
            m.weight.data.normal_(0.0, 0.02)
        elif name.find("BatchNorm") != -1:
            m.weight.data.normal_(1.0, 0.02)
            m.bias.data.fill_(0)

    g, d = Generator(), Discriminator()
    g.apply(weights_init)
    d.apply(weights_init)
    return g, d


def classic_loop(image_root: Path, device: str, warmup: int, steps: int, log_file: Path) -> dict[str, float]:
    """Train like the example until ``warmup + steps`` iterations; images/s over the timed ones."""
    import torch
    import torch.nn as nn
    import torch.optim as optim
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    torch.manual_seed(999)
    dataset = dset.ImageFolder(
        root=str(image_root),
        transform=transforms.Compose(
            [
                transforms.Resize(CLASSIC_SIZE),
                transforms.CenterCrop(CLASSIC_SIZE),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        ),
    )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=CLASSIC_BATCH, shuffle=True, num_workers=CLASSIC_WORKERS
    )
    dev = torch.device(device)
    net_g, net_d = classic_nets(3)
    net_g, net_d = net_g.to(dev), net_d.to(dev)
    criterion = nn.BCELoss()
    real_label, fake_label = 1.0, 0.0
    optimizer_d = optim.Adam(net_d.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizer_g = optim.Adam(net_g.parameters(), lr=0.0002, betas=(0.5, 0.999))
    total, done, images, t0 = warmup + steps, 0, 0, 0.0
    with open(log_file, "w") as out:
        epoch = 0
        while done < total:
            for i, data in enumerate(dataloader, 0):
                net_d.zero_grad()
                real_cpu = data[0].to(dev)
                batch_size = real_cpu.size(0)
                label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=dev)
                output = net_d(real_cpu)
                err_d_real = criterion(output, label)
                err_d_real.backward()
                d_x = output.mean().item()
                noise = torch.randn(batch_size, NZ, 1, 1, device=dev)
                fake = net_g(noise)
                label.fill_(fake_label)
                output = net_d(fake.detach())
                err_d_fake = criterion(output, label)
                err_d_fake.backward()
                d_g_z1 = output.mean().item()
                err_d = err_d_real + err_d_fake
                optimizer_d.step()
                net_g.zero_grad()
                label.fill_(real_label)
                output = net_d(fake)
                err_g = criterion(output, label)
                err_g.backward()
                d_g_z2 = output.mean().item()
                optimizer_g.step()
                print(
                    "[%d][%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f"  # noqa: UP031 (as the example prints)
                    % (epoch, i, len(dataloader), err_d.item(), err_g.item(), d_x, d_g_z1, d_g_z2),
                    file=out,
                )
                done += 1
                if done == warmup:
                    t0 = time.perf_counter()  # the .item() calls above synchronised the device
                elif done > warmup:
                    images += batch_size
                if done == total:
                    break
            epoch += 1
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images}


# ---------------------------------------------------------------------------
# Our trainer, timed at the moments its losses are fetched (each fetch synchronises the device).


def ours(images, arch_kw: dict[str, Any], batch: int, warmup: int, steps: int, **speed: Any) -> dict[str, float]:
    import math

    from aigc_pipeline.models.base import Arch, Hparams
    from aigc_pipeline.training.loop import Callbacks, train

    n = len(images)
    per_epoch = n // batch
    fetches: list[tuple[float, int]] = []

    def on_metrics(step: int, _: dict[str, float]) -> None:
        fetches.append((time.perf_counter(), step))

    chunk = 1 if speed.get("device", "cpu") == "cpu" else 5  # fetch every step on the CPU (free there)
    res = train(
        images,
        arch=Arch(**arch_kw),
        hparams=Hparams(2e-4, 0.5, 0.999),
        epochs=math.ceil((warmup + steps) / per_epoch),
        batch_size=batch,
        seed=999,
        checkpoint_dir=None,
        checkpoint_every=10**9,
        log_every=chunk,
        callbacks=Callbacks(on_metrics=on_metrics),
        **speed,
    )
    after = [f for f in fetches if f[1] >= warmup]
    (t_a, s_a) = after[0]
    (t_b, s_b) = next(f for f in after if f[1] >= warmup + steps)
    return {
        "images_per_s": (s_b - s_a) * batch / (t_b - t_a),
        "seconds": t_b - t_a,
        "steps": s_b - s_a,
        "speed": res.speed,
    }


def write_image_folder(images, labels, root: Path) -> None:
    """The prepared uint8 images as PNG files in class folders, what ImageFolder reads."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"class-{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")


# ---------------------------------------------------------------------------


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench training`` (see :mod:`bench.registry`)."""
    sizes = QUICK if ctx.quick else FULL
    work = fresh_dir(ctx.work)
    env_vars = isolate_environment(work)
    project = import_from_snapshot(work / "source")

    import torch

    from aigc_pipeline.config import load_config
    from aigc_pipeline.data.prepared import load_prepared
    from aigc_pipeline.evaluation.results import read_evaluation
    from aigc_pipeline.models.base import Arch, Hparams
    from aigc_pipeline.models.families import resolve_hparams
    from aigc_pipeline.stages import augment, evaluate, ingest
    from aigc_pipeline.stages import train as train_stage
    from aigc_pipeline.training.checkpoint import list_checkpoints
    from aigc_pipeline.training.loop import Callbacks
    from aigc_pipeline.training.loop import train as train_loop

    repo_params = Path(__file__).resolve().parents[1]
    overrides = tuple(ctx.overrides)
    phases = Phases(ctx.wait_idle, CONTENDED_CORES, log)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    raw: dict[str, Any] = {}

    # Data: the default dataset at the classic example's shape (64 px RGB) and as params.yaml has it.
    def prepare() -> tuple[Any, Path, Path]:
        big = load_config(repo_params, [*overrides, "datasets.digits.size=64", "datasets.digits.channels=3"])
        ingest.run(big, work / "data" / "digits64", project_dir=work)
        data64 = load_prepared(work / "data" / "digits64", "train")
        write_image_folder(data64.images, data64.labels, work / "data" / "png64")
        cfg = load_config(repo_params, [*overrides, *sizes.quality_overrides])
        ingest.run(cfg, work / "data" / "prepared", project_dir=work)
        augment.run(cfg, work / "data" / "prepared", work / "data" / "augmented")
        return data64, work / "data" / "prepared", work / "data" / "augmented"

    data64, prepared, augmented = phases("prepare data", prepare)
    arch64 = dict(family="dcgan", size=CLASSIC_SIZE, channels=3, latent_dim=NZ, width=NGF)

    # 1. Throughput against the classic example, on each device present.
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        label = "CPU" if device == "cpu" else f"GPU: {torch.cuda.get_device_name(0)}"
        runs: dict[str, list[dict[str, float]]] = {"classic": [], "auto": [], "fp32": []}
        for r in range(sizes.rounds):
            runs["classic"].append(
                phases(
                    f"{device} classic example, round {r + 1}",
                    lambda: classic_loop(
                        work / "data" / "png64", device, sizes.warmup, sizes.steps, work / f"classic-{device}-{r}.log"
                    ),
                )
            )
            runs["auto"].append(
                phases(
                    f"{device} our trainer (auto), round {r + 1}",
                    lambda: ours(data64.images, arch64, CLASSIC_BATCH, sizes.warmup, sizes.steps, device=device),
                )
            )
            runs["fp32"].append(
                phases(
                    f"{device} our trainer (fp32), round {r + 1}",
                    lambda: ours(
                        data64.images,
                        arch64,
                        CLASSIC_BATCH,
                        sizes.warmup,
                        sizes.steps,
                        device=device,
                        precision="fp32",
                        channels_last=False,
                    ),
                )
            )
        med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in runs.items()}
        group = f"Throughput, {label} (DCGAN 64x64 RGB, batch {CLASSIC_BATCH}, images/s, higher is better)"
        rows.append(
            row(
                group,
                f"our trainer, auto ({runs['auto'][0]['speed']})",
                med["auto"],
                "images/s",
                baseline=med["classic"],
                baseline_label="classic example loop",
            )
        )
        rows.append(
            row(
                group,
                "our trainer, fp32 (data path only)",
                med["fp32"],
                "images/s",
                baseline=med["classic"],
                baseline_label="classic example loop",
            )
        )
        rows.append(row(group, "classic PyTorch DCGAN example loop", med["classic"], "images/s"))
        raw[f"throughput_{device}"] = runs
    notes.append(
        f"Throughput: {sizes.warmup} warm-up + {sizes.steps} timed steps per run, {sizes.rounds} "
        f"interleaved round(s), median; {len(data64.images)} digit images upscaled to 64x64 RGB by the "
        f"ingest stage; the classic loop reads them as PNG files through ImageFolder and a "
        f"{CLASSIC_WORKERS}-worker DataLoader. torch threads: {torch.get_num_threads()}."
    )
    if not torch.cuda.is_available():
        notes.append("No GPU was present: GPU figures are left out.")

    # 2. Speed options on this CPU, default model and data.
    cfg = load_config(repo_params, overrides)
    aug = load_prepared(augmented)

    def recipe(family: str) -> Hparams:
        """The optimiser settings ``family`` trains with here (params.yaml's, ``auto`` resolved for the size)."""
        tcfg = load_config(repo_params, [*overrides, f"train.model={family}"]).train
        return resolve_hparams(train_stage.resolve_auto(tcfg, family=family, size=aug.images.shape[-1]))

    arch_default = dict(
        family="dcgan",
        size=aug.images.shape[-1],
        channels=aug.images.shape[1],
        latent_dim=cfg.train.latent_dim,
        width=train_stage.resolve_auto(cfg.train, family="dcgan", size=aug.images.shape[-1]).width,
    )
    options = [
        ("fp32", dict(precision="fp32", channels_last=False)),
        ("channels_last", dict(precision="fp32", channels_last=True)),
        ("bf16 autocast", dict(precision="bf16", channels_last=False)),
        ("bf16 autocast + channels_last", dict(precision="bf16", channels_last=True)),
    ]
    if sizes.compile:
        options.append(("torch.compile (fp32)", dict(precision="fp32", channels_last=False, compile=True)))
    measured: dict[str, dict[str, float]] = {}
    for name, kw in options:
        t0 = time.perf_counter()
        measured[name] = phases(
            f"cpu option {name}",
            lambda: ours(
                aug.images,
                arch_default,
                cfg.train.batch_size,
                10 if kw.get("compile") else 3,
                sizes.option_steps,
                device="cpu",
                **kw,
            ),
        )
        measured[name]["total_s"] = time.perf_counter() - t0
    group = f"Speed options on this CPU (dcgan, {arch_default['size']} px digits, batch {cfg.train.batch_size})"
    for name, _ in options:
        rows.append(
            row(
                group,
                name,
                measured[name]["images_per_s"],
                "images/s",
                baseline=measured["fp32"]["images_per_s"] if name != "fp32" else None,
                baseline_label="fp32" if name != "fp32" else None,
            )
        )
    from aigc_pipeline.training.speed import resolve_speed

    notes.append(f"`auto` on this machine means: {resolve_speed(torch.device('cpu')).describe()}.")
    if sizes.compile:
        notes.append(
            f"torch.compile: {measured['torch.compile (fp32)']['total_s']:.0f} s for the whole short run "
            f"(compilation included) vs {measured['fp32']['total_s']:.0f} s eager."
        )
    raw["speed_options"] = measured

    # 3. Quality at equal budget.
    fids: dict[str, list[float]] = {"dcgan": [], "sngan": []}
    steps_seen = set()
    for seed in sizes.seeds:
        for family in ("dcgan", "sngan"):

            def one() -> float:
                run_cfg = load_config(
                    repo_params, [*overrides, *sizes.quality_overrides, f"train.model={family}", f"train.seed={seed}"]
                )
                out = work / "quality" / f"{family}-{seed}"
                result = train_stage.run(
                    run_cfg, augmented, out / "model", out / "checkpoints", quiet=True, project_dir=work
                )
                steps_seen.add(result.steps)
                return evaluate.run(run_cfg, out / "model", prepared, out / "eval", quiet=True).fid

            fids[family].append(phases(f"quality {family} seed {seed}", one))
    if len(steps_seen) != 1:
        raise BenchError(f"the two models trained for different numbers of steps: {sorted(steps_seen)}")
    sngan_hp = recipe("sngan")
    protocol = read_evaluation(work / "quality" / f"sngan-{sizes.seeds[0]}" / "eval").protocol_id
    mean = {k: statistics.mean(v) for k, v in fids.items()}
    (steps,) = steps_seen
    group = f"Quality at equal budget ({steps} steps, FID, lower is better)"
    rows.append(
        row(
            group,
            f"sngan FID, mean of {len(sizes.seeds)} seed(s)",
            mean["sngan"],
            "FID",
            baseline=mean["dcgan"],
            baseline_label="dcgan, same steps",
        )
    )
    notes.append(
        f"FID protocol {protocol} (evaluate stage, torch-fidelity with the real Inception weights); "
        f"per seed: dcgan {[round(x, 2) for x in fids['dcgan']]}, sngan {[round(x, 2) for x in fids['sngan']]}."
    )
    plus = f" plus {', '.join(sizes.quality_overrides)}" if sizes.quality_overrides else ""
    notes.append(
        f"Models trained with params.yaml as committed{plus}; "
        f"sngan: lr {sngan_hp.lr}, betas {sngan_hp.beta1}/{sngan_hp.beta2}, EMA {sngan_hp.ema_decay} "
        f"(with warm-up), DiffAugment '{cfg.train.diffaugment}'."
    )
    raw["fid"] = fids

    # 4. Checkpoint cost at the default interval, default config.
    def checkpoint_cost(family: str) -> dict[str, float]:
        marks: dict[str, dict[int, float]] = {"progress": {}, "checkpoint": {}}
        folder = fresh_dir(work / "checkpoint-cost" / family)
        every = 4
        train_loop(
            aug.images,
            arch=Arch(**{**arch_default, "family": family}),
            hparams=recipe(family),
            epochs=max(1, -(-sizes.checkpoint_steps // (len(aug.images) // cfg.train.batch_size))),
            batch_size=cfg.train.batch_size,
            seed=0,
            checkpoint_dir=folder,
            checkpoint_every=every,
            callbacks=Callbacks(
                on_progress=lambda s, t, e: marks["progress"].__setitem__(s, time.perf_counter()),
                on_checkpoint=lambda s, p: marks["checkpoint"].__setitem__(s, time.perf_counter()),
            ),
        )
        ckpt = [marks["checkpoint"][s] - marks["progress"][s] for s in marks["checkpoint"]]
        plain = [
            marks["progress"][s] - marks["progress"][s - 1]
            for s in marks["progress"]
            if s - 1 in marks["progress"] and s - 1 not in marks["checkpoint"]
        ]
        size = list_checkpoints(folder)[-1][1].stat().st_size
        return {"checkpoint_s": statistics.median(ckpt), "step_s": statistics.median(plain), "bytes": size}

    group = f"Checkpoint cost at train.checkpoint_every={cfg.train.checkpoint_every}"
    for family in ("dcgan", "sngan"):
        c = phases(f"checkpoint cost {family}", lambda: checkpoint_cost(family))
        share = 100 * c["checkpoint_s"] / (cfg.train.checkpoint_every * c["step_s"])
        rows.append(row(group, f"{family}: share of training time", share, "%"))
        rows.append(
            row(
                group,
                f"{family}: one checkpoint ({c['bytes'] / 2**20:.1f} MiB)",
                1000 * c["checkpoint_s"],
                "ms",
                baseline=1000 * c["step_s"],
                baseline_label="one training step",
            )
        )
        raw[f"checkpoint_{family}"] = c

    contended = phases.contended()
    if contended:
        notes.append(
            "Other processes kept the CPU busy during: "
            + "; ".join(contended)
            + ". Re-run on a quiet machine for figures to publish."
        )
    if ctx.quick:
        notes.append(
            "--quick profile: a smoke test (few steps, one seed, a 1-epoch training and a "
            "60-sample FID); its figures are not comparable with the full run's."
        )
    return result_doc(
        ctx,
        schema_version=SCHEMA_VERSION,
        name=NAME,
        title=TITLE,
        command=COMMAND,
        rows=rows,
        notes=notes,
        project=project,
        overrides=overrides,
        raw=raw,
        phases=phases.record,
        environment=env_vars,
    )
