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
