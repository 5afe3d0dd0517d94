"""The inference workers prune decisions older than SEMG_PREDICTION_RETENTION_DAYS, one at a time, and survive a
database that is away while they try."""

from __future__ import annotations

import logging
import re
import time

from ml_model.nat_inference import Options, Worker
from semg import repo
from semg.embedded import free_port


def _seed(conn, user_id: int, old: int, recent: int, days: int) -> None:
    with conn.cursor() as cur:
        cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, decided_at)
                       SELECT %s, 'fist', 0.5, now() - %s * interval '1 day' - i * interval '1 s'
                       FROM generate_series(1, %s) i""", (user_id, days + 1, old))
        cur.execute("""INSERT INTO predictions (user_id, gesture, confidence, decided_at)
                       SELECT %s, 'fist', 0.5, now() - i * interval '1 minute' FROM generate_series(1, %s) i""",
                    (user_id, recent))


def _counts(conn, days: int) -> tuple[int, int, int]:
    with conn.cursor() as cur:
        cur.execute("""SELECT count(*) FILTER (WHERE decided_at < now() - make_interval(days => %s)),
                              count(*) FILTER (WHERE decided_at >= now() - make_interval(days => %s)),
                              (SELECT count(*) FROM sample_blocks) FROM predictions""", (days, days))
        return cur.fetchone()


def test_running_workers_prune_old_decisions_once(workers, model_user, clean_db, monkeypatch):
    uid, dev, _ = model_user()
    other = repo.create_user(clean_db, "Other", "other@example.org")["id"]
    _seed(clean_db, uid, 3000, 40, 30)
    _seed(clean_db, other, 2000, 10, 30)
    with clean_db.cursor() as cur:  # a year-old recording: never pruned
        cur.execute("""INSERT INTO sample_blocks (user_id, device_id, seq0, n, channels, sample_rate_hz, device_millis0,
                       device_time0, server_ts, values) VALUES (%s, %s, 0, 1, 8, 200, 0, now() - interval '365 days',
                       now() - interval '365 days', '{1,2,3,4,5,6,7,8}')""", (uid, dev))
    monkeypatch.setenv("SEMG_PREDICTION_RETENTION_DAYS", "30")
    monkeypatch.setenv("SEMG_INFERENCE_PRUNE_FIRST_S", "0.5")
    procs = workers(2)
    deadline = time.monotonic() + 60
    while _counts(clean_db, 30)[0] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _counts(clean_db, 30) == (0, 50, 1)
    time.sleep(1)  # the other worker's pass, if it came second
    assert all(p.poll() is None for p in procs)
    lines = [m for p in procs for m in re.findall(r"INFO semg.inference: pruned (\d+) decisions older than \S+ "
                                                      r"\(30 days\)", p.log.read_text())]
    assert lines == ["5000"]  # one pass did it all, the other found it busy or done


def test_a_pruning_pass_survives_a_database_outage(clean_db, settings, caplog):
    uid = repo.create_user(clean_db, "A", "a@example.org")["id"]
    _seed(clean_db, uid, 50, 5, 7)
    opts = Options(api_url="http://127.0.0.1:9")
    away = Worker(settings.model_copy(update={"semg_prediction_retention_days": 7, "postgres_port": free_port()}), opts)
    with caplog.at_level(logging.WARNING, logger="semg.inference"):
        assert away.prune_once() is None
    assert "cannot prune old decisions" in caplog.text and "will retry" in caplog.text
    assert _counts(clean_db, 7)[:2] == (50, 5)
    back = Worker(settings.model_copy(update={"semg_prediction_retention_days": 7}), opts)
    assert back.prune_once()["removed"] == 50
    assert _counts(clean_db, 7)[:2] == (0, 5)
    forever = Worker(settings.model_copy(update={"semg_prediction_retention_days": 0}), opts)
    _seed(clean_db, uid, 3, 0, 7)
    assert forever.prune_once()["removed"] == 0 and _counts(clean_db, 7)[:2] == (3, 5)
