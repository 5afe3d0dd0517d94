"""What the review page's CSV says about a recording: the labels training learns from."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pandas as pd

from semg import repo


def _labels(csv: bytes) -> pd.Series:
    df = pd.read_csv(io.BytesIO(csv), keep_default_na=False)
    return df.set_index("seq")["label"]


def test_intervals_marked_without_an_end_are_labelled_in_the_csv_as_training_labels_them(clean_db):
    """POST /intervals/{id}/mark takes an optional end; training then labels the interval for its planned length,
    never past the next cue. The CSV left such samples unlabelled (and the time-range review left the interval
    out), so the file did not say what the model was trained on."""
    import data
    import ui_seed
    base = ui_seed.seed_user(clean_db, gestures=("fist",), channels=2, rate=100.0)
    uid, did = base["user"]["id"], base["device"]["id"]
    start = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    ui_seed.seed_samples(clean_db, uid, did, start, 1000, channels=2, rate=100.0, block=10, drop_every=0)
    s = repo.create_session(clean_db, uid, did, ["fist"], 1, 1.0, 1.0)
    repo.start_session(clean_db, s["id"], at=start)
    rest0, fist, rest1 = s["intervals"]  # each planned 1 s; sample k is at start + k * 10 ms
    at = lambda k: start + timedelta(milliseconds=10 * k)  # noqa: E731
    repo.mark_interval(clean_db, rest0["id"], at(100))               # no end: 1 s, but the next cue comes at 150
    repo.mark_interval(clean_db, fist["id"], at(150), at(300))
    repo.mark_interval(clean_db, rest1["id"], at(400))               # no end, last: its planned 1 s
    repo.end_session(clean_db, s["id"], at=at(999))
    s = repo.get_session(clean_db, s["id"])

    label = _labels(data.export_csv(did, start, at(999), s["intervals"]))
    assert (label[99], label[100], label[149]) == ("", "REST", "REST")
    assert (label[150], label[299], label[300]) == ("fist", "fist", "")
    assert (label[399], label[400], label[499], label[500]) == ("", "REST", "REST", "")

    # the time-range review finds them too, ending where training ends them
    found = data.intervals_between(uid, at(120), at(450))
    assert [(iv["label"], iv["started_at"], iv["ended_at"]) for iv in found] == [
        ("REST", at(100), at(150)), ("fist", at(150), at(300)), ("REST", at(400), at(500))]
    label = _labels(data.export_csv(did, start, at(999), found))
    assert (label[100], label[149], label[450], label[500]) == ("REST", "REST", "REST", "")


def test_the_csv_tells_samples_of_a_restarted_device_apart_by_boot(clean_db):
    """A device that restarts mid-recording (a brown-out, a re-flash) numbers its samples from 0 again. The CSV
    had no boot column: two samples shared each sequence number and a lost packet could not be told from a
    restart. Each row now carries its boot, and every (boot, seq) comes out once with the values stored."""
    import data
    import ui_seed
    base = ui_seed.seed_user(clean_db, gestures=("fist",), channels=2, rate=100.0)
    uid, did = base["user"]["id"], base["device"]["id"]
    start = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    rows = []
    for boot, t, first in ((1, start, 0), (2, start + timedelta(seconds=1), 0)):
        for b in range(5):  # 5 blocks of 10 samples; values say boot, seq and channel; the int16 limits too
            seq0 = first + 10 * b
            values = [[-32768, 32767] if (boot, seq0 + k) == (1, 0) else [boot * 1000 + seq0 + k, -(seq0 + k)]
                      for k in range(10)]
            rows.append((uid, did, boot, seq0, 10, 2, 100.0, 0.0, t + timedelta(milliseconds=100 * b), t,
                         [v for pair in values for v in pair]))
    with clean_db.cursor() as cur:
        cur.executemany("""INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels, sample_rate_hz,
                                                      device_millis0, device_time0, server_ts, values)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""", rows)
    clean_db.commit()

    df = pd.read_csv(io.BytesIO(data.export_csv(did, start, start + timedelta(seconds=3))), keep_default_na=False)
    assert list(df.columns[:4]) == ["time", "t_s", "boot", "seq"]
    assert len(df) == 100 and not df.duplicated(["boot", "seq"]).any()
    assert df.groupby("boot")["seq"].apply(list).to_dict() == {1: list(range(50)), 2: list(range(50))}
    first, later = df.iloc[0], df[(df.boot == 2) & (df.seq == 7)].iloc[0]
    assert (first.ch0, first.ch1) == (-32768, 32767)
    assert (later.ch0, later.ch1) == (2007, -7)


def test_a_gesture_name_is_never_a_spreadsheet_formula_in_the_csv(clean_db):
    """A gesture may be named through the API by a user's key; the operator who opens that user's review CSV in a
    spreadsheet ran `=HYPERLINK(...)` as a formula. Such a label gets a leading ' (shown as text); others as they are."""
    import data
    import ui_seed
    base = ui_seed.seed_user(clean_db, gestures=('=HYPERLINK("http://x.invalid","y")', "fist"), channels=2,
                             rate=100.0)
    uid, did = base["user"]["id"], base["device"]["id"]
    start = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    ui_seed.seed_samples(clean_db, uid, did, start, 400, channels=2, rate=100.0, block=10, drop_every=0)
    at = lambda k: start + timedelta(milliseconds=10 * k)  # noqa: E731
    intervals = [{"label": '=HYPERLINK("http://x.invalid","y")', "started_at": at(0), "ended_at": at(100)},
                 {"label": "fist", "started_at": at(100), "ended_at": at(200)}]
    label = _labels(data.export_csv(did, start, at(399), intervals))
    assert (label[0], label[150]) == ('\'=HYPERLINK("http://x.invalid","y")', "fist")


