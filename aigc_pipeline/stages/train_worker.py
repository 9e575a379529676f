"""One process of a data-parallel training, started by the train stage through torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m aigc_pipeline.stages.train_worker CONFIG.json DATA OUT CHECKPOINTS PROJECT RESULT.json \\
        [--quiet] [--reference DIR] [--no-tracking]

Every rank runs :func:`aigc_pipeline.stages.train.run` with the launching process's config;
rank 0 writes the outputs and RESULT.json (the stage result, or the error it stopped with).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run this rank's share of the training; returns the exit status."""
    p = argparse.ArgumentParser(prog="aigc_pipeline.stages.train_worker")
    for name in ("config", "data", "out", "checkpoints", "project", "result"):
        p.add_argument(name, type=Path)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--reference", type=Path, default=None)  # FID over training, on rank 0
    p.add_argument("--no-tracking", action="store_true")  # the launching call had no project: no MLflow run
    args = p.parse_args(argv)

    import torch.distributed as dist

    from aigc_pipeline import env
    from aigc_pipeline.config import config_from_dict
    from aigc_pipeline.errors import AigcError
    from aigc_pipeline.stages import train
    from aigc_pipeline.training import distributed
    from aigc_pipeline.training.speed import resolve_device

    env.set_defaults(args.project)
    cfg = config_from_dict(json.loads(args.config.read_text()))
    info = distributed.init_from_env(resolve_device(cfg.train.device).type)
    try:
        result = train.run(
            cfg,
            args.data,
            args.out,
            args.checkpoints,
            reference=args.reference,
            quiet=args.quiet,
            project_dir=None if args.no_tracking else args.project,
        )
    except AigcError as e:
        if info.is_main:
            train.report_for_parent(args.result, None, e)
        print(f"aigc train (rank {info.rank}): error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        if info.is_main:
            train.report_for_parent(args.result, None, e)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if info.is_main:
        train.report_for_parent(args.result, result, None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
