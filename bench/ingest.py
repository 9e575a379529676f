"""The ingest benchmark: throughput and peak memory of our ingest against a plain single-process PIL loop.

Data: generated image files (default 10k and 50k; ``--quick`` 1k and 5k) in class folders, a mix
of PNG and JPEG in several colour modes (RGB, L, RGBA, P) and sizes (160-512 px a side, any
aspect), with smooth gradients, shapes and (JPEG) sensor-like noise, so file sizes and decode
costs are those of real pictures rather than of flat or pure-noise images. They are generated
deterministically once into ``bench/.work/ingest-images/<spec digest>/`` and reused by later
runs with the same spec (never committed).

Each measurement runs in its own fresh interpreter (``python -m bench.ingest --measure ...``):

- **ours**: :func:`aigc_pipeline.stages.ingest.prepare` on the folder (``image-folder``, labels from
  folders, 64 px RGB), with the default workers (every core): full validation, normalisation,
  content hashes, duplicate check, shards, manifest, report, card and preview.
- **baseline**: what a plain script does: walk the folder, ``Image.open(...).convert("RGB")``,
  resize the shorter side to 64 px and centre-crop (the same resampling as ours), keep the arrays
  in a list, ``np.stack`` and ``np.save`` them, one process.

Throughput is images per second of the work inside the interpreter (imports excluded, worker start
included). Peak memory is the largest summed RSS of the measured process and all its descendants
(the forkserver and decoding workers), sampled from /proc every 50 ms; the main process's own
``ru_maxrss`` is kept in the raw record. CPU time is that of the measured process and all its
descendants over the same work (imports excluded): unlike wall time, it barely moves when other
processes share the cores. Runs are interleaved (baseline, ours at 10k, then at 50k), each after
a wait for a quiet machine.

Targets (issue #3): ours >= 1.8x the baseline's throughput on 2 cores, and ours' peak memory at
50k within 1.2x of that at 10k.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import REPO, WORK_DIR, BenchError

NAME = "ingest"
TITLE = "Ingest: throughput and peak memory vs. a plain single-process PIL loop"
SIZE = 64  # output side, RGB
COUNTS = (10_000, 50_000)
QUICK_COUNTS = (1_000, 5_000)
CLASSES = 10
SPEC_VERSION = 1  # bump when the generator below changes what it writes
TARGET_SPEEDUP = 1.8
TARGET_MEMORY_GROWTH = 1.2
SAMPLE_SECONDS = 0.05
CONTENDED_CORES = 0.25

# (format, mode, share): the mix of files, in the order the generator cycles through it.
MIX = (("JPEG", "RGB", 45), ("JPEG", "L", 10), ("PNG", "RGB", 25), ("PNG", "RGBA", 10), ("PNG", "P", 10))


# --- data -----------------------------------------------------------------------------------------


def _kind(i: int) -> tuple[str, str]:
    slot = i % 100
    for fmt, mode, share in MIX:
        if slot < share:
            return fmt, mode
        slot -= share
    raise AssertionError("MIX shares must add up to 100")


@functools.cache
def _noise():
    """A fixed 512x512 field of Gaussian noise (sigma 6) that images take random crops of: cheap and deterministic."""
    import numpy as np

    return np.random.default_rng([SPEC_VERSION, 2**31]).normal(0, 6, size=(512, 512, 3)).astype(np.int16)


def _make_image(i: int):
    """Image ``i`` of the data set and its file name: a function of ``i`` only."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([SPEC_VERSION, i])
    fmt, mode = _kind(i)
    w, h = (int(x) for x in rng.integers(160, 513, size=2))
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = (np.linspace(0, 1, w)[None, :] * 0.6 + np.linspace(0, 1, h)[:, None] * 0.4)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = sorted(rng.integers(0, w, size=2))
        y0, y1 = sorted(rng.integers(0, h, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=fill)
    if fmt == "JPEG":  # photographs carry sensor noise; PNGs here are graphics-like, as they usually are
        y, x = (int(v) for v in rng.integers(0, 513 - np.array([h, w])))
        arr = np.asarray(img).astype(np.int16) + _noise()[y : y + h, x : x + w]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        alpha = (np.linspace(80, 255, w)[None, :].repeat(h, 0)).astype(np.uint8)
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "P":
        # A palette image without Pillow's slow quantiser: 64 colours indexed by the picture's own levels.
        index = (np.asarray(img.convert("L")) >> 2).astype(np.uint8)
        img = Image.fromarray(index, "P")
        img.putpalette(rng.integers(0, 256, size=64 * 3).astype(np.uint8).tobytes())
    name = f"c{i % CLASSES}/{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
    return img, fmt, name, int(rng.integers(80, 96))


def _write_range(args: tuple[str, int, int]) -> int:
    root, start, stop = Path(args[0]), args[1], args[2]
    total = 0
    for i in range(start, stop):
        img, fmt, name, quality = _make_image(i)
        path = root / name
        img.save(path, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
        total += path.stat().st_size
    return total


def generate(count: int, log) -> tuple[Path, dict]:
    """The folder of ``count`` generated files (made once, then reused); returns it and its stats."""
    import multiprocessing

    spec = {"version": SPEC_VERSION, "count": count, "classes": CLASSES, "mix": MIX}
    digest = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
    root = WORK_DIR / "ingest-images" / f"{count}-{digest}"
    marker = root / ".complete.json"  # a dotfile: ingest ignores it, the baseline skips it too
    if marker.exists():
        return root, json.loads(marker.read_text())
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    for c in range(CLASSES):
        (tmp / f"c{c}").mkdir(parents=True)
    log(f"generating {count} image files in {root} (once; reused by later runs)")
    started = time.perf_counter()
    step = 500
    ranges = [(str(tmp), s, min(s + step, count)) for s in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        total = sum(pool.imap_unordered(_write_range, ranges))
    stats = {**spec, "bytes": total, "mean_kib": total / count / 1024, "generated_in_s": time.perf_counter() - started}
    (tmp / marker.name).write_text(json.dumps(stats))
    os.replace(tmp, root)
    log(f"generated {count} files, {total / 2**20:.0f} MiB, in {stats['generated_in_s']:.0f} s")
    return root, stats


# --- the two measured programs (run in a fresh interpreter each) -------------------------------------


def measure_ours(images: Path, out: Path, workers: int | None) -> dict:
    """Our ingest, as `aigc ingest` runs it."""
    from aigc_pipeline.config import DatasetConfig
    from aigc_pipeline.data.parallel import default_workers
    from aigc_pipeline.stages.ingest import prepare

    dcfg = DatasetConfig(source="image-folder", path=str(images), labels="folders", size=SIZE, channels=3)
    import pyarrow.parquet  # noqa: F401 - imported on first use by the manifest writer; imports are not timed

    _cpu_seconds()  # its imports, before the clock starts
    cpu, started = _cpu_seconds(), time.perf_counter()
    result = prepare(dcfg, out, name="bench", max_rejected_fraction=0.0, workers=workers)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "images": result.accepted,
        "rejected": result.rejected,
        "duplicates": result.duplicates,
        "workers": workers or default_workers(),
    }


def measure_baseline(images: Path, out: Path) -> dict:
    """A plain single-process PIL loop: decode, convert, resize + centre-crop, collect, save."""
    import numpy as np
    from PIL import Image

    _cpu_seconds()  # its imports, before the clock starts
    cpu, started = _cpu_seconds(), time.perf_counter()
    arrays, labels = [], []
    for root, dirs, files in os.walk(images):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            with Image.open(os.path.join(root, name)) as im:
                img = im.convert("RGB")
            w, h = img.size
            scale = SIZE / min(w, h)
            resample = Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BICUBIC
            img = img.resize((max(SIZE, round(w * scale)), max(SIZE, round(h * scale))), resample, reducing_gap=None)
            left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
            arrays.append(np.asarray(img.crop((left, top, left + SIZE, top + SIZE))).transpose(2, 0, 1))
            labels.append(os.path.basename(root))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", np.stack(arrays))
    np.save(out / "labels.npy", np.array(labels))
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu_seconds() - cpu,
        "images": len(arrays),
        "workers": 1,
    }


def _cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children and its live descendants with theirs (the
    decoding workers are children of a forkserver that outlives them: they count through it)."""
    from bench.workspace import cpu_snapshot  # noqa: PLC0415 - kept out of the spawned workers' imports

    return cpu_snapshot().own


def _child_main(argv: list[str]) -> int:
    import resource

    p = argparse.ArgumentParser(prog="python -m bench.ingest")
    p.add_argument("--measure", choices=("ours", "baseline"), required=True)
    p.add_argument("images", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--workers", type=int)
    args = p.parse_args(argv)
    if args.measure == "ours":
        record = measure_ours(args.images, args.out, args.workers)
    else:
        record = measure_baseline(args.images, args.out)
    record["ru_maxrss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(record))
    return 0


# --- running and sampling a measurement --------------------------------------------------------------


def _tree_rss(root: int) -> tuple[int, int]:
    """Summed RSS in bytes of ``root`` and its live descendants, and how many processes that is."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue  # exited between listing and reading
            parent[int(entry)] = int(text[text.rindex(")") + 2 :].split()[1])
    members = [pid for pid in parent if pid == root or _descends(pid, root, parent)]
    total = 0
    for pid in members:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total, len(members)


def _descends(pid: int, root: int, parent: dict[int, int]) -> bool:
    p = parent.get(pid)
    while p:
        if p == root:
            return True
        p = parent.get(p)
    return False


def run_measurement(kind: str, images: Path, out: Path, *, env: dict[str, str], cwd: Path, log_file: Path) -> dict:
    """Run one measurement in a subprocess, sampling its process tree's RSS; returns its record."""
    from bench.workspace import cpu_snapshot, cpu_span

    argv = [sys.executable, "-m", "bench.ingest", "--measure", kind, str(images), str(out)]
    before = cpu_snapshot()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, n = _tree_rss(proc.pid)
            if rss > peak["rss"]:
                peak["rss"] = rss
            peak["processes"] = max(peak["processes"], n)
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    span = cpu_span(before, cpu_snapshot())
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(output)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-20:])
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}:\n{tail}")
    record = json.loads(output.strip().splitlines()[-1])
    if span["other_cpu_s"] is not None:
        # The decoding workers are children of a forkserver nobody waits for, so their CPU time
        # never reaches this process's children times; the measured program counted them itself
        # (live descendants) in cpu_seconds. Without this the workers would show up as "others".
        machine = span["other_cpu_s"] + span["own_cpu_s"]
        own = max(span["own_cpu_s"], record["cpu_seconds"])
        span.update(
            own_cpu_s=own, other_cpu_s=max(0.0, machine - own), other_cores=max(0.0, machine - own) / span["wall_s"]
        )
    record.update(
        peak_rss_mib=peak["rss"] / 2**20,
        peak_processes=peak["processes"],
        cpu=span,
        images_per_second=record["images"] / record["seconds"],
    )
    return record


