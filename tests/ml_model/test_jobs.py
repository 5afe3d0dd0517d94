"""Training jobs through the real database: a synthetic capture session is recorded, a job scheduled, the
queue worker trains it; failures show their cause; cancel stops; a dead worker's job is not stuck."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg2.extras
import pytest

from ml_model import artifacts, jobs, training
from ml_model import preprocessing as pp
from semg import repo

REPO = Path(__file__).resolve().parents[2]
RATE = 500.0
CHANNELS = 4
# Per-gesture amplitude of each channel: distinct muscle patterns the model can learn.
PATTERNS = {"REST": [0.05, 0.05, 0.05, 0.05], "fist": [1.0, 0.8, 0.2, 0.1], "open hand": [0.1, 0.3, 1.0, 0.9]}


def record_session(conn, user_id, device_id, gestures=("fist", "open hand"), reps=3, hold_s=2.0, rest_s=1.5,
                   seed=0, stream=True, journal_dir=None, minutes_ago=5, transform=None, lose_every=0, boot=0,
                   packet=25, lead_s=0.0):
    """Create a session through semg.repo, mark its cues as 'happened', store matching sample blocks.
    journal_dir: the marks are left in a capture journal there instead (a window that could not store them and
    was closed), not in the database. minutes_ago: when it started (two sessions of a device must not overlap).
    transform: applied to the float samples (n, CHANNELS) before they are stored as int16.
    lose_every: every lose_every-th packet is not stored (lost on the way). packet: samples per packet.
    lead_s: the device streamed that long before the session started (its packets are not aligned to the start)."""
    rng = np.random.default_rng(seed)
    s = repo.create_session(conn, user_id, device_id, list(gestures), reps, hold_s, rest_s)
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes_ago)
    repo.start_session(conn, s["id"], at=t0)
    marks = []
    for iv in s["intervals"]:
        start = t0 + dt.timedelta(milliseconds=iv["planned_start_ms"])
        end = t0 + dt.timedelta(milliseconds=iv["planned_end_ms"])
        if journal_dir is None:
            repo.mark_interval(conn, iv["id"], start, end)
        marks.append({"v": 1, "session_id": s["id"], "session_created_at": s["created_at"].isoformat(),
                      "op": "mark", "interval_id": iv["id"], "started_at": start.isoformat(),
                      "ended_at": end.isoformat()})
    if journal_dir is not None:
        journal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = journal_dir / f"session{s['id']}-1-test.jsonl"
        path.write_text("".join(json.dumps(m) + "\n" for m in marks))
        quiet = time.time() - 60
        os.utime(path, (quiet, quiet))
    total_ms = s["intervals"][-1]["planned_end_ms"]
    repo.end_session(conn, s["id"], at=t0 + dt.timedelta(milliseconds=total_ms))
    if not stream:
        return s
    n = int((total_ms / 1000 + lead_s) * RATE)
    t_ms = np.arange(n) * 1000 / RATE - lead_s * 1000
    amp = np.zeros((n, CHANNELS))
    for iv in s["intervals"]:
        sel = (t_ms >= iv["planned_start_ms"]) & (t_ms < iv["planned_end_ms"])
        amp[sel] = PATTERNS[iv["label"]]
    x = rng.standard_normal((n, CHANNELS)) * amp * 2000
    x = np.clip(x if transform is None else transform(x), -32768, 32767).astype(np.int16)
    rows, k = [], packet
    for i in range(0, n - k + 1, k):
        if lose_every and (i // k) % lose_every == lose_every - 1:
            continue
        rows.append((user_id, device_id, boot, i, k, CHANNELS, RATE, i * 1000 / RATE,
                     t0 + dt.timedelta(milliseconds=float(t_ms[i])), t0, x[i:i + k].ravel().tolist()))
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(max(seq0 + n), 0) FROM sample_blocks WHERE device_id = %s", (device_id,))
        offset = cur.fetchone()[0]
        rows = [(r[0], r[1], r[2], r[3] + offset, *r[4:]) for r in rows]
        psycopg2.extras.execute_values(cur, """INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels,
            sample_rate_hz, device_millis0, device_time0, server_ts, values) VALUES %s""", rows, page_size=1000)
    return s


def _run_worker_until_idle(timeout=300):
    stop = threading.Event()
    t = threading.Thread(target=jobs.worker_loop, kwargs={"poll_s": 0.2, "stop": stop}, daemon=True)
    t.start()
    return stop, t


def test_a_waiting_worker_is_seen_connected_under_its_name(clean_db):
    """The web UI's Overview tells an idle worker from none by its connection's application_name."""
    import time

    from semg import db

    def connected() -> int:
        with clean_db.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name = %s", (db.TRAINER_APPLICATION_NAME,))
            return cur.fetchone()[0]

    assert connected() == 0
    stop, t = _run_worker_until_idle()
    try:
        deadline = time.monotonic() + 20
        while connected() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert connected() == 1
    finally:
        stop.set()
        t.join(20)
    assert not t.is_alive()
    deadline = time.monotonic() + 20  # the server ends the backend a moment after the client has closed
    while connected() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert connected() == 0


def test_scheduled_job_is_trained_by_the_worker(clean_db, user_device):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 15})
    jobs.worker_loop(once=True, poll_s=0.1)
    done = repo.get_job(clean_db, job["id"])
    assert done["status"] == "completed", (done["error"], repo.job_logs(clean_db, job["id"]))
    assert done["progress"] == 100 and done["artifact_id"] and done["started_at"] and done["finished_at"]
    assert len(done["epoch_metrics"]) >= 1 and {"train_loss", "val_acc"} <= set(done["epoch_metrics"][0])
    model = repo.latest_model(clean_db, u["id"])
    assert model["id"] == done["artifact_id"]
    assert sorted(model["classes"]) == ["REST", "fist", "open hand"]
    assert model["sample_rate_hz"] == RATE and model["window_ms"] == 250 and model["step_ms"] == 25
    assert list(model["channels"]) == [0, 1, 2, 3] and model["size_bytes"] <= 1_000_000
    meta = model["metadata"]
    assert meta["metrics"]["accuracy"] > 0.9, meta["metrics"]
    assert "confusion_matrix" in meta["metrics"] and meta["scaler"]
    with clean_db.cursor() as cur:
        cur.execute("SELECT weights FROM model_artifacts WHERE id = %s", (model["id"],))
        weights = bytes(cur.fetchone()[0])
    pred = artifacts.Predictor(weights, meta)
    assert pred.predict_proba(np.zeros((2, CHANNELS, meta["window"]), np.float32)).shape == (2, 3)


def test_a_job_trains_on_the_labels_waiting_in_capture_journals(clean_db, user_device, settings):
    """Interval times a capture window could not store wait in a journal on the server; only a UI page load
    stored them, so a job the worker took before any page load failed with "no data" (or trained without
    them)."""
    u, d = user_device
    journals = settings.state_dir / "capture-journal"
    try:
        s = record_session(clean_db, u["id"], d["id"], journal_dir=journals)
        job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
        assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
        assert sorted(repo.latest_model(clean_db, u["id"])["classes"]) == ["REST", "fist", "open hand"]
        assert any("waiting in journals" in line["message"] for line in repo.job_logs(clean_db, job["id"]))
        assert all(iv["started_at"] for iv in repo.get_session(clean_db, s["id"])["intervals"])
        assert not list(journals.glob("*.jsonl"))
    finally:
        for f in journals.glob("*.jsonl"):
            f.unlink()


def test_a_job_waits_for_a_journal_another_replay_is_storing(clean_db, user_device, settings):
    """A journal being stored by another replay (a UI page load, the API, another worker) at the moment the job
    replays was taken for a live capture run and skipped: the job read its sessions before those labels were
    stored and failed with "no data" (or trained without them, or on a discarded repetition)."""
    import contextlib
    import fcntl

    from semg import db, journal

    u, d = user_device
    journals = settings.state_dir / "capture-journal"
    try:
        s = record_session(clean_db, u["id"], d["id"], journal_dir=journals)
        path = next(journals.glob(f"session{s['id']}-*.jsonl"))
        job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})

        @contextlib.contextmanager
        def slow_connection():  # the other replay waits a moment for its database connection (a busy pool)
            time.sleep(1.5)
            with contextlib.closing(db.connect(settings)) as conn:
                yield conn

        other = threading.Thread(target=journal.replay_interval_journals,
                                 kwargs={"directory": journals, "connection": slow_connection})
        other.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the other replay holds the journal
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                break
            finally:
                os.close(fd)
            time.sleep(0.01)
        outcome = jobs.run_job(job["id"])
        other.join(10)
        assert outcome == "completed", repo.get_job(clean_db, job["id"])["error"]
        assert sorted(repo.latest_model(clean_db, u["id"])["classes"]) == ["REST", "fist", "open hand"]
    finally:
        for f in journals.glob("*.jsonl"):
            f.unlink()


def test_failing_jobs_show_their_cause_and_change_nothing_else(clean_db, user_device):
    u, d = user_device
    empty = record_session(clean_db, u["id"], d["id"], stream=False)
    job = repo.schedule_job(clean_db, u["id"], [empty["id"]])
    assert jobs.run_job(job["id"]) == "failed"
    j = repo.get_job(clean_db, job["id"])
    assert j["status"] == "failed" and "no data" in j["error"] and j["finished_at"]
    one = record_session(clean_db, u["id"], d["id"], gestures=("fist",), reps=2)
    assert repo.latest_model(clean_db, u["id"]) is None
    # a device with another channel count in the same job: refused when scheduled, and failed by the worker
    # should the device change after scheduling
    d8 = repo.register_device(clean_db, u["id"], CHANNELS, RATE)
    s8 = repo.create_session(clean_db, u["id"], d8["id"], ["fist"], 1, 1, 1)
    repo.end_session(clean_db, s8["id"])
    job3 = repo.schedule_job(clean_db, u["id"], [one["id"], s8["id"]])  # s8 recorded nothing yet
    with clean_db.cursor() as cur:
        cur.execute("UPDATE devices SET channel_count = 8 WHERE id = %s", (d8["id"],))
    clean_db.commit()
    with pytest.raises(repo.Invalid, match="different channel counts"):
        repo.schedule_job(clean_db, u["id"], [one["id"], s8["id"]])
    assert jobs.run_job(job3["id"]) == "failed"
    assert "inconsistent channel counts" in repo.get_job(clean_db, job3["id"])["error"]


def test_a_gesture_that_yields_no_windows_fails_the_job_naming_it(clean_db, user_device):
    """A gesture recorded with holds too short for one window after the reaction time (0.5 s, which the plan
    allows) had no training windows: the job completed with a model that could never recognise it, silently."""
    u, d = user_device
    a = record_session(clean_db, u["id"], d["id"], gestures=("fist",), reps=4, minutes_ago=20)
    b = record_session(clean_db, u["id"], d["id"], gestures=("open hand",), reps=4, hold_s=0.5, seed=1)
    job = repo.schedule_job(clean_db, u["id"], [a["id"], b["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"]) == "failed"
    error = repo.get_job(clean_db, job["id"])["error"]
    assert "'open hand'" in error and f"sessions [{b['id']}]" in error and "0.50 s" in error, error
    assert "'fist'" not in error and repo.latest_model(clean_db, u["id"]) is None
    # with a window that fits its holds it trains, and the model knows it
    job = repo.schedule_job(clean_db, u["id"], [a["id"], b["id"]], {"epochs": 2, "window_ms": 100})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    assert sorted(repo.latest_model(clean_db, u["id"])["classes"]) == ["REST", "fist", "open hand"]


def test_lost_packets_are_bridged_in_training_as_in_live_recognition(clean_db, user_device):
    """Training cut no window across a lost packet: with one packet in 7 lost (25 samples at 500 Hz, a 125-sample
    window) it kept about a tenth of the windows, though the live worker bridges such gaps. Now training bridges
    gaps of up to a quarter window too, and windows holding only received samples."""
    u, d = user_device
    whole = record_session(clean_db, u["id"], d["id"], minutes_ago=20, seed=3)
    lossy = record_session(clean_db, u["id"], d["id"], seed=3, lose_every=7, boot=1)
    cfg = training.merge_config({"sample_rate_hz": 1.0})
    counts = {}
    for name, s in (("whole", whole), ("lossy", lossy)):
        job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
        data = jobs.load_job_data(clean_db, job["id"], cfg)
        counts[name] = len(data["windows"])
        assert sorted(set(data["labels"].astype(str))) == ["REST", "fist", "open hand"]
    assert counts["lossy"] >= 0.8 * counts["whole"], counts
    # the windows hold received samples only: every value of a lossy window is one of the stored samples
    with clean_db.cursor() as cur:
        cur.execute("SELECT values FROM sample_blocks WHERE device_id = %s AND boot = 1", (d["id"],))
        stored = {tuple(v) for (vals,) in cur.fetchall() for v in np.asarray(vals).reshape(-1, CHANNELS).tolist()}
    job = repo.schedule_job(clean_db, u["id"], [lossy["id"]], {"epochs": 2})
    windows = jobs.load_job_data(clean_db, job["id"], cfg)["windows"]
    assert all(tuple(v) in stored for w in windows[::50] for v in np.asarray(w).T.tolist())
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]


def test_a_session_starting_inside_a_long_packet_trains_on_all_its_samples(clean_db, user_device):
    """A slow device sends long packets (legal up to 4076 samples). Training fetched the blocks that began in the
    session only, so the samples of the packet under way when the session started were left out: here the
    first second of the session (2 s packets, the session starting halfway through one)."""
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], packet=1000, lead_s=1.0)
    marked = repo.get_session(clean_db, s["id"])["intervals"]
    t_from = min(iv["started_at"] for iv in marked)
    t_to = max(iv["ended_at"] for iv in marked)
    with clean_db.cursor() as cur:
        _, times, _, seq = jobs._session_samples(cur, d["id"], t_from, t_to)
        cur.execute("""SELECT seq0 + k FROM sample_blocks, generate_series(0, n - 1) AS k WHERE device_id = %s
                       AND device_time0 + make_interval(secs => k / sample_rate_hz) BETWEEN %s AND %s""",
                    (d["id"], t_from, t_to))
        stored = {r[0] for r in cur.fetchall()}
    assert len(stored) > 0.9 * (t_to - t_from).total_seconds() * RATE
    missing = stored - set(seq.tolist())
    assert not missing, f"{len(missing)} of the session's {len(stored)} samples left out (seq {min(missing)}..)"
    assert times.min() < t_from.timestamp() * 1000 <= times.min() + 2000  # the packet under way, not older ones


def test_the_model_records_the_intervals_and_windows_it_was_trained_on(clean_db, user_device):
    """The artifact named its job but not what the job read: the intervals that labelled the samples (which can be
    corrected or discarded later) and the windows per class and repetition were only in the job's log, or nowhere."""
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    redone = next(iv for iv in s["intervals"] if iv["label"] == "fist" and iv["repetition"] == 1)
    repo.discard_interval(clean_db, redone["id"])  # a redone repetition: its times kept, out of training
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    data = jobs.load_job_data(clean_db, job["id"], training.merge_config({"sample_rate_hz": RATE}))
    assert jobs.run_job(job["id"]) == "completed"
    meta = repo.latest_model(clean_db, u["id"])["metadata"]
    got = meta["data"]
    assert got["interval_columns"] == ["id", "label", "repetition", "start_ms", "end_ms"]
    [session] = got["sessions"]
    assert session["id"] == s["id"] and session["device_id"] == d["id"]
    stored = {iv["id"]: iv for iv in repo.get_session(clean_db, s["id"])["intervals"]}
    assert [row[0] for row in session["intervals"]] == [i for i in stored if i != redone["id"]]
    for iv_id, label, rep, start_ms, end_ms in session["intervals"]:
        iv = stored[iv_id]
        assert (label, rep) == (iv["label"], iv["repetition"])
        assert abs(start_ms - iv["started_at"].timestamp() * 1000) < 1e-3
        assert abs(end_ms - iv["ended_at"].timestamp() * 1000) < 1e-3
    classes, counts = np.unique(data["labels"].astype(str), return_counts=True)
    assert got["windows_per_class"] == dict(zip(classes.tolist(), counts.tolist(), strict=True))
    assert got["n_windows"] == len(data["labels"]) == sum(counts)
    assert got["repetitions"] == [0, 1, 2] and got["window_stride"] == data["stride"] and got["thinned"] == 1