def test_a_range_starting_inside_a_long_packet_has_that_packets_later_samples(clean_db):
    """A slow device sends long packets (here 10 Hz, 100 samples = 10 s each: legal up to 4076 samples). The
    review fetched only blocks that began at most 5 s before the range, so a range starting 7 s into a packet
    had no samples for its first 3 s, in the chart and in the CSV, though they are stored."""
    import data
    import ui_seed
    base = ui_seed.seed_user(clean_db, gestures=("fist",), channels=1, rate=10.0)
    uid, did = base["user"]["id"], base["device"]["id"]
    start = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    rows = [(uid, did, 1, 100 * b, 100, 1, 10.0, 10_000.0 * b, start + timedelta(seconds=10 * b), start,
             list(range(100 * b, 100 * b + 100))) for b in range(3)]  # each sample's value is its seq
    with clean_db.cursor() as cur:
        cur.executemany("""INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels, sample_rate_hz,
                                                      device_millis0, device_time0, server_ts, values)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""", rows)
    clean_db.commit()
    t0, t1 = start + timedelta(seconds=17), start + timedelta(seconds=24)  # 17.0 .. 24.0 s: seq 170 .. 240

    df = pd.read_csv(io.BytesIO(data.export_csv(did, t0, t1)), keep_default_na=False)
    assert list(df.seq) == list(range(170, 241)) and list(df.ch0) == list(range(170, 241))
    shown = data.signal(did, t0, t1)
    assert list(shown.frame.ch0) == list(range(170, 241)) and shown.samples == 71
    inside = data.signal(did, start + timedelta(seconds=12), start + timedelta(seconds=18))  # within one packet
    assert list(inside.frame.ch0) == list(range(120, 181)) and inside.samples == 61


def test_the_export_size_estimate_is_not_below_the_zip_for_a_device_with_few_channels(clean_db):
    """The web UI builds a user's export zip in its own memory below MAX_UI_EXPORT_BYTES, judged by
    export_size_estimate. It counted 4 bytes per stored value, but the export's CSV carries six columns per sample
    (device, boot, seq, device millis, device time, server time) besides the values: for a one-channel device the
    zip is about 3.5 times the estimate, so an export of well over the limit was still built in the UI."""
    import data
    import ui_seed
    base = ui_seed.seed_user(clean_db, gestures=("fist",), channels=1, rate=1000.0)
    uid, did = base["user"]["id"], base["device"]["id"]
    ui_seed.seed_samples(clean_db, uid, did, datetime(2026, 1, 5, 10, 0, tzinfo=UTC), 300_000, channels=1,
                         rate=1000.0, block=50, drop_every=0)
    clean_db.commit()
    zipped = len(data.export_user(uid))
    assert data.export_size_estimate(uid).bytes >= zipped, (data.export_size_estimate(uid), zipped)
