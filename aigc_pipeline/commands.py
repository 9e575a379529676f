"""The commands ``dvc.yaml`` runs (``aigc ingest|augment|train|evaluate|register``): argument
parsing that raises instead of exiting, and thin handlers that call one stage and print a line.

Each stage command is also a plain function (:data:`STAGE_FUNCTIONS`), which the Prefect flows
call directly with the stage table's arguments (:mod:`aigc_pipeline.pipeline`); the ``aigc``
script (:mod:`aigc_pipeline.cli`) adds the commands that drive Prefect and the registry on top
of these. So both front doors share one implementation, and nothing here reaches up into ``flows/``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from aigc_pipeline import env
from aigc_pipeline.errors import AigcError

PathLike = str | Path


class UsageError(AigcError, ValueError):
    """A command line that does not parse (unknown or malformed argument, missing required one).

    ``command`` is the (sub)command it was meant for, e.g. ``aigc train``; ``status`` is the exit
    code :func:`aigc_pipeline.cli.main` returns for it (2, as argparse would; 0 after ``--help`` printed the help).
    """

    def __init__(self, message: str, *, command: str, status: int = 2) -> None:
        super().__init__(message)
        self.command = command
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, except that it raises instead of calling ``sys.exit``: :func:`execute` runs
    inside Prefect tasks, where an exit would take the worker down instead of failing the task."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise UsageError(f"{self.prog}: {message} (usage: {usage})", command=self.prog)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        # Reached after --help / --version printed their text; error() handles the failures.
        if message:
            print(message, file=sys.stderr, end="")
        raise UsageError(
            message.strip() if message else f"{self.prog}: exited with status {status}",
            command=self.prog,
            status=status,
        )


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key for this command, e.g. train.epochs=3 (repeatable)",
    )


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--labels",
        metavar="folders|none|COLUMN",
        help="folder/archive: class from the first sub-folder (folders) or none; manifest: label column "
        "(default: a folder holding only sub-folders is labelled by them, anything else is unlabelled)",
    )
    p.add_argument("--size", type=int, help="output side in pixels, a power of two (default 32)")
    p.add_argument("--channels", type=int, help="1 (grayscale) or 3 (RGB) (default 1)")


def path_arg(args: argparse.Namespace, value: str) -> Path:
    """Paths on the command line are relative to the project root, as in dvc.yaml."""
    p = Path(value)
    return p if p.is_absolute() else Path(args.project) / p


def config_of(args: argparse.Namespace):
    from aigc_pipeline.config import load_config

    return load_config(args.project, args.overrides)


def _cmd_ingest(args: argparse.Namespace) -> Any:
    from aigc_pipeline.errors import ConfigError

    if args.source is not None:
        r = _ingest_source(args)
        _print_ingest(r)
        return r
    for flag, value in (
        ("--labels", args.labels),
        ("--size", args.size),
        ("--channels", args.channels),
        ("--max-rejected", args.max_rejected),
    ):
        if value is not None:
            raise ConfigError(
                f"{flag}: only with `aigc ingest SOURCE`; for a registered dataset use "
                "--set datasets.NAME.KEY=VALUE (or --set ingest.max_rejected_fraction=F)"
            )
    return ingest_stage(args.project, args.out, dataset=args.dataset, overrides=args.overrides, workers=args.workers)


def _print_ingest(r: Any) -> None:
    skipped = f", {r.skipped} non-image files skipped" if r.skipped else ""
    print(
        f"ingest: {r.accepted} images accepted, {r.rejected} rejected, {r.duplicates} duplicates dropped{skipped}; "
        f"splits {r.splits}; -> {r.out}"
    )


def _ingest_source(args: argparse.Namespace) -> Any:
    """``aigc ingest SOURCE --out DIR``: any folder, archive or manifest, params.yaml untouched."""
    from aigc_pipeline.config import PARAMS_FILE, DatasetConfig, IngestConfig
    from aigc_pipeline.data.catalog import source_entry
    from aigc_pipeline.errors import ConfigError
    from aigc_pipeline.stages import ingest

    if args.dataset:
        raise ConfigError("give either SOURCE or --dataset NAME, not both")
    source = path_arg(args, args.source)
    entry = source_entry(
        source, stored_path=str(source.resolve()), labels=args.labels, size=args.size, channels=args.channels
    )
    dcfg = DatasetConfig.from_dict(entry, prefix="--")  # errors name the flag: "--size: must be a power of two"
    # The project's ingest settings when there is one; the defaults for a folder anywhere.
    has_params = (Path(args.project) / PARAMS_FILE).exists()
    icfg = config_of(args).ingest if has_params or args.overrides else IngestConfig()
    max_rejected = icfg.max_rejected_fraction if args.max_rejected is None else args.max_rejected
    if not 0.0 <= max_rejected <= 1.0:
        raise ConfigError(f"--max-rejected: must be in [0, 1], got {max_rejected}")
    return ingest.prepare(
        dcfg,
        path_arg(args, args.out),
        name=source.name,
        eval_fraction=icfg.eval_fraction,
        max_rejected_fraction=max_rejected,
        project_dir=Path(args.project),
        workers=args.workers,
        threshold_name="--max-rejected" if args.max_rejected is not None else "ingest.max_rejected_fraction",
    )


def _cmd_augment(args: argparse.Namespace) -> Any:
    return augment_stage(args.project, args.data, args.out, overrides=args.overrides)


def _cmd_train(args: argparse.Namespace) -> Any:
    return train_stage(
        args.project, args.data, args.out, args.checkpoints, reference=args.reference, overrides=args.overrides
    )


def _cmd_evaluate(args: argparse.Namespace) -> Any:
    return evaluate_stage(args.project, args.model, args.reference, args.out, overrides=args.overrides)


def _cmd_register(args: argparse.Namespace) -> Any:
    return register_stage(args.project, args.model, args.evaluation, args.receipt, overrides=args.overrides)


# The stage commands as functions: the handlers above call them after parsing a command line, and
# the Prefect flows (pipeline.run_stage) call them directly with the stage table's arguments. Each
# runs one stage function and prints the line the terminal and the Prefect log show. Relative
# paths are relative to the project, as in dvc.yaml.


def ingest_stage(
    project: PathLike,
    out: PathLike,
    *,
    dataset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    workers: int | None = None,
) -> Any:
    """``aigc ingest --dataset NAME --out DIR``: a dataset registered in params.yaml."""
    from aigc_pipeline.config import load_config
    from aigc_pipeline.stages import ingest

    root = Path(project)
    r = ingest.run(load_config(root, overrides), root / out, dataset=dataset, project_dir=root, workers=workers)
    _print_ingest(r)
    return r


def augment_stage(
    project: PathLike, data: PathLike, out: PathLike, *, overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """``aigc augment --data DIR --out DIR``."""
    from aigc_pipeline.config import load_config
    from aigc_pipeline.stages import augment

    root = Path(project)
    r = augment.run(load_config(root, overrides), root / data, root / out)
    print(f"augment: {r.originals} training images -> {r.count} with augmented copies; -> {r.out}")
    return r


def train_stage(
    project: PathLike,
    data: PathLike,
    out: PathLike,
    checkpoints: PathLike,
    *,
    reference: PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    observer: Any = None,
) -> Any:
    """``aigc train --data DIR --out DIR --checkpoints DIR [--reference DIR]``; ``observer`` (a
    :class:`~aigc_pipeline.stages.train.TrainingObserver`) sees the plan and each epoch."""
    from aigc_pipeline.config import load_config
    from aigc_pipeline.stages import train

    root = Path(project)
    r = train.run(
        load_config(root, overrides),
        root / data,
        root / out,
        root / checkpoints,
        reference=None if reference is None else root / reference,
        project_dir=root,
        observer=observer,
    )
    resumed = f" (resumed from step {r.resumed_from})" if r.resumed_from else ""
    took = ""
    if math.isfinite(r.seconds):
        from aigc_pipeline.training.budget import format_duration

        took = f" in {format_duration(r.seconds)}"
        if math.isfinite(r.estimated_seconds):
            took += f" (the plan estimated {format_duration(r.estimated_seconds)})"
    print(
        f"train: {r.model} {r.steps} steps{resumed}{took}, {r.images_per_second:.0f} images/s ({r.speed}); -> {r.out}"
    )
    return r


def evaluate_stage(
    project: PathLike,
    model: PathLike,
    reference: PathLike,
    out: PathLike,
    *,
    overrides: list[str] | tuple[str, ...] = (),
) -> Any:
    """``aigc evaluate --model DIR --reference DIR --out DIR``."""
    from aigc_pipeline.config import load_config
    from aigc_pipeline.stages import evaluate

    root = Path(project)
    r = evaluate.run(load_config(root, overrides), root / model, root / reference, root / out, project_dir=root)
    isc = f"; IS unavailable: {r.isc_unavailable}" if r.isc_unavailable else ""
    print(f"evaluate: {evaluate.summary_line(r)}{isc}; {r.seconds:.1f} s -> {r.out}")
    return r


def register_stage(
    project: PathLike,
    model: PathLike,
    evaluation: PathLike,
    receipt: PathLike,
    *,
    overrides: list[str] | tuple[str, ...] = (),
) -> Any:
    """``aigc register --model DIR --evaluation DIR --receipt FILE``."""
    from aigc_pipeline.config import load_config
    from aigc_pipeline.stages import register

    root = Path(project)
    r = register.run(load_config(root, overrides), root / model, root / evaluation, root / receipt, project_dir=root)
    again = " (already registered by an earlier attempt)" if r.reused else ""
    print(f"register: {r.name} v{r.version}{again}: {r.decision} ({r.reason}); run {r.run_id}")
    return r


STAGE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "ingest": ingest_stage,
    "augment": augment_stage,
    "train": train_stage,
    "evaluate": evaluate_stage,
    "register": register_stage,
}


def new_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The ``aigc`` parser with ``--project``, and its (still empty) sub-command action to add commands to."""
    parser = _Parser(
        prog="aigc",
        description="Generative-model pipeline: ingest, augment, "
        "train, evaluate, register; `aigc run` runs them all as a Prefect flow.",
    )
    parser.add_argument("--project", default=".", help="project root holding params.yaml and dvc.yaml (default: .)")
    return parser, parser.add_subparsers(dest="command", required=True)