def measure(ctx: Any, log) -> dict[str, Any]:
    """Generate the data, run every measurement, return the result document."""
    from bench.report import SCHEMA_VERSION
    from bench.workspace import (
        fresh_dir,
        isolate_environment,
        load_average,
        machine_info,
        snapshot_source,
        utc_now,
        wait_for_quiet,
    )

    counts = QUICK_COUNTS if ctx.quick else COUNTS
    if ctx.overrides:
        raise BenchError("the ingest benchmark takes no --set overrides (it does not use params.yaml)")
    work = fresh_dir(ctx.work)
    isolate_environment(work)
    source = work / "source"
    revision = snapshot_source(source)
    # The snapshot's aigc_pipeline first; bench itself from the repository (the snapshot leaves it out).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(REPO)])}
    data = {n: generate(n, log) for n in counts}
    load_before = load_average()
    records: dict[str, dict] = {}
    waits: dict[str, dict] = {}
    for n in counts:
        for kind in ("baseline", "ours"):
            label = f"{kind}-{n}"
            if ctx.wait_idle > 0:
                waits[label] = wait_for_quiet(ctx.wait_idle, CONTENDED_CORES, log=log)
            log(f"{label}: measuring")
            rec = run_measurement(
                kind, data[n][0], work / "out" / label, env=env, cwd=work, log_file=work / "logs" / f"{label}.log"
            )
            if rec["images"] != n:
                raise BenchError(
                    f"{label}: {rec['images']} images out of {n} generated files "
                    f"(rejected {rec.get('rejected')}, duplicates {rec.get('duplicates')})"
                )
            records[label] = rec
            log(
                f"{label}: {rec['images_per_second']:.0f} images/s, {rec['seconds']:.1f} s, peak RSS "
                f"{rec['peak_rss_mib']:.0f} MiB over {rec['peak_processes']} processes"
                + (f"; others kept {rec['cpu']['other_cores']:.2f} cores busy" if rec["cpu"]["other_cores"] else "")
            )
    load_after = load_average()
    profile = "quick" if ctx.quick else "default"
    return {
        "schema_version": SCHEMA_VERSION,
        "name": NAME if profile == "default" else f"{NAME}-{profile}",
        "title": TITLE if profile == "default" else f"{TITLE} ({profile} profile)",
        "command": "python -m bench ingest" + (" --quick" if ctx.quick else ""),
        "date": utc_now(),
        "machine": machine_info(),
        "project": revision,
        "profile": {"name": profile, "overrides": [], "counts": list(counts), "size": SIZE, "channels": 3},
        "rows": _rows(records, counts),
        "notes": _notes(records, counts, data, load_before, load_after, waits),
        "data": {str(n): stats for n, (_, stats) in data.items()},
        "measurements": records,
    }


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _rows(records: dict[str, dict], counts: tuple[int, int]) -> list[dict]:
    from bench.report import row

    small, large = counts
    rows = []
    g1 = f"Throughput, {SIZE} px RGB output (images/s, higher is better; target >= {TARGET_SPEEDUP}x)"
    for n in counts:
        ours, base = records[f"ours-{n}"], records[f"baseline-{n}"]
        rows.append(
            row(
                g1,
                f"ours, {_k(n)} files ({ours['workers']} worker processes)",
                ours["images_per_second"],
                "images/s",
                baseline=base["images_per_second"],
                baseline_label="plain PIL loop, 1 process",
            )
        )
    g_cpu = "CPU time per 1000 images, all processes (s; lower is better; robust to other load on the machine)"
    for n in counts:
        ours, base = records[f"ours-{n}"], records[f"baseline-{n}"]
        rows.append(
            row(
                g_cpu,
                f"ours, {_k(n)} files",
                ours["cpu_seconds"] / n * 1000,
                "s",
                baseline=base["cpu_seconds"] / n * 1000,
                baseline_label="plain PIL loop",
            )
        )
    g2 = (
        f"Peak memory, RSS of the process tree (MiB; target: ours at {_k(large)} <= "
        f"{TARGET_MEMORY_GROWTH}x at {_k(small)})"
    )
    rows.append(
        row(
            g2,
            f"ours, {_k(large)} files",
            records[f"ours-{large}"]["peak_rss_mib"],
            "MiB",
            baseline=records[f"ours-{small}"]["peak_rss_mib"],
            baseline_label=f"ours, {_k(small)} files",
        )
    )
    rows.append(
        row(
            g2,
            f"plain PIL loop, {_k(large)} files",
            records[f"baseline-{large}"]["peak_rss_mib"],
            "MiB",
            baseline=records[f"baseline-{small}"]["peak_rss_mib"],
            baseline_label=f"plain PIL loop, {_k(small)} files",
        )
    )
    for n in counts:
        rows.append(
            row(
                g2,
                f"ours, {_k(n)} files",
                records[f"ours-{n}"]["peak_rss_mib"],
                "MiB",
                baseline=records[f"baseline-{n}"]["peak_rss_mib"],
                baseline_label="plain PIL loop",
            )
        )
    return rows


