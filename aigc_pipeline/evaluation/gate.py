"""The noise-aware promotion gate: numbers in, a decision and its reasons out (no MLflow here).

A candidate becomes ``champion`` only if its evaluation is complete and finite, it passes the
absolute quality bar (its FID at most ``max_fid_ratio`` times the data's own floor under the same
protocol, optional precision/recall minimums), and its FID beats the champion's under the *same
protocol* by more than a configured margin *and* by more than the measured noise:
``noise_sigmas * sqrt(std_candidate^2 + std_champion^2)``, the stds being each evaluation's
bootstrap spread. Otherwise it is a ``challenger`` (kept, aliased, not serving), or ``rejected``
when its run is diverged, partially evaluated or below the quality bar (never aliased).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from aigc_pipeline.evaluation.metrics import copying_text
from aigc_pipeline.evaluation.protocol import protocol_differences
from aigc_pipeline.evaluation.results import Evaluation

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "REJECTED",
    "REQUIRED_METRICS",
    "Score",
    "Verdict",
    "check_evaluation",
    "decide",
    "quality_bar",
]

CHAMPION, CHALLENGER, REJECTED = "champion", "challenger", "rejected"
# Every complete evaluation has these, under its protocol id, finite.
REQUIRED_METRICS = ("fid", "kid", "precision", "recall")


@dataclass(frozen=True)
class Score:
    """An FID and its measured noise (bootstrap std; None when not measured)."""

    fid: float
    fid_std: float | None


@dataclass(frozen=True)
class Verdict:
    decision: str  # champion | challenger | rejected
    reason: str
    details: dict[str, Any] = field(default_factory=dict)  # the numbers behind it, for tags

    @property
    def promote(self) -> bool:
        return self.decision == CHAMPION


def check_evaluation(evaluation: Evaluation, model_meta: Mapping[str, Any] | None = None) -> list[str]:
    """Why this evaluation (``metrics.json`` + ``evaluation.json``) and model (``model.json``) may not
    be promoted; [] if fine.

    Partial evaluations (a required metric missing), non-finite values and diverged training
    (a non-finite final loss) are each a reason.
    """
    problems: list[str] = []
    pid = evaluation.protocol_id
    if not pid:
        return ["evaluation.json has no protocol id: not an evaluation this pipeline wrote"]
    required = list(REQUIRED_METRICS)
    if int((evaluation.details.get("bootstrap") or {}).get("replicas", 0) or 0) > 0:
        required.append("fid_std")
    for name in required:
        value = evaluation.metrics.get(name)
        if value is None:
            problems.append(f"{name} under protocol {pid} is missing (partial evaluation)")
        elif not _finite(value):
            problems.append(f"{name} is {value} (not a finite number)")
    losses = (model_meta or {}).get("final_losses") or {}
    bad = sorted(k for k, v in losses.items() if not _finite(v))
    if bad:
        problems.append(f"training diverged: final {', '.join(bad)} not finite")
    return problems


def quality_bar(
    evaluation: Evaluation,
    *,
    max_fid_ratio: float | None,
    min_precision: float | None = None,
    min_recall: float | None = None,
    max_copy_share: float | None = None,
    min_copy_ct: float | None = None,
) -> list[str]:
    """Why the candidate is below the absolute quality bar (``register.max_fid_ratio``,
    ``min_precision``, ``min_recall``) or copies its training data (``register.max_copy_share``,
    ``min_copy_ct``), each reason with its numbers; [] if it passes or no bar is set."""
    m = evaluation.metrics
    failures = []
    if max_fid_ratio is not None:
        fid, floor = m.get("fid"), m.get("floor_fid")
        if not (_finite(fid) and _finite(floor) and floor > 0):
            why = (evaluation.details.get("floor") or {}).get("unavailable", "not measured")
            failures.append(f"the data's floor is unavailable ({why}): register.max_fid_ratio cannot be checked")
        elif fid > max_fid_ratio * floor:
            failures.append(
                f"FID {fid:.2f} is {fid / floor:.2f}x the data's floor {floor:.2f} "
                f"(register.max_fid_ratio {max_fid_ratio:g})"
            )
    for name, minimum in (("precision", min_precision), ("recall", min_recall)):
        value = m.get(name)
        if minimum is not None and _finite(value) and value < minimum:
            floor = m.get(f"floor_{name}")
            seen = f"; real data: {floor:.3f}" if _finite(floor) else ""
            failures.append(f"{name} {value:.3f} < register.min_{name} {minimum:g}{seen}")
    failures += _copying(evaluation, max_copy_share, min_copy_ct)
    return failures


def _copying(evaluation: Evaluation, max_share: float | None, min_ct: float | None) -> list[str]:
    """Why the candidate copies its training data, with its figures and real data's; [] if it does not."""
    m = evaluation.metrics
    if max_share is None and min_ct is None:
        return []
    share, ct = m.get("copy_share"), m.get("copy_ct")
    if not _finite(share):
        why = (evaluation.details.get("copying") or {}).get("unavailable", "not measured (evaluate.copy_check off?)")
        return [f"data copying unavailable ({why}): register.max_copy_share / min_copy_ct cannot be checked"]
    figures = copying_text(m)
    failures = []
    if max_share is not None and share > max_share:
        failures.append(f"copies its training data: {figures}; copy_share above register.max_copy_share {max_share:g}")
    if min_ct is not None:
        if not _finite(ct):
            why = (evaluation.details.get("copying") or {}).get("ct_unavailable") or "not measured"
            failures.append(f"C_T unavailable ({why}): register.min_copy_ct cannot be checked")
        elif ct < min_ct:
            failures.append(f"copies its training data: {figures}; C_T below register.min_copy_ct {min_ct:g}")
    return failures


