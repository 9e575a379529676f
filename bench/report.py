"""Result documents: building rows, validating the schema, atomic writes and RESULTS.md.

One JSON document per benchmark in ``bench/results/<name>.json``; RESULTS.md is rendered
from all of them, so a new benchmark only has to write a valid document (see bench/README.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import BenchError

SCHEMA_VERSION = 1
REQUIRED = {
    "schema_version": int,
    "name": str,
    "title": str,
    "command": str,
    "date": str,
    "machine": dict,
    "rows": list,
    "notes": list,
}
ROW_KEYS = {"group", "metric", "value", "unit", "baseline", "baseline_label", "ratio"}

MACHINE_ORDER = ("cpu_model", "cpu_count", "memory_gib", "python", "torch")
MACHINE_LABELS = {
    "cpu_model": "CPU",
    "cpu_count": "CPUs",
    "memory_gib": "memory (GiB)",
    "python": "Python",
    "torch": "torch",
}


def row(
    group: str,
    metric: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_label: str | None = None,
) -> dict[str, Any]:
    """One measured figure; ``ratio`` is ``value / baseline`` when a baseline is given."""
    if (baseline is None) != (baseline_label is None):
        raise BenchError(f"row {metric!r}: give both baseline and baseline_label, or neither")
    ratio = None
    if baseline is not None:
        if not baseline > 0:
            raise BenchError(f"row {metric!r}: baseline {baseline!r} must be > 0 for a ratio")
        ratio = value / baseline
    return {
        "group": group,
        "metric": metric,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_label": baseline_label,
        "ratio": ratio,
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(doc: Any, source: str = "result") -> dict[str, Any]:
    """Check ``doc`` against the schema in bench/README.md; raise :class:`BenchError` naming the problem."""
    if not isinstance(doc, dict):
        raise BenchError(f"{source}: expected a JSON object")
    for key, tp in REQUIRED.items():
        if not isinstance(doc.get(key), tp):
            raise BenchError(f"{source}: '{key}' must be a {tp.__name__}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise BenchError(f"{source}: schema_version {doc['schema_version']} (this renderer reads {SCHEMA_VERSION})")
    if not doc["rows"]:
        raise BenchError(f"{source}: no rows")
    for i, r in enumerate(doc["rows"]):
        where = f"{source}: rows[{i}]"
        if not isinstance(r, dict) or not {"metric", "value", "unit"} <= r.keys():
            raise BenchError(f"{where}: needs metric, value and unit")
        if unknown := r.keys() - ROW_KEYS:
            raise BenchError(f"{where}: unknown keys {sorted(unknown)}")
        if not _finite(r["value"]):
            raise BenchError(f"{where} ({r['metric']}): value {r['value']!r} is not a finite number")
        for key in ("baseline", "ratio"):
            if r.get(key) is not None and not _finite(r[key]):
                raise BenchError(f"{where} ({r['metric']}): {key} {r[key]!r} is not a finite number")
    if not all(isinstance(n, str) for n in doc["notes"]):
        raise BenchError(f"{source}: notes must be strings")
    return doc


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write ``doc`` as JSON so that readers see the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every ``*.json`` in ``results_dir``, validated, ordered by name."""
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}: not valid JSON ({e})") from e
        docs.append(validate(doc, str(path)))
    return sorted(docs, key=lambda d: d["name"])


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _machine_line(machine: dict[str, Any]) -> str:
    parts = [f"{MACHINE_LABELS[k]}: {machine[k]}" for k in MACHINE_ORDER if machine.get(k) is not None]
    parts += [
        f"{k}: {v}"
        for k, v in machine.items()
        if k not in MACHINE_ORDER and isinstance(v, (str, int, float, bool)) and v is not None
    ]
    return "; ".join(parts)


def render_section(doc: dict[str, Any]) -> str:
    """Markdown for one result document: a header, one table per row group, then the notes."""
    lines = [f"## {doc['title']}", ""]
    lines.append(f"- Command: `{doc['command']}`")
    lines.append(f"- Date: {doc['date']}")
    lines.append(f"- Machine: {_machine_line(doc['machine'])}")
    project = doc.get("project")
    if isinstance(project, dict) and project.get("git_commit"):
        dirty = " (working tree had uncommitted changes)" if project.get("dirty") else ""
        lines.append(f"- Project commit: `{project['git_commit'][:12]}`{dirty}")
    profile = doc.get("profile")
    if isinstance(profile, dict) and "name" in profile:
        overrides = profile.get("overrides") or []
        shown = ", ".join(f"`{o}`" for o in overrides) if overrides else "none (params.yaml as committed)"
        lines.append(f"- Params profile: {profile['name']}; overrides: {shown}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in doc["rows"]:
        groups.setdefault(r.get("group") or "", []).append(r)
    for group, rows in groups.items():
        lines.append("")
        if group:
            lines += [f"### {group}", ""]
        lines += ["| Metric | Value | Baseline | Ratio |", "|---|---:|---|---:|"]
        for r in rows:
            unit = r["unit"]
            value = f"{_num(r['value'])} {unit}"
            baseline = ""
            if r.get("baseline") is not None:
                baseline = f"{_num(r['baseline'])} {unit}"
                if r.get("baseline_label"):
                    baseline += f" ({r['baseline_label']})"
            ratio = f"{r['ratio']:.2f}×" if r.get("ratio") is not None else ""
            lines.append(f"| {_cell(r['metric'])} | {value} | {_cell(baseline)} | {ratio} |")
    if doc.get("figures_markdown"):  # optional: tables with pictures, paths relative to RESULTS.md
        lines += ["", doc["figures_markdown"].rstrip()]
    if doc["notes"]:
        lines += ["", "Notes:", ""]
        lines += [f"- {_cell(n)}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def render(docs: Iterable[dict[str, Any]]) -> str:
    """The whole RESULTS.md: a preamble, then one section per result document."""
    docs = list(docs)
    head = [
        "# Benchmark results",
        "",
        "Generated by `make bench` (`python -m bench`) from `bench/results/*.json`; do not edit by hand.",
        "Each section is one benchmark; its schema and how to add one are in `bench/README.md`.",
        "Ratio = value / baseline.",
        "",
        "",
    ]
    if not docs:
        head.append("No results yet.\n")
    return "\n".join(head) + "\n".join(render_section(d) for d in docs)


def publish(doc: dict[str, Any], results_dir: Path, markdown: Path) -> Path:
    """Validate ``doc``, write it as ``results_dir/<name>.json`` and re-render ``markdown`` from all results."""
    validate(doc, doc.get("name", "result"))
    target = results_dir / f"{doc['name']}.json"
    write_json_atomic(target, doc)
    write_text_atomic(markdown, render(load_results(results_dir)))
    return target
