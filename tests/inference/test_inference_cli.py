"""testing/test_inference.py: stored data (a Myo folder, a capture session) through /predict -> JSON report."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np

from tests.conftest import require_myo_data
from tests.inference.conftest import REPO

CLI = [sys.executable, str(REPO / "testing" / "test_inference.py")]


def _run(*args: str) -> dict:
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_myo_folder(api_server, model_user):
    folder = require_myo_data() / "Female0" / "training0"
    uid, _, meta = model_user()
    report = _run("--user-id", str(uid), "--batch", "500", "myo", str(folder), "--cycles", "3", "--labels",
                  ",".join(meta["classes"] + ["x", "y"]))
    assert report["model_id"] == meta["artifact_id"] and report["cycles"] == [3]
    assert 1000 < report["windows"] < 2000 and 0 <= report["accuracy"] <= 1
    assert report["requests"] == -(-report["windows"] // 500)
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "mean"}


def test_capture_session(api_server, model_user, clean_db):
    from semg import repo
    uid, dev, meta = model_user()
    for g in ("fist", "open"):
        repo.add_gesture(clean_db, uid, g)
    s = repo.create_session(clean_db, uid, dev, ["fist", "open"], 1, 2.0, 1.0)
    t0 = dt.datetime(2024, 6, 1, 10, 0, tzinfo=dt.UTC)
    repo.start_session(clean_db, s["id"], at=t0)
    for iv in s["intervals"]:
        repo.mark_interval(clean_db, iv["id"], t0 + dt.timedelta(milliseconds=iv["planned_start_ms"]),
                           t0 + dt.timedelta(milliseconds=iv["planned_end_ms"]))
    total_ms = s["intervals"][-1]["planned_end_ms"]
    repo.end_session(clean_db, s["id"], at=t0 + dt.timedelta(milliseconds=total_ms))
    # 200 Hz x 8 channels stored as the UDP server does: blocks of 20 samples, one gap of one block
    rng = np.random.default_rng(0)
    rows = []
    for b, seq0 in enumerate(range(0, total_ms // 5, 20)):
        if b == 10:
            continue
        t = t0 + dt.timedelta(milliseconds=seq0 * 5)
        rows.append((uid, dev, 0, seq0, 20, 8, 200.0, seq0 * 5.0, t, t, rng.integers(-50, 50, 160).tolist()))
    with clean_db.cursor() as cur:
        cur.executemany("""INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels, sample_rate_hz,
                               device_millis0, device_time0, server_ts, values) VALUES (%s, %s, %s, %s, %s, %s, %s,
                               %s, %s, %s, %s::smallint[])""", rows)
    report = _run("session", str(s["id"]))
    assert report["session"] == s["id"] and report["user_id"] == uid and report["model_id"] == meta["artifact_id"]
    # 5 intervals (rest, fist, rest, open, rest); windows of 250 ms every 25 ms after 300 ms reaction time
    assert 150 < report["windows"] <= 175, report  # 3 x 19 + 2 x 59 at most
    assert set(report["per_class_accuracy"]) == {"REST", "fist", "open"}


def test_a_user_key_gets_its_windows_through_in_smaller_requests(api_server, model_user, clean_db):
    """A user key may send 256 KiB per request: 256 windows of 8 x 50 int16 (273 KB as base64) are refused with 413,
    and the tool then sends as many as fit, instead of stopping."""
    from ml_model.rest import keys as keystore
    folder = require_myo_data() / "Female0" / "training0"
    uid, _, meta = model_user()
    key = keystore.create_key(clean_db, "user", uid, "test_inference")["key"]
    everything = _run("--user-id", str(uid), "myo", str(folder), "--cycles", "3")
    report = _run("--user-id", str(uid), "--api-key", key, "myo", str(folder), "--cycles", "3")
    assert report["windows"] == everything["windows"] and report["accuracy"] == everything["accuracy"]
    assert 100 < report["windows_per_request"] < 256 and everything["windows_per_request"] == 256
    assert report["requests"] == -(-report["windows"] // report["windows_per_request"])
