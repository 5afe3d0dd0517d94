"""How long a backup and a restore of recordings take, and how big the file is (python -m semg.backup).

Starts its own embedded PostgreSQL in a temporary state directory, stores `--hours` of one armband's recording
(8 channels at 500 Hz in 50-sample packets, EMG-like noise, which compresses about as badly as real EMG), makes a
backup, restores it into a second, empty database of the same server and checks every sample came back.

    python bench/backup.py [--hours 1] [--rate 500] [--channels 8]

The LAST stdout line is one JSON object: samples, database_mb, backup_mb, create_s, restore_s, restored_samples;
create_s at full speed (SEMG_BACKUP_MB_PER_S=0, the pace is measured by --live).

What a backup does to live recognition, and the pace that spares it (SEMG_BACKUP_MB_PER_S):

    python bench/backup.py --live [--hours 3] [--paces 0,10,5] [--users 10] [--duration 40] [--rounds 2]

runs bench/latency.py (its own live path: --users devices at 200 Hz x 8 channels, 50 ms packets) once without a
backup and once per pace with backups of the recording made one after another for the whole run (`python -m
semg.backup create`, this PostgreSQL), in an order reversed every round. JSON: per variant the p50/p99 of each
round, the backups made and their mean seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
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
    ap.add_argument("--live", action="store_true", help="live latency while backups run, at each --paces")
    ap.add_argument("--paces", default="0,10,5", help="SEMG_BACKUP_MB_PER_S values to compare (0: full speed)")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--duration", type=float, default=40.0, help="measured seconds per run")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    if a.live:
        try:
            paces = [float(v) for v in a.paces.split(",")]
            if any(v < 0 for v in paces):
                raise ValueError
        except ValueError:
            ap.error(f"--paces {a.paces!r}: comma-separated MB/s, 0 or more")
        return _live(a, paces)

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
        backup.create(out, s.model_copy(update={"semg_backup_mb_per_s": 0}))
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


def _live(a, paces: list[float]) -> int:
    with embedded_postgres("semg-bench-backup-live-") as state:
        from semg import db
        from semg.config import get_settings
        with contextlib.closing(db.connect(get_settings())) as conn:
            conn.autocommit = True
            samples = seed_recording(conn, a.hours, a.rate, a.channels, "Bench Backup")["samples"]
        print(f"{samples:,} samples stored", file=sys.stderr)
        # bench/latency.py makes its own instance: none of this one's settings
        latency_env = {k: v for k, v in os.environ.items() if not k.startswith(("SEMG_", "POSTGRES_", "NATS_"))}
        variants = ["none", *(f"pace_{p:g}" for p in paces)]
        results: dict[str, dict] = {v: {"p50_ms": [], "p99_ms": [], "backups": 0, "backup_s": 0.0} for v in variants}
        for r in range(a.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                lat = subprocess.Popen([sys.executable, str(REPO / "bench" / "latency.py"), "--users", str(a.users),
                                        "--configs", "200hz_8ch", "--packet-ms", "50", "--duration", str(a.duration)],
                                       cwd=REPO, env=latency_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
                res = results[variant]
                try:
                    while lat.poll() is None:  # backups one after another until the run ends (its start-up too)
                        if variant == "none":
                            time.sleep(0.5)
                            continue
                        out = state / "live.tar"
                        t0 = time.perf_counter()
                        subprocess.run([sys.executable, "-m", "semg.backup", "create", str(out)], cwd=REPO,
                                       check=True, env={**os.environ, "SEMG_BACKUP_MB_PER_S": variant[5:]},
                                       capture_output=True, timeout=3600)
                        res["backup_s"] += time.perf_counter() - t0
                        res["backups"] += 1
                        out.unlink()
                finally:
                    if lat.poll() is None:
                        lat.kill()
                lines = [ln for ln in lat.stdout.read().splitlines() if ln.startswith("{")]
                if lat.returncode != 0 or not lines:
                    print(f"bench/latency.py failed (exit {lat.returncode})", file=sys.stderr)
                    return 1
                fig = json.loads(lines[-1])["200hz_8ch"][str(a.users)]
                res["p50_ms"].append(fig["p50_ms"])
                res["p99_ms"].append(fig["p99_ms"])
                print(variant, fig["p50_ms"], fig["p99_ms"], file=sys.stderr)
        for res in results.values():
            res["backup_s"] = round(res["backup_s"] / res["backups"], 1) if res["backups"] else None
    print(json.dumps({"hours": a.hours, "samples": samples, "users": a.users, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
