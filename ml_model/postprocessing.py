"""Turning per-window model outputs into live decisions (pure functions, no state of their own).

A raw window decision flickers at gesture transitions and when the user does something the model never
saw. Two guards, applied by the inference worker on each user's last few windows:

- majority vote: the decision is the label most of the last `votes` windows agreed on;
- confidence threshold: when the vote is not a clear majority, or the voted label's mean probability over
  those windows is below `min_confidence`, the answer is `unsure_label` (UNKNOWN, or REST for callers that
  prefer "do nothing") instead of a guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

UNKNOWN = "UNKNOWN"
REST = "REST"


class Decision(NamedTuple):
    gesture: str  # the decided label, or the unsure label
    confidence: float  # mean probability of the voted label over the voting windows (0..1)
    raw_gesture: str  # the newest window's own top class


def top_class(classes: Sequence[str], probabilities: Sequence[float]) -> tuple[str, float]:
    """(label, probability) of the most probable class."""
    if len(classes) != len(probabilities) or not classes:
        raise ValueError("need one probability per class")
    best = max(range(len(classes)), key=probabilities.__getitem__)
    return classes[best], float(probabilities[best])


def majority_vote(labels: Sequence[str]) -> tuple[str, float]:
    """(label, share of votes); ties go to the most recent of the tied labels."""
    if not labels:
        raise ValueError("no labels to vote on")
    counts = Counter(labels)
    best = max(counts.values())
    for label in reversed(labels):  # the newest of the tied labels
        if counts[label] == best:
            return label, best / len(labels)
    raise AssertionError("unreachable")


def decide(
    classes: Sequence[str],
    history: Sequence[Sequence[float]],
    min_confidence: float = 0.5,
    min_share: float = 0.5,
    unsure_label: str = UNKNOWN,
) -> Decision:
    """Decision for the newest window given the probabilities of the last windows (oldest first, newest last).

    The caller keeps `history` to its voting length (e.g. a deque(maxlen=votes)); one window means no smoothing.
    A vote must win more than `min_share` of the windows and its label a mean probability of at least
    `min_confidence`, else the answer is `unsure_label`.
    """
    if not history:
        raise ValueError("history is empty")
    tops = [top_class(classes, p) for p in history]
    raw = tops[-1][0]
    label, share = majority_vote([t[0] for t in tops])
    k = list(classes).index(label)
    confidence = sum(float(p[k]) for p in history) / len(history)
    if (share <= min_share and len(history) > 1) or confidence < min_confidence:
        return Decision(unsure_label, confidence, raw)
    return Decision(label, confidence, raw)
