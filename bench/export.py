"""How long a user's data export takes (the User Management button, GET /users/{id}/export), and how big it is.

Starts its own embedded PostgreSQL in a temporary state directory, stores `--hours` of one armband's recording
(8 channels at 500 Hz in 50-sample packets, EMG-like noise) and `--predictions` decisions, then exports the user
`--rounds` times at each zip compression level of `--levels`, interleaved (the machine is noisy), and checks the
zip's sample count.

    python bench/export.py [--hours 1] [--predictions 144000] [--levels 1,6] [--rounds 2]

The LAST stdout line is one JSON object: samples, predictions, and per level the best seconds, MB and samples/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _embedded_pg import embedded_postgres, seed_recording  # noqa: E402 - bench/ is on sys.path when run


def _seed_predictions(conn, user_id: int, device_id: int, n: int) -> None:
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, device_id, device_millis,
                                                sample_received, decided_at, latency_ms)
                       SELECT %(u)s, (ARRAY['REST', 'fist', 'open hand'])[1 + i %% 3], 0.5 + (i %% 50) / 100.0,
                              %(d)s, i * 25.0, now() + make_interval(secs => i * 0.025),
                              now() + make_interval(secs => i * 0.025 + 0.03), 12.5
                       FROM generate_series(1, %(n)s) AS i""", {"u": user_id, "d": device_id, "n": n})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--predictions", type=int, default=144_000, help="decisions stored (~1 h of live use)")
    ap.add_argument("--levels", default="1,6", help="zip compression levels to compare (1 is the platform's)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    try:
        levels = [int(v) for v in a.levels.split(",")]
        if not levels or any(not 0 <= v <= 9 for v in levels):
            raise ValueError
    except ValueError:
        ap.error(f"--levels {a.levels!r}: comma-separated zlib levels 0-9")

    with embedded_postgres("semg-bench-export-") as state:
        from semg import db, repo
        from semg.config import get_settings
        with contextlib.closing(db.connect(get_settings())) as conn:
            conn.autocommit = True
            seeded = seed_recording(conn, a.hours, a.rate, a.channels, "Bench Export")
            _seed_predictions(conn, seeded["user_id"], seeded["device_id"], a.predictions)
            with conn.cursor() as cur:
                cur.execute("VACUUM ANALYZE")
            print(f"{seeded['samples']:,} samples and {a.predictions:,} decisions stored; exporting",
                  file=sys.stderr)
            out = state / "export.zip"
            best: dict[int, float] = {}
            size: dict[int, int] = {}
            for _ in range(a.rounds):
                for level in levels:
                    repo.EXPORT_ZIP_LEVEL = level
                    t0 = time.perf_counter()
                    with open(out, "wb") as f:
                        manifest = repo.export_user_data(conn, seeded["user_id"], None, out=f)
                    took = time.perf_counter() - t0
                    best[level] = min(best.get(level, took), took)
                    size[level] = out.stat().st_size
                    with zipfile.ZipFile(out) as zf, zf.open(f"samples/device_{seeded['device_id']}.csv") as f:
                        rows = sum(1 for _ in f) - 1
                    if rows != seeded["samples"] or manifest["counts"]["samples"] != seeded["samples"]:
                        print(f"level {level}: {rows} sample rows in the zip, {seeded['samples']} stored",
                              file=sys.stderr)
                        return 1
    figures = {"hours": a.hours, "rate_hz": a.rate, "channels": a.channels, "samples": seeded["samples"],
               "predictions": a.predictions,
               "levels": {str(v): {"export_s": round(best[v], 2), "zip_mb": round(size[v] / 2**20, 1),
                                   "samples_per_s": round(seeded["samples"] / best[v])} for v in levels}}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
