"""Simulators and the demo loader against the real database and udpserver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testing import sampledataload, simulate_arduinodata, udpsim
from testing.emgsynth import REST, EmgSynth, Schedule

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: float = 60) -> list[dict]:
    r = subprocess.run([sys.executable, str(REPO / "testing" / script), *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _stored(conn, device_id: int) -> tuple[int, list[int]]:
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(sum(n), 0), array_agg(DISTINCT boot) FROM sample_blocks WHERE device_id = %s",
                    (device_id,))
        n, boots = cur.fetchone()
    return int(n), sorted(boots or [])


def test_udpsim_cli_registers_and_streams_both_protocols(clean_db, udp_server, tmp_path):
    srv = udp_server()
    out = _run("udpsim.py", "--register", "--users", "2", "--protocol", "both", "--duration", "3", "--rate", "200",
               "--channels", "3", "--batch", "20", "--schedule-out", str(tmp_path / "sched.json"))
    registered = [o["registered"] for o in out if "registered" in o]
    summary = out[-1]
    assert [r["protocol"] for r in registered] == ["binary", "legacy"]
    assert registered[0]["key"] and registered[1]["key"] is None
    assert summary["samples"] >= 2 * 550 and summary["packets"] > 0
    m = srv.wait_settled()
    assert m["packets"]["rejected"] == 0 and m["samples"]["stored"] == summary["samples"]
    for reg, dev in zip(registered, summary["devices"], strict=True):
        assert _stored(clean_db, reg["device_id"])[0] == dev["samples"]
    sched = json.loads((tmp_path / "sched.json").read_text())
    first = sched["devices"][0]["schedule"]
    assert first["t0_unix"] == pytest.approx(summary["t0_unix"])
    assert first["intervals"][1]["label"] == "fist" and "start_time" in first["intervals"][1]


def test_udpsim_follows_schedule_and_counts_loss(clean_db, udp_server):
    from udphelpers import add_device, add_user
    key = b"u" * 32
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=key)
    srv = udp_server()
    schedule = Schedule.cycles(["fist", "open"], repetitions=1, hold_s=1.0, rest_s=0.5)
    sd = udpsim.SimDevice("binary", 4, 500.0, udpsim.SynthSource(EmgSynth(4, 500.0, seed=1), schedule), schedule,
                          device_id=dev, key=key, boot=3)
    sim = udpsim.Simulation([sd], port=srv.addr[1], batch=25, speed=2.0, loss=0.1, seed=4)
    summary = sim.run(duration_s=2.0)
    assert summary["samples"] == 2000 and sd.dropped_packets > 0
    m = srv.wait_settled()
    assert m["samples"]["stored"] == 2000 - 25 * sd.dropped_packets
    # the schedule tells which gesture each stored sample belongs to
    assert sd.label_of_seq(0) == REST and sd.label_of_seq(int(0.6 * 500)) == "fist"
    with clean_db.cursor() as cur:
        cur.execute("SELECT seq, values FROM sensor_samples WHERE device_id = %s ORDER BY seq", (dev,))
        rows = cur.fetchall()
    seqs = np.array([r[0] for r in rows])
    # dropped packets between the first and last delivered one are exactly the gaps the server counted
    assert m["samples"]["lost"] == (seqs.max() - seqs.min() + 1) - len(seqs) > 0
    vals = np.array([r[1] for r in rows], float)
    labels = np.array([sd.label_of_seq(s) for s in seqs])
    # compare settled stretches only: a contraction relaxes over ~0.12 s, so the first 0.3 s of each interval
    # still carries the previous one (otherwise which packets the loss happened to drop decides the ratio)
    settled = labels == np.array([sd.label_of_seq(max(0, s - int(0.3 * 500))) for s in seqs])
    loud = lambda lab: np.sqrt(((vals[(labels == lab) & settled] - 2048) ** 2).mean(0)).max()  # noqa: E731
    assert loud("fist") > 3 * loud(REST) and loud("open") > 3 * loud(REST)


def test_udpsim_follows_a_recording_session_from_its_start(clean_db, udp_server, tmp_path):
    """The capture page starts the session (and its cues) before anyone can type the simulator's command with
    the session id: the gestures must still be held when the UI cues them, or every label is wrong."""
    from semg import repo
    user = repo.create_user(clean_db, "Follower", "follower@example.org")
    repo.add_gesture(clean_db, user["id"], "fist")
    dev = repo.register_device(clean_db, user["id"], 4, 500.0)
    session = repo.create_session(clean_db, user["id"], dev["id"], ["fist"], repetitions=2, hold_s=4.0, rest_s=4.0)
    srv = udp_server()  # ready once it has loaded the device list, which holds the device registered above
    started = repo.start_session(clean_db, session["id"])["started_at"].timestamp()
    out = _run("udpsim.py", "--device", f"{dev['id']}:{dev['secret_key_hex']}", "--session", str(session["id"]),
               "--duration", "10", "--schedule-out", str(tmp_path / "sched.json"))
    assert out[-1]["t0_unix"] > started + 0.5  # the simulator did start later than the session
    fist = json.loads((tmp_path / "sched.json").read_text())["devices"][0]["schedule"]["intervals"][1]
    assert fist["label"] == "fist"
    assert fist["start_time"] == pytest.approx(started + 4.0, abs=0.05)
    srv.wait_settled()
    with clean_db.cursor() as cur:
        cur.execute("SELECT extract(epoch FROM server_ts), values FROM sensor_samples WHERE device_id = %s",
                    (dev["id"],))
        rows = cur.fetchall()
    t = np.array([float(r[0]) for r in rows]) - started
    vals = np.array([r[1] for r in rows], float)
    rms = lambda a, b: np.sqrt(((vals[(t > a) & (t < b)] - 2048) ** 2).mean())  # noqa: E731
    # what arrived while the UI showed the fist cue is the fist; the rest after it is quiet
    assert rms(4.5, 8.0) > 3 * rms(8.5, 11.5), (rms(4.5, 8.0), rms(8.5, 11.5))


def test_udpsim_replays_myo_recordings(clean_db, udp_server):
    from tests_conftest_shim import require_myo_data
    data = require_myo_data()
    # 40 x real time: 138 s of a 200 Hz armband in 3.5 s, beyond any device's sample budget (PROTOCOL.md): the
    # server is started without it, as udpsim's --speed help says
    srv = udp_server("--rate-tolerance", "0")
    out = _run("udpsim.py", "--register", "--replay", str(data), "--subjects", "Female0", "--speed", "40",
               "--duration", "20", timeout=90)
    reg = out[0]["registered"]
    summary = out[-1]
    files = sorted((data / "Female0" / "training0").glob("classe_*.dat"), key=lambda p: int(p.stem.split("_")[1]))
    recorded = np.concatenate([np.fromfile(p, "<i2").reshape(-1, 8) for p in files])
    assert reg["channels"] == 8 and reg["sample_rate_hz"] == 200
    assert summary["samples"] == len(recorded)
    srv.wait_settled(60)
    with clean_db.cursor() as cur:
        cur.execute("SELECT values FROM sample_blocks WHERE device_id = %s ORDER BY boot, seq0", (reg["device_id"],))
        stored = np.concatenate([np.array(r[0], "<i2").reshape(-1, 8) for r in cur.fetchall()])
    assert np.array_equal(stored, recorded)
    values, schedule = udpsim.load_myo_subject(data / "Female0" / "training0")
    assert schedule.intervals[5].label == "fist" and schedule.intervals[7].repetition == 1
    assert schedule.intervals[0].label == REST and schedule.intervals[0].kind == "rest"


def test_arduino_emulator_binary_with_reboot_and_legacy(clean_db, udp_server, tmp_path):
    srv = udp_server()
    out = _run("simulate_arduinodata.py", "--register", "--duration", "4", "--reboot-after", "2",
               "--wifi-connect-s", "0.5", "--nvs", str(tmp_path / "nvs.json"))
    reg, summary = out[0]["registered"], out[-1]
    assert summary["boots"] == 2 and summary["boot"] == 2
    m = srv.wait_settled()
    n, boots = _stored(clean_db, reg["device_id"])
    assert boots == [1, 2] and m["packets"]["rejected"] == 0
    with clean_db.cursor() as cur:
        cur.execute("SELECT DISTINCT n FROM sample_blocks WHERE device_id = %s", (reg["device_id"],))
        assert {r[0] for r in cur.fetchall()} == {simulate_arduinodata.SAMPLES_PER_PACKET}
        cur.execute("SELECT min(device_millis0) FROM sample_blocks WHERE device_id = %s AND boot = 2",
                    (reg["device_id"],))
        assert cur.fetchone()[0] == simulate_arduinodata.SETUP_MS  # millis() restarted at the reboot
    out = _run("simulate_arduinodata.py", "--register", "--legacy", "--duration", "2", "--wifi-connect-s", "0.3",
               "--nvs", str(tmp_path / "nvs2.json"))
    reg, summary = out[0]["registered"], out[-1]
    srv.wait_settled()
    assert _stored(clean_db, reg["device_id"])[0] == summary["packets_sent"] > 500


def test_sampledataload_builds_a_trainable_labelled_session(clean_db):
    out = sampledataload.load(clean_db, repetitions=2, hold_s=2.0, rest_s=1.0, channels=4, rate_hz=500.0)
    again = sampledataload.load(clean_db, repetitions=1, hold_s=1.0, rest_s=1.0, channels=4, rate_hz=500.0)
    assert again["user_id"] == out["user_id"] and again["device_id"] == out["device_id"] and again["boot"] == 2
    assert out["samples"] == out["duration_s"] * 500 and out["intervals"] == 2 * 4 * 2 + 1
    with clean_db.cursor() as cur:
        cur.execute("SELECT status, started_at, ended_at FROM capture_sessions WHERE id = %s", (out["session_id"],))
        status, s_start, s_end = cur.fetchone()
        assert status == "completed"
        cur.execute("""SELECT i.label, count(*), min(x.device_time), max(x.device_time), i.started_at, i.ended_at
                       FROM session_intervals i JOIN sensor_samples x
                         ON x.device_id = %s AND x.boot = 1
                        AND x.device_time >= i.started_at AND x.device_time < i.ended_at
                       WHERE i.session_id = %s GROUP BY i.id ORDER BY i.ordinal""",
                    (out["device_id"], out["session_id"]))
        rows = cur.fetchall()
    assert len(rows) == out["intervals"]
    for label, count, first, last, started, ended in rows:
        expected = (ended - started).total_seconds() * 500
        assert count == pytest.approx(expected, abs=1), label
        assert first == started  # the first sample of each interval is at its start time
    assert rows[0][4] == s_start and rows[-1][5] == s_end


@pytest.mark.parametrize("args, needle", [
    (["--register"], "udpsim: database: connection to server"),
    (["--device", "7:00", "--session", "3"], "udpsim: database: connection to server"),
    (["--register", "--replay", "/nonexistent-replay-dir"], "/nonexistent-replay-dir"),
    (["--legacy-user", "1", "--schedule", "/nonexistent-schedule.json"], "/nonexistent-schedule.json"),
])
def test_udpsim_user_errors_are_one_line(services, args, needle):
    from semg.embedded import free_port
    env = {**os.environ, "POSTGRES_PORT": str(free_port())}  # nothing listens there: the database is down
    r = subprocess.run([sys.executable, str(REPO / "testing" / "udpsim.py"), *args, "--duration", "1"],
                       capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("udpsim: "), r.stderr[-2000:]
