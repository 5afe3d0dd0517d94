"""Training core: learns separable synthetic gestures, is deterministic, reports progress, can be cancelled,
and rejects unusable data with a TrainingDataError that says why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlcore_helpers import FAST_CONFIG, SYNTH_CLASSES, synthetic_windows

from ml_model import preprocessing as pp
from ml_model.model import EMGNet, count_parameters
from ml_model.training import (
    TrainingCancelled,
    TrainingDataError,
    default_val_group,
    evaluate_model,
    merge_config,
    train_model,
    windows_from_capture,
)


def test_trains_on_separable_data(trained_synth):
    model, meta, metrics = trained_synth
    assert not model.training
    assert metrics["accuracy"] > 0.9
    assert meta["classes"] == SYNTH_CLASSES
    assert metrics["confusion_matrix"]["classes"] == SYNTH_CLASSES
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    assert cm.shape == (3, 3) and cm.sum() == metrics["n_val_windows"]
    assert set(metrics["per_class_accuracy"]) == set(SYNTH_CLASSES)
    assert metrics["val_groups"] == [2]  # the last repetition is held out, whole
    json.dumps(meta, allow_nan=False)
    json.dumps(metrics, allow_nan=False)


def test_the_held_out_repetition_holds_every_class_it_can():
    """A last repetition cut short (only its first rest recorded) was held out: the epoch count was chosen on
    rest windows alone and their accuracy reported as the model's."""
    y = np.array(["REST", "fist", "open"] * 3 + ["REST"] * 4)
    g = np.array([0] * 3 + [1] * 3 + [2] * 3 + [3] * 4)
    assert default_val_group(y, g) == 2
    # never the only repetition of a class (training would lack it), nor one holding fewer classes
    y2 = np.r_[y, ["point"] * 3]
    g2 = np.r_[g, [0] * 3]
    assert default_val_group(y2, g2) == 2
    assert default_val_group(np.array(["REST", "fist", "REST", "fist"]), np.array([0, 0, 1, 1])) == 1


def test_model_accepts_any_channel_count_and_window_length():
    for n_channels in (1, 3, 16):
        for length in (20, 50, 250):
            net = EMGNet(n_channels, 5).eval()
            assert net(torch.zeros(2, n_channels, length)).shape == (2, 5)
    assert EMGNet(**EMGNet(8, 7).hparams).hparams == EMGNet(8, 7).hparams
    with pytest.raises(ValueError):
        EMGNet(17, 5)
    assert count_parameters(EMGNet(16, 10)) < 100_000


def test_deterministic_with_seed(synth_data):
    w, y, g = synth_data
    cfg = {**FAST_CONFIG, "max_epochs": 2}
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state())
    m1, _, _ = train_model(w, y, g, cfg, seed=3)
    m2, _, _ = train_model(w, y, g, cfg, seed=3)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # torch's global state (threads, determinism flag, RNG) is restored after training
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state())
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    m3, _, _ = train_model(w, y, g, cfg, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True))


def test_progress_callback_and_cancel(synth_data):
    w, y, g = synth_data
    seen = []

    def progress(epoch, n_epochs, train_loss, train_acc, val_loss, val_acc):
        seen.append((epoch, n_epochs, val_acc))

    cfg = {**FAST_CONFIG, "max_epochs": 3, "patience": 10}
    train_model(w, y, g, cfg, progress_callback=progress)
    val_phase = [s for s in seen if s[2] is not None]
    assert [s[0] for s in val_phase] == [1, 2, 3] and all(s[1] == 3 for s in val_phase)
    assert all(s[2] is None for s in seen[3:])  # retraining on everything has no validation
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1))

    # Early stopping: epoch numbers stay continuous and the total never shrinks below the epoch reported.
    seen.clear()
    _, _, metrics = train_model(w, y, g, {**FAST_CONFIG, "max_epochs": 8, "patience": 1}, progress_callback=progress)
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1))
    assert all(epoch <= total for epoch, total, _ in seen) and seen[-1][0] == seen[-1][1]
    assert metrics["final_epochs"] == metrics["best_epoch"] and len(seen) <= 8 + metrics["best_epoch"]

    def cancel(epoch, *_):
        if epoch == 2:
            raise TrainingCancelled("stop")

    with pytest.raises(TrainingCancelled):
        train_model(w, y, g, cfg, progress_callback=cancel)


