"""What the rescoring trials (standing-stats.py, truncation.py) share: the models a custom run of
`python -m bench datasets` on mnist left in bench/.work/datasets-custom/runs/, batch-norm
statistics recomputed for a generator, and one model scored by the project's evaluate stage.

Imported by those scripts (run as `python bench/results/trials/SCRIPT.py`, so this folder is on
the path); it points the evaluation cache at the bench's before aigc_pipeline is imported.
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

W = Path(__file__).resolve().parents[3] / "bench" / ".work" / "datasets-custom"
os.environ.setdefault("AIGC_CACHE_DIR", str(W / "aigc-cache"))
from aigc_pipeline.config import load_config  # noqa: E402 (after the cache folder is chosen)
from aigc_pipeline.stages import evaluate  # noqa: E402

CFG = load_config(
    W / "project",
    ["train.batch_size=64", "train.latent_dim=64", "train.conditional=false", "train.lr=0.0008", "dataset=mnist"],
)
PREPARED = W / "data" / "prepared" / "mnist"


def models(seeds: list[int], budgets: list[str]) -> Iterator[tuple[int, str, Path, float]]:
    """``(seed, budget, model folder, the bench's FID ratio for it)`` of the run's sngan models."""
    for seed in seeds:
        for budget in budgets:
            run = W / "runs" / f"mnist-sngan-{seed}"
            before = json.loads((run / f"eval-{budget}" / "metrics.json").read_text())
            yield seed, budget, run / f"model-{budget}", before["fid_ratio"]


def standing_statistics(g: torch.nn.Module, latent_dim: int, batches: int, scale: float = 1.0, bs: int = 64) -> None:
    """Replace ``g``'s batch-norm statistics by their average over ``batches`` train-mode batches of
    ``bs`` latents ``scale * z`` drawn with a fixed seed (BigGAN's standing statistics); ``g`` is
    left in eval mode."""
    norms = [m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the passes
    g.train()
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for _ in range(batches):
            g(torch.randn(bs, latent_dim, generator=gen) * scale)
    for m in norms:
        m.momentum = 0.1
    g.eval()


def score(model: Path, out: Path, bench_ratio: float) -> dict[str, Any]:
    """The model in ``model`` scored into ``out``: FID, its ratio to the floor, precision, recall,
    the bench's ratio beside it and the seconds it took."""
    t = time.time()
    s = evaluate.run(CFG, model, PREPARED, out, quiet=True)
    return dict(
        fid=s.fid,
        ratio=s.fid / s.floor.fid,
        precision=s.precision,
        recall=s.recall,
        bench_ratio=bench_ratio,
        secs=time.time() - t,
    )
