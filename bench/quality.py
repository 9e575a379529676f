"""The quality benchmark: what each model family draws after a fixed training budget on this
machine, read against the data's own floor.

For every family of the model registry, each with params.yaml's settings plus its entry in
:data:`FAMILY_SETTINGS`, and every training seed: the project's own train stage runs on the
default dataset (ingest + augment as ``make run`` does) until ``budget`` seconds of wall-clock
training have passed (the stage's ``should_stop``: a clean stop with a checkpoint), the project's
own evaluate stage scores that model at the default protocol (FID with its bootstrap, KID,
precision/recall, and the floor: real training images scored the same way), then training
resumes (exactly, from the checkpoint) to the next budget. So the 1, 2 and 4 minute figures come
from one run per seed, as one uninterrupted training would have produced them.

Results: FID / precision / recall, mean and spread over the seeds, with the floor as baseline
(``ratio`` = FID / floor FID); the evaluation's grid of each family at each budget (seed 0) in
``bench/results/quality/``, and a model-zoo table with those pictures in
``bench/results/quality.md`` (the README shows it).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import RESULTS_DIR, BenchError
from bench.report import SCHEMA_VERSION, row, write_text_atomic
from bench.workspace import Phases, fresh_dir, import_from_snapshot, isolate_environment, result_doc

NAME = "quality"
TITLE = "Quality: FID / precision / recall of every family after fixed training budgets, against the data's floor"
COMMAND = "python -m bench quality"
CONTENDED_CORES = 0.25
# Far more epochs than any budget reaches: the budget, not the epoch count, ends training.
UNBOUNDED_EPOCHS = 100_000

# Class-conditional variants measured once (seed 0, the largest budget): does a sample show the
# digit it was asked for? Judged by the evaluation's classifier (trained on the real digits).
CONDITIONAL = ("resgan", "ddpm")

# What each family trains with on top of params.yaml (its recipe's learning rate and betas come
# from `auto`); a family missing here is an error, so a new family gets measured deliberately.
FAMILY_SETTINGS: dict[str, tuple[str, ...]] = {
    "dcgan": (),
    "sngan": (),
    "resgan": (),
    "vae": (),
    "ddpm": ("train.batch_size=128",),
}


@dataclass(frozen=True)
class Sizes:
    """How much the benchmark runs (``--quick`` is a smoke test: its figures prove nothing)."""

    budgets: tuple[float, ...]  # seconds of training at which each family is evaluated
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # on top of params.yaml


FULL = Sizes(budgets=(60.0, 120.0, 240.0), seeds=(0, 1, 2), overrides=())
QUICK = Sizes(budgets=(4.0, 8.0), seeds=(0,), overrides=("evaluate.num_samples=40", "evaluate.bootstrap=10"))


def log(msg: str) -> None:
    print(f"[bench quality] {msg}", file=sys.stderr, flush=True)


def _stopper(budget: float, spent: float) -> tuple[Callable[[int], bool], Callable[[], float]]:
    """``should_stop`` for a training call that may run until ``budget`` seconds of training in
    total, ``spent`` of them before this call; and a function giving the total after the call."""
    start = time.perf_counter()
    return (lambda step: spent + time.perf_counter() - start >= budget), (lambda: spent + time.perf_counter() - start)


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench quality`` (see :mod:`bench.registry`)."""
    sizes = QUICK if ctx.quick else FULL
    work = fresh_dir(ctx.work)
    env_vars = isolate_environment(work)
    project = import_from_snapshot(work / "source")

    from aigc_pipeline.config import load_config
    from aigc_pipeline.data.prepared import read_meta
    from aigc_pipeline.evaluation.results import read_evaluation
    from aigc_pipeline.models.families import MODELS, resolve_hparams
    from aigc_pipeline.stages import augment, evaluate, ingest
    from aigc_pipeline.stages import train as train_stage

    missing = sorted(set(MODELS) - set(FAMILY_SETTINGS))
    if missing:
        raise BenchError(f"no FAMILY_SETTINGS entry for {missing}: say what they train with before measuring them")
    repo_params = Path(__file__).resolve().parents[1]
    overrides = (*ctx.overrides, *sizes.overrides)
    phases = Phases(ctx.wait_idle, CONTENDED_CORES, log)
    base = load_config(repo_params, list(overrides))
    prepared, augmented = work / "data" / "prepared", work / "data" / "augmented"

    def prepare() -> None:
        ingest.run(base, prepared, project_dir=work)
        augment.run(base, prepared, augmented)

    phases("prepare data", prepare)
    size = read_meta(prepared)["size"]  # what the families' `auto` width and EMA decay resolve for
    grids = fresh_dir(work / "grids")
    results: dict[str, dict[float, list[dict[str, float]]]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for family in MODELS:
        results[family] = {b: [] for b in sizes.budgets}
        for seed in sizes.seeds:
            cfg = load_config(
                repo_params,
                [
                    *overrides,
                    f"train.model={family}",
                    f"train.seed={seed}",
                    f"train.epochs={UNBOUNDED_EPOCHS}",
                    *FAMILY_SETTINGS[family],
                ],
            )
            used = train_stage.resolve_auto(cfg.train, family=family, size=size)
            hp = resolve_hparams(used)
            settings[family] = {
                "overrides": list(FAMILY_SETTINGS[family]),
                "lr": hp.lr,
                "betas": [hp.beta1, hp.beta2],
                "batch_size": cfg.train.batch_size,
                "width": used.width,
                "latent_dim": cfg.train.latent_dim,
            }
            out = work / "runs" / f"{family}-{seed}"
            spent = 0.0
            for budget in sizes.budgets:

                def train_then_score() -> dict[str, float]:
                    nonlocal spent
                    stop, total = _stopper(budget, spent)
                    result = train_stage.run(
                        cfg,
                        augmented,
                        out / f"model-{budget:g}s",
                        out / "checkpoints",
                        quiet=True,
                        project_dir=work,
                        should_stop=stop,
                    )
                    spent = total()
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
                        "train_s": spent,
                        "protocol": scored.protocol.id,
                    }

                measured = phases(f"{family} seed {seed} to {budget:g} s", train_then_score)
                results[family][budget].append(measured)
                if seed == sizes.seeds[0]:
                    shutil.copy2(out / f"eval-{budget:g}s" / "samples.png", grids / f"{family}-{budget:g}s.png")

    conditional: dict[str, dict[str, float]] = {}
    budget = sizes.budgets[-1]
    for family in CONDITIONAL:
        cfg = load_config(
            repo_params,
            [
                *overrides,
                f"train.model={family}",
                "train.conditional=true",
                f"train.epochs={UNBOUNDED_EPOCHS}",
                *FAMILY_SETTINGS[family],
            ],
        )
        out = work / "runs" / f"{family}-conditional"

        def conditional_run() -> dict[str, float]:
            stop, _ = _stopper(budget, 0.0)
            result = train_stage.run(
                cfg, augmented, out / "model", out / "checkpoints", quiet=True, project_dir=work, should_stop=stop
            )
            evaluate.run(cfg, out / "model", prepared, out / "eval", quiet=True)
            scored = read_evaluation(out / "eval")
            return {
                "label_accuracy": scored.value("classifier_label_accuracy"),
                "classifier_accuracy": scored.value("classifier_accuracy"),
                "fid": scored.value("fid"),
                "fid_ratio": scored.value("fid_ratio"),
                "steps": result.steps,
            }

        conditional[family] = phases(f"{family} conditional to {budget:g} s", conditional_run)
        shutil.copy2(out / "eval" / "samples.png", grids / f"{family}-conditional-{budget:g}s.png")

    first = results[next(iter(MODELS))][sizes.budgets[0]][0]
    protocol, floor = first["protocol"], {k: first[f"floor_{k}"] for k in ("fid", "precision", "recall")}
    if any(r["protocol"] != protocol for f in results.values() for b in f.values() for r in b):
        raise BenchError("the evaluations were made under different protocols: not comparable")
    rows: list[dict[str, Any]] = []
    for budget in sizes.budgets:
        group = (
            f"After {budget:g} s of training on this CPU (mean ± sd over {len(sizes.seeds)} seed(s); "
            f"baseline: real data, the floor)"
        )
        for family in MODELS:
            runs = results[family][budget]
            steps = statistics.mean(r["steps"] for r in runs)
            for metric, better in (("fid", "lower"), ("precision", "higher"), ("recall", "higher")):
                values = [r[metric] for r in runs]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                rows.append(
                    row(
                        group,
                        f"{family} {metric} ({better} is better; ± {sd:.3g}; {steps:.0f} steps)",
                        statistics.mean(values),
                        metric if metric == "fid" else "share",
                        baseline=floor[metric],
                        baseline_label="real data (floor)",
                    )
                )
    group = (
        f"Class-conditional (train.conditional: true), after {budget:g} s, seed 0: share of samples the digit "
        "classifier assigns to the requested class"
    )
    for family, c in conditional.items():
        rows.append(
            row(
                group,
                f"{family} ({c['steps']} steps; FID {c['fid']:.1f}, {c['fid_ratio']:.2f}x the floor)",
                c["label_accuracy"],
                "share",
                baseline=c["classifier_accuracy"],
                baseline_label="the classifier on real eval digits",
            )
        )
    notes = [
        f"Protocol {protocol}: the evaluate stage as the pipeline runs it (params.yaml's evaluate section"
        f"{', plus ' + ', '.join(sizes.overrides) if sizes.overrides else ''}). The floor: "
        f"{base.evaluate.num_samples} real training images scored the same way against the same reference "
        f"(FID {floor['fid']:.2f}, precision {floor['precision']:.3f}, recall {floor['recall']:.3f}); a ratio of "
        "1.0 is as good as real data.",
        "Budgets are wall-clock seconds of the train stage (model building, resuming and the fixed-noise grids "
        "included), on the machine below; each seed is one training evaluated at every budget.",
        "Families: "
        + "; ".join(
            f"{f}: lr {s['lr']:g}, betas {s['betas'][0]:g}/{s['betas'][1]:g}, batch "
            f"{s['batch_size']}, width {s['width']}" + (f" ({', '.join(s['overrides'])})" if s["overrides"] else "")
            for f, s in settings.items()
        )
        + ".",
        "Sample grids (seed 0, the evaluation's first 64 samples): bench/results/quality/; the table with "
        "pictures: bench/results/quality.md.",
    ]
    contended = phases.contended()
    if contended:
        notes.append(
            "Other processes kept the CPU busy during: "
            + "; ".join(contended)
            + ". Budgets are wall-clock: re-run on a quiet machine for figures to publish."
        )
    if ctx.quick:
        notes.append(
            "--quick profile: a smoke test (seconds of training, one seed, a small sample); its figures prove nothing."
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
        raw={f: {f"{b:g}": runs for b, runs in per.items()} for f, per in results.items()},
        families=settings,
        conditional=conditional,
        phases=phases.record,
        environment=env_vars,
    )
    if ctx.profile == "default":
        publish_zoo(doc, grids, sizes.budgets, RESULTS_DIR)
    return doc


