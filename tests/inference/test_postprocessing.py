"""ml_model.postprocessing: majority vote and confidence threshold (pure functions)."""

from __future__ import annotations

import pytest

from ml_model.postprocessing import UNKNOWN, decide, majority_vote, top_class

CLASSES = ["REST", "fist", "open"]


def test_top_class():
    assert top_class(CLASSES, [0.1, 0.7, 0.2]) == ("fist", 0.7)
    with pytest.raises(ValueError):
        top_class(CLASSES, [0.5, 0.5])


def test_majority_vote_ties_go_to_the_newest():
    assert majority_vote(["a", "b", "a"]) == ("a", 2 / 3)
    assert majority_vote(["a", "b"]) == ("b", 0.5)
    with pytest.raises(ValueError):
        majority_vote([])


def test_single_window_is_its_own_decision():
    d = decide(CLASSES, [[0.1, 0.8, 0.1]])
    assert d.gesture == "fist" and d.raw_gesture == "fist" and abs(d.confidence - 0.8) < 1e-9


def test_vote_smooths_a_flicker():
    d = decide(CLASSES, [[0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.1, 0.8, 0.1]])
    assert d.gesture == "fist" and d.raw_gesture == "fist"
    d = decide(CLASSES, [[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6]])
    assert d.gesture == "fist" and d.raw_gesture == "open"  # one odd window does not flip the decision


def test_unsure_instead_of_guessing():
    low = decide(CLASSES, [[0.3, 0.4, 0.3]] * 3)
    assert low.gesture == UNKNOWN and low.raw_gesture == "fist" and abs(low.confidence - 0.4) < 1e-9
    split = decide(CLASSES, [[0.0, 0.9, 0.1], [0.0, 0.1, 0.9], [0.9, 0.05, 0.05]])
    assert split.gesture == UNKNOWN  # no majority
    assert decide(CLASSES, [[0.3, 0.4, 0.3]], unsure_label="REST").gesture == "REST"
    assert decide(CLASSES, [[0.3, 0.4, 0.3]], min_confidence=0.0).gesture == "fist"


def test_empty_history_is_an_error():
    with pytest.raises(ValueError):
        decide(CLASSES, [])
