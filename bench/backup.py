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
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _embedded_pg import embedded_postgres, seed_recording  # noqa: E402 - bench/ is on sys.path when run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--channels", type=int, default=8)
    a = ap.parse_args(argv)

    with embedded_postgres("semg-bench-backup-") as state:
        from semg import backup, db
        from semg.config import get_settings
        s = get_settings()
        with contextlib.closing(db.connect(s)) as conn:
            conn.autocommit = True
            samples = seed_recording(conn, a.hours, a.rate, a.channels, "Bench Backup")["samples"]
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
                   "restored_samples": result["restored"]["samples"]}
        print(json.dumps(figures))
        return 0 if figures["restored_samples"] == samples else 1


if __name__ == "__main__":
    sys.exit(main())