def add_stage_commands(sub: Any) -> None:
    """Add the five stage commands to ``sub`` (a ``parser.add_subparsers()``)."""
    p = sub.add_parser(
        "ingest", help="validate and prepare a dataset (a registered one, or any folder/archive/manifest)"
    )
    p.add_argument(
        "source",
        nargs="?",
        help="a folder of images, a .zip/.tar archive or a .csv/.parquet manifest "
        "(instead of --dataset; params.yaml is not changed)",
    )
    p.add_argument("--dataset", help="entry of `datasets` in params.yaml (default: `dataset`)")
    p.add_argument("--out", required=True, help="prepared dataset folder to write")
    add_source_options(p)
    p.add_argument(
        "--max-rejected",
        type=float,
        metavar="F",
        help="with SOURCE: fail when more than this share is rejected (default: ingest.max_rejected_fraction)",
    )
    p.add_argument("--workers", type=int, help="decoding processes (default: all CPU cores)")
    add_common(p)
    p.set_defaults(handler=_cmd_ingest)

    p = sub.add_parser("augment", help="seeded offline augmentation of the training split")
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--out", required=True, help="augmented dataset folder to write")
    add_common(p)
    p.set_defaults(handler=_cmd_augment)

    p = sub.add_parser("train", help="train the model named by train.model")
    p.add_argument("--data", required=True, help="(augmented) prepared dataset folder")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints")
    p.add_argument(
        "--reference",
        help="prepared dataset of real images: measure FID over training against it (evaluate.progress_every)",
    )
    add_common(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("evaluate", help="FID (torch-fidelity, real Inception weights) against real data")
    p.add_argument("--model", required=True, help="model folder from `aigc train`")
    p.add_argument("--reference", required=True, help="prepared dataset of real images")
    p.add_argument("--out", required=True, help="folder for metrics.json and samples.png")
    add_common(p)
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("register", help="log to MLflow, register, move the champion alias")
    p.add_argument("--model", required=True, help="model folder from `aigc train`")
    p.add_argument("--evaluation", required=True, help="folder from `aigc evaluate`")
    p.add_argument("--receipt", required=True, help="JSON file recording what was registered")
    add_common(p)
    p.set_defaults(handler=_cmd_register)


def execute(parser: argparse.ArgumentParser, argv: list[str]) -> Any:
    """Parse ``argv`` (without the program name) and run the command; returns its result.

    Raises :class:`aigc_pipeline.errors.AigcError` for user errors, :class:`UsageError` for a
    command line that does not parse; never exits.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse reports these from the top-level parser; name the subcommand they were given to.
        sub_command = getattr(args, "dataset_command", None) or getattr(args, "weights_command", None)
        command = " ".join(["aigc", *(c for c in (args.command, sub_command) if c)])
        raise UsageError(
            f"{command}: unrecognized arguments: {' '.join(extra)} (see `{command} --help`)", command=command
        )
    env.set_defaults(args.project)
    return args.handler(args)
