"""Trial: sngan on the bench's mnist with a linear learning-rate decay to 0 over the run
(lr-decay.patch applied to a checkout), same seed and about the same steps as the published
10-minute point of `python -m bench datasets`, scored by the project's evaluate stage. Reads the
prepared data a default `python -m bench datasets` run left in bench/.work/datasets-default/.

    git apply bench/results/trials/lr-decay.patch
    .venv/bin/python bench/results/trials/lr-decay.py SEED STEPS OUT_FOLDER
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WORK = ROOT / "bench" / ".work" / "datasets-default"


def main(seed: int, target_steps: int, out: Path) -> dict[str, float]:
    """Train to the whole epochs covering ``target_steps``, decaying over all of them; score it."""
    sys.path.insert(0, str(ROOT))
    from bench.datasets import PINNED
    from bench.workspace import isolate_environment

    isolate_environment(WORK)  # the caches and telemetry settings the bench run used
    project = WORK / "project"
    augmented, prepared = WORK / "data" / "augmented" / "mnist", WORK / "data" / "prepared" / "mnist"
    from aigc_pipeline.config import load_config

    batch_size = load_config(project, [*PINNED, "dataset=mnist"]).train.batch_size
    steps_per_epoch = json.loads((augmented / "meta.json").read_text())["count"] // batch_size
    epochs = math.ceil(target_steps / steps_per_epoch)
    os.environ["TRIAL_DECAY_STEPS"] = str(epochs * steps_per_epoch)  # read by the patched loop on import
    from aigc_pipeline.stages import evaluate
    from aigc_pipeline.stages import train as train_stage

    overrides = [*PINNED, "dataset=mnist", "train.model=sngan", f"train.seed={seed}", f"train.epochs={epochs}"]
    cfg = load_config(project, overrides)
    started = time.perf_counter()
    result = train_stage.run(cfg, augmented, out / "model", out / "checkpoints", quiet=True, project_dir=project)
    train_s = time.perf_counter() - started
    scored = evaluate.run(cfg, out / "model", prepared, out / "eval", quiet=True)
    return {
        "seed": seed,
        "steps": result.steps,
        "decay_steps": epochs * steps_per_epoch,
        "train_s": train_s,
        "fid": scored.fid,
        "ratio": scored.fid / scored.floor.fid,
        "precision": scored.precision,
        "recall": scored.recall,
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))))
