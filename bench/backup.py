"""How long a backup and a restore of recordings take, and how big the file is (python -m semg.backup).

Starts its own embedded PostgreSQL in a temporary state directory, stores `--hours` of one armband's recording
(8 channels at 500 Hz in 50-sample packets, EMG-like noise, which compresses about as badly as real EMG), makes a
backup, restores it into a second, empty database of the same server and checks every sample came back.

    python bench/backup.py [--hours 1] [--rate 500] [--channels 8]

The LAST stdout line is one JSON object: samples, database_mb, backup_mb, create_s, restore_s, restored_samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BLOCK = 50


def _seed(conn, hours: float, rate: float, channels: int) -> int:
    from semg import repo
    user = repo.create_user(conn, "Bench Backup", "bench-backup@example.org")
    dev = repo.register_device(conn, user["id"], channels, rate, name="bench armband")
    blocks = int(hours * 3600 * rate) // BLOCK
    with conn.cursor() as cur:
        for first in range(0, blocks, 20_000):  # in slices: one statement per ~2.8 min of recording at 500 Hz
            cur.execute(
                """INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels, sample_rate_hz,
                                              device_millis0, device_time0, server_ts, values)
                   SELECT %(u)s, %(d)s, 0, b * %(n)s, %(n)s, %(c)s, %(rate)s, b * %(n)s * 1000.0 / %(rate)s,
                          now() + make_interval(secs => b * %(n)s / %(rate)s),
                          now() + make_interval(secs => (b + 1) * %(n)s / %(rate)s),
                          ARRAY(SELECT (2048 + 600 * (random() + random() + random() - 1.5))::smallint
                                FROM generate_series(1, %(n)s * %(c)s) WHERE b >= 0)
                   FROM generate_series(%(lo)s, %(hi)s - 1) AS b""",
                {"u": user["id"], "d": dev["id"], "n": BLOCK, "c": channels, "rate": rate, "lo": first,
                 "hi": min(blocks, first + 20_000)})
    return blocks * BLOCK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--channels", type=int, default=8)
    a = ap.parse_args(argv)

    state = Path(tempfile.mkdtemp(prefix="semg-bench-backup-"))
    os.chmod(state, 0o755)  # the embedded postgres runs unprivileged when we are root
    for var in ("POSTGRES_HOST", "POSTGRES_PASSWORD", "SEMG_BIND_HOST"):
        os.environ.pop(var, None)
    from semg.embedded import free_port
    os.environ.update({"SEMG_STATE_DIR": str(state), "POSTGRES_PORT": str(free_port()), "POSTGRES_DB": "sensordb",
                       "NATS_PORT": str(free_port())})
    (state / "logs").mkdir()
    pg = subprocess.Popen([sys.executable, "-m", "semg.embedded", "postgres"], cwd=REPO,
                          stdout=open(state / "logs" / "postgres.log", "ab"), stderr=subprocess.STDOUT)
    try:
        from semg import backup, db
        from semg.config import get_settings
        db.init(wait=90)
        s = get_settings()
        with contextlib.closing(db.connect(s)) as conn:
            conn.autocommit = True
            samples = _seed(conn, a.hours, a.rate, a.channels)
            with conn.cursor() as cur:
                cur.execute("VACUUM ANALYZE sample_blocks")
                cur.execute("SELECT pg_database_size(current_database())")
                db_bytes = cur.fetchone()[0]
                cur.execute("CREATE DATABASE bench_restored")
        print(f"{samples:,} samples stored ({db_bytes >> 20} MB); backing up", file=sys.stderr)

        out = state / "bench.tar"
        t0 = time.perf_counter()
        backup.create(out, s)
        create_s = time.perf_counter() - t0

        target = s.model_copy(update={"postgres_db": "bench_restored"})  # no videos here: the same state dir
        with contextlib.closing(db.connect(target)) as conn:
            db.migrate(conn)
        t0 = time.perf_counter()
        result = backup.restore(out, target)
        restore_s = time.perf_counter() - t0
        figures = {"hours": a.hours, "rate_hz": a.rate, "channels": a.channels, "samples": samples,
                   "database_mb": round(db_bytes / 2**20, 1), "backup_mb": round(out.stat().st_size / 2**20, 1),
                   "create_s": round(create_s, 2), "restore_s": round(restore_s, 2),
                   "restored_samples": result["restored"]["sample_blocks"]}
        print(json.dumps(figures))
        return 0 if figures["restored_samples"] == samples else 1
    finally:
        pg.send_signal(signal.SIGINT)
        try:
            pg.wait(60)
        except subprocess.TimeoutExpired:
            pg.kill()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
