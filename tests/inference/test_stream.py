"""The worker's per-user buffer (windows on the absolute sequence grid) and its user partitioning."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_model.nat_inference import ModelSpec, UserStream, owner_slot
from semg.messages import SamplesMessage

SPEC = ModelSpec(artifact_id=1, classes=("REST", "a"), n_device_channels=2, sample_rate_hz=100.0, window=10, step=3)


def _msg(seq0: int, values: np.ndarray, device: int = 1, boot: int = 0) -> SamplesMessage:
    n = len(values)
    return SamplesMessage(userid=1, device_id=device, boot=boot, sample_rate_hz=100, channels=2, seq0=seq0,
                          device_millis=[10.0 * (seq0 + i) for i in range(n)], recv_time=[1000.0 + seq0 + i
                                                                                         for i in range(n)],
                          values=values.tolist())


def _feed(stream: UserStream, msgs) -> tuple[list[int], list[np.ndarray]]:
    ends, wins = [], []
    for m in msgs:
        r = stream.append(m)
        if r is not None:
            ends += r.end_seq.tolist()
            wins += list(r.windows)
            assert np.array_equal(r.end_millis, 10.0 * r.end_seq)
            assert np.array_equal(r.end_recv, 1000.0 + r.end_seq)
    return ends, wins


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 50), cuts=st.lists(st.integers(1, 25), min_size=1, max_size=30))
def test_windows_do_not_depend_on_how_samples_are_split(start, cuts):
    total = sum(cuts)
    data = np.arange(total * 2).reshape(total, 2) % 1000
    stream = UserStream(1, SPEC, votes=3)
    msgs, a = [], 0
    for c in cuts:
        msgs.append(_msg(start + a, data[a:a + c]))
        a += c
    ends, wins = _feed(stream, msgs)
    first = start + SPEC.window - 1
    first += (-(first + 1)) % SPEC.step
    assert ends == list(range(first, start + total, SPEC.step))
    for e, w in zip(ends, wins):
        i = e - start
        np.testing.assert_array_equal(w, data[i - SPEC.window + 1:i + 1].T)  # channels first


def test_gap_resent_samples_and_new_boot():
    stream = UserStream(1, SPEC, votes=3)
    d = np.ones((12, 2))
    ends, _ = _feed(stream, [_msg(0, d)])
    assert ends == [11]
    ends, _ = _feed(stream, [_msg(15, d)])            # gap: nothing until a full window after 15
    assert ends == [26] and stream.resets == 1
    epoch = stream.epoch
    ends, _ = _feed(stream, [_msg(15, d)])            # the same samples again (a re-sent batch): ignored
    assert ends == [] and stream.duplicates == 12
    ends, _ = _feed(stream, [_msg(20, d)])            # overlaps what was seen: only 27..31 are new
    assert ends == [29] and stream.resets == 1 and stream.duplicates == 19 and stream.epoch == epoch
    ends, _ = _feed(stream, [_msg(0, d)])             # an old batch of this run arriving late: ignored
    assert ends == [] and stream.next_seq == 32
    ends, _ = _feed(stream, [_msg(32, d, boot=1)])    # new boot (contiguous seq or not)
    assert ends == [41] and stream.resets == 2 and stream.epoch != epoch
    ends, _ = _feed(stream, [_msg(44, d, device=2, boot=1)])  # another device while this one streams: ignored
    assert ends == [] and stream.other_device == 12 and stream.device_id == 1
    stream.last_message -= 1.5  # device 1 has been silent for a while: device 2 takes over
    ends, _ = _feed(stream, [_msg(44, d, device=2, boot=1)])
    assert ends == [53] and stream.device_id == 2
    ends, _ = _feed(stream, [_msg(40, d, device=2, boot=1)])  # older than the run's newest sample: too late
    assert ends == [] and stream.resets == 3 and stream.next_seq == 56


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(1, 25), min_size=1, max_size=30), data=st.data())
def test_resent_and_overlapping_messages_change_nothing(cuts, data):
    """At-least-once delivery: re-sending any seen range, alone or glued to new samples, cuts the same windows."""
    total = sum(cuts)
    values = np.arange(total * 2).reshape(total, 2) % 1000
    clean, resent, a = [], [], 0
    for c in cuts:
        clean.append(_msg(a, values[a:a + c]))
        if a and data.draw(st.booleans()):  # a re-send of something already seen
            lo = data.draw(st.integers(0, a - 1))
            hi = data.draw(st.integers(lo + 1, a))
            resent.append(_msg(lo, values[lo:hi]))
        if a and data.draw(st.booleans()):  # the new chunk arrives glued to seen samples
            lo = data.draw(st.integers(0, a - 1))
            resent.append(_msg(lo, values[lo:a + c]))
        else:
            resent.append(_msg(a, values[a:a + c]))
        a += c
    want_ends, want_wins = _feed(UserStream(1, SPEC, votes=3), clean)
    stream = UserStream(1, SPEC, votes=3)
    ends, wins = _feed(stream, resent)
    assert ends == want_ends and stream.resets == 0
    for w, v in zip(wins, want_wins):
        np.testing.assert_array_equal(w, v)


def test_big_message_grows_the_buffer():
    stream = UserStream(1, SPEC, votes=3)
    ends, wins = _feed(stream, [_msg(0, np.arange(2000).reshape(1000, 2))])
    assert len(ends) == len(range(11, 1000, 3)) and wins[-1].shape == (2, 10)


def test_partition_is_deterministic_balanced_and_stable():
    users = range(1, 2001)
    two = {u: owner_slot(u, {0, 1}) for u in users}
    assert 800 < sum(1 for s in two.values() if s == 0) < 1200
    three = {u: owner_slot(u, {0, 1, 2}) for u in users}
    moved = [u for u in users if three[u] != two[u]]
    assert all(three[u] == 2 for u in moved)  # a new worker only takes users; others stay put
    assert owner_slot(5, set()) is None and owner_slot(5, {7}) == 7


def test_a_lost_packet_is_bridged_and_the_run_goes_on():
    spec = ModelSpec(artifact_id=1, classes=("REST", "a"), n_device_channels=2, sample_rate_hz=100.0, window=20,
                     step=5)  # bridges gaps of up to 5 samples
    data = np.arange(200).reshape(100, 2).astype(float)
    stream = UserStream(1, spec, votes=3)
    ends, _ = _feed(stream, [_msg(0, data[0:30])])
    epoch = stream.epoch
    ends, wins = _feed(stream, [_msg(34, data[34:41])])  # 30..33 lost
    assert stream.resets == 0 and stream.bridged == 4 and stream.epoch == epoch
    assert ends == [34, 39]  # no window ends on a lost sample
    # the window ending at 34 holds the 20 samples received up to it: 11..29 and 34
    np.testing.assert_array_equal(wins[0].T, data[[*range(11, 30), 34]])
    np.testing.assert_array_equal(wins[1].T, data[[*range(16, 30), *range(34, 40)]])
    # 41..43 lost too: windows ending at 44, 49 and 54 would span both gaps, 7 lost samples, over a quarter
    # window: not cut; the one ending at 59 spans only the second (37..40, 44..59)
    ends, wins = _feed(stream, [_msg(44, data[44:60])])
    assert ends == [59] and stream.too_lossy == 3 and stream.resets == 0 and stream.bridged == 7
    np.testing.assert_array_equal(wins[0].T, data[[*range(37, 41), *range(44, 60)]])
    ends, _ = _feed(stream, [_msg(66, data[66:90])])  # 6 lost: more than a quarter window -> a new run
    assert stream.resets == 1 and ends == [89] and stream.epoch != epoch and stream.bridged == 7 and \
        stream.too_lossy == 3


def test_a_reordered_packet_takes_its_place():
    spec = ModelSpec(artifact_id=1, classes=("REST", "a"), n_device_channels=2, sample_rate_hz=100.0, window=20,
                     step=5)
    data = np.arange(200).reshape(100, 2).astype(float) + 1000
    stream = UserStream(1, spec, votes=3)
    _feed(stream, [_msg(0, data[0:30]), _msg(34, data[34:40])])
    ends, wins = _feed(stream, [_msg(30, data[30:34]), _msg(40, data[40:50])])  # 30..33 arrive late
    assert stream.duplicates == 0 and ends == [44, 49]
    np.testing.assert_array_equal(wins[0].T, data[25:45])  # contiguous again


@settings(max_examples=80, deadline=None)
@given(lost=st.lists(st.booleans(), min_size=5, max_size=40), size=st.integers(1, 7))
def test_windows_across_losses_hold_the_last_received_samples_and_span_little(lost, size):
    spec = ModelSpec(artifact_id=1, classes=("REST", "a"), n_device_channels=2, sample_rate_hz=100.0, window=24,
                     step=4)  # bridges up to 6 lost samples
    total = len(lost) * size
    data = np.stack([np.arange(total), -np.arange(total)], axis=1).astype(float) + 1
    stream = UserStream(1, spec, votes=3)
    msgs = [_msg(i * size, data[i * size:(i + 1) * size]) for i, gone in enumerate(lost) if not gone]
    ends, wins = _feed(stream, msgs)
    got = sorted({m.seq0 + j for m in msgs for j in range(len(m.values))})
    for e, w in zip(ends, wins):
        held = [s for s in got if s <= e][-24:]
        assert held[-1] == e and e - held[0] + 1 - 24 <= 6
        np.testing.assert_array_equal(w.T, data[held])
    gaps = [b - a - 1 for a, b in zip(got, got[1:]) if b - a > 1]
    if all(g <= 6 for g in gaps):  # every gap is bridged: one run, and every grid window with little loss is cut
        assert stream.resets == 0
        want = [e for e in got if (e + 1) % 4 == 0 and e >= 23
                and len([s for s in got if s <= e]) >= 24 and e - [s for s in got if s <= e][-24] + 1 - 24 <= 6]
        assert ends == want
    else:
        assert stream.resets >= 1
