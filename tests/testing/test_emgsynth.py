"""The synthetic sEMG is learnable: gestures differ per channel, schedules label it, users differ."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from testing.emgsynth import DEFAULT_GESTURES, REST, EmgSynth, Interval, Schedule


def _features(values: np.ndarray, labels: np.ndarray, rate: float, win_s: float = 0.2):
    """Log-RMS per channel of non-overlapping windows whose samples all share one label."""
    w = int(win_s * rate)
    X, y = [], []
    for i in range(0, len(values) - w, w):
        lab = labels[i:i + w]
        if (lab == lab[0]).all():
            x = values[i:i + w].astype(float)
            X.append(np.log(np.sqrt(((x - x.mean(0)) ** 2).mean(0)) + 1))
            y.append(lab[0])
    return np.array(X), np.array(y)


def test_schedule_follows_capture_plan_layout():
    s = Schedule.cycles(["fist", "open"], repetitions=2, hold_s=3, rest_s=2)
    assert [(i.label, i.start_s, i.end_s) for i in s.intervals[:4]] == [
        (REST, 0, 2), ("fist", 2, 5), (REST, 5, 7), ("open", 7, 10)]
    assert s.duration_s == 22 and s.gestures == ["fist", "open"]
    assert list(s.labels_at(np.array([0.5, 2.0, 4.99, 5.0, 8, 99]))) == [REST, "fist", "fist", REST, "open", REST]
    assert Schedule.from_plan(s.to_plan()).to_json() == s.to_json()
    custom = Schedule([Interval("gesture", "pinch", 1.0, 2.0)])
    assert custom.label_at(1.5) == "pinch" and custom.label_at(2.5) == REST


@pytest.mark.parametrize("channels, rate", [(4, 500.0), (8, 200.0)])
def test_a_simple_classifier_learns_the_gestures_across_repetitions(channels, rate):
    schedule = Schedule.cycles(["fist", "open", "wrist_flexion", "wrist_extension"], repetitions=4, hold_s=3,
                               rest_s=2)
    synth = EmgSynth(channels, rate, seed=5, gestures=schedule.gestures)
    values, labels = synth.generate_schedule(schedule, 0.0, int(schedule.duration_s * rate))
    assert values.dtype == np.int16 and values.min() >= 0 and values.max() <= 4095
    reps = np.zeros(len(labels), int)
    for iv in schedule.intervals:
        reps[int(iv.start_s * rate):int(iv.end_s * rate)] = iv.repetition
    Xtr, ytr = _features(values[reps < 3], labels[reps < 3], rate)
    Xte, yte = _features(values[reps == 3], labels[reps == 3], rate)
    classes = sorted(set(ytr))
    centroids = np.stack([Xtr[ytr == c].mean(0) for c in classes])
    pred = np.array(classes)[np.argmin(((Xte[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert (pred == yte).mean() > 0.85  # held-out repetition, nearest centroid on log-RMS


def test_users_differ_and_streaming_keeps_state():
    a, b = EmgSynth(4, 500, seed=1), EmgSynth(4, 500, seed=2)
    assert not np.allclose(a.pattern("fist"), b.pattern("fist"))
    assert np.allclose(a.pattern("fist"), EmgSynth(4, 500, seed=1).pattern("fist"))  # stable per user
    x = np.concatenate([a.generate(100, "fist") for _ in range(20)]).astype(float)
    rest = a.generate(2000, REST).astype(float)
    assert x[1000:].std() > 3 * rest[1000:].std()  # contraction builds up and stays; rest is quiet


@pytest.mark.parametrize("channels", [1, 2])
def test_gestures_of_a_sensor_with_too_few_channels_differ_in_force(channels):
    """With one channel (a maker's single sensor) no gesture can have a muscle group of its own, and each got a
    level drawn from 0.6-1.0: within one another's force fluctuation, so a model trained on "Trying it without a
    sensor" told them apart 69 % of the time and every live decision came out unsure. Gestures that share their
    channels now differ by force (each half the one before), as a one-channel user makes them."""
    syn = EmgSynth(channels, 500.0, seed=0)
    by_main: dict[tuple, list[float]] = {}
    for g in DEFAULT_GESTURES:
        p = syn.pattern(g)
        by_main.setdefault(tuple(np.flatnonzero(p > 0.5 * p.max())), []).append(float(p.max()))  # its channels
    assert any(len(levels) > 1 for levels in by_main.values())  # (the case at hand: channels shared)
    for levels in by_main.values():
        for stronger, weaker in itertools.pairwise(sorted(levels, reverse=True)):
            assert stronger >= 1.9 * weaker, by_main
        assert min(levels) >= 3 * syn.pattern(REST).max(), by_main  # and still well above rest
