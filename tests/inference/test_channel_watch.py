"""The worker's live electrode check (ChannelWatch in UserStream) on real Myo recordings and on its own."""

from __future__ import annotations

import numpy as np
import pytest

from ml_model import datasets
from ml_model import preprocessing as pp
from ml_model.nat_inference import ChannelWatch, ModelSpec, UserStream
from semg.messages import SamplesMessage
from tests.conftest import require_myo_data

RATE, CHUNK = 200, 10  # the Myo bridge's rate; 10 samples per message
FAULT_AT, BACK_AT = 20 * RATE, 30 * RATE  # the injected fault lasts from 20 s to 30 s


def _spec(recordings) -> ModelSpec:
    """The reference a model trained on repetitions 0-2 would carry (pp.channel_reference of its metadata)."""
    x, _, _ = datasets.recordings_to_windows([r for r in recordings if r.cycle < 3], 50, 5)
    meta = {"channels": list(range(8)), "n_device_channels": 8, "filter": pp.filter_config(None),
            "scaler": pp.fit_standardizer(x.astype(np.float32)), "input_stats": pp.input_stats(x)}
    ref = pp.channel_reference(meta)
    return ModelSpec(1, ("REST", "a"), 8, float(RATE), 50, 5, tuple(ref["channels"]), tuple(ref["mean"]),
                     tuple(ref["std"]))


def _replay(spec: ModelSpec, stream: np.ndarray) -> list[tuple[int, int, str]]:
    """(sample number, channel, 'start' | 'end') of every spell event while streaming in messages of CHUNK."""
    watch, events = ChannelWatch(spec), []
    for a in range(0, len(stream), CHUNK):
        v = stream[a:a + CHUNK].astype(np.float32)
        watch.add(v, a + len(v) - 1)
        events += [(a + len(v) - 1, f.channel, "start" if end is None else "end") for f, end in watch.take_events()]
    return events


@pytest.fixture(scope="module")
def myo():
    root = require_myo_data()
    return {s: datasets.load_session(root, s, "training0") for s in datasets.list_subjects(root)}


def test_no_warning_on_untouched_real_recordings(myo):
    """Every subject's whole session (rest, strong gestures that clip at the armband's range) streamed as live."""
    assert len(myo) >= 5
    for subject, recs in myo.items():
        assert _replay(_spec(recs), np.concatenate([r.data for r in recs])) == [], subject


@pytest.mark.parametrize("subject", ["Female0", "Male3", "Female4"])
@pytest.mark.parametrize("fault", ["zero", "rail", "constant"])
def test_a_failed_channel_is_flagged_within_2_s_and_cleared_within_2_s_of_its_return(myo, subject, fault):
    recs = myo[subject]
    spec = _spec(recs)
    clean = np.concatenate([r.data for r in recs]).astype(np.int32)
    for ch in range(8):
        x = clean.copy()
        x[FAULT_AT:BACK_AT, ch] = {"zero": 0, "rail": 127, "constant": -37}[fault]
        events = _replay(spec, x)
        assert {c for _, c, _ in events} == {ch}, f"other channels flagged: {events}"
        (start, _, what), (end, _, what2) = events  # one spell: no flapping
        assert (what, what2) == ("start", "end")
        assert FAULT_AT <= start < FAULT_AT + 2 * RATE
        assert BACK_AT <= end < BACK_AT + 2 * RATE


def _msg(seq0: int, values: np.ndarray) -> SamplesMessage:
    n = len(values)
    return SamplesMessage(userid=1, device_id=1, boot=0, sample_rate_hz=RATE, channels=values.shape[1], seq0=seq0,
                          device_millis=[5.0 * (seq0 + i) for i in range(n)], recv_time=[1000.0 + (seq0 + i) / RATE
                                                                                        for i in range(n)],
                          values=values.astype(int).tolist())


