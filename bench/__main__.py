"""``python -m bench [NAME ...]``: run benchmarks, write bench/results/<name>.json, re-render bench/RESULTS.md.

Benchmarks are registered by name in :data:`bench.registry.BENCHMARKS`; with no NAME all of them
run, one after the other. The default profile is the project's params.yaml unchanged (exactly what
``make run`` runs) and publishes to bench/results/. ``--quick`` (or any ``--set``) runs a smaller
profile as a smoke test and publishes to bench/.work/<profile>-results/ instead, so it never
replaces real figures.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench import RESULTS_DIR, RESULTS_MD, WORK_DIR, BenchError
from bench.registry import BENCHMARKS, Context


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke-test profile (small data, short training, few evaluation samples)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params.yaml override for every project copy (repeatable); makes the profile 'custom'",
    )
    p.add_argument(
        "--dvc-repeats", type=int, default=3, help="pipeline: repeats of the dvc repro/status/version timings"
    )
    p.add_argument("--no-cli-run", action="store_true", help="pipeline: skip timing `aigc run` in a subprocess")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each phase, wait up to this long for other processes to go quiet (default 60; 0 = never wait)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        help="where to write <name>.json and RESULTS.md "
        "(default: bench/results + bench/RESULTS.md for the default profile, else bench/.work/)",
    )
    p.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md from the results folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and publish each; returns the exit status."""
    args = build_parser().parse_args(argv)
    from bench import report

    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"python -m bench: unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    if args.dvc_repeats < 1:
        print("python -m bench: --dvc-repeats must be >= 1", file=sys.stderr)
        return 2
    profile = "quick" if args.quick else "custom" if args.overrides else "default"
    if profile == "quick" and args.overrides:
        profile = "quick-custom"
    if args.results_dir is not None:
        results_dir, markdown = args.results_dir, args.results_dir / "RESULTS.md"
    elif profile == "default":
        results_dir, markdown = RESULTS_DIR, RESULTS_MD
    else:
        results_dir = WORK_DIR / f"{profile}-results"
        markdown = results_dir / "RESULTS.md"
    if args.render_only:
        report.write_text_atomic(markdown, report.render(report.load_results(results_dir)))
        print(f"rendered {markdown}")
        return 0

    failed = []
    for name in args.names or list(BENCHMARKS):
        ctx = Context(
            name=name,
            profile=profile,
            quick=args.quick,
            overrides=tuple(args.overrides),
            work=WORK_DIR / f"{name}-{profile}",
            dvc_repeats=args.dvc_repeats,
            cli_run=not args.no_cli_run,
            wait_idle=args.wait_idle,
        )
        try:
            doc = importlib.import_module(BENCHMARKS[name]).run(ctx)
            target = report.publish(doc, results_dir, markdown)
        except BenchError as e:
            print(f"python -m bench: {name} FAILED, no results written for it: {e}", file=sys.stderr)
            failed.append(name)
            continue
        print(report.render_section(doc))
        print(f"wrote {target} and {markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