def test_a_session_that_gave_no_window_is_not_recorded_as_trained_on(clean_db, user_device):
    """meta["data"] listed every labelled session of the job, also one whose device sent nothing during it."""
    u, d = user_device
    silent = record_session(clean_db, u["id"], d["id"], minutes_ago=20, stream=False)
    recorded = record_session(clean_db, u["id"], d["id"], minutes_ago=10)
    job = repo.schedule_job(clean_db, u["id"], [silent["id"], recorded["id"]])
    data = jobs.load_job_data(clean_db, job["id"], training.merge_config({"sample_rate_hz": RATE}))
    assert [s["id"] for s in jobs.training_data(data)["sessions"]] == [recorded["id"]]


def test_sessions_of_one_repetition_each_are_held_out_as_repetitions(clean_db, user_device):
    """A calibration of one repetition per gesture, recorded again in a second session: both were 'repetition 1', so
    training from scratch failed ('need at least 2 repetitions') and fine-tuning could only check itself on the
    ends of the recordings it learnt from. The sessions are the repetitions then, and the second is held out."""
    u, d = user_device
    first = record_session(clean_db, u["id"], d["id"], reps=1, minutes_ago=10)
    second = record_session(clean_db, u["id"], d["id"], reps=1, seed=1, minutes_ago=5)
    job = repo.schedule_job(clean_db, u["id"], [first["id"], second["id"]], {"epochs": 5})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    meta = repo.latest_model(clean_db, u["id"])["metadata"]
    assert meta["metrics"]["val_sessions"] == [second["id"]] and meta["metrics"]["n_val_windows"] > 0
    assert meta["data"]["groups"] == "sessions" and meta["data"]["repetitions"] == [0]
    assert meta["data"]["group_sessions"] == {"0": first["id"], "1": second["id"]}
    assert any("the sessions are taken as the repetitions" in r["message"] for r in repo.job_logs(clean_db, job["id"]))

    # sessions that could not be held out (each the only one of its gesture) stay one group, as before
    u2 = repo.create_user(clean_db, "Other", "other@example.org")
    for g in ("fist", "open hand"):
        repo.add_gesture(clean_db, u2["id"], g)
    d2 = repo.register_device(clean_db, u2["id"], CHANNELS, RATE)
    only_fist = record_session(clean_db, u2["id"], d2["id"], gestures=("fist",), reps=1, minutes_ago=10)
    only_open = record_session(clean_db, u2["id"], d2["id"], gestures=("open hand",), reps=1, minutes_ago=5)
    job2 = queue_unchecked(clean_db, u2["id"], [only_fist["id"], only_open["id"]])  # scheduling refuses it now
    data = jobs.load_job_data(clean_db, job2["id"], training.merge_config({"sample_rate_hz": RATE}))
    assert data["group_sessions"] is None and set(data["groups"].tolist()) == {0}


