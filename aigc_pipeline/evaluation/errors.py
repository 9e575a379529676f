"""Error type for evaluation problems the user can fix (inputs, weights, cache)."""

from __future__ import annotations

from aigc_pipeline.errors import AigcError


class EvaluationError(AigcError, ValueError):
    """Evaluation inputs, Inception weights or the metric cache are unusable; the message says how to fix it."""