def test_failed_channels_are_read_as_their_training_level_and_too_many_make_decisions_unsure():
    mean = (3.4, -2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    spec = ModelSpec(1, ("REST", "a"), 8, float(RATE), 50, 5, tuple(range(8)), mean, (20.0,) * 8)
    stream = UserStream(1, spec, votes=3)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 20, (12 * RATE, 8)).round()
    x[2 * RATE:, 0] = 0       # channel 0 comes off at 2 s
    x[4 * RATE:, 1] = 127     # channel 1 rails at 4 s
    x[6 * RATE:8 * RATE, 5] = 0  # channel 5 off from 6 s to 8 s: three of eight failed
    seen = []
    for a in range(0, len(x), CHUNK):
        r = stream.append(_msg(a, x[a:a + CHUNK]))
        if r is not None:
            seen.append((a, {f.channel for f in r.faults}, r.unsure))
            for f in r.faults:  # replaced by the training level, in whole counts
                assert (r.windows[:, f.channel, :] == round(mean[f.channel])).all()
            for c in set(range(8)) - {f.channel for f in r.faults}:
                np.testing.assert_array_equal(r.windows[:, c, -1], x[r.end_seq, c])
    at = dict((a, (faults, unsure)) for a, faults, unsure in seen)
    assert at[int(1.9 * RATE)] == (set(), False)
    assert at[int(3.5 * RATE)] == ({0}, False)
    assert at[int(5.5 * RATE)] == ({0, 1}, False)
    assert pp.too_many_faults(3, 8) and not pp.too_many_faults(2, 8)
    assert at[int(7.9 * RATE)] == ({0, 1, 5}, True)
    assert at[int(11.9 * RATE)] == ({0, 1}, False)  # channel 5 back: decisions go on
    events = stream.watch.take_events()
    assert [(f.channel, end is None) for f, end in events] == [(0, True), (1, True), (5, True), (5, False)]


def test_a_model_update_mid_spell_keeps_the_failed_channel_read_as_its_training_level():
    """A new model (a retrain: the same channels, slightly other training levels) arriving while an electrode was
    railed started the check from nothing: for the next second the railing channel went to /predict as it was
    (one of 8 Myo channels at its rail: 14-45 % right) and the log said the spell started again, never that the
    first one ended. Now the last second's samples are judged against the new reference at once."""
    mean, std = (0.0,) * 8, (20.0,) * 8
    old = ModelSpec(1, ("REST", "a"), 8, float(RATE), 50, 5, tuple(range(8)), mean, std)
    new = ModelSpec(2, ("REST", "a"), 8, float(RATE), 50, 5, tuple(range(8)), (0.4,) + mean[1:], (21.0,) + std[1:])
    stream = UserStream(1, old, votes=3)
    rng = np.random.default_rng(1)
    x = rng.normal(0, 20, (8 * RATE, 8)).round()
    x[2 * RATE:, 1] = 127  # channel 1 rails from 2 s on
    seen, events = [], []
    for a in range(0, len(x), CHUNK):
        if a == 5 * RATE:
            stream.use_model(new)
        r = stream.append(_msg(a, x[a:a + CHUNK]))
        events += [(f.channel, end is None) for f, end in stream.watch.take_events()]
        if r is not None and a >= 4 * RATE:
            seen.append((a, {f.channel for f in r.faults}, bool((r.windows[:, 1, :] == 127).any())))
    assert all(faults == {1} and not railed for a, faults, railed in seen), \
        [(a / RATE, faults, railed) for a, faults, railed in seen if faults != {1} or railed][:3]
    assert events == [(1, True)]  # one spell, still under way
    assert stream.watch.faults[1].start_seq < 3 * RATE  # since it started, not since the update


def test_channels_an_older_model_was_trained_on_as_constants_are_not_failed_electrodes():
    """A model trained before flat channels got FLAT_STD_FACTOR (a constant channel's std was exactly 1) on a
    4-channel board with two inputs unwired (one at the ADC's rail, one at 0): before the upgrade it decided as
    trained; after it, the live check took both for failed electrodes and made every decision unsure."""
    rng = np.random.default_rng(2)
    x = rng.normal(2048, 120, (400, 4, 50)).round()
    x[:, 2, :], x[:, 3, :] = 4095, 0
    mean, std = pp.channel_mean_std(x)
    old_scaler = {"mean": mean.tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist()}  # the old rule
    meta = {"channels": [0, 1, 2, 3], "n_device_channels": 4, "filter": pp.filter_config(None),
            "scaler": old_scaler, "input_stats": old_scaler}
    ref = pp.channel_reference(meta)
    assert ref["channels"] == [0, 1]
    spec = ModelSpec(1, ("REST", "a"), 4, float(RATE), 50, 5, tuple(ref["channels"]), tuple(ref["mean"]),
                     tuple(ref["std"]))
    stream = UserStream(1, spec, votes=3)
    live = rng.normal(2048, 120, (4 * RATE, 4)).round()
    live[:, 2], live[:, 3] = 4095, 0
    decided = 0
    for a in range(0, len(live), CHUNK):
        r = stream.append(_msg(a, live[a:a + CHUNK]))
        if r is not None:
            decided += 1
            assert (r.faults, r.unsure) == ((), False), a
    assert decided > 0 and stream.watch.take_events() == []