def publish_zoo(doc: dict[str, Any], grids: Path, budgets: tuple[float, ...], results_dir: Path) -> Path:
    """Copy the grids to ``results_dir/quality/`` and write ``results_dir/quality.md``: one row per
    family, one column per budget, each cell the grid above its FID / precision / recall."""
    target = results_dir / "quality"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(grids, target)
    raw = doc["raw"]
    first = next(iter(raw.values()))[f"{budgets[0]:g}"][0]
    head = "| family | " + " | ".join(f"{b / 60:g} min" for b in budgets) + " |"
    lines = [
        f"# Model zoo: {doc['machine'].get('cpu_model', 'this CPU')}, {doc['machine'].get('cpu_count')} cores",
        "",
        f"`{doc['command']}`, {doc['date']}. Each cell: the evaluation's samples after that much training "
        f"(seed 0), then FID / precision / recall, mean over {len(next(iter(raw.values()))[f'{budgets[0]:g}'])} "
        f"seed(s). Real data (the floor) scores FID {first['floor_fid']:.1f}, precision "
        f"{first['floor_precision']:.2f}, recall {first['floor_recall']:.2f} under the same protocol "
        f"(`{first['protocol']}`).",
        "",
        head,
        "|" + " --- |" * (len(budgets) + 1),
    ]
    for family, per in raw.items():
        cells = []
        for b in budgets:
            runs = per[f"{b:g}"]
            fid = statistics.mean(r["fid"] for r in runs)
            cells.append(
                f"![{family} {b:g} s](quality/{family}-{b:g}s.png)<br>FID {fid:.1f} "
                f"({fid / first['floor_fid']:.2f}x) / {statistics.mean(r['precision'] for r in runs):.2f}"
                f" / {statistics.mean(r['recall'] for r in runs):.2f}"
            )
        lines.append(f"| `{family}` | " + " | ".join(cells) + " |")
    if doc.get("conditional"):
        last = f"{budgets[-1]:g}"
        lines += [
            "",
            f"Class-conditional (`train.conditional: true`), {budgets[-1] / 60:g} min, seed 0; samples cycle "
            "through the classes 0-9, and the share is how many of them the digit classifier assigns to the "
            "class they were asked for:",
            "",
            "| family | samples | requested class | real digits |",
            "| --- | --- | ---: | ---: |",
        ]
        for family, c in doc["conditional"].items():
            lines.append(
                f"| `{family}` | ![{family} conditional](quality/{family}-conditional-{last}s.png) | "
                f"{c['label_accuracy']:.2f} | {c['classifier_accuracy']:.2f} |"
            )
    path = results_dir / "quality.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    # The same tables in RESULTS.md (bench/), whose picture paths start one folder up.
    doc["figures_markdown"] = "\n".join(lines[2:]).replace("](quality/", f"]({results_dir.name}/quality/")
    return path