def queue_unchecked(conn, user_id, session_ids, params=None) -> dict:
    """A job queued as schedule_job does but without its checks: one queued before a check existed (upgrade)."""
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO training_jobs (user_id, params) VALUES (%s, %s) RETURNING id",
                    (user_id, psycopg2.extras.Json(params or {})))
        job_id = cur.fetchone()[0]
        cur.executemany("INSERT INTO training_job_sessions (job_id, session_id) VALUES (%s, %s)",
                        [(job_id, s) for s in session_ids])
    return repo.get_job(conn, job_id)


def test_a_job_from_scratch_with_nothing_to_hold_out_is_refused_saying_what_to_record(clean_db, user_device):
    """One repetition of each gesture trained from scratch failed with training's 'need at least 2 repetitions
    (groups) so one can be held out for validation': jargon, no word of what to record, and with two sessions of
    different gestures ('2 repetitions'?) puzzling; and it failed only once a worker took it, maybe hours later
    behind other jobs, while the API had answered 201. Scheduling now refuses it, saying why and what to do; a job
    queued before (an upgrade) fails in the worker with the same words."""
    u, d = user_device
    one = record_session(clean_db, u["id"], d["id"], reps=1, minutes_ago=20)
    with pytest.raises(repo.Invalid) as refused:
        repo.schedule_job(clean_db, u["id"], [one["id"]], {"epochs": 2})
    error = str(refused.value)
    assert error.startswith("this session holds one repetition of each gesture: training from scratch holds a "
                            "repetition out"), error
    assert "Record each gesture once more" in error and "fine-tune a pretrained base" in error
    assert repo.list_jobs(clean_db, u["id"]) == []
    assert repo.single_repetition(clean_db, u["id"], [one["id"]])
    assert not repo.single_repetition(clean_db, u["id"] + 1, [one["id"]])  # another user's session: not theirs
    queued = queue_unchecked(clean_db, u["id"], [one["id"]], {"epochs": 2})
    assert jobs.run_job(queued["id"]) == "failed"
    assert repo.get_job(clean_db, queued["id"])["error"] == error

    only_fist = record_session(clean_db, u["id"], d["id"], gestures=("fist",), reps=1, minutes_ago=15)
    only_open = record_session(clean_db, u["id"], d["id"], gestures=("open hand",), reps=1, minutes_ago=10)
    pair = [only_fist["id"], only_open["id"]]
    with pytest.raises(repo.Invalid) as refused:
        repo.schedule_job(clean_db, u["id"], pair, {"epochs": 2})
    error = str(refused.value)
    assert "each holds a gesture no other one does (fist, open hand), so none can be held out" in error, error
    assert "Record each gesture once more" in error
    queued = queue_unchecked(clean_db, u["id"], pair, {"epochs": 2})
    assert jobs.run_job(queued["id"]) == "failed"
    assert repo.get_job(clean_db, queued["id"])["error"] == error

    # what the job can hold out is scheduled: a second repetition of both (the sessions are the repetitions), a
    # session of two repetitions, a base to fine-tune; a redone repetition is not a second one
    assert repo.schedule_job(clean_db, u["id"], [one["id"], only_fist["id"], only_open["id"]])
    assert not repo.single_repetition(clean_db, u["id"], [one["id"], only_fist["id"]])
    two = record_session(clean_db, u["id"], d["id"], reps=2, minutes_ago=5)
    assert repo.schedule_job(clean_db, u["id"], [two["id"]])
    with clean_db, clean_db.cursor() as cur:  # its second repetition redone: left out of training
        cur.execute("UPDATE session_intervals SET discarded = true WHERE session_id = %s AND repetition = 1",
                    (two["id"],))
    with pytest.raises(repo.Invalid, match="this session holds one repetition of each gesture"):
        repo.schedule_job(clean_db, u["id"], [two["id"]])


