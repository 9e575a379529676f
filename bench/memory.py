"""The memory benchmark: peak RSS of ingest, augment and train on a 50,000-image 64 px RGB folder (issue #17, item 5).

Data: two flat folders of distinct 64x64 RGB PNG files (default 50,000 and, as the baseline in
the same run, 5,000; ``--quick`` 2,000 and 500), each image a seeded gradient with random
ellipses and rectangles, so no two are alike (the ingest drops duplicates). They are generated
deterministically once into ``bench/.work/memory-images/<count>-<spec digest>/`` and reused by
later runs with the same generator parameters.

Each folder is registered as a dataset of one fresh project copy exactly as a user does it, through
the project's CLI in subprocesses (``.venv/bin/aigc``, the source snapshot first on PYTHONPATH):

1. ``aigc dataset add NAME FOLDER --size 64 --channels 3``
2. ``aigc ingest --dataset NAME --out data/prepared/NAME`` (dvc.yaml's ``ingest@NAME``)
3. ``aigc augment --data data/prepared/NAME --out data/augmented/NAME`` (``augment@NAME``)
4. ``aigc train`` with dvc.yaml's arguments for that dataset, ``--set dataset=NAME
   train.model=dcgan train.epochs=1 train.batch_size=64 evaluate.progress_every=0``; stopped with
   SIGTERM after a fixed time (``TRAIN_SECONDS``, the same for both sizes) when the epoch has not
   finished by then (an epoch of 40,000 images takes 3 to 60 minutes on 2 shared CPU cores; the
   whole training set is in memory from the first step). The peak is then that of the first
   ``TRAIN_SECONDS`` of the command, and the end of an epoch (sample grid, export) is not covered.

For every command: the wall time, and the peak of the summed RSS of its process and all its
descendants (decoding workers, MLflow's threads live in the process), sampled from /proc every
50 ms with :func:`bench.ingest._tree_rss`. Rows: each stage's peak at the large size against the
same at the small size. The expectation (issue #17): memory grows by about the data's uint8 array
(50,000 x 3 x 64 x 64 bytes = 586 MiB for all of it, of which the training split is ~80 %), not a
multiple of it; the notes give the measured growth against that.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import WORK_DIR, BenchError
from bench.ingest import SAMPLE_SECONDS, _tree_rss

NAME = "memory"
TITLE = "Memory: peak RSS of ingest, augment and train, 50k vs 5k images (64 px RGB)"
SIZE = 64
CHANNELS = 3
COUNTS = (5_000, 50_000)
QUICK_COUNTS = (500, 2_000)
TRAIN_SECONDS = 120.0  # training is stopped (SIGTERM) after this long when its epoch is not done
QUICK_TRAIN_SECONDS = 45.0
SPEC_VERSION = 1  # bump when the generator below changes what it writes
CONTENDED_CORES = 0.25
TRAIN_SETTINGS = ("train.model=dcgan", "train.epochs=1", "train.batch_size=64", "evaluate.progress_every=0")
STAGES = ("dataset add", "ingest", "augment", "train")


def log(msg: str) -> None:
    print(f"[bench memory] {msg}", file=sys.stderr, flush=True)


# --- data -----------------------------------------------------------------------------------------


def _make_image(i: int):
    """Image ``i``: a seeded two-colour gradient with 3-8 random shapes; a function of ``i`` only."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([SPEC_VERSION, 17, i])
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    angle = rng.random() * 2 * np.pi
    x = np.linspace(-1, 1, SIZE)
    t = (np.cos(angle) * x[None, :] + np.sin(angle) * x[:, None]) / 2.0 + 0.5
    img = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(int(v) for v in rng.integers(-8, SIZE + 8, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(-8, SIZE + 8, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 2, y1 + 2), fill=fill)
    return img


def _write_range(args: tuple[str, int, int]) -> int:
    root, start, stop = Path(args[0]), args[1], args[2]
    total = 0
    for i in range(start, stop):
        path = root / f"{i:06d}.png"
        _make_image(i).save(path, format="PNG")
        total += path.stat().st_size
    return total


def generate(count: int) -> tuple[Path, dict]:
    """The folder of ``count`` generated PNG files (made once, then reused); returns it and its stats."""
    import multiprocessing
    import shutil

    spec = {"version": SPEC_VERSION, "count": count, "size": SIZE, "mode": "RGB", "format": "PNG", "shapes": [3, 8]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = WORK_DIR / "memory-images" / f"{count}-{digest}"
    marker = root.with_name(root.name + ".complete.json")  # beside the folder: nothing extra inside it
    if marker.exists() and root.is_dir():
        return root, json.loads(marker.read_text())
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"generating {count} PNG files in {root} (once; reused by later runs)")
    started = time.perf_counter()
    step = 1000
    ranges = [(str(tmp), s, min(s + step, count)) for s in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        total = sum(pool.imap_unordered(_write_range, ranges))
    stats = {**spec, "bytes": total, "mean_kib": total / count / 1024, "generated_in_s": time.perf_counter() - started}
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    marker.write_text(json.dumps(stats))
    log(f"generated {count} files, {total / 2**20:.0f} MiB, in {stats['generated_in_s']:.0f} s")
    return root, stats


# --- a sampled subprocess -----------------------------------------------------------------------------


def run_sampled(
    argv: list[str], cwd: Path, env: dict[str, str], log_file: Path, stop_after: float | None = None
) -> dict[str, Any]:
    """Run ``argv``, sampling its process tree's summed RSS; with ``stop_after``, SIGTERM it after that
    many seconds (then SIGKILL 60 s later). Returns wall time, peak RSS and whether it was stopped."""
    from bench.workspace import cpu_snapshot, cpu_span

    before = cpu_snapshot()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "processes": 0, "at_s": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, n = _tree_rss(proc.pid)
            if rss > peak["rss"]:
                peak.update(rss=rss, at_s=time.perf_counter() - started)
            peak["processes"] = max(peak["processes"], n)
            done.wait(SAMPLE_SECONDS)

    stopped = {"sent_at_s": None}

    def stopper() -> None:
        if not done.wait(stop_after):
            stopped["sent_at_s"] = time.perf_counter() - started
            proc.send_signal(signal.SIGTERM)
            if not done.wait(60):
                proc.kill()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timer = threading.Thread(target=stopper, daemon=True) if stop_after is not None else None
    if timer is not None:
        timer.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if timer is not None:
        timer.join()
    span = cpu_span(before, cpu_snapshot())
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(output)
    if proc.returncode != 0 and stopped["sent_at_s"] is None:
        tail = "\n".join(output.splitlines()[-20:])
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}:\n{tail}")
    return {
        "seconds": seconds,
        "returncode": proc.returncode,
        "peak_rss_mib": peak["rss"] / 2**20,
        "peak_at_s": peak["at_s"],
        "peak_processes": peak["processes"],
        "stopped_at_s": stopped["sent_at_s"],
        "other_cores": span["other_cores"],
        "output_tail": output.splitlines()[-3:],
        "last_progress": next((line.strip() for line in reversed(output.splitlines()) if "step" in line), None),
    }


# --- the benchmark --------------------------------------------------------------------------------------


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _count(folder: Path, split: str = "all") -> int:
    """Images in a prepared (or augmented) dataset folder, from its manifest (the images stay on disk)."""
    import pandas as pd

    manifest = pd.read_parquet(folder / "manifest.parquet", columns=["split"])
    return int((manifest["split"] == split).sum()) if split != "all" else len(manifest)


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench memory`` (see :mod:`bench.registry`)."""
    from bench.report import SCHEMA_VERSION, row
    from bench.workspace import (
        BIN,
        copy_project,
        fresh_dir,
        import_from_snapshot,
        isolate_environment,
        load_average,
        result_doc,
        wait_for_quiet,
    )

    counts = QUICK_COUNTS if ctx.quick else COUNTS
    train_cap = QUICK_TRAIN_SECONDS if ctx.quick else TRAIN_SECONDS
    work = fresh_dir(ctx.work)
    isolate_environment(work)
    revision = import_from_snapshot(work / "source")  # also puts the snapshot on PYTHONPATH for the CLI
    data = {n: generate(n) for n in counts}
    project = copy_project(work / "project", work / "source", ctx.overrides)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(project / ".prefect"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    aigc = str(BIN / "aigc")
    load_before = load_average()
    records: dict[int, dict[str, dict]] = {}
    for n in counts:
        name = f"mem{_k(n)}"
        folder = data[n][0]
        commands = {
            "dataset add": [
                aigc,
                "dataset",
                "add",
                name,
                str(folder),
                "--size",
                str(SIZE),
                "--channels",
                str(CHANNELS),
            ],
            "ingest": [aigc, "ingest", "--dataset", name, "--out", f"data/prepared/{name}"],
            "augment": [aigc, "augment", "--data", f"data/prepared/{name}", "--out", f"data/augmented/{name}"],
            "train": [
                aigc,
                "train",
                "--data",
                f"data/augmented/{name}",
                "--out",
                f"models/{name}-dcgan",
                "--checkpoints",
                f"checkpoints/{name}-dcgan",
                "--reference",
                f"data/prepared/{name}",
                "--set",
                f"dataset={name}",
                *(x for s in TRAIN_SETTINGS for x in ("--set", s)),
            ],
        }
        records[n] = {}
        for stage, argv in commands.items():
            waited = wait_for_quiet(ctx.wait_idle, CONTENDED_CORES, log=log) if ctx.wait_idle > 0 else None
            log(f"{name} {stage}: {' '.join(argv[1:])}")
            rec = run_sampled(
                argv,
                project,
                env,
                work / "logs" / f"{name}-{stage.replace(' ', '-')}.log",
                stop_after=train_cap if stage == "train" else None,
            )
            rec["waited"] = waited
            records[n][stage] = rec
            log(
                f"{name} {stage}: {rec['seconds']:.1f} s, peak RSS {rec['peak_rss_mib']:.0f} MiB over "
                f"{rec['peak_processes']} processes (at {rec['peak_at_s']:.1f} s)"
                + (f"; stopped by SIGTERM at {rec['stopped_at_s']:.0f} s" if rec["stopped_at_s"] else "")
            )
        rec_counts = {
            "files": n,
            "prepared": _count(project / "data" / "prepared" / name),
            "train_split": _count(project / "data" / "prepared" / name, "train"),
            "augmented": _count(project / "data" / "augmented" / name),
        }
        if rec_counts["prepared"] != n:
            raise BenchError(f"{name}: ingest kept {rec_counts['prepared']} of {n} generated images")
        records[n]["counts"] = rec_counts
    load_after = load_average()

    small, large = counts
    mib = 2**20
    array = {n: n * CHANNELS * SIZE * SIZE / mib for n in counts}
    train_array = {n: records[n]["counts"]["augmented"] * CHANNELS * SIZE * SIZE / mib for n in counts}
    rows: list[dict] = []
    g_peak = (
        f"Peak RSS of the process tree (MiB; {_k(large)} vs {_k(small)} images; expected growth about "
        f"the uint8 data, {array[large] - array[small]:.0f} MiB, not a multiple of it)"
    )
    for stage in ("ingest", "augment", "train"):
        rows.append(
            row(
                g_peak,
                f"{stage}, {_k(large)} images",
                records[large][stage]["peak_rss_mib"],
                "MiB",
                baseline=records[small][stage]["peak_rss_mib"],
                baseline_label=f"{stage}, {_k(small)} images",
            )
        )
    g_growth = "Growth of the peak against the data's uint8 array (MiB; measured in this run)"

    def growth_of(stage: str) -> tuple[float, float]:
        """(peak at large minus at small, the uint8 array's growth that stage holds)."""
        grown = records[large][stage]["peak_rss_mib"] - records[small][stage]["peak_rss_mib"]
        held = train_array if stage == "train" else array
        return grown, held[large] - held[small]

    for stage in ("ingest", "augment", "train"):
        growth, expected = growth_of(stage)
        rows.append(
            row(
                g_growth,
                f"{stage}: peak at {_k(large)} minus peak at {_k(small)}",
                growth,
                "MiB",
                baseline=expected,
                baseline_label=(
                    "uint8 array growth, all images" if stage != "train" else "uint8 array growth, training set"
                ),
            )
        )
    g_time = "Wall time of the command (s; train: stopped at the cap when not done)"
    for stage in STAGES:
        rows.append(
            row(
                g_time,
                f"{stage}, {_k(large)} images",
                records[large][stage]["seconds"],
                "s",
                baseline=records[small][stage]["seconds"],
                baseline_label=f"{stage}, {_k(small)} images",
            )
        )

    notes = [
        f"Data: {_k(small)} and {_k(large)} generated 64x64 RGB PNG files (seeded gradients with 3-8 random "
        f"shapes, all distinct: ingest kept every one, checked); {data[large][1]['mean_kib']:.1f} KiB per file. "
        f"uint8 arrays: all images {array[small]:.0f} / {array[large]:.0f} MiB ({large} x 3 x 64 x 64 = "
        f"{large * 3 * 64 * 64:,} bytes); training split (what augment writes and train loads, augment.copies "
        f"as in params.yaml) {records[small]['counts']['augmented']} / {records[large]['counts']['augmented']} "
        f"images = {train_array[small]:.0f} / {train_array[large]:.0f} MiB; a float32 copy would be 4x that.",
        "Growth per stage (peak at large minus at small) vs the uint8 array growth: "
        + "; ".join(
            f"{stage} {records[large][stage]['peak_rss_mib'] - records[small][stage]['peak_rss_mib']:.0f} MiB "
            f"({growth_of(stage)[0] / growth_of(stage)[1]:.2f}x "
            f"the array growth)"
            for stage in ("ingest", "augment", "train")
        )
        + ". Target: at most about 1x (plus augmented copies), not a multiple.",
        "Each command is the project's CLI (.venv/bin/aigc) in a subprocess, in one fresh project copy; peak RSS "
        f"is the largest summed RSS of the process and all its descendants, sampled every {SAMPLE_SECONDS * 1000:.0f} "
        "ms from /proc (shared pages count once per process).",
        f"train: dvc.yaml's command with --set dataset=NAME {' '.join(TRAIN_SETTINGS)}. FID over training is off "
        "(evaluate.progress_every=0): with it the hook would also hold the reference split in memory (20% of the "
        "images) and run Inception at the end of the epoch, which the small set reaches and the large one does not.",
        f"train is stopped with SIGTERM after {train_cap:.0f} s when its one epoch is not done by then: "
        + "; ".join(
            f"{_k(n)}: "
            + (
                f"stopped at {records[n]['train']['stopped_at_s']:.0f} s"
                if records[n]["train"]["stopped_at_s"]
                else "finished"
            )
            + f", peak reached at {records[n]['train']['peak_at_s']:.0f} s"
            for n in counts
        )
        + ". The whole training set is loaded before the first step, so the peak is that of a full epoch's "
        "steady state once steps run; the last progress line before the stop: "
        + " | ".join(
            f"{_k(n)}: {(records[n]['train']['last_progress'] or 'none (still starting)')[:160]}" for n in counts
        )
        + ". The end of an epoch (sample grid, model export) is not covered when the cap stops it.",
        f"Load average (1/5/15 min) before {load_before}, after {load_after} on {os.cpu_count()} CPUs. Other "
        "processes' CPU use per command (average cores): "
        + ", ".join(
            f"{_k(n)} {stage} {records[n][stage]['other_cores']:.2f}"
            for n in counts
            for stage in STAGES
            if records[n][stage]["other_cores"] is not None
        )
        + " (memory figures hardly depend on it; times do).",
    ]
    return result_doc(
        ctx,
        schema_version=SCHEMA_VERSION,
        name=NAME,
        title=TITLE,
        command="python -m bench memory",
        rows=rows,
        notes=notes,
        project=revision,
        overrides=ctx.overrides,
        data={str(n): stats for n, (_, stats) in data.items()},
        measurements={str(n): records[n] for n in counts},
    )