def decide(
    candidate: Score | None,
    problems: list[str],
    *,
    champion: Score | None,
    champion_version: str | None,
    margin: float,
    noise_sigmas: float,
    protocol_id: str,
    below_bar: list[str] | tuple[str, ...] = (),
    candidate_protocol: Mapping[str, Any] | None = None,
    champion_protocol: Mapping[str, Any] | None = None,
) -> Verdict:
    """The gate's decision for ``candidate`` against the current champion's score on ``protocol_id``.

    ``champion_version`` None means there is no champion. ``champion`` None with a version means
    the champion has no FID under this protocol (not comparable): then the reason names what
    differs between ``candidate_protocol`` and ``champion_protocol`` (the protocols' fields, e.g.
    the torch-fidelity version or the precision of the feature pass) when both are given.
    ``below_bar``: what :func:`quality_bar` found; any entry rejects the candidate.
    """
    if problems or candidate is None:
        return Verdict(REJECTED, "not promotable: " + "; ".join(problems or ["no score"]))
    if below_bar:
        return Verdict(REJECTED, "below the quality bar: " + "; ".join(below_bar), {"candidate_fid": candidate.fid})
    if champion_version is None:
        return Verdict(CHAMPION, "first model: no champion yet", {"candidate_fid": candidate.fid})
    base: dict[str, Any] = {"candidate_fid": candidate.fid, "champion_version": champion_version}
    if candidate.fid_std is not None:
        base["candidate_fid_std"] = candidate.fid_std
    if champion is None:
        how = "measured under another protocol"
        if candidate_protocol is not None and champion_protocol is not None:
            differences = protocol_differences(candidate_protocol, champion_protocol)
            if champion_protocol.get("id"):
                how = f"measured under {champion_protocol['id']}"
            if differences:
                how += "; differs in " + ", ".join(differences)
                base["protocol_differences"] = "; ".join(differences)[:4000]
        return Verdict(
            CHALLENGER,
            f"champion v{champion_version} has no FID under protocol {protocol_id} "
            f"({how}): not comparable; re-evaluate the champion under this protocol, or promote by "
            "hand with `aigc promote`",
            base,
        )
    base["champion_fid"] = champion.fid
    if not _finite(champion.fid):
        return Verdict(
            CHAMPION, f"champion v{champion_version}'s FID is {champion.fid}: any finite score beats it", base
        )
    if candidate.fid_std is None:
        return Verdict(
            CHALLENGER,
            "no noise estimate for this evaluation (evaluate.bootstrap is 0): an improvement cannot be told from noise",
            base,
        )
    champion_std = champion.fid_std
    assumed = ""
    if champion_std is None or not _finite(champion_std):
        champion_std, assumed = candidate.fid_std, " (champion's spread not measured: assumed equal)"
    else:
        base["champion_fid_std"] = champion_std
    noise = noise_sigmas * math.hypot(candidate.fid_std, champion_std)
    delta = champion.fid - candidate.fid
    details = {**base, "delta": delta, "noise": noise, "margin": margin, "noise_sigmas": noise_sigmas}
    head = (
        f"FID {candidate.fid:.3f}±{candidate.fid_std:.3f} vs champion v{champion_version}'s "
        f"{champion.fid:.3f}±{champion_std:.3f} on {protocol_id}"
    )
    if delta > margin and delta > noise:
        return Verdict(
            CHAMPION,
            f"{head}: better by {delta:.3f}, more than the margin {margin:g} and the noise "
            f"{noise:.3f} ({noise_sigmas:g} sigma){assumed}",
            details,
        )
    if delta <= 0:
        why = f"not better (worse by {-delta:.3f})"
    elif delta <= noise:
        why = f"better by {delta:.3f}, within the noise {noise:.3f} ({noise_sigmas:g} sigma){assumed}"
    else:
        why = f"better by {delta:.3f}, not more than the margin {margin:g}"
    return Verdict(CHALLENGER, f"{head}: {why}; the champion stays", details)


def _finite(value: Any) -> TypeGuard[float]:
    # a TypeGuard: where it holds, the Optional metric it checked is a float
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
