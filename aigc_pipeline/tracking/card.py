"""The model card: a markdown page saying what a registered model is, how it scored, under which
protocol, and where it came from. Logged in the model's artifacts and on its MLflow run, and (in
its short form) the registered model version's description.

Images are linked by a URL MLflow's server answers (``get-artifact?path=...&run_uuid=...``).
MLflow 3.17 renders two kinds of markdown: descriptions (model version, run) through
showdown + sanitize-html, which keeps an ``<img>`` with a relative ``src``, so the version
description links them relative to the UI page; and markdown artifacts through react-markdown,
which shows an image whose URL has no scheme as the text ``[alt](url)``, so the card logged as an
artifact links them by the UI's absolute address (:func:`aigc_pipeline.tracking.store.ui_url`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from aigc_pipeline.compute import describe
from aigc_pipeline.evaluation.metrics import entries
from aigc_pipeline.evaluation.results import Evaluation

CARD_FILE = "model_card.md"
MAX_DESCRIPTION = 5000  # MLflow's model version description column (VARCHAR(5000))


def model_card(
    *,
    name: str,
    meta: Mapping[str, Any],
    evaluation: Evaluation,
    params: Mapping[str, str],
    lineage: Mapping[str, str],
    problems: list[str],
    images: Sequence[tuple[str, str]] = (),
    short: bool = False,
) -> str:
    """Markdown for the model in ``meta`` (model.json), registered as ``name``, scored by ``evaluation``.

    ``images`` are ``(caption, url)`` pairs shown under the introduction. ``short``: the form for
    a model version's description (at most :data:`MAX_DESCRIPTION` characters): only the
    ``train.*`` parameters and the lineage that leads back to the code and data.
    """
    arch = meta.get("arch", {})
    lines = [
        f"# Model card: {name}",
        "",
        f"A `{meta.get('model')}` generator for the `{meta.get('dataset')}` dataset: "
        f"{arch.get('channels')}x{arch.get('size')}x{arch.get('size')} images from a {arch.get('latent_dim')}-d latent"
        + (f", class-conditional over {arch.get('num_classes')} classes" if arch.get("num_classes") else "")
        + ".",
        "",
        f'Use: `mlflow.pyfunc.load_model("models:/{name}@champion").predict(pandas.DataFrame({{"n": [16], '
        '"seed": [0]}))` returns uint8 images `[n, C, H, W]`; add a `label` column for a class '
        "(-1 or missing: classes cycle)"
        + (
            ""
            if not meta.get("generator", {}).get("sampler")
            else ", a `steps` column for the number of sampling steps"
        )
        + f". Or `aigc sample models:/{name}@champion -n 64 --out grid.png`.",
        "",
    ]
    for caption, url in images:
        lines += [f"**{caption}**", "", f"![{caption}]({url})", ""]
    lines += [
        "## Data",
        "",
        f"- training data digest (augmented set): `{meta.get('data_digest')}`",
        f"- trained for {meta.get('steps')} steps; final losses: "
        + ", ".join(f"{k} {v:.4f}" for k, v in (meta.get("final_losses") or {}).items()),
        "- compute: "
        + (describe(meta["compute"]) if meta.get("compute") else "not recorded (a model from before compute.json)"),
    ]
    protocol = evaluation.details.get("protocol") or {}
    pid = protocol.get("id")
    lines += ["", "## Metrics", ""]
    if pid:
        lines += [
            f"Protocol `{pid}`: extractor `{protocol.get('extractor')}` (weights sha256 "
            f"`{protocol.get('weights_sha256')}`), {protocol.get('num_samples')} generated vs "
            f"{protocol.get('num_reference')} real images of the `{protocol.get('reference_split')}` split "
            f"(content digest `{protocol.get('reference_digest')}`), {protocol.get('size')} px. "
            "Numbers under different protocols are not comparable. *Real data* is the data's own floor: "
            "real images outside the reference split scored the same way (what a perfect model would get).",
            "",
            "| metric | this model | real data |",
            "|---|---:|---:|",
        ]
        for entry in entries("card"):
            value = evaluation.value(entry.name)
            if value is not None:
                floor = evaluation.value(entry.floor) if entry.floor else None
                lines.append(f"| {entry.label} | {_fmt(value)} | {_fmt(floor) if floor is not None else ''} |")
        ratio = evaluation.value("fid_ratio")
        if ratio is not None:
            lines += ["", f"FID is **{ratio:.2f}x** the data's floor."]
        boot = evaluation.details.get("bootstrap") or {}
        if boot.get("replicas"):
            lines += [
                "",
                f"FID noise: {boot['replicas']} bootstrap resamplings of the generated features "
                f"(seed {boot.get('seed')}), mean {_fmt(boot.get('fid_mean'))}.",
            ]
    else:
        lines.append("No protocol: this evaluation is not usable.")
    details = evaluation.details
    if details.get("isc_unavailable"):
        lines += ["", f"Inception Score: unavailable — {details['isc_unavailable']}"]
    if details.get("classifier"):
        c = details["classifier"]
        lines += [
            "",
            f"Classifier score: {c.get('what')}; classifier `{c.get('classifier')}` (protocol "
            f"`{c.get('id')}`), accuracy on the real eval split {_fmt(c.get('accuracy'))}.",
        ]
    if problems:
        lines += ["", "**Not promotable**: " + "; ".join(problems)]
    shown = {k: v for k, v in params.items() if k.startswith("train.")} if short else params
    lines += [
        "",
        "## Parameters" + (" (training; all of them in the run's params)" if short else ""),
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(shown.items())]
    kept = {k: v for k, v in lineage.items() if k.startswith(_SHORT_LINEAGE)} if short else lineage
    lines += ["", "## Lineage", "", "| tag | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(kept.items())]
    text = "\n".join(lines) + "\n"
    if short and len(text) > MAX_DESCRIPTION:
        note = "\n\n*(cut to fit MLflow's description limit; the full card is the run's `model_card.md`)*\n"
        text = text[: MAX_DESCRIPTION - len(note)].rsplit("\n", 1)[0] + note
    return text


_SHORT_LINEAGE = ("git.", "mlflow.run_id", "prefect.flow_run_id", "aigc.data_digest", "dvc.lock.train")


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)
