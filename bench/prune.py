"""How long an hourly retention pass (semg.repo.prune_predictions) takes when many decisions are due, and what it does
to the live worker's inserts meanwhile: the batches as they were (each starting at the user's first decision)
against the batches now (each starting where the one before did), with and without a snapshot held elsewhere (a
backup's pg_dump, an export) all through the pass.

Starts its own embedded PostgreSQL in a temporary state directory; for each case stores `--due` decisions of one
user older than the retention and `--kept` recent ones (TRUNCATEd and stored again between cases), then prunes
while a thread COPYs 60 decisions every 0.5 s as the inference worker does (3 users at 40/s).

    python bench/prune.py [--due 1000000] [--kept 200000]

The LAST stdout line is one JSON object: per case the pass seconds, batches, first and last batch ms, and the
insert latency p50/p99 during the pass (and idle, before the first).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg2.extensions  # noqa: E402
from _embedded_pg import embedded_postgres  # noqa: E402 - bench/ is on sys.path when run

DAYS = 90
# the batches before rev-prune: from the user's first decision every time, asynchronous commits
_OLD_BATCH = """DELETE FROM predictions WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM predictions WHERE user_id = %(u)s AND decided_at < %(before)s
    ORDER BY decided_at LIMIT %(n)s))"""


class _Timed(psycopg2.extensions.cursor):
    """Records how long each DELETE statement took, in ms, in the class list `log`."""
    log: list[float] = []

    def execute(self, sql, args=None):
        t = time.monotonic()
        r = super().execute(sql, args)
        if "DELETE FROM predictions" in sql:
            _Timed.log.append((time.monotonic() - t) * 1000)
        return r


def _pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 1) if xs else None


class _Inserter(threading.Thread):
    def __init__(self, user_id: int):
        super().__init__(daemon=True)
        from semg import db
        self.conn, self.user_id, self.done = db.connect(application_name="bench-insert"), user_id, threading.Event()
        self.lat: list[tuple[float, float]] = []

    def run(self) -> None:
        row = f"{self.user_id}\t\\N\tfist\t0.9\t\\N\t1.0\t\\N\t12.5\t\\N\n" * 60
        while not self.done.is_set():
            t = time.monotonic()
            with self.conn, self.conn.cursor() as cur:
                cur.execute("SET LOCAL synchronous_commit TO OFF")
                cur.copy_expert("""COPY predictions (user_id, model_id, gesture, confidence, device_id, device_millis,
                                   sample_received, latency_ms, channel_faults) FROM STDIN""", io.StringIO(row))
            self.lat.append((t, (time.monotonic() - t) * 1000))
            self.done.wait(max(0.0, 0.5 - (time.monotonic() - t)))
        self.conn.close()

    def between(self, t0: float, t1: float) -> dict:
        xs = [ms for t, ms in self.lat if t0 <= t < t1]
        return {"n": len(xs), "p50_ms": _pct(xs, 50), "p99_ms": _pct(xs, 99), "max_ms": _pct(xs, 100)}


def _seed(conn, user_id: int, due: int, kept: int) -> None:
    with conn.cursor() as cur:
        cur.execute("TRUNCATE predictions")
        cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, device_id, decided_at, latency_ms)
                       SELECT %(u)s, 'fist', 0.9, NULL::bigint, now() - make_interval(days => %(days)s + 1)
                              - make_interval(secs => (%(due)s - i) * 0.025), 12.5
                       FROM generate_series(1, %(due)s) i
                       UNION ALL
                       SELECT %(u)s, 'rest', 0.9, NULL, now() - make_interval(secs => (%(kept)s - i) * 0.025), 12.5
                       FROM generate_series(1, %(kept)s) i""", {"u": user_id, "days": DAYS, "due": due, "kept": kept})
        cur.execute("VACUUM ANALYZE predictions")


def _old_pass(conn, user_id: int) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT now() - make_interval(days => %s)", (DAYS,))
        before = cur.fetchone()[0]
    conn.commit()
    total = 0
    while True:
        with conn, conn.cursor() as cur:
            cur.execute("SET LOCAL synchronous_commit TO OFF")
            cur.execute(_OLD_BATCH, {"u": user_id, "before": before, "n": 10_000})
            n = cur.rowcount
        total += n
        if n < 10_000:
            return total
        time.sleep(0.02)  # PRUNE_PAUSE_S


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--due", type=int, default=1_000_000, help="decisions older than the retention")
    ap.add_argument("--kept", type=int, default=200_000, help="recent decisions")
    args = ap.parse_args(argv)
    with embedded_postgres("semg-bench-prune-"):
        from semg import db, repo
        with contextlib.closing(db.connect()) as conn:
            conn.autocommit = True
            user_id = repo.create_user(conn, "Bench", "bench@example.org")["id"]
            ins = _Inserter(user_id)
            ins.start()
            t = time.monotonic()
            time.sleep(10)
            figures: dict = {"due": args.due, "kept": args.kept, "insert_idle": ins.between(t, time.monotonic())}
            for hold in (False, True):
                for variant in ("before", "now"):
                    _seed(conn, user_id, args.due, args.kept)
                    held = db.connect()
                    if hold:
                        held.set_session(isolation_level="REPEATABLE READ")
                        held.cursor().execute("SELECT count(*) FROM users")
                    _Timed.log = []
                    with contextlib.closing(db.connect(cursor_factory=_Timed)) as pc:
                        t = time.monotonic()
                        removed = (_old_pass(pc, user_id) if variant == "before"
                                   else repo.prune_predictions(pc, DAYS, pause_s=0.02)["removed"])
                        took = time.monotonic() - t
                    held.close()
                    log = _Timed.log
                    figures[f"{variant}{'_held_snapshot' if hold else ''}"] = {
                        "removed": removed, "pass_s": round(took, 2), "batches": len(log),
                        "first_batch_ms": round(log[0], 1), "last_full_batch_ms": round(log[-2], 1),
                        "insert_during": ins.between(t, t + took)}
                    print(json.dumps(figures), file=sys.stderr, flush=True)
            ins.done.set()
            ins.join()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