def test_a_repetition_held_out_of_the_longer_sessions_only_is_named_so(clean_db, user_device):
    """A one-repetition calibration trained with an earlier three-repetition session: repetition 3, held out, is
    only in the longer one, but the Jobs page said 'repetition 3 of every session'. The job names the sessions."""
    u, d = user_device
    short = record_session(clean_db, u["id"], d["id"], reps=1, minutes_ago=10)
    long = record_session(clean_db, u["id"], d["id"], reps=3, seed=1, minutes_ago=5)
    job = repo.schedule_job(clean_db, u["id"], [short["id"], long["id"]], {"epochs": 3})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    meta = repo.latest_model(clean_db, u["id"])["metadata"]
    assert meta["metrics"]["val_groups"] == [2] and meta["data"]["groups"] == "repetitions"
    assert meta["metrics"]["val_repetition_sessions"] == [long["id"]]


def test_a_job_whose_windows_would_exceed_the_memory_budget_trains_on_every_kth(clean_db, user_device, settings):
    """Training windows overlap (one every step_ms): a long recording of many channels at a high rate (16 at 4 kHz:
    ~400 MB a minute as float32, and training holds ~2.6 copies) had no bound and could exhaust the machine's
    memory, the job then killed and re-queued. Above SEMG_TRAIN_MAX_WINDOW_MB the job cuts every k-th window."""
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    cfg = training.merge_config({"sample_rate_hz": 1.0})
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    whole = jobs.load_job_data(clean_db, job["id"], cfg)
    win = whole["windows"].shape[2]
    need = len(whole["windows"]) * CHANNELS * win * 4
    thin = jobs.load_job_data(clean_db, job["id"], cfg, max_window_bytes=need // 3)
    assert whole["thinned"] == 1 and thin["thinned"] >= 3 and thin["stride"] == thin["thinned"] * whole["stride"]
    assert len(thin["windows"]) * thin["thinned"] <= len(whole["windows"]) + 3 * thin["thinned"] * 7  # (run edges)
    assert len(thin["windows"]) * CHANNELS * win * 4 <= need // 3 * 1.1
    assert sorted(set(thin["labels"].astype(str))) == sorted(set(whole["labels"].astype(str)))
    assert set(thin["groups"]) == set(whole["groups"])  # every repetition still there to validate on
    assert jobs.load_job_data(clean_db, job["id"], cfg, max_window_bytes=2 * need)["thinned"] == 1

    # the setting, through a job (8 repetitions: ~3 MB of windows): it trains, says so, the model serves as set
    big = record_session(clean_db, u["id"], d["id"], minutes_ago=30, reps=8)
    job = repo.schedule_job(clean_db, u["id"], [big["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"], settings.model_copy(update={"semg_train_max_window_mb": 1})) == "completed"
    with clean_db.cursor() as cur:
        cur.execute("SELECT message FROM job_logs WHERE job_id = %s AND message LIKE %s", (job["id"], "%SEMG_TRAIN%"))
        said = [r[0] for r in cur.fetchall()]
    assert len(said) == 1 and re.search(r"training uses every ([2-9]|\d\d)(nd|rd|th) window \(one every", said[0]), said
    assert repo.latest_model(clean_db, u["id"])["step_ms"] == cfg["step_ms"]


def test_intervals_marked_without_an_end_or_overlapping(clean_db, user_device):
    """A client that marks only each cue's start (the REST API's ended_at is optional) gets the planned length as
    the end; its cue timer running 1 ms early made that overlap the next cue, and every job on the session failed
    with "internal error: ValueError: capture-plan intervals ... must not overlap", naming nothing."""
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"])
    ivs = sorted(s["intervals"], key=lambda iv: iv["ordinal"])
    started = {iv["id"]: iv["started_at"] for iv in repo.get_session(clean_db, s["id"])["intervals"]}
    for iv in ivs:
        repo.mark_interval(clean_db, iv["id"], started[iv["id"]] - dt.timedelta(milliseconds=iv["ordinal"]))
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    assert sorted(repo.latest_model(clean_db, u["id"])["classes"]) == ["REST", "fist", "open hand"]
    # marked ends that really overlap the next cue: the job fails naming the session and both intervals
    fist = ivs[1]
    nxt = started[ivs[2]["id"]] - dt.timedelta(milliseconds=2)
    repo.mark_interval(clean_db, fist["id"], started[fist["id"]] - dt.timedelta(milliseconds=1),
                       nxt + dt.timedelta(milliseconds=500))
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"]) == "failed"
    error = repo.get_job(clean_db, job["id"])["error"]
    assert error.startswith(f"session {s['id']}: ") and "internal error" not in error, error
    assert "'fist' of repetition 1" in error and "the rest of repetition 1" in error and "0.500 s" in error, error


def test_an_electrode_off_while_recording_is_ignored_and_reported(clean_db, user_device):
    """An ESP32 channel at its rail (electrode disconnected) in every training window got std 1: with the
    electrode back at serving its ~2048 +- EMG values reached the model as thousands and it recognised nothing
    (fist 0 %, open hand 13 %); nobody was told. Now the model ignores the channel and the job log says so."""
    u, d = user_device

    def esp32_off(x):
        x = x + 2048
        x[:, 3] = 4095
        return x

    s = record_session(clean_db, u["id"], d["id"], reps=4, transform=esp32_off)
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 10})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    warned = [line for line in repo.job_logs(clean_db, job["id"]) if line["level"] == "WARNING"]
    assert len(warned) == 1 and warned[0]["message"].startswith("channel 3 did not vary"), warned
    model = repo.latest_model(clean_db, u["id"])
    with clean_db.cursor() as cur:
        cur.execute("SELECT weights FROM model_artifacts WHERE id = %s", (model["id"],))
        pred = artifacts.Predictor(bytes(cur.fetchone()[0]), model["metadata"])
    rng = np.random.default_rng(7)
    for label in ("REST", "fist", "open hand"):  # the electrode is back: channel 3 carries EMG again
        x = 2048 + rng.standard_normal((pred.window * 6, CHANNELS)) * np.asarray(PATTERNS[label]) * 2000
        raw = pp.make_windows(np.clip(x, -32768, 32767).astype(np.int16), pred.window, pred.window // 2)
        names, _ = pred.predict(raw)
        assert np.mean([n == label for n in names]) > 0.9, (label, names)


def test_a_recording_in_which_no_channel_varied_fails_the_job(clean_db, user_device):
    """Every channel at the ADC's rail (the sensor board unpowered or unplugged) was flat, but flat_channels named
    none (each got the same std, none a million times another's): the job completed without a warning, with a
    model answering the same whatever the user does (held-out accuracy 0.50), served in place of the last one."""
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], reps=4, transform=lambda x: np.full_like(x, 4095))
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 10})
    assert jobs.run_job(job["id"]) == "failed"
    error = repo.get_job(clean_db, job["id"])["error"]
    assert error.startswith("no channel varied in the training data (channels 0, 1, 2, 3 constant"), error
    assert repo.latest_model(clean_db, u["id"]) is None


