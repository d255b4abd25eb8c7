"""Why a prediction deserves a look first: a suspicion score and its reasons.

The review queue sorts radiographs by `assess(...).score`, highest first.
Each reason adds points and says in words what it found, so that the page
can show why a radiograph sits where it does:

- low confidence: a named point whose heatmap peak is barely above the
  presence threshold;
- order: a vertebra drawn above the one it should lie below (radiographs
  are upright, T4 at the top);
- too close: two names nearer than half the usual spacing, most often two
  names on one vertebra;
- missing: an unnamed vertebra between two named ones;
- spacing: a step between neighbours far longer or shorter than the
  film's usual one (a skipped or doubled level).

The usual spacing is the median per-level distance between consecutive
named points of the same film, so the score needs no pixel size and no
training statistics.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vertjax import vertebrae

# Below this a present point counts as doubtful (presence itself is >= 0.5).
LOW_CONFIDENCE: float = 0.7
# Relative step length outside [1 / SPACING_RATIO, SPACING_RATIO] is an outlier.
SPACING_RATIO: float = 1.5
# Points per finding: an anatomical impossibility outweighs a weak peak.
WEIGHTS: dict[str, float] = {
    "none": 10.0,
    "order": 3.0,
    "close": 3.0,
    "missing": 2.0,
    "spacing": 1.5,
    "confidence": 5.0,  # times the shortfall below LOW_CONFIDENCE
}


@dataclasses.dataclass(frozen=True)
class Reason:
    """One finding: its kind (a WEIGHTS key), a sentence, and the points it adds."""

    kind: str
    text: str
    points: float


@dataclasses.dataclass(frozen=True)
class Assessment:
    """The suspicion score (sum of the reasons' points, 0 = nothing found) and its reasons."""

    score: float
    reasons: tuple[Reason, ...]


def usual_spacing(xy: np.ndarray, present: np.ndarray) -> float | None:
    """Median distance per level between consecutive present points, or None.

    Args:
      xy: [K, 2] (x, y) in pixels.
      present: [K] bool.
    """
    named = np.flatnonzero(present)
    steps = [
        float(np.linalg.norm(xy[k] - xy[j])) / (k - j)
        for j, k in zip(named[:-1], named[1:], strict=True)
    ]
    return float(np.median(steps)) if steps else None


def assess(xy: np.ndarray, confidence: np.ndarray, present: np.ndarray) -> Assessment:
    """Scores one film's named points.

    Args:
      xy: [K, 2] (x, y) in original pixels, K = 13, layer order T4..L4.
      confidence: [K] heatmap peaks.
      present: [K] bool, the points that carry a name.

    Returns:
      The Assessment, reasons in the order of the module docstring.
    """
    xy = np.asarray(xy, np.float64)
    confidence = np.asarray(confidence, np.float64)
    present = np.asarray(present, bool)
    names = vertebrae.NAMES
    named = [int(k) for k in np.flatnonzero(present)]
    if not named:
        return Assessment(WEIGHTS["none"], (Reason("none", "no vertebra named", WEIGHTS["none"]),))
    reasons = []
    weak = [k for k in named if confidence[k] < LOW_CONFIDENCE]
    if weak:
        shortfall = sum(LOW_CONFIDENCE - confidence[k] for k in weak)
        listed = ", ".join(f"{names[k]} {confidence[k]:.2f}" for k in weak)
        reasons.append(
            Reason("confidence", f"low confidence: {listed}", WEIGHTS["confidence"] * shortfall)
        )
    pairs = list(zip(named[:-1], named[1:], strict=True))
    for j, k in pairs:
        if xy[k, 1] <= xy[j, 1]:
            reasons.append(Reason("order", f"{names[k]} lies above {names[j]}", WEIGHTS["order"]))
    spacing = usual_spacing(xy, present)
    if spacing and spacing > 0:
        for a, j in enumerate(named):
            for k in named[a + 1 :]:
                distance = float(np.linalg.norm(xy[k] - xy[j]))
                if distance < 0.5 * spacing:
                    reasons.append(
                        Reason(
                            "close",
                            f"{names[j]} and {names[k]} are {distance:.0f} px apart, under half "
                            f"the usual {spacing:.0f} px",
                            WEIGHTS["close"],
                        )
                    )
    for j, k in pairs:
        for m in range(j + 1, k):
            reasons.append(
                Reason(
                    "missing",
                    f"{names[m]} missing between {names[j]} and {names[k]}",
                    WEIGHTS["missing"],
                )
            )
    if spacing and spacing > 0:
        for j, k in pairs:
            ratio = float(np.linalg.norm(xy[k] - xy[j])) / (k - j) / spacing
            # A step under half the spacing is already a "close" pair.
            if ratio > SPACING_RATIO or 0.5 <= ratio < 1 / SPACING_RATIO:
                reasons.append(
                    Reason(
                        "spacing",
                        f"{names[j]}-{names[k]} spacing {ratio:.1f}x the usual {spacing:.0f} px",
                        WEIGHTS["spacing"],
                    )
                )
    score = math.fsum(r.points for r in reasons)
    return Assessment(round(score, 3), tuple(reasons))
