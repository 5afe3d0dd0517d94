"""Demo data set: a user, gesture bank, device, one completed capture session and its synthetic samples.

    python testing/sampledataload.py                       # demo@example.org, 4 gestures x 5 repetitions
    python testing/sampledataload.py --repetitions 8 --channels 8 --replace

Uses the same synthetic sEMG as testing/udpsim.py and the same session layout as the capture page
(semg.repo), with session_intervals' started_at/ended_at matching the sample times exactly, so a newcomer
can schedule a training job on it right away. Re-running adds another session for the same demo user
(--replace deletes the user and everything of theirs first). Prints one JSON object with the ids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.emgsynth import DEFAULT_GESTURES, EmgSynth, Schedule  # noqa: E402

DEVICE_NAME = "demo synthetic sensor"
BLOCK = 25  # samples per stored block, as the sketch sends them


def _find_user(cur, email: str) -> int | None:
    cur.execute("SELECT id FROM users WHERE lower(email) = lower(%s)", (email,))
    row = cur.fetchone()
    return row[0] if row else None


def load(conn, name: str = "Demo User", email: str = "demo@example.org", gestures=DEFAULT_GESTURES,
         repetitions: int = 5, hold_s: float = 3.0, rest_s: float = 2.0, channels: int = 4, rate_hz: float = 500.0,
         seed: int = 42, replace: bool = False, end_time: float | None = None) -> dict:
    """Insert the data set; returns the ids and sizes. The session ends at `end_time` (default: now)."""
    from semg import repo
    from udpserver.ingest import Record
    from udpserver.spool import ChunkBuilder
    from udpserver.storage import copy_into, copy_payload

    with conn.cursor() as cur:
        user_id = _find_user(cur, email)
    conn.commit()
    if user_id is not None and replace:
        from semg.config import get_settings
        repo.delete_user(conn, user_id, get_settings().video_dir)
        user_id = None
    if user_id is None:
        user_id = repo.create_user(conn, name, email, notes="synthetic demo data (testing/sampledataload.py)")["id"]
    bank = {g["name"] for g in repo.list_gestures(conn, user_id)}
    for g in gestures:
        if g not in bank:
            repo.add_gesture(conn, user_id, g, description="synthetic demo gesture")
    device = next((d for d in repo.list_devices(conn, user_id) if d["name"] == DEVICE_NAME
                   and d["channel_count"] == channels and float(d["sample_rate_hz"]) == float(rate_hz)), None)
    key_hex = None
    if device is None:
        device = repo.register_device(conn, user_id, channels, rate_hz, protocol="binary", name=DEVICE_NAME)
        key_hex = device["secret_key_hex"]
    device_id = device["id"]
    with conn.cursor() as cur:  # a new "boot" of the device, after anything it already stored
        cur.execute("SELECT coalesce(max(boot), 0) + 1 FROM sample_blocks WHERE device_id = %s", (device_id,))
        boot = cur.fetchone()[0]
    conn.commit()

    session = repo.create_session(conn, user_id, device_id, list(gestures), repetitions, hold_s, rest_s,
                                  name=f"Synthetic demo session ({repetitions} repetitions)")
    schedule = Schedule.from_plan(session["intervals"])
    total_s = schedule.duration_s
    # a whole second, so sample and cue times are exact in PostgreSQL's microseconds (no boundary jitter)
    t_start = float(int((end_time if end_time is not None else time.time()) - total_s))
    at = lambda s: datetime.fromtimestamp(t_start + s, UTC)  # noqa: E731
    repo.start_session(conn, session["id"], at=at(0))
    for iv in session["intervals"]:
        repo.mark_interval(conn, iv["id"], at(iv["planned_start_ms"] / 1000), at(iv["planned_end_ms"] / 1000))
    repo.end_session(conn, session["id"], "completed", at=at(total_s))

    n = int(round(total_s * rate_hz))
    values, labels = EmgSynth(channels, rate_hz, seed=seed + user_id, gestures=gestures).generate_schedule(
        schedule, 0.0, n)
    millis_base = 5000.0  # the device had been up a few seconds when the session started
    builder = ChunkBuilder()
    for seq0 in range(0, n, BLOCK):
        block = values[seq0:seq0 + BLOCK]
        k = len(block)
        t0 = t_start + seq0 / rate_hz
        builder.add(Record(user_id, device_id, boot, seq0, k, channels, float(rate_hz),
                           millis_base + seq0 * 1000.0 / rate_hz, t0, t0 + (k - 1) / rate_hz + 0.004,
                           np.ascontiguousarray(block, dtype="<i2").tobytes(), 0))
    data, rows, samples = copy_payload([b"".join(builder.parts)])
    with conn.cursor() as cur:
        copy_into(cur, "sample_blocks", data)
    conn.commit()
    counts = {str(lab): int(c) for lab, c in zip(*np.unique(labels.astype(str), return_counts=True), strict=True)}
    return {"user_id": user_id, "email": email, "device_id": device_id, "device_key": key_hex,
            "session_id": session["id"], "intervals": len(session["intervals"]), "gestures": list(gestures),
            "boot": boot, "blocks": rows, "samples": samples, "duration_s": total_s, "samples_per_label": counts,
            "started_at": at(0).isoformat(), "ended_at": at(total_s).isoformat()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python testing/sampledataload.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--name", default="Demo User")
    p.add_argument("--email", default="demo@example.org")
    p.add_argument("--gestures", default=",".join(DEFAULT_GESTURES))
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--hold", type=float, default=3.0, help="seconds per gesture hold")
    p.add_argument("--rest", type=float, default=2.0, help="seconds of rest before each gesture")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--replace", action="store_true", help="delete the demo user and all their data first")
    args = p.parse_args(argv)
    from semg import db, repo
    from semg.config import settings_or_exit
    settings_or_exit("sampledataload")
    try:
        with contextlib.closing(db.connect()) as conn:
            out = load(conn, args.name, args.email, [g.strip() for g in args.gestures.split(",") if g.strip()],
                       args.repetitions, args.hold, args.rest, args.channels, args.rate, args.seed, args.replace)
    except repo.RepoError as e:
        print(f"sampledataload: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one readable line instead of a traceback (e.g. database down)
        print(f"sampledataload: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