def test_fine_tune_from_state_dict(trained_synth, synth_data):
    model, meta, _ = trained_synth
    w, y, g = synth_data
    cfg = {**FAST_CONFIG, "max_epochs": 1, "retrain_full": False}
    tuned, _, metrics = train_model(w, y, g, cfg, class_names=SYNTH_CLASSES, init_state_dict=model.state_dict())
    assert metrics["accuracy"] > 0.9  # starts from a good model, one epoch does not ruin it


def test_channel_subset_is_recorded(synth_data):
    w, y, g = synth_data
    _, meta, _ = train_model(w, y, g, {**FAST_CONFIG, "max_epochs": 1, "channels": [2, 0]})
    assert meta["channels"] == [2, 0] and meta["n_device_channels"] == 4
    assert len(meta["scaler"]["mean"]) == 2 and meta["model"]["n_channels"] == 2


def _bad(w, y, g, match, **cfg):
    with pytest.raises(TrainingDataError, match=match):
        train_model(w, y, g, {**FAST_CONFIG, **cfg})


def test_training_data_errors(synth_data):
    w, y, g = synth_data
    _bad(np.empty((0, 4, 50)), [], [], "no training data")
    _bad(w, np.full(len(y), "fist", dtype=object), g, "only one class")
    few = np.r_[np.flatnonzero(y != "open"), np.flatnonzero(y == "open")[:3]]
    _bad(w[few], y[few], g[few], "too few windows")
    _bad([w[0], w[1][:3]], y[:2], g[:2], "inconsistent channel counts")
    nan = w.astype(np.float32)
    nan[5, 1, 7] = np.nan
    _bad(nan, y, g, "NaN")
    _bad(w, y, np.zeros(len(g)), "at least 2 repetitions")
    _bad(w, y[:-1], g, "one label and one group per window")
    _bad(w, y, g, "sample_rate_hz", sample_rate_hz=None)
    _bad(w, y, g, "channels", channels=[7])
    _bad(w[:, :, :5], y, g, "too short")
    with pytest.raises(TrainingDataError, match="not in class_names"):
        train_model(w, y, g, FAST_CONFIG, class_names=["REST", "fist"])
    with pytest.raises(ValueError, match="unknown training config key"):
        merge_config({"epochs": 3})


def test_windows_from_capture_groups_follow_repetitions():
    rate = 200.0
    win, step = pp.window_params(250, 25, rate)
    plan, t = [], 0.0
    for rep in range(2):
        for label in ("fist", "open"):
            plan.append({"label": "rest", "kind": "rest", "start_ms": t, "end_ms": t + 1000})
            plan.append({"label": label, "kind": "gesture", "start_ms": t + 1000, "end_ms": t + 3000})
            t += 3000
    ts = np.arange(int(t * rate / 1000)) * 1000 / rate
    x = np.random.default_rng(0).standard_normal((len(ts), 3))
    w, labels, groups = windows_from_capture(x, ts, plan, win, step)
    assert w.shape[1:] == (3, win) and len(w) == len(labels) == len(groups)
    assert set(labels) == {"REST", "fist", "open"}
    assert set(groups[labels == "fist"]) == {0, 1}
    # the rest before the second 'fist' belongs to cycle 0 (after the first cycle's last gesture)
    assert set(groups[labels == "REST"]) == {0, 1}


def test_evaluate_model_on_prepared_windows(trained_synth):
    model, meta, _ = trained_synth
    w, y, _ = synthetic_windows(reps=1, seed=9)
    metrics = evaluate_model(model, pp.prepare_for_model(w, meta), y, meta["classes"])
    assert metrics["accuracy"] > 0.9
