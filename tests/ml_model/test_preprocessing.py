"""Preprocessing: windows equal plain slicing, labels never straddle cue boundaries, shared prepare path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_model import preprocessing as pp


@settings(max_examples=60, deadline=None)
@given(
    n_samples=st.integers(0, 300),
    n_channels=st.integers(1, 16),
    win=st.integers(1, 60),
    step=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_make_windows_matches_slicing(n_samples, n_channels, win, step, seed):
    x = np.random.default_rng(seed).integers(-128, 128, size=(n_samples, n_channels)).astype(np.int16)
    w = pp.make_windows(x, win, step)
    expected_n = max(0, (n_samples - win) // step + 1) if n_samples >= win else 0
    assert w.shape == (expected_n, n_channels, win)
    assert pp.n_windows(n_samples, win, step) == expected_n
    for i in range(expected_n):
        np.testing.assert_array_equal(w[i], x[i * step : i * step + win].T)


def test_make_windows_is_a_view():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    w = pp.make_windows(x, 5, 3)
    assert np.shares_memory(w, x)
    with pytest.raises(ValueError):
        pp.make_windows(x[:, 0], 5, 3)


def test_window_params_defaults():
    assert pp.window_params(250, 25, 200) == (50, 5)
    assert pp.window_params(250, 25, 1000) == (250, 25)
    assert pp.window_params(250, 25, 500) == (125, 13)  # half up
    with pytest.raises(ValueError):
        pp.window_params(0, 25, 200)


@st.composite
def capture_plans(draw):
    """A random capture plan (alternating rest/gesture with optional gaps) and sample timestamps."""
    n_iv = draw(st.integers(1, 8))
    t = float(draw(st.integers(0, 1000)))
    intervals = []
    for i in range(n_iv):
        t += draw(st.sampled_from([0, 0, 37]))  # sometimes a gap no label covers
        dur = draw(st.integers(50, 2500))
        kind = "rest" if i % 2 == 0 else "gesture"
        intervals.append({"label": f"g{i % 3}", "start_ms": t, "end_ms": t + dur, "kind": kind})
        t += dur
    rate = draw(st.sampled_from([100.0, 200.0, 500.0]))
    jitter = draw(st.floats(0, 0.4))
    n = int((t + 500) * rate / 1000)
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    ts = np.arange(n) * 1000 / rate + rng.uniform(0, jitter * 1000 / rate, n)
    ts = np.maximum.accumulate(ts)
    return intervals, ts, rate


@settings(max_examples=80, deadline=None)
@given(plan=capture_plans(), reaction_ms=st.sampled_from([0.0, 150.0, 300.0]), step=st.integers(1, 7))
def test_labels_never_cross_boundaries(plan, reaction_ms, step):
    intervals, ts, rate = plan
    win, _ = pp.window_params(250, 25, rate)
    labels, index = pp.label_windows(ts, intervals, win, step, reaction_ms)
    assert labels.shape == index.shape == (pp.n_windows(len(ts), win, step),)
    for i, (lab, k) in enumerate(zip(labels, index, strict=True)):
        first, last = ts[i * step], ts[i * step + win - 1]
        if k < 0:
            assert lab is None
            # Unlabelled windows must not fit in any interval after its reaction time.
            assert not any(
                first >= iv["start_ms"] + reaction_ms and last < iv["end_ms"] for iv in intervals
            )
            continue
        iv = intervals[k]
        assert iv["start_ms"] + reaction_ms <= first and last < iv["end_ms"]
        assert lab == (pp.REST_LABEL if iv["kind"] == "rest" else iv["label"])


def test_label_windows_simple_plan():
    ts = np.arange(0, 3000, 5.0)  # 200 Hz, 3 s
    plan = [
        {"label": "rest", "start_ms": 0, "end_ms": 1000, "kind": "rest"},
        {"label": "fist", "start_ms": 1000, "end_ms": 2000, "kind": "gesture"},
    ]
    labels, index = pp.label_windows(ts, plan, win=50, step=5, reaction_ms=300)
    starts = np.arange(len(labels)) * 5 * 5.0
    # Rest: starts 300..(1000-250) ms; fist: starts 1300..1750 ms; nothing after 2000 ms.
    assert set(labels[(starts >= 300) & (starts <= 750)]) == {"REST"}
    assert set(labels[(starts >= 1300) & (starts <= 1750)]) == {"fist"}
    assert all(lab is None for lab in labels[(starts > 750) & (starts < 1300)])
    assert all(lab is None for lab in labels[starts > 1750])
    with pytest.raises(ValueError):
        pp.label_windows(ts, plan + [{"label": "x", "start_ms": 1500, "end_ms": 2500, "kind": "gesture"}], 50, 5)


def test_standardizer_and_channel_selection():
    rng = np.random.default_rng(0)
    w = rng.normal(5.0, 3.0, size=(200, 3, 20))
    w[:, 2] = 7.0  # a dead channel must not explode
    params = pp.fit_standardizer(w)
    z = pp.apply_standardizer(w, params)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :2].mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(z[:, :2].std(axis=(0, 2)), 1, atol=1e-3)
    assert np.all(z[:, 2] == 0)
    np.testing.assert_array_equal(pp.select_channels(w, [2, 0], axis=1), w[:, [2, 0]])
    with pytest.raises(ValueError):
        pp.select_channels(w, [3], axis=1)


def test_a_flat_channel_stays_zero_when_it_comes_alive():
    """A channel that was flat in training (electrode off: constant, at a rail, or one odd sample) got std 1 (or
    its tiny std): once the electrode was back at serving its values reached the model in the thousands."""
    rng = np.random.default_rng(0)
    w = rng.normal(2048.0, 300.0, size=(200, 4, 20))
    w[:, 2] = 4095.0  # at the ADC's rail
    w[:, 3] = 0.0
    w[7, 3, 5] = 1.0  # one odd sample
    params = pp.fit_standardizer(w)
    assert pp.flat_channels(params) == [2, 3]
    alive = rng.normal(2048.0, 300.0, size=(50, 4, 20))
    z = pp.apply_standardizer(alive, params)
    assert np.abs(z[:, 2:]).max() < 1e-4, np.abs(z[:, 2:]).max()
    np.testing.assert_allclose(z[:, :2].std(axis=(0, 2)), 1, atol=0.05)
    assert pp.flat_channels(pp.fit_standardizer(w[:, :2])) == []
    assert pp.flat_channels(pp.fit_standardizer(np.stack([w[:, 0], w[:, 0] / 500], axis=1))) == []  # weak but alive
    stats = pp.input_stats(w)  # the raw level and spread stay what they were
    assert stats["std"][2] == 1.0 and stats["mean"][2] == 4095.0
    at_rails = np.stack([w[:, 2], w[:, 2] * 0], axis=1)
    assert pp.flat_channels(pp.fit_standardizer(at_rails)) == [0, 1]  # every channel flat: all are named
    assert pp.flat_channels(pp.fit_standardizer(w[:, 2:3])) == [0]


def test_channel_statistics_of_many_windows_take_little_memory():
    """input_stats and fit_standardizer of a long job's windows (228 k windows of 8 x 125 int16: 457 MB) made a
    float64 copy of them all plus one of its squared deviations: the training job peaked at 4.3 GB. They now
    work through a few MB at a time, with the same figures."""
    import tracemalloc

    rng = np.random.default_rng(1)
    raw = rng.normal(2048.0, 300.0, size=(20_000, 8, 125)).astype(np.int16)  # 40 MB
    rows = rng.random(len(raw)) < 0.8
    as64 = raw.astype(np.float64)
    want_mean, want_std = as64.mean(axis=(0, 2)), as64.std(axis=(0, 2))
    want_fit = as64[rows].std(axis=(0, 2))
    del as64

    def peak_of(fn, *args):
        tracemalloc.start()
        try:
            out = fn(*args)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < raw.nbytes, f"{peak / 2**20:.0f} MiB allocated for {raw.nbytes / 2**20:.0f} MiB of windows"
        return out

    stats = peak_of(pp.input_stats, raw)
    fitted = peak_of(pp.fit_standardizer, raw, rows)
    np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-12)
    np.testing.assert_allclose(stats["std"], want_std, rtol=1e-12)
    np.testing.assert_allclose(fitted["std"], want_fit, rtol=1e-12)
    assert fitted == pp.fit_standardizer(raw[rows])
    # scaling allocates its result only (it made a temporary of the same size too), with the same values
    unscaled = raw.astype(np.float32)
    want = (unscaled - np.float32(fitted["mean"])[None, :, None]) / np.float32(fitted["std"])[None, :, None]
    tracemalloc.start()
    try:
        scaled = pp.apply_standardizer(unscaled, fitted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * unscaled.nbytes, f"{peak / 2**20:.0f} MiB allocated to scale {unscaled.nbytes / 2**20:.0f} MiB"
    assert scaled.dtype == np.float32 and np.array_equal(scaled, want)


def test_filters_keep_shape_and_remove_what_they_should():
    rate = 200.0
    t = np.arange(50) / rate
    dc_and_emg = 100.0 + np.sin(2 * np.pi * 60 * t)
    windows = np.tile(dc_and_emg, (4, 2, 1))
    out = pp.apply_filter(windows, {"highpass_hz": 10.0}, rate)
    assert out.shape == windows.shape
    assert abs(out.mean()) < 5.0  # the DC offset is gone
    same = pp.apply_filter(windows, None, rate)
    assert same is windows  # no filter configured: untouched
    notched = pp.apply_filter(np.tile(np.sin(2 * np.pi * 50 * np.arange(400) / rate), (1, 1, 1)),
                              {"notch_hz": 50.0}, rate)
    assert np.abs(notched[0, 0, 100:300]).max() < 0.2
    with pytest.raises(ValueError):
        pp.apply_filter(windows, {"highpass_hz": 150.0}, rate)


def test_prepare_for_model_shapes_and_dtype():
    rng = np.random.default_rng(1)
    raw = rng.integers(-100, 100, size=(10, 8, 50)).astype(np.int16)
    meta = {"channels": [1, 3, 5], "filter": pp.filter_config(None), "sample_rate_hz": 200.0}
    unscaled = pp.prepare_unscaled(raw, meta)
    meta["scaler"] = pp.fit_standardizer(unscaled)
    x = pp.prepare_for_model(raw, meta)
    assert x.shape == (10, 3, 50) and x.dtype == np.float32
    expected = (raw[:, [1, 3, 5]] - np.array(meta["scaler"]["mean"])[None, :, None]) / np.array(
        meta["scaler"]["std"]
    )[None, :, None]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.integers(0, 40), min_size=1, max_size=60), win=st.integers(4, 60), step=st.integers(1, 9))
def test_spans_little_loss_marks_the_windows_the_live_worker_would_cut(gaps, win, step):
    """Training keeps a window across lost samples exactly when the live worker would cut it: at most
    max_bridged(win) sequence numbers missing between its first and last sample."""
    seq = np.cumsum(np.asarray(gaps) + 1)  # each sample follows the previous after `gap` lost ones
    keep = pp.spans_little_loss(seq, win, step)
    assert len(keep) == pp.n_windows(len(seq), win, step)
    for i, k in enumerate(keep):
        first, last = seq[i * step], seq[i * step + win - 1]
        assert k == (last - first + 1 - win <= pp.max_bridged(win))
    assert pp.max_bridged(win) == int(win * pp.MAX_BRIDGE_FRACTION)