def test_a_session_aborted_in_its_last_repetition_is_validated_on_a_whole_one(clean_db, user_device):
    """Aborted in the first rest of its last repetition: that repetition (rest only) was held out, so early
    stopping chose the epochs on rest alone (3 of 20) and the job reported "held-out accuracy 1.0" for a model
    never validated on a gesture."""
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], reps=4)
    last = [iv for iv in sorted(s["intervals"], key=lambda iv: iv["ordinal"]) if iv["repetition"] == 3]
    with clean_db.cursor() as cur:  # nothing after the first rest of repetition 4 was recorded
        cur.execute("UPDATE session_intervals SET started_at = NULL, ended_at = NULL WHERE id = ANY(%s)",
                    ([iv["id"] for iv in last[1:]],))
    clean_db.commit()
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 20})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    metrics = repo.latest_model(clean_db, u["id"])["metrics"]
    assert metrics["val_groups"] == [2], metrics["val_groups"]
    assert all(v is not None for v in metrics["per_class_accuracy"].values()), metrics["per_class_accuracy"]
    assert "val_repetition_sessions" not in metrics  # the one session holds it: 'of every session'


def test_a_deleted_gesture_no_longer_trains_until_a_gesture_of_its_name_is_added(clean_db, user_device):
    """Deleting a gesture from the bank left its recorded intervals labelled with its name, so every later job
    trained it again and the new model still recognised the gesture the user had removed."""
    u, d = user_device
    pinch = repo.add_gesture(clean_db, u["id"], "pinch")
    PATTERNS["pinch"] = [0.2, 1.0, 0.1, 0.9]
    try:
        s = record_session(clean_db, u["id"], d["id"], gestures=("fist", "pinch", "open hand"), reps=3)
    finally:
        del PATTERNS["pinch"]
    repo.delete_gesture(clean_db, pinch["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    assert sorted(repo.latest_model(clean_db, u["id"])["classes"]) == ["REST", "fist", "open hand"]
    logged = [line["message"] for line in repo.job_logs(clean_db, job["id"])]
    assert any(m.startswith("left out the recordings of gestures deleted from the bank: 'pinch' (sessions "
                            f"[{s['id']}])") for m in logged), logged
    # the intervals after it still end where they did: the rest after each pinch keeps its windows
    data = jobs.load_job_data(clean_db, job["id"], training.merge_config({"sample_rate_hz": 1.0}))
    assert "pinch" not in set(data["labels"].astype(str)) and "\x00" not in "".join(data["labels"].astype(str))
    # adding a gesture of that name again (deleted by mistake) brings its recordings back
    repo.add_gesture(clean_db, u["id"], "pinch")
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    assert sorted(repo.latest_model(clean_db, u["id"])["classes"]) == ["REST", "fist", "open hand", "pinch"]
    # a session holding only deleted gestures fails saying so, not "is the device streaming"
    for g in repo.list_gestures(clean_db, u["id"]):
        repo.delete_gesture(clean_db, g["id"])
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    assert jobs.run_job(job["id"]) == "failed"
    error = repo.get_job(clean_db, job["id"])["error"]
    assert "only rest and deleted gestures ('fist' (sessions" in error, error


def test_gesture_names_typed_decomposed_are_the_same_gesture(clean_db, user_device):
    """'Hände' typed with a decomposed umlaut (as macOS keyboards send it) was a second gesture beside the
    composed one: two classes the user cannot tell apart, and sessions planned with one missed the other."""
    u, _ = user_device
    composed, decomposed = "H\u00e4nde auf", "Ha\u0308nde auf"
    g = repo.add_gesture(clean_db, u["id"], composed)
    with pytest.raises(repo.RepoError, match="already has a gesture with that name"):
        repo.add_gesture(clean_db, u["id"], decomposed)
    s = repo.create_session(clean_db, u["id"], None, [decomposed], 1, 2.0, 1.0)
    assert s["plan"]["gestures"] == [composed]
    assert [iv["gesture_id"] for iv in s["intervals"] if iv["kind"] == "gesture"] == [g["id"]]
    assert repo.add_interval(clean_db, s["id"], "gesture", decomposed, 0, 0, 1000)["gesture_id"] == g["id"]


def train_in_background(conn, job_id: int) -> tuple[threading.Thread, dict]:
    """run_job(job_id) in a thread, returned once training is under way; the dict gets its `status`."""
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(status=jobs.run_job(job_id)))
    t.start()
    deadline = time.monotonic() + 120
    while repo.get_job(conn, job_id)["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return t, result


def test_cancel_stops_a_running_job(clean_db, user_device):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], reps=4)
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 500})
    t, result = train_in_background(clean_db, job["id"])
    r = subprocess.run([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "cancel", str(job["id"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    t.join(120)
    assert result["status"] == "canceled"
    j = repo.get_job(clean_db, job["id"])
    assert j["status"] == "canceled" and j["finished_at"] and repo.latest_model(clean_db, u["id"]) is None


def test_job_of_a_dead_worker_is_requeued_then_failed(clean_db, user_device):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], stream=False)
    job = repo.schedule_job(clean_db, u["id"], [s["id"]])
    for attempt in range(1, jobs.MAX_ATTEMPTS + 1):
        assert jobs.claim_next(clean_db) == job["id"]
        with clean_db.cursor() as cur:  # the worker "dies": its heartbeat goes stale
            cur.execute("UPDATE training_jobs SET heartbeat_at = now() - interval '10 minutes' WHERE id = %s",
                        (job["id"],))
        assert jobs.recover_stale_jobs(clean_db) == [job["id"]]
        status = repo.get_job(clean_db, job["id"])["status"]
        assert status == ("scheduled" if attempt < jobs.MAX_ATTEMPTS else "failed")
    assert "stopped responding" in repo.get_job(clean_db, job["id"])["error"]


@pytest.fixture
def two_trainees(clean_db, user_device):
    """(u, su, v, sv): the job tests' user and a second one, each with a completed capture session."""
    u, d = user_device
    v = repo.create_user(clean_db, "Second", "second@example.org")
    for g in PATTERNS:
        if g != "REST":
            repo.add_gesture(clean_db, v["id"], g)
    dv = repo.register_device(clean_db, v["id"], CHANNELS, RATE)
    su = record_session(clean_db, u["id"], d["id"], stream=False)
    sv = record_session(clean_db, v["id"], dv["id"], stream=False)
    return u, su, v, sv


def test_users_take_turns_in_the_queue(clean_db, two_trainees):
    """Oldest-first let one user's queue (a script, or many retrains scheduled at once) keep everyone else's first
    job waiting until all of it was trained. Now the user with fewer jobs running, then the one whose last job
    started longest ago, goes first; each user's own jobs keep their order."""
    u, su, v, sv = two_trainees

    def schedule(user, session, n=1):
        return [repo.schedule_job(clean_db, user["id"], [session["id"]])["id"] for _ in range(n)]

    def finish(job_id):
        with clean_db.cursor() as cur:
            cur.execute("UPDATE training_jobs SET status = 'canceled', finished_at = now() WHERE id = %s", (job_id,))
        clean_db.commit()

    # one worker, each job done before the next is taken
    first = schedule(u, su, 3)
    late = schedule(v, sv)
    order = []
    while (j := jobs.claim_next(clean_db)) is not None:
        order.append(j)
        finish(j)
    assert order == [first[0], late[0], first[1], first[2]]
    # two workers: while one of the first user's jobs runs, the other user's (newest) job is next
    again = schedule(u, su, 3)
    assert jobs.claim_next(clean_db) == again[0]
    later = schedule(v, sv)
    assert jobs.claim_next(clean_db) == later[0]
    assert jobs.claim_next(clean_db) == again[1]


def test_users_take_turns_when_two_workers_claim_at_once(clean_db, two_trainees):
    """Two workers claiming at the same moment each read the queue before the other's claim was committed: both
    saw the first user with no job running and both took that user's jobs, while the second user's one job
    waited for a whole training. A claim now waits for the one under way, so it sees the job that one took."""
    import psycopg2.extensions

    from semg import db
    u, su, v, sv = two_trainees
    first = [repo.schedule_job(clean_db, u["id"], [su["id"]])["id"] for _ in range(3)]
    late = repo.schedule_job(clean_db, v["id"], [sv["id"]])["id"]
    claimed, commit = threading.Event(), threading.Event()

    class SlowCommit(psycopg2.extensions.connection):
        """A worker whose claim has been made but is not yet committed (the moment the other one claims)."""

        def __exit__(self, *exc):
            claimed.set()
            commit.wait(10)
            return super().__exit__(*exc)

    conns = [db.connect(connection_factory=SlowCommit), db.connect()]
    got: dict[int, int | None] = {}
    try:
        a = threading.Thread(target=lambda: got.__setitem__(0, jobs.claim_next(conns[0], "worker-a")))
        a.start()
        assert claimed.wait(10)
        b = threading.Thread(target=lambda: got.__setitem__(1, jobs.claim_next(conns[1], "worker-b")))
        b.start()
        b.join(0.5)  # the second claim is made while the first is not committed yet
        commit.set()
        a.join(10)
        b.join(10)
    finally:
        commit.set()
        [c.close() for c in conns]
    assert got == {0: first[0], 1: late}, (got, first, late)


def test_a_claim_does_not_read_every_job_of_the_waiting_users(clean_db):
    """Whose turn it is came from an aggregate over every job ever run by each user with a job waiting: jobs are
    kept as long as their user, so a claim read the whole job history of the queue's users (300 finished jobs
    each for 1000 users, one waiting each: ~100 ms per claim, growing with the history, each claim made one at a
    time). The turn is now read per waiting user from indexes; the order is the same."""
    with clean_db.cursor() as cur:
        cur.execute("""INSERT INTO users (name, email) SELECT 'Queue ' || g, 'queue' || g || '@example.org'
                       FROM generate_series(1, 1000) g RETURNING id""")
        users = [r[0] for r in cur.fetchall()]
        cur.execute("""INSERT INTO training_jobs (user_id, status, created_at, started_at, finished_at)
                       SELECT u, 'completed', t, t, t FROM unnest(%s::bigint[]) WITH ORDINALITY AS x(u, k),
                            generate_series(1, 300) g, LATERAL (SELECT now() - make_interval(secs => g * 1000 + k)) AS c(t)""",
                    (users,))
        # the user whose last job started longest ago goes first; running jobs count against their user
        cur.execute("""INSERT INTO training_jobs (user_id, status, started_at)
                       VALUES (%s, 'in-progress', now() - interval '2 days')""", (users[-1],))
        cur.execute("INSERT INTO training_jobs (user_id) SELECT u FROM unnest(%s::bigint[]) u RETURNING id, user_id",
                    (users,))
        waiting = {u: j for j, u in cur.fetchall()}
        cur.execute("ANALYZE training_jobs")
    clean_db.commit()
    with clean_db.cursor() as cur:
        cur.execute("""SELECT user_id FROM training_jobs WHERE user_id = ANY(%s) GROUP BY user_id
                       ORDER BY count(*) FILTER (WHERE status = 'in-progress'), max(started_at), user_id""", (users,))
        expected = [waiting[r[0]] for r in cur.fetchall()][:5]
    # rows of training_jobs the claim reads, from its plan (machine-independent): per waiting user, not per job
    autocommit, clean_db.autocommit = clean_db.autocommit, False
    try:
        with clean_db.cursor() as cur:  # ANALYZE runs the claim: rolled back
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + jobs.CLAIM_SQL, {"worker": "explain"})
            plan = cur.fetchone()[0][0]["Plan"]
    finally:
        clean_db.rollback()
        clean_db.autocommit = autocommit
    read = _rows_read(plan, "training_jobs")
    assert read < 10 * len(users), f"{read} rows of training_jobs read for {len(users)} waiting users"  # was ~300k
    claimed = [jobs.claim_next(clean_db, "scale") for _ in range(5)]
    assert claimed == expected


def _rows_read(node: dict, relation: str) -> int:
    """Rows an EXPLAIN ANALYZE plan (JSON) read from `relation`: returned or filtered out, over all loops."""
    own = 0
    if node.get("Relation Name") == relation:
        own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
               + node.get("Rows Removed by Index Recheck", 0)) * node.get("Actual Loops", 1)
    return own + sum(_rows_read(child, relation) for child in node.get("Plans", []))


