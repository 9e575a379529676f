"""``python -m bench``: run the benchmarks, write bench/results/*.json and re-render bench/RESULTS.md.

The default profile is the project's params.yaml unchanged (exactly what ``make run`` runs) and
publishes to bench/results/. ``--quick`` (or any ``--set``) runs a smaller profile as a smoke
test and publishes to bench/.work/<profile>-results/ instead, so it never replaces real figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import RESULTS_DIR, RESULTS_MD, WORK_DIR, BenchError


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test profile (200 images at 16 px, one short epoch, 24 evaluation samples)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="params.yaml override for every project copy (repeatable); makes the profile 'custom'")
    p.add_argument("--dvc-repeats", type=int, default=3, help="repeats of the dvc repro/status/version timings")
    p.add_argument("--no-cli-run", action="store_true", help="skip timing `aigc run` in a subprocess")
    p.add_argument("--wait-idle", type=float, default=60.0, metavar="SECONDS",
                   help="before each phase, wait up to this long for other processes to go quiet "
                   "(default 60; 0 = never wait)")
    p.add_argument("--results-dir", type=Path, help="where to write <name>.json and RESULTS.md "
                   "(default: bench/results + bench/RESULTS.md for the default profile, else bench/.work/)")
    p.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md from the results folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline benchmark and publish it; returns the exit status."""
    args = build_parser().parse_args(argv)
    from bench import pipeline, report

    if args.dvc_repeats < 1:
        print("python -m bench: --dvc-repeats must be >= 1", file=sys.stderr)
        return 2
    overrides = tuple(pipeline.QUICK_OVERRIDES if args.quick else ()) + tuple(args.overrides)
    name = "quick" if args.quick else "custom" if overrides else "default"
    if name == "quick" and args.overrides:
        name = "quick-custom"
    profile = pipeline.Profile(name, overrides)
    if args.results_dir is not None:
        results_dir, markdown = args.results_dir, args.results_dir / "RESULTS.md"
    elif name == "default":
        results_dir, markdown = RESULTS_DIR, RESULTS_MD
    else:
        results_dir = WORK_DIR / f"{name}-results"
        markdown = results_dir / "RESULTS.md"

    try:
        if args.render_only:
            report.write_text_atomic(markdown, report.render(report.load_results(results_dir)))
            print(f"rendered {markdown}")
            return 0
        opts = pipeline.Options(profile=profile, work=WORK_DIR / f"pipeline-{name}",
                                dvc_repeats=args.dvc_repeats, cli_run=not args.no_cli_run,
                                wait_idle=args.wait_idle)
        doc = pipeline.measure(opts)
        target = report.publish(doc, results_dir, markdown)
    except BenchError as e:
        print(f"python -m bench: FAILED, no results written: {e}", file=sys.stderr)
        return 1
    print(report.render_section(doc))
    print(f"wrote {target} and {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
