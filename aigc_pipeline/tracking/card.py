"""The model card: a markdown page saying what a registered model is, how it scored, under which
protocol, and where it came from. Logged in the model's artifacts and on its MLflow run."""

from __future__ import annotations

import math
from typing import Any, Mapping

CARD_FILE = "model_card.md"

_LABELS = {
    "fid": "FID (lower is better)",
    "fid_std": "FID bootstrap standard deviation (measurement noise)",
    "kid": "KID (lower is better)",
    "kid_std": "KID standard deviation over subsets",
    "precision": "precision (share of samples inside the real manifold)",
    "recall": "recall (share of real images covered by samples)",
    "isc": "Inception Score",
    "isc_std": "Inception Score std over splits",
    "classifier_score": "classifier score (NOT Inception Score; see below)",
    "classifier_label_accuracy": "label accuracy of class-conditional samples",
}


def model_card(*, name: str, meta: Mapping[str, Any], metrics: Mapping[str, Any], params: Mapping[str, str],
               lineage: Mapping[str, str], problems: list[str]) -> str:
    """Markdown for the model in ``meta`` (model.json) scored by ``metrics`` (metrics.json)."""
    arch = meta.get("arch", {})
    lines = [
        f"# Model card: {name}",
        "",
        f"A `{meta.get('model')}` generator for the `{meta.get('dataset')}` dataset: "
        f"{arch.get('channels')}x{arch.get('size')}x{arch.get('size')} images from a {arch.get('latent_dim')}-d latent"
        + (f", class-conditional over {arch.get('num_classes')} classes" if arch.get("num_classes") else "") + ".",
        "",
        "Use: `mlflow.pyfunc.load_model(\"models:/NAME@champion\").predict(pandas.DataFrame({\"n\": [16], "
        "\"seed\": [0]}))` returns uint8 images `[n, C, H, W]`; add a `label` column for a class "
        "(-1 or missing: classes cycle). Or `aigc sample models:/NAME@champion -n 64 --out grid.png`.",
        "",
        "## Data",
        "",
        f"- training data digest (augmented set): `{meta.get('data_digest')}`",
        f"- trained for {meta.get('steps')} steps; final losses: "
        + ", ".join(f"{k} {v:.4f}" for k, v in (meta.get("final_losses") or {}).items()),
    ]
    protocol = metrics.get("protocol") or {}
    pid = protocol.get("id")
    lines += ["", "## Metrics", ""]
    if pid:
        lines += [
            f"Protocol `{pid}`: extractor `{protocol.get('extractor')}` (weights sha256 "
            f"`{protocol.get('weights_sha256')}`), {protocol.get('num_samples')} generated vs "
            f"{protocol.get('num_reference')} real images of the `{protocol.get('reference_split')}` split "
            f"(content digest `{protocol.get('reference_digest')}`), {protocol.get('size')} px. "
            "Numbers under different protocols are not comparable.",
            "",
            "| metric | value |",
            "|---|---:|",
        ]
        for key, label in _LABELS.items():
            value = (metrics.get(key) or {}) if isinstance(metrics.get(key), Mapping) else {}
            for proto, v in value.items():
                lines.append(f"| {label} `[{proto}]` | {_fmt(v)} |")
        boot = metrics.get("bootstrap") or {}
        if boot.get("replicas"):
            lines += ["", f"FID noise: {boot['replicas']} bootstrap resamplings of the generated features "
                      f"(seed {boot.get('seed')}), mean {_fmt(boot.get('fid_mean'))}."]
    else:
        lines.append("No protocol: this evaluation is not usable.")
    if metrics.get("isc_unavailable"):
        lines += ["", f"Inception Score: unavailable — {metrics['isc_unavailable']}"]
    if metrics.get("classifier"):
        c = metrics["classifier"]
        lines += ["", f"Classifier score: {c.get('what')}; classifier `{c.get('classifier')}`, "
                  f"accuracy on the real eval split {_fmt(c.get('accuracy'))}."]
    if problems:
        lines += ["", "**Not promotable**: " + "; ".join(problems)]
    lines += ["", "## Parameters", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(params.items())]
    lines += ["", "## Lineage", "", "| tag | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(lineage.items())]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)
