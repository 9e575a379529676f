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
import shutil
from pathlib import Path

from rescore import models, score, standing_statistics  # first: it chooses the evaluation cache
from safetensors.torch import save_file

from aigc_pipeline.models.export import WEIGHTS_FILE, load_generator

out = Path("/tmp/bnexp")


def standing(src: Path, dst: Path, batches: int) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    g, arch = load_generator(src)
    standing_statistics(g, arch.latent_dim, batches)
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(dst / WEIGHTS_FILE))


rows = []
for seed, budget, src, bench_ratio in models([0, 1], ["300s", "600s"]):
    for variant, batches in (("orig", 0), ("standing16", 16)):
        dst = out / f"s{seed}-{budget}-{variant}"
        if batches:
            standing(src, dst / "model", batches)
        else:
            shutil.copytree(src, dst / "model", dirs_exist_ok=True)
        r = dict(seed=seed, budget=budget, variant=variant, **score(dst / "model", dst / "eval", bench_ratio))
        print(json.dumps(r), flush=True)
        rows.append(r)
(out / "rows.json").write_text(json.dumps(rows, indent=1))
