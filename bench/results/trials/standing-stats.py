"""Trial: the exported generator's batch-norm statistics recomputed with its own (EMA) weights.

The EMA generator runs in eval mode with batch-norm statistics copied from the live generator
(``models/ema.py``: buffers are copied, not averaged). This rescoring keeps each model's weights
and replaces only those statistics by their average over 16 train-mode batches of 64 latents
drawn with a fixed seed (BigGAN's "standing statistics"), then scores both versions with the
project's evaluate stage, so each pair differs in nothing else. It read the model folders that
the trial "the auto recipe (8e-4) again" left in bench/.work/datasets-custom/runs/ (its
`orig` rows reproduce that trial's published FIDs exactly) and wrote to /tmp/bnexp/; the rows it
printed are standing-stats-rescore.json. Run as it was: `.venv/bin/python THIS_FILE`.
"""

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

W = Path(__file__).resolve().parents[3] / "bench" / ".work" / "datasets-custom"
os.environ.setdefault("AIGC_CACHE_DIR", str(W / "aigc-cache"))
from aigc_pipeline.config import load_config  # noqa: E402 (after the cache folder is chosen)
from aigc_pipeline.models.export import WEIGHTS_FILE, load_generator  # noqa: E402
from aigc_pipeline.stages import evaluate  # noqa: E402

cfg = load_config(
    W / "project",
    ["train.batch_size=64", "train.latent_dim=64", "train.conditional=false", "train.lr=0.0008", "dataset=mnist"],
)
prepared = W / "data" / "prepared" / "mnist"
out = Path("/tmp/bnexp")


def standing(src: Path, dst: Path, batches: int, bs: int = 64) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    g, arch = load_generator(src)
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
    g.train()
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for _ in range(batches):
            g(torch.randn(bs, arch.latent_dim, generator=gen))
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(dst / WEIGHTS_FILE))


rows = []
for seed in (0, 1):
    for budget in ("300s", "600s"):
        src = W / "runs" / f"mnist-sngan-{seed}" / f"model-{budget}"
        before = json.loads((W / "runs" / f"mnist-sngan-{seed}" / f"eval-{budget}" / "metrics.json").read_text())
        for variant, batches in (("orig", 0), ("standing16", 16)):
            dst = out / f"s{seed}-{budget}-{variant}"
            if batches:
                standing(src, dst / "model", batches)
            else:
                shutil.copytree(src, dst / "model", dirs_exist_ok=True)
            t = time.time()
            s = evaluate.run(cfg, dst / "model", prepared, dst / "eval", quiet=True)
            r = dict(
                seed=seed,
                budget=budget,
                variant=variant,
                fid=s.fid,
                ratio=s.fid / s.floor.fid,
                precision=s.precision,
                recall=s.recall,
                bench_ratio=before["fid_ratio"],
                secs=time.time() - t,
            )
            print(json.dumps(r), flush=True)
            rows.append(r)
(out / "rows.json").write_text(json.dumps(rows, indent=1))
