"""Trial: the truncation trick (BigGAN, StyleGAN) on the auto recipe's exported models.

Sampling draws latents z ~ N(0, I); truncation scales them towards their mean, z * psi, so the
generator draws from the dense middle of its latent space: fewer malformed samples (precision up),
less variety (recall down). This rescoring keeps each model's weights and scores it at several psi
with the project's evaluate stage (the loaded generator is wrapped so that it sees psi * z, nothing
else changes; psi = 1 reproduces the bench's own figures). With ``STANDING=N`` the generator's
batch-norm statistics are first recomputed from N train-mode batches of 64 truncated latents. It
reads the model folders that a run of `python -m bench datasets` left in
bench/.work/datasets-custom/runs/ (``SEEDS``, ``BUDGETS``: which) and writes to /tmp/trunc/.
Run as it was: `SEEDS=0 BUDGETS=600s .venv/bin/python THIS_FILE 1.0 0.85 0.7`, then the same with
``STANDING=16`` and psi ``1.0 0.8``; the rows are truncation-rescore.json.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

W = Path(__file__).resolve().parents[3] / "bench" / ".work" / "datasets-custom"
os.environ.setdefault("AIGC_CACHE_DIR", str(W / "aigc-cache"))
from aigc_pipeline.config import load_config  # noqa: E402 (after the cache folder is chosen)
from aigc_pipeline.stages import evaluate  # noqa: E402

cfg = load_config(
    W / "project",
    ["train.batch_size=64", "train.latent_dim=64", "train.conditional=false", "train.lr=0.0008", "dataset=mnist"],
)
prepared = W / "data" / "prepared" / "mnist"
out = Path("/tmp/trunc")
psis = [float(p) for p in sys.argv[1:]] or [1.0, 0.9, 0.8, 0.7]


class Truncated(torch.nn.Module):
    def __init__(self, g: torch.nn.Module, psi: float) -> None:
        super().__init__()
        self.g, self.psi, self.latent_shape = g, psi, g.latent_shape

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.g(z * self.psi, labels)


STANDING = int(os.environ.get("STANDING", "0"))  # batches of 64 truncated latents for the BN statistics


def standing(g: torch.nn.Module, latent_dim: int, psi: float, batches: int = 16) -> None:
    """Batch-norm statistics recomputed for latents psi * z (train mode, cumulative average)."""
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    g.train()
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for _ in range(STANDING):
            g(torch.randn(64, latent_dim, generator=gen) * psi)
    g.eval()


_load = evaluate.load_generator
rows = []
for seed in [int(x) for x in os.environ.get("SEEDS", "0,1").split(",")]:
    for budget in os.environ.get("BUDGETS", "300s,600s").split(","):
        src = W / "runs" / f"mnist-sngan-{seed}" / f"model-{budget}"
        before = json.loads((W / "runs" / f"mnist-sngan-{seed}" / f"eval-{budget}" / "metrics.json").read_text())
        for psi in psis:
            dst = out / f"s{seed}-{budget}-psi{psi}"
            shutil.copytree(src, dst / "model", dirs_exist_ok=True)

            def load(folder, device="cpu", psi=psi):
                g, arch = _load(folder, device)
                if STANDING:
                    standing(g, arch.latent_dim, psi)
                return Truncated(g, psi).eval(), arch

            evaluate.load_generator = load
            t = time.time()
            s = evaluate.run(cfg, dst / "model", prepared, dst / "eval", quiet=True)
            r = dict(
                seed=seed,
                budget=budget,
                psi=psi,
                standing=STANDING,
                fid=s.fid,
                ratio=s.fid / s.floor.fid,
                precision=s.precision,
                recall=s.recall,
                bench_ratio=before["fid_ratio"],
                secs=time.time() - t,
            )
            print(json.dumps(r), flush=True)
            rows.append(r)
(out / f"rows-{os.getpid()}.json").write_text(json.dumps(rows, indent=1))