def _notes(
    records: dict, counts: tuple[int, int], data: dict, load_before: list, load_after: list, waits: dict
) -> list[str]:
    small, large = counts
    speedups = {
        n: records[f"ours-{n}"]["images_per_second"] / records[f"baseline-{n}"]["images_per_second"] for n in counts
    }
    growth = records[f"ours-{large}"]["peak_rss_mib"] / records[f"ours-{small}"]["peak_rss_mib"]
    met_speed = all(s >= TARGET_SPEEDUP for s in speedups.values())
    stats = data[large][1]
    mix = ", ".join(f"{share}% {fmt} {mode}" for fmt, mode, share in MIX)
    notes = [
        f"Targets: throughput {'met' if met_speed else 'NOT met'} "
        f"({', '.join(f'{_k(n)}: {s:.2f}x' for n, s in speedups.items())}, target >= {TARGET_SPEEDUP}x); "
        f"memory growth {_k(small)} -> {_k(large)} {growth:.2f}x "
        f"({'met' if growth <= TARGET_MEMORY_GROWTH else 'NOT met'}, target <= {TARGET_MEMORY_GROWTH}x).",
        f"Data: generated files in {CLASSES} class folders, {mix}; sides 160-512 px; mean "
        f"{stats['mean_kib']:.0f} KiB per file ({_k(large)} set: {stats['bytes'] / 2**20:.0f} MiB). Every "
        "file is valid and distinct: both programs keep all of them (checked).",
        "Ours does more checking per image than the baseline (header checks before decoding, PNG CRCs "
        "verified, EXIF orientation, alpha composited over white where the baseline drops it, a sha256 per "
        "image for the duplicate check and split, streamed shards with a manifest, report, card and preview) "
        "but resizes more cheaply: JPEGs decode at a reduced DCT scale of at least twice the output size and "
        "shrinking reduces by an integer factor before the bicubic filter (Pillow's thumbnail strategy, "
        "reducing_gap=2); the baseline does a plain full decode and a full bicubic resize.",
        "CPU time (all processes, this measurement's work only) bounds the speed-up: with c_base and c_ours "
        "CPU-seconds per image, 2 cores give at most 2 x c_base / c_ours = "
        + ", ".join(
            f"{_k(n)}: {2 * records[f'baseline-{n}']['cpu_seconds'] / records[f'ours-{n}']['cpu_seconds']:.2f}x"
            for n in counts
        )
        + " here. Starting the workers "
        "(a forkserver importing numpy and Pillow once, then forking the 2 workers) is a fixed cost that "
        "weighs on small sets.",
        "Each measurement is a fresh interpreter; times exclude its imports, include starting the decoding "
        "workers and writing the output. Peak memory is the summed RSS of the measured process and its "
        f"workers, sampled every {SAMPLE_SECONDS * 1000:.0f} ms (shared library pages count once per process).",
        "ru_maxrss of the measured main process alone (MiB): "
        + ", ".join(f"{label} {r['ru_maxrss_self_mib']:.0f}" for label, r in records.items())
        + ".",
        f"Load average (1/5/15 min) before {load_before}, after {load_after} on {os.cpu_count()} CPUs.",
        "CPU used by other processes during each measurement (average cores busy): "
        + ", ".join(
            f"{label} {r['cpu']['other_cores']:.2f}"
            for label, r in records.items()
            if r["cpu"].get("other_cores") is not None
        )
        + f" (of {os.cpu_count()}).",
    ]
    busy = [
        label
        for label, r in records.items()
        if r["cpu"].get("other_cores") is not None and r["cpu"]["other_cores"] >= CONTENDED_CORES
    ]
    if busy:
        notes.append(
            f"Other processes kept >= {CONTENDED_CORES} cores busy during {', '.join(busy)}: the images/s "
            "figures and their ratios are then not trustworthy (the runs competed for the cores, "
            "unequally); the CPU-time rows are hardly affected. Re-run on a quiet machine."
        )
    if waits:
        notes.append(
            "Waited for a quiet machine (< 0.25 cores used by others) before each measurement: "
            + ", ".join(
                f"{label} {w['waited_s']:.0f} s{'' if w['quiet'] else ' (gave up: still busy)'}"
                for label, w in waits.items()
            )
            + "."
        )
    return notes


def run(ctx: Any) -> dict[str, Any]:
    """Entry point for ``python -m bench ingest`` (see :mod:`bench.registry`)."""

    def log(msg: str) -> None:
        print(f"[bench ingest] {msg}", file=sys.stderr, flush=True)

    return measure(ctx, log)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
