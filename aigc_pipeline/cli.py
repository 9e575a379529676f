"""The ``aigc`` command line: the stage commands ``dvc.yaml`` calls (:mod:`aigc_pipeline.commands`,
which the Prefect flow runs in-process too) and, on top of them, the commands that drive the flow,
the deployments, the registry and the tools (``run``, ``deploy``, ``dataset add``, ``status``,
``fid``, ``promote``, ...). Thin wrappers: parse, call one function, print a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aigc_pipeline.commands import (
    UsageError,
    add_common,
    add_source_options,
    add_stage_commands,
    config_of,
    execute,
    new_parser,
    path_arg,
)
from aigc_pipeline.errors import AigcError, Terminated

__all__ = ["UsageError", "build_parser", "main", "run_command"]


def _cmd_dataset_add(args: argparse.Namespace) -> Any:
    from aigc_pipeline.config import DatasetConfig
    from aigc_pipeline.data.catalog import (
        add_dataset,
        check_dvc_hashable,
        check_name,
        quick_scan,
        source_entry,
        stored_path,
    )

    check_name(args.name)
    source = path_arg(args, args.source)
    check_dvc_hashable(source)  # dvc.yaml's ingest@NAME depends on it
    entry = source_entry(
        source,
        stored_path=stored_path(source, Path(args.project)),
        labels=args.labels,
        size=args.size,
        channels=args.channels,
    )
    dcfg = DatasetConfig.from_dict(entry, prefix=f"datasets.{args.name}.")
    scan = quick_scan(dcfg, Path(args.project))  # at least one decodable image, before params.yaml changes
    path = add_dataset(args.project, args.name, entry, force=args.force)
    details = ", ".join(f"{k}: {v}" for k, v in entry.items())
    print(f"dataset {args.name!r} added to {path} ({details}); first decodable image: {scan.first_image}")
    print(f"train on it with `aigc run --dataset {args.name}` (the active `dataset:` is unchanged)")
    from flows.events import DATASET_EVENT, emit_dataset_updated

    event = emit_dataset_updated(args.name, entry)  # only with PREFECT_API_URL set (scale-out set-up)
    if event:
        print(f"Prefect event {DATASET_EVENT} emitted for aigc.dataset.{args.name} (id {event})")
    return entry


def _cmd_run(args: argparse.Namespace) -> Any:
    from aigc_pipeline.config import load_config
    from aigc_pipeline.pipeline import check_dvc_inputs

    overrides = (
        ([f"dataset={args.dataset}"] if args.dataset else [])
        + ([f"train.model={args.model}"] if args.model else [])
        + list(args.overrides)
    )
    cfg = load_config(args.project, overrides)
    check_dvc_inputs(cfg)  # fail fast, before Prefect starts
    from flows.retrain import retrain

    # The flow's parameters say what it trains (the resolved dataset and family) and the --set
    # overrides; its first task writes them to params.yaml, like `dvc exp run -S`, so dvc.lock
    # records exactly what ran and `dvc status` stays truthful afterwards.
    summary = retrain(
        project_dir=str(Path(args.project).resolve()),
        dataset=cfg.dataset,
        model=cfg.train.model,
        overrides=list(args.overrides),
    )
    print(summary["line"])
    return summary


def _cmd_deploy(args: argparse.Namespace) -> Any:
    from flows.deploy import deploy

    r = deploy(
        args.project,
        repository=args.repository,
        branch=args.branch,
        pool_type=args.pool_type,
        crash_after=args.crash_after,
    )
    pools = ", ".join(f"{k} ({v})" for k, v in r.pools.items())
    print(
        f"deployed {', '.join(r.deployments)} to {r.api_url}; work pools {pools}; runs clone {r.repository} "
        f"({r.branch}); flow runs silent for {args.crash_after:g} s are marked Crashed"
    )
    return r


def _cmd_status(args: argparse.Namespace) -> Any:
    from mlflow import MlflowClient

    from aigc_pipeline.tracking.registry import list_models
    from aigc_pipeline.tracking.store import tracking_uri

    uri = tracking_uri(args.project)
    models = list_models(MlflowClient(tracking_uri=uri, registry_uri=uri))
    status = {"tracking_uri": uri, "models": models}
    if args.json:
        print(json.dumps(status, indent=2))
        return status
    print(f"MLflow tracking URI: {uri}")
    if not models:
        print("no registered models yet (run `aigc run`)")
    for m in models:
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "no aliases"
        print(f"\n{m['name']}  latest v{m['latest_version']} ({m['latest_decision'] or 'no decision'})  ({aliases})")
        if "champion" not in m["aliases"]:
            print("  no champion: no version has passed the gate yet")
        if m["champion_history"]:
            print(f"  champion history (oldest first): {', '.join('v' + v for v in m['champion_history'])}")
        for version, info in m["versions"].items():
            print(
                f"  v{version} {info['family'] or '?'} [{', '.join(info['aliases']) or info['decision'] or '-'}]: "
                f"{_scores(info['metrics'])}" + (f"  [{info['protocol']}]" if info["protocol"] else "")
            )
    return status


def _scores(metrics: dict[str, float]) -> str:
    """``FID 25.4 ± 0.6 (floor 19.1 = 1.33x), precision 0.667, recall 0.730``; what is there of it."""
    from aigc_pipeline.evaluation.metrics import copying_text, fid_text

    if "fid" not in metrics:
        return "no evaluation metrics"
    text = fid_text(metrics)
    if "fid_inf" in metrics:
        text += f", FID-inf {metrics['fid_inf']:.2f}" + (
            f" ± {metrics['fid_inf_std']:.2f}" if "fid_inf_std" in metrics else ""
        )
    for k in ("precision", "recall"):
        if k in metrics:
            text += f", {k} {metrics[k]:.3f}" + (
                f" (real {metrics['floor_' + k]:.3f})" if f"floor_{k}" in metrics else ""
            )
    if "copy_share" in metrics:
        text += f"; {copying_text(metrics)}"
    return text


def _cmd_fid(args: argparse.Namespace) -> Any:
    from aigc_pipeline.config import PARAMS_FILE
    from aigc_pipeline.evaluation.folders import compare_folders
    from aigc_pipeline.evaluation.inception import resolve_inception_weights

    has_params = (Path(args.project) / PARAMS_FILE).exists()
    configured = args.weights or (config_of(args).evaluate.inception_weights if has_params else None)
    result = compare_folders(
        path_arg(args, args.dir_a),
        path_arg(args, args.dir_b),
        weights=resolve_inception_weights(configured),
        size=args.size,
        batch_size=args.batch_size,
        device=args.device,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    std = f" ± {result['fid_std']:.3f} (bootstrap sd)" if result["fid_std"] is not None else ""
    inf = (
        f"  FID-inf {result['fid_inf']:.4f} ± {result['fid_inf_std']:.4f}" if result.get("fid_inf") is not None else ""
    )
    print(
        f"FID {result['fid']:.4f}{std}{inf}  KID {result['kid']:.5f} ± {result['kid_std']:.5f}  "
        f"precision {result['precision']:.4f}  recall {result['recall']:.4f}"
    )
    print(
        f"protocol {result['protocol']['id']}: {result['protocol']['num_samples']} images of {args.dir_a} vs "
        f"{result['protocol']['num_reference']} of {args.dir_b}"
    )
    if "isc_unavailable" in result:
        print(f"Inception Score unavailable: {result['isc_unavailable']}")
    return result


def _cmd_copies(args: argparse.Namespace) -> Any:
    from aigc_pipeline.config import PARAMS_FILE
    from aigc_pipeline.evaluation.folders import copies_in_folders
    from aigc_pipeline.evaluation.inception import resolve_inception_weights
    from aigc_pipeline.evaluation.metrics import copying_text

    has_params = (Path(args.project) / PARAMS_FILE).exists()
    configured = args.weights or (config_of(args).evaluate.inception_weights if has_params else None)
    result = copies_in_folders(
        path_arg(args, args.generated),
        path_arg(args, args.train),
        path_arg(args, args.heldout) if args.heldout else None,
        weights=resolve_inception_weights(configured),
        size=args.size,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{copying_text(result)}; calibrated on {result['calibration']} ({result['num_heldout']} images)")
    for pair in result["most_copied"]:
        print(f"  {pair['generated']} ~ {pair['train']} (distance / threshold {pair['distance_over_threshold']:.3f})")
    return result


def _cmd_weights_fetch(args: argparse.Namespace) -> Any:
    from aigc_pipeline.evaluation.inception import fetch_torch_fidelity_weights

    source = path_arg(args, args.file) if args.file else None
    weights = fetch_torch_fidelity_weights(url=args.url, source_file=source, timeout=args.timeout)
    print(
        f"torch-fidelity's Inception weights (sha256 {weights.sha256}, with their classifier layer) are stored "
        f"as {weights.path}; evaluations now use them and compute Inception Score from their logits "
        f"(protocol ids incv3-{weights.sha256[:8]}_...)"
    )
    return weights


def _client(args: argparse.Namespace):
    from mlflow import MlflowClient

    from aigc_pipeline.tracking.store import tracking_uri

    uri = tracking_uri(args.project)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(args: argparse.Namespace) -> tuple[str, str]:
    from aigc_pipeline.config import PARAMS_FILE, RegisterConfig

    rcfg = config_of(args).register if (Path(args.project) / PARAMS_FILE).exists() else RegisterConfig()
    return rcfg.champion_alias, rcfg.challenger_alias


def _cmd_promote(args: argparse.Namespace) -> Any:
    from aigc_pipeline.tracking.registry import promote

    champion, challenger = _aliases(args)
    change = promote(
        _client(args),
        args.name,
        args.version,
        reason=args.reason,
        alias=champion,
        challenger_alias=challenger,
        force=args.force,
    )
    before = f"v{change.previous}" if change.previous else "none"
    print(f"{change.name}: '{change.alias}' {before} -> v{change.version} ({change.reason})")
    return change


def _cmd_rollback(args: argparse.Namespace) -> Any:
    from aigc_pipeline.tracking.registry import restore_previous_champion

    champion, _ = _aliases(args)
    change = restore_previous_champion(_client(args), args.name, reason=args.reason, alias=champion)
    print(f"{change.name}: '{change.alias}' v{change.previous} -> v{change.version} ({change.reason})")
    return change


def _cmd_migrate(args: argparse.Namespace) -> Any:
    from aigc_pipeline.tracking.migrate import migrate

    champion, _ = _aliases(args)
    target = args.to or config_of(args).registered_model
    m = migrate(_client(args), args.name, target, alias=champion)
    copied = ", ".join(f"v{a} -> v{b}" for a, b in m.copied.items()) or "nothing new"
    print(
        f"migrate: {m.source} -> {m.target}: {copied}"
        + (f" (already copied: {', '.join('v' + v for v in m.skipped)})" if m.skipped else "")
    )
    if m.champion_carried:
        print(f"{m.target}: '{champion}' = v{m.champion} (the copy of {m.source}'s champion)")
    else:
        print(
            f"{m.target}: '{champion}' " + (f"stays v{m.champion}" if m.champion else "unset (the old model had none)")
        )
    return m


def _cmd_sample(args: argparse.Namespace) -> Any:
    from aigc_pipeline.tracking.sample import sample_grid

    path, images = sample_grid(
        args.project,
        args.model_uri,
        args.n,
        path_arg(args, args.out),
        seed=args.seed,
        label=args.label,
        steps=args.steps,
    )
    print(
        f"sample: {len(images)} images from {args.model_uri} (seed {args.seed}"
        + (f", label {args.label}" if args.label is not None else "")
        + (f", {args.steps} sampling steps" if args.steps is not None else "")
        + f") -> {path}"
    )
    return path


def build_parser() -> argparse.ArgumentParser:
    parser, sub = new_parser()
    add_stage_commands(sub)

    p = sub.add_parser("dataset", help="manage the datasets registered in params.yaml")
    dsub = p.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("add", help="register a folder, archive or manifest as datasets.NAME in params.yaml")
    p.add_argument("name", help="dataset name (letters, digits, '-', '_')")
    p.add_argument("source", help="a folder of images, a .zip/.tar archive or a .csv/.parquet manifest")
    add_source_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing entry of the same name")
    p.set_defaults(handler=_cmd_dataset_add)

    p = sub.add_parser("run", help="run the whole pipeline as a Prefect flow (embedded server by default)")
    p.add_argument("--dataset", help="train on this registered dataset (written to params.yaml)")
    p.add_argument(
        "--model",
        help="train this model family, e.g. dcgan (train.model, written to params.yaml; "
        "the families: aigc_pipeline/models/families.py)",
    )
    add_common(p)
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("fid", help="FID, KID, precision/recall between two image folders (the pipeline's protocol)")
    p.add_argument("dir_a", help="folder of images, e.g. your samples (the 'generated' side)")
    p.add_argument("dir_b", help="folder of reference images (its statistics are cached by content)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON object (fid, fid_std, fid_inf, kid, precision, recall, protocol)",
    )
    p.add_argument("--size", type=int, help="resize every image to SIZE x SIZE first (shorter side + centre crop)")
    p.add_argument(
        "--weights",
        help="Inception state dict file, or 'download' (default: evaluate.inception_weights, "
        "the file `aigc weights fetch` stored, torch-fidelity's checked hub file, or the offline conversion)",
    )
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception pass (default 50)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamplings for the FID's spread (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    add_common(p)
    p.set_defaults(handler=_cmd_fid)

    p = sub.add_parser(
        "copies",
        help="data copying: are the images of GENERATED closer to images of TRAIN than "
        "unseen real images are? (the evaluation's check, for any folders)",
    )
    p.add_argument("generated", help="folder of images, e.g. your samples")
    p.add_argument("train", help="folder of the training images")
    p.add_argument(
        "--heldout",
        help="folder of real images the model never saw (calibration; default: TRAIN, each "
        "image left out of its own search)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON object (copy_share, copy_ct, exact_copies, floor_*, spaces, most_copied)",
    )
    p.add_argument("--size", type=int, help="resize every image to SIZE x SIZE first (shorter side + centre crop)")
    p.add_argument("--weights", help="Inception state dict file, or 'download' (default: as `aigc fid`)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception pass (default 50)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out halves and k-means")
    add_common(p)
    p.set_defaults(handler=_cmd_copies)

    p = sub.add_parser("weights", help="Inception weights for the evaluation")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser(
        "fetch",
        help="download torch-fidelity's Inception weights (network needed once), check "
        "their published sha256, store them as safetensors: real Inception Score from then on",
    )
    p.add_argument(
        "--file",
        help="use this copy of weights-inception-2015-12-05-6726825d.pth instead of "
        "downloading (its sha256 is checked the same way)",
    )
    p.add_argument(
        "--url",
        help="download from this mirror instead (default: $AIGC_INCEPTION_WEIGHTS_URL, else "
        "torch-fidelity's release URL); the sha256 is still checked",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    p.set_defaults(handler=_cmd_weights_fetch, overrides=[])

    p = sub.add_parser("promote", help="make a registered version the champion by hand (who and why are recorded)")
    p.add_argument("name", help="registered model name, e.g. digits-dcgan")
    p.add_argument("version", help="model version number")
    p.add_argument("--reason", required=True, help="why; recorded on the version and its run with your user name")
    p.add_argument("--force", action="store_true", help="promote even a version the gate rejected")
    p.set_defaults(handler=_cmd_promote, overrides=[])

    p = sub.add_parser("rollback", help="put the previous champion back")
    p.add_argument("name", help="registered model name")
    p.add_argument("--reason", help="why; recorded on both versions")
    p.set_defaults(handler=_cmd_rollback, overrides=[])

    p = sub.add_parser(
        "migrate",
        help="copy a per-family registered model's versions (digits-dcgan) into the "
        "dataset's one registered model (digits)",
    )
    p.add_argument("name", help="the old registered model, e.g. digits-dcgan")
    p.add_argument(
        "--to",
        help="the registered model to copy into (default: the active dataset's, "
        "register.model_name or the dataset's name)",
    )
    p.set_defaults(handler=_cmd_migrate, overrides=[])

    p = sub.add_parser("sample", help="write a grid of images from a registered model")
    p.add_argument("model_uri", help="e.g. models:/digits@champion, models:/digits/3, runs:/RUN/model")
    p.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    p.add_argument("--label", type=int, help="class to generate (class-conditional models)")
    p.add_argument("--steps", type=int, help="sampling steps (diffusion models; default: the model's own)")
    p.set_defaults(handler=_cmd_sample)

    p = sub.add_parser("deploy", help="create the work pools and prefect.yaml's deployments on $PREFECT_API_URL")
    p.add_argument("--repository", help="git URL the workers clone (default: this checkout's origin)")
    p.add_argument("--branch", help="branch the retrain deployment runs (default: the current branch)")
    p.add_argument("--pool-type", default="process", help="type of work pools created when missing (default: process)")
    p.add_argument(
        "--crash-after",
        type=float,
        default=90.0,
        metavar="SECONDS",
        help="mark a flow run Crashed after this long without a heartbeat (default 90; > 30)",
    )
    p.set_defaults(handler=_cmd_deploy)

    p = sub.add_parser("status", help="registered models, aliases and latest metrics")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_status)
    return parser


def run_command(argv: list[str]) -> Any:
    """Parse ``argv`` (without the program name) and run the command; returns its result.

    Raises :class:`aigc_pipeline.errors.AigcError` for user errors, :class:`UsageError` for a
    command line that does not parse; never exits.
    """
    return execute(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aigc`` script: user errors become one line on stderr and exit code 2."""
    try:
        run_command(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        if e.status != 0:
            print(f"aigc: error: {e}", file=sys.stderr)
        return e.status
    except AigcError as e:
        print(f"aigc: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"aigc: {e}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("aigc: interrupted", file=sys.stderr)
        return 130
    return 0
