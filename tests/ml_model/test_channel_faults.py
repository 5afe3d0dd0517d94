"""The live electrode check (preprocessing.channel_faults / channel_reference): properties of the detector."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_model import preprocessing as pp

N = 200  # one second at 200 Hz
channels = st.integers(1, 8)
seeds = st.integers(0, 2**16)


def _emg(rng: np.random.Generator, n: int, c: int, std: float) -> np.ndarray:
    """Noise-like sEMG quantised to whole counts, as a device sends it."""
    return np.rint(rng.laplace(0, std / np.sqrt(2), (n, c)))


@settings(max_examples=60, deadline=None)
@given(c=channels, seed=seeds, std=st.floats(2.0, 500.0), level=st.floats(-5000, 5000))
def test_a_constant_channel_is_flat_whatever_its_value(c, seed, std, level):
    rng = np.random.default_rng(seed)
    x = _emg(rng, N, c, std)
    k = int(rng.integers(c))
    x[:, k] = round(level)
    codes = pp.channel_faults(x, np.zeros(c), np.full(c, std))
    assert codes[k] == pp.CHANNEL_FLAT


@settings(max_examples=60, deadline=None)
@given(c=channels, seed=seeds, std=st.floats(2.0, 500.0), share=st.floats(0.3, 3.0))
def test_a_live_channel_at_its_training_scale_or_quieter_is_ok(c, seed, std, share):
    """Real signal from rest (a small share of the training spread: the Myo set's quietest second had 2.4 %) to
    strong (several times it) is never called failed."""
    rng = np.random.default_rng(seed)
    x = _emg(rng, N, c, std * share)
    assert not pp.channel_faults(x, np.zeros(c), np.full(c, std)).any()


@settings(max_examples=60, deadline=None)
@given(c=channels, seed=seeds, gain=st.floats(30.0, 80.0), rail=st.sampled_from([127, 2047, 4095]))
def test_a_channel_clipping_at_its_rails_is_saturated(c, seed, gain, rail):
    rng = np.random.default_rng(seed)
    std = rail / 8
    x = np.clip(_emg(rng, N, c, std), -rail - 1, rail)
    k = int(rng.integers(c))
    x[:, k] = np.clip(x[:, k] * gain, -rail - 1, rail)  # two thirds of the samples beyond the range: clipped
    codes = pp.channel_faults(x, np.zeros(c), np.full(c, std))
    assert codes[k] == pp.CHANNEL_SATURATED
    assert (np.delete(codes, k) == pp.CHANNEL_OK).all()


@settings(max_examples=60, deadline=None)
@given(c=channels, seed=seeds, data=st.data())
def test_channels_are_judged_alone_and_sample_order_does_not_matter(c, seed, data):
    rng = np.random.default_rng(seed)
    std = rng.uniform(2, 100, c)
    x = _emg(rng, N, c, 1.0) * std
    for k in range(c):  # some channels failed in various ways
        how = data.draw(st.sampled_from(["ok", "const", "rail", "quiet"]))
        if how == "const":
            x[:, k] = rng.integers(-200, 200)
        elif how == "rail":
            x[:, k] = np.where(rng.random(N) < 0.8, 10 * std[k], x[:, k])
        elif how == "quiet":
            x[:, k] *= 0.001
    mean = np.zeros(c)
    codes = pp.channel_faults(x, mean, std)
    for k in range(c):
        assert pp.channel_faults(x[:, [k]], mean[[k]], std[[k]])[0] == codes[k]
    np.testing.assert_array_equal(pp.channel_faults(x[rng.permutation(N)], mean, std), codes)


@settings(max_examples=60, deadline=None)
@given(c=channels, seed=seeds, scale=st.sampled_from([0.25, 0.5, 2.0, 4.0, 16.0]), offset=st.integers(-3000, 3000))
def test_units_do_not_matter(c, seed, scale, offset):
    """The same signal in other units (an ADC of more bits, a DC offset) against its training stats in those
    units is judged the same (powers of two keep the arithmetic exact)."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(2, 100, c)
    x = _emg(rng, N, c, 1.0) * std
    x[:, 0] = 5
    if c > 1:
        x[:, 1] = np.where(rng.random(N) < 0.7, 4 * std[1], x[:, 1])
    mean = np.zeros(c)
    codes = pp.channel_faults(x, mean, std)
    np.testing.assert_array_equal(pp.channel_faults(x * scale + offset, mean * scale + offset, std * scale), codes)


def test_too_few_samples_or_bad_shapes():
    assert (pp.channel_faults(np.zeros((1, 3)), np.zeros(3), np.ones(3)) == pp.CHANNEL_OK).all()
    with pytest.raises(ValueError):
        pp.channel_faults(np.zeros(10), np.zeros(1), np.ones(1))
    with pytest.raises(ValueError):
        pp.channel_faults(np.zeros((10, 2)), np.zeros(3), np.ones(3))


def test_reference_skips_channels_flat_in_training_and_maps_device_channels():
    w = np.random.default_rng(0).normal(0, 20, (30, 6, 50)).astype(np.float32)
    w[:, 4] = 4095.0  # electrode off while recording: the model ignores it
    meta = {"channels": [1, 3, 4, 5], "n_device_channels": 6, "sample_rate_hz": 200.0, "filter": None,
            "input_stats": pp.input_stats(w)}
    meta["scaler"] = pp.fit_standardizer(pp.prepare_unscaled(w, meta))
    ref = pp.channel_reference(meta)
    assert ref["channels"] == [1, 3, 5]
    np.testing.assert_allclose(ref["std"], np.asarray(meta["input_stats"]["std"])[[1, 3, 5]])
    # an artifact without input_stats: the scaler, in raw units without a high-pass filter; none with one
    old = {k: v for k, v in meta.items() if k != "input_stats"}
    assert pp.channel_reference(old)["channels"] == [1, 3, 5]
    assert pp.channel_reference({**old, "filter": {"highpass_hz": 20.0}}) is None
