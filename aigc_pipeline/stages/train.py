"""Train: fit the configured model family on the augmented dataset; export the generator."""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc_pipeline.config import Config, config_digest
from aigc_pipeline.data.prepared import load_prepared
from aigc_pipeline.errors import ConfigError
from aigc_pipeline.images import save_grid
from aigc_pipeline.io import atomic_dir, atomic_write_text
from aigc_pipeline.models.base import Arch, Hparams
from aigc_pipeline.models.export import save_generator
from aigc_pipeline.training.loop import Callbacks, resolve_device, train


@dataclass(frozen=True)
class TrainStageResult:
    out: Path
    model: str
    steps: int
    resumed_from: int
    images_per_second: float
    final_losses: dict[str, float]


def run(cfg: Config, data: Path, out: Path, checkpoints: Path, *, reference: Path | None = None,
        quiet: bool = False) -> TrainStageResult:
    """Train on the prepared dataset at ``data``; write the model folder ``out``.

    With ``reference`` (a prepared dataset), FID over training is measured every
    ``evaluate.progress_every`` epochs and written to ``fid_progress.csv``.

    Checkpoints go to ``checkpoints/<config hash>/``: a rerun with the same config and data
    resumes, a changed config starts fresh instead of resuming someone else's state.
    """
    tcfg = cfg.train
    prepared = load_prepared(data)
    dcfg = cfg.active_dataset
    num_classes = 0
    if tcfg.conditional:
        if not prepared.classes or (prepared.labels < 0).any():
            raise ConfigError(f"train.conditional: dataset '{cfg.dataset}' at {data} is not labelled "
                              "(every image needs a class); set train.conditional=false")
        num_classes = len(prepared.classes)
    arch = Arch(family=tcfg.model, size=prepared.images.shape[-1], channels=prepared.images.shape[1],
                latent_dim=tcfg.latent_dim, width=tcfg.width, num_classes=num_classes)
    hp = Hparams(lr=tcfg.lr, beta1=tcfg.beta1, beta2=tcfg.beta2, vae_beta=tcfg.vae_beta,
                 ema_decay=tcfg.ema_decay, diffaugment=tcfg.diffaugment)
    run_key = config_digest({"train": dataclasses.asdict(tcfg), "arch": arch.__dict__, "data": prepared.digest})[:16]
    grids: list[tuple[int, np.ndarray]] = []
    log = _EpochPrinter(quiet)
    progress = None
    if reference is not None:
        from aigc_pipeline.evaluation.progress import progress_hook  # torch-fidelity only when asked for

        progress = progress_hook(cfg, reference, arch, device=resolve_device(tcfg.device))

    result = train(
        prepared.images,
        labels=prepared.labels if num_classes else None,
        arch=arch,
        hparams=hp,
        epochs=tcfg.epochs,
        batch_size=tcfg.batch_size,
        seed=tcfg.seed,
        checkpoint_dir=Path(checkpoints) / run_key,
        checkpoint_every=tcfg.checkpoint_every,
        device=tcfg.device,
        sample_grid=tcfg.sample_grid,
        callbacks=Callbacks(on_progress=log.progress, on_epoch_end=lambda e, g, s: (grids.append((e, g)), log.epoch(e, s)),
                            on_epoch_generator=progress),
    )
    final = {k: v for k, v in result.history[-1].items() if k != "step"}
    with atomic_dir(out) as tmp:
        save_generator(
            tmp,
            result.family.generator,
            arch,
            {
                "model": tcfg.model,
                "dataset": cfg.dataset,
                "data_digest": prepared.digest,
                "classes": list(prepared.classes),
                "steps": result.steps,
                "train": dataclasses.asdict(tcfg),
                "source_size": dcfg.size,
                "final_losses": final,
            },
        )
        for epoch, grid in grids:
            save_grid(grid, tmp / "samples" / f"epoch-{epoch:03d}.png")
        if grids:
            save_grid(grids[-1][1], tmp / "samples.png")
        atomic_write_text(tmp / "history.csv", _history_csv(result.history))
        if progress is not None and progress.rows:
            atomic_write_text(tmp / "fid_progress.csv", progress.csv_text())
    return TrainStageResult(out=out, model=tcfg.model, steps=result.steps, resumed_from=result.resumed_from,
                            images_per_second=result.images_per_second, final_losses=final)


def _history_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    if history:
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        for row in history:
            w.writerow({**row, "step": int(row["step"])})
    return buf.getvalue()


class _EpochPrinter:
    """One line per epoch (and a carriage-return counter on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.step = self.total = 0

    def progress(self, step: int, total: int, epoch: int) -> None:
        self.step, self.total = step, total
        if self.tty and not self.quiet and step % 10 == 0:
            print(f"\r  train epoch {epoch} step {step}/{total}", end="", file=sys.stderr, flush=True)

    def epoch(self, epoch: int, stats: dict[str, float]) -> None:
        if self.quiet:
            return
        rate = self.step / max(time.perf_counter() - self.t0, 1e-9)
        losses = "  ".join(f"{k} {v:.4f}" for k, v in stats.items())
        print(f"\r  train epoch {epoch}  step {self.step}/{self.total}  {losses}  ({rate:.1f} steps/s)",
              file=sys.stderr, flush=True)