def test_two_workers_never_take_the_same_job(clean_db, user_device):
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], stream=False)
    ids = [repo.schedule_job(clean_db, u["id"], [s["id"]])["id"] for _ in range(6)]
    from semg import db
    conns = [db.connect() for _ in range(2)]
    taken = []
    lock = threading.Lock()

    def take(conn):
        while (j := jobs.claim_next(conn)) is not None:
            with lock:
                taken.append(j)

    threads = [threading.Thread(target=take, args=(c,)) for c in conns]
    [t.start() for t in threads]
    [t.join() for t in threads]
    [c.close() for c in conns]
    assert sorted(taken) == sorted(ids)


def test_worker_process_trains_and_requeues_its_job_on_sigterm(clean_db, user_device):
    import signal
    u, d = user_device
    s = record_session(clean_db, u["id"], d["id"], reps=4)
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 500})
    w = subprocess.Popen([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "worker", "--poll", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while repo.get_job(clean_db, job["id"])["progress"] == 0 and time.monotonic() < deadline:
            assert w.poll() is None, w.stdout.read()
            time.sleep(0.2)
        assert repo.get_job(clean_db, job["id"])["status"] == "in-progress"
        w.send_signal(signal.SIGTERM)
        assert w.wait(60) == 0
    finally:
        if w.poll() is None:
            w.kill()
    j = repo.get_job(clean_db, job["id"])
    assert j["status"] == "scheduled" and j["worker"] is None
    assert "re-queued" in repo.job_logs(clean_db, job["id"])[-1]["message"]
    repo.cancel_job(clean_db, job["id"])


def test_cli_rejects_bad_job_ids(services):
    for bad in ("abc", "0"):
        r = subprocess.run([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "cancel", bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "JOB_ID" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "cancel", "987654"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr


def test_gesture_data_stored_before_nfc_and_relinking_is_brought_in_line_by_migration_0005(clean_db, user_device):
    """Stored by the code before: a gesture named with decomposed accents (macOS), and a gesture deleted and added
    again (its intervals stayed unlinked, and trained by label). After the upgrade, no session could be planned
    with the first ("not in this user's gesture bank") and the second's recordings silently stopped training."""
    from semg.db import MIGRATIONS_DIR

    u, d = user_device
    decomposed, composed = "Ha\u0308nde", "H\u00e4nde"
    s = record_session(clean_db, u["id"], d["id"], reps=3)
    with clean_db.cursor() as cur:
        cur.execute("INSERT INTO gestures (user_id, name) VALUES (%s, %s) RETURNING id", (u["id"], decomposed))
        old = cur.fetchone()[0]
        cur.execute("""INSERT INTO capture_sessions (user_id, name, plan) VALUES (%s, '', %s) RETURNING id""",
                    (u["id"], json.dumps({"gestures": [decomposed], "repetitions": 1})))
        planned = cur.fetchone()[0]
        cur.execute("""INSERT INTO session_intervals (session_id, ordinal, kind, gesture_id, label, repetition,
                           planned_start_ms, planned_end_ms) VALUES (%s, 0, 'gesture', %s, %s, 0, 0, 1000)""",
                    (planned, old, decomposed))
        # "fist" deleted and added again by the code before: its intervals unlinked, labelled "fist"
        cur.execute("UPDATE session_intervals SET gesture_id = NULL WHERE session_id = %s AND label = 'fist'",
                    (s["id"],))
    clean_db.commit()
    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 2})
    before = jobs.load_job_data(clean_db, job["id"], training.merge_config({"sample_rate_hz": 1.0}))
    assert "fist" not in set(before["labels"].astype(str))  # the upgrade alone dropped them
    with pytest.raises(repo.Invalid, match="not in this user's gesture bank"):
        repo.create_session(clean_db, u["id"], None, [decomposed], 1, 2.0, 1.0)

    sql = (MIGRATIONS_DIR / "0005_gesture_names_nfc.sql").read_text()
    for _ in range(2):  # and again: nothing more changes
        with clean_db, clean_db.cursor() as cur:
            cur.execute(sql)

    assert [g["name"] for g in repo.list_gestures(clean_db, u["id"]) if g["id"] == old] == [composed]
    assert repo.get_session(clean_db, planned)["plan"]["gestures"] == [composed]
    assert [(iv["label"], iv["gesture_id"]) for iv in repo.get_session(clean_db, planned)["intervals"]] == \
        [(composed, old)]
    new = repo.create_session(clean_db, u["id"], None, [decomposed], 1, 2.0, 1.0)
    assert [iv["gesture_id"] for iv in new["intervals"] if iv["kind"] == "gesture"] == [old]
    after = jobs.load_job_data(clean_db, job["id"], training.merge_config({"sample_rate_hz": 1.0}))
    assert "fist" in set(after["labels"].astype(str)) and not after["deleted_gestures"]


def test_a_session_whose_intervals_were_never_marked_fails_saying_so(clean_db, user_device, tmp_path):
    """A session captured through the API without POST /intervals/{id}/mark has samples but nothing labels them:
    the job said "no samples were recorded during their gesture/rest cues (is the device streaming ...?)"."""
    u, d = user_device
    # streamed, but its marks only in a journal the platform does not read (as if never sent)
    unmarked = record_session(clean_db, u["id"], d["id"], journal_dir=tmp_path / "elsewhere", minutes_ago=5)
    silent = record_session(clean_db, u["id"], d["id"], stream=False, minutes_ago=10)  # marked, nothing streamed
    errors = []
    for ids in ([unmarked["id"]], [unmarked["id"], silent["id"]], [silent["id"]]):
        job = repo.schedule_job(clean_db, u["id"], ids, {"epochs": 2})
        assert jobs.run_job(job["id"]) == "failed"
        errors.append(repo.get_job(clean_db, job["id"])["error"])
    assert errors[0] == (f"no data in the chosen sessions: session {unmarked['id']} has no interval with its actual "
                         "start and end, so no sample is labelled (the capture page records them as it "
                         "cues each interval; through the API: POST /intervals/{id}/mark for each)"), errors[0]
    assert errors[1].startswith(f"no data in the chosen sessions: session {unmarked['id']} has no interval") and \
        errors[1].endswith("; in the others no samples were recorded during their cues"), errors[1]
    assert "is the device streaming while you capture?" in errors[2], errors[2]


def test_a_gesture_renamed_while_a_job_reads_its_sessions_trains_as_one_class(clean_db, user_device):
    """A job reads each session's labels in turn. 'fist' renamed 'grip' (another tab, the API) between two of
    those reads gave the first session's intervals as 'fist' and the second's as 'grip': the model learnt one
    gesture as two classes, each from half its recordings. The job pauses after its first label read here."""
    from semg import db
    u, d = user_device
    first = record_session(clean_db, u["id"], d["id"], minutes_ago=10)
    second = record_session(clean_db, u["id"], d["id"], seed=1, minutes_ago=5)
    job = repo.schedule_job(clean_db, u["id"], [first["id"], second["id"]])
    read_one, go_on = threading.Event(), threading.Event()

    class PauseAfterFirstLabels(psycopg2.extensions.cursor):
        def execute(self, query, vars=None):
            super().execute(query, vars)
            if "FROM session_intervals" in query and not read_one.is_set():
                read_one.set()
                assert go_on.wait(30)

    conn = db.connect(cursor_factory=PauseAfterFirstLabels)
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(jobs.load_job_data(
        conn, job["id"], training.merge_config({"sample_rate_hz": 1.0}))), daemon=True)
    try:
        reader.start()
        assert read_one.wait(30)
        fist = next(g for g in repo.list_gestures(clean_db, u["id"]) if g["name"] == "fist")
        repo.update_gesture(clean_db, fist["id"], name="grip")
        go_on.set()
        reader.join(60)
    finally:
        go_on.set()
        conn.close()
    assert not reader.is_alive() and out, "load_job_data did not finish"
    classes = set(out["labels"].astype(str))
    assert len(classes & {"fist", "grip"}) == 1, classes


def test_a_model_is_tested_as_it_is_served_and_within_the_window_bound(clean_db, user_device):
    """score_job_model read the artifact's metadata raw where serving completes it from its columns: a model whose
    metadata lacks n_device_channels/window (older ones; serving.meta_from_row fills them) failed with KeyError,
    and one trained on a name with decomposed accents (before the bank normalised to NFC) counted every window of
    that gesture 'not in the model'. And the windows were cut at every step with no bound, in the UI's process:
    hours of sessions took gigabytes (training thins them above SEMG_TRAIN_MAX_WINDOW_MB)."""
    import unicodedata
    u, d = user_device
    trained = record_session(clean_db, u["id"], d["id"], minutes_ago=20)
    later = record_session(clean_db, u["id"], d["id"], seed=2, minutes_ago=10)
    job = repo.schedule_job(clean_db, u["id"], [trained["id"]], {"epochs": 8})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]
    first = jobs.score_job_model(clean_db, job["id"], [later["id"]])
    assert first["not_in_model"] == {} and first["stride_ms"] == first["step_ms"], first

    # an older model: its metadata has neither the device's channel count nor the window in samples
    with clean_db.cursor() as cur:
        cur.execute("UPDATE model_artifacts SET metadata = metadata - 'n_device_channels' - 'window' - 'step' "
                    "WHERE job_id = %s", (job["id"],))
    clean_db.commit()
    assert jobs.score_job_model(clean_db, job["id"], [later["id"]])["accuracy"] == first["accuracy"]

    # a model from before the bank's NFC: its class is the decomposed spelling of the gesture now named so
    name = "poing fermé"
    repo.update_gesture(clean_db, next(g["id"] for g in repo.list_gestures(clean_db, u["id"]) if g["name"] == "fist"),
                        name=name)
    nfd = unicodedata.normalize("NFD", name)
    with clean_db.cursor() as cur:
        cur.execute("""UPDATE model_artifacts SET classes = %(c)s::jsonb,
                              metadata = jsonb_set(metadata, '{classes}', %(c)s::jsonb) WHERE job_id = %(j)s""",
                    {"c": json.dumps([nfd if c == "fist" else c for c in first["confusion_matrix"]["classes"]]),
                     "j": job["id"]})
    clean_db.commit()
    again = jobs.score_job_model(clean_db, job["id"], [later["id"]])
    assert again["not_in_model"] == {} and again["accuracy"] == first["accuracy"], again
    assert name in again["confusion_matrix"]["classes"]

    # a gesture renamed since the model was trained: its recordings carry the new name, the model the old one;
    # they are the same gesture (found by the intervals the model learnt from), not one the model does not know
    repo.update_gesture(clean_db, next(g["id"] for g in repo.list_gestures(clean_db, u["id"])
                                       if g["name"] == "open hand"), name="open palm")
    renamed = jobs.score_job_model(clean_db, job["id"], [later["id"]])
    assert renamed["not_in_model"] == {} and renamed["accuracy"] == first["accuracy"], renamed
    assert renamed["renamed"] == {"open hand": "open palm"} and "open palm" in renamed["confusion_matrix"]["classes"]
    # the two gestures now named as the other was when the model was trained (through a third name): each class
    # follows its gesture, not the name it had
    with clean_db.cursor() as cur:  # the model as trained again (without the decomposed spelling above)
        cur.execute("""UPDATE model_artifacts SET classes = %(c)s::jsonb,
                              metadata = jsonb_set(metadata, '{classes}', %(c)s::jsonb) WHERE job_id = %(j)s""",
                    {"c": json.dumps(first["confusion_matrix"]["classes"]), "j": job["id"]})
    clean_db.commit()
    ids = {g["name"]: g["id"] for g in repo.list_gestures(clean_db, u["id"])}
    for gid, to in ((ids[name], "tmp"), (ids["open palm"], "fist"), (ids[name], "open hand")):
        repo.update_gesture(clean_db, gid, name=to)
    swapped = jobs.score_job_model(clean_db, job["id"], [later["id"]])
    assert swapped["renamed"] == {"fist": "open hand", "open hand": "fist"}, swapped["renamed"]
    assert swapped["not_in_model"] == {} and swapped["accuracy"] == first["accuracy"], swapped

    # above the bound every k-th window is cut, as training does, and the result says how far apart they are
    r = subprocess.run([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "score", str(job["id"]),
                        "--sessions", str(later["id"])], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SEMG_TRAIN_MAX_WINDOW_MB": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    thinned = json.loads(r.stdout.strip().splitlines()[-1])
    k = round(thinned["stride_ms"] / thinned["step_ms"])
    assert first["n_windows"] * CHANNELS * 125 * 4 > 2**20 and k >= 2  # 250 ms at 500 Hz, as float32
    assert abs(thinned["n_windows"] - first["n_windows"] / k) <= 40, (thinned["n_windows"], first["n_windows"], k)


def test_a_jobs_model_is_tested_on_sessions_it_did_not_train_on(clean_db, user_device):
    """A researcher (or a user after a one-repetition calibration) could not test a stored model on another
    session (another day's): `evaluate` only retrains on a Myo-layout folder. `TrainMLJob.py score` gives the Jobs
    page's figures on the chosen sessions' windows."""
    u, d = user_device
    trained = record_session(clean_db, u["id"], d["id"], gestures=("fist",), minutes_ago=20)
    later = record_session(clean_db, u["id"], d["id"], seed=2, minutes_ago=10)  # fist and open hand
    job = repo.schedule_job(clean_db, u["id"], [trained["id"]], {"epochs": 8, "window_ms": 600})
    assert jobs.run_job(job["id"]) == "completed", repo.get_job(clean_db, job["id"])["error"]

    def score(*args):
        return subprocess.run([sys.executable, str(REPO / "ml_model" / "TrainMLJob.py"), "score", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    r = score(job["id"], "--sessions", f"{later['id']},{trained['id']}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["sessions"] == sorted([later["id"], trained["id"]]) and out["trained_on"] == [trained["id"]]
    assert out["confusion_matrix"]["classes"] == ["REST", "fist"] and out["accuracy"] > 0.8, out
    assert sum(map(sum, out["confusion_matrix"]["matrix"])) == out["n_windows"] == sum(out["windows_per_class"].values())
    assert out["not_in_model"]["open hand"] > 0  # a gesture the model does not know: counted, left out
    # the same windows the platform would cut and label (load_sessions_data), and the served model's own answers
    data = jobs.load_sessions_data(clean_db, u["id"], [later["id"], trained["id"]],
                                   {"window_ms": out["window_ms"], "step_ms": out["step_ms"]})
    assert out["n_windows"] + out["not_in_model"]["open hand"] == len(data["labels"])

    # a session whose gesture holds were too short for a window: tested on the windows it has (its rests), where
    # training's rule (every gesture recorded must give windows) refused the whole test
    brief = record_session(clean_db, u["id"], d["id"], hold_s=0.5, seed=3, minutes_ago=3)  # < the 600 ms window
    r = score(job["id"], "--sessions", brief["id"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["windows_per_class"].keys() == {"REST"}

    other = repo.create_user(clean_db, "Else", "else@example.org")
    repo.add_gesture(clean_db, other["id"], "fist")
    theirs = repo.create_session(clean_db, other["id"], None, ["fist"], 1, 1.0, 1.0)
    waiting = repo.schedule_job(clean_db, u["id"], [trained["id"]])
    for args, said in (((job["id"], "--sessions", theirs["id"]), f"session {theirs['id']} not found for user"),
                       ((waiting["id"], "--sessions", later["id"]), f"job {waiting['id']} has no model (scheduled)"),
                       ((job["id"],), "--sessions: give the capture session ids"),
                       ((job["id"], "--sessions", "x"), "--sessions must be whole numbers")):
        r = score(*args)
        assert r.returncode == 2 and said in r.stderr, (args, r.stderr[-1500:])
