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
from pathlib import Path

import torch
from rescore import evaluate, models, score, standing_statistics  # first: it chooses the evaluation cache

out = Path("/tmp/trunc")
psis = [float(p) for p in sys.argv[1:]] or [1.0, 0.9, 0.8, 0.7]
STANDING = int(os.environ.get("STANDING", "0"))  # batches of 64 truncated latents for the BN statistics


class Truncated(torch.nn.Module):
    def __init__(self, g: torch.nn.Module, psi: float) -> None:
        super().__init__()
        self.g, self.psi, self.latent_shape = g, psi, g.latent_shape

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.g(z * self.psi, labels)


_load = evaluate.load_generator
rows = []
seeds = [int(x) for x in os.environ.get("SEEDS", "0,1").split(",")]
for seed, budget, src, bench_ratio in models(seeds, os.environ.get("BUDGETS", "300s,600s").split(",")):
    for psi in psis:
        dst = out / f"s{seed}-{budget}-psi{psi}"
        shutil.copytree(src, dst / "model", dirs_exist_ok=True)

        def load(folder, device="cpu", psi=psi):
            g, arch = _load(folder, device)
            if STANDING:
                standing_statistics(g, arch.latent_dim, STANDING, scale=psi)
            return Truncated(g, psi).eval(), arch

        evaluate.load_generator = load
        r = dict(
            seed=seed, budget=budget, psi=psi, standing=STANDING, **score(dst / "model", dst / "eval", bench_ratio)
        )
        print(json.dumps(r), flush=True)
        rows.append(r)
(out / f"rows-{os.getpid()}.json").write_text(json.dumps(rows, indent=1))
