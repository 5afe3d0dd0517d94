"""Test data for the UI: a user with gestures, a device, a completed capture session and its samples.

The samples are generated inside PostgreSQL (generate_series), so a million of them take seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from psycopg2.extras import Json

from semg import repo


def seed_user(conn, name="Ada Lovelace", email="ada@example.org", gestures=("fist", "open hand"),
              channels=8, rate=1000.0) -> dict:
    user = repo.create_user(conn, name, email, notes="seeded")
    for g in gestures:
        repo.add_gesture(conn, user["id"], g, description=f"{g} (seed)", channels_used=[0, 1],
                         channel_purposes={"0": "flexors", "1": "extensors"})
    dev = repo.register_device(conn, user["id"], channels, rate, name="seed armband")
    return {"user": user, "device": dev}


def seed_samples(conn, user_id: int, device_id: int, start: datetime, samples: int, channels: int = 8,
                 rate: float = 1000.0, block: int = 50, drop_every: int = 97, boot: int = 0) -> int:
    """Insert `samples` samples as blocks of `block` from `start`; every `drop_every`-th block is left out
    (a packet loss of about 1/drop_every). Amplitude alternates every 2.5 s like rest/gesture. Returns
    the number of samples stored."""
    nblocks = samples // block
    with conn.cursor() as cur:
        cur.execute(
            """INSERT INTO sample_blocks (user_id, device_id, boot, seq0, n, channels, sample_rate_hz,
                                          device_millis0, device_time0, server_ts, values)
               SELECT %(u)s, %(d)s, %(boot)s, b * %(n)s, %(n)s, %(c)s, %(rate)s,
                      b * %(n)s * 1000.0 / %(rate)s,
                      %(t0)s::timestamptz + make_interval(secs => b * %(n)s / %(rate)s),
                      %(t0)s::timestamptz + make_interval(secs => (b + 1) * %(n)s / %(rate)s + 0.004),
                      ARRAY(SELECT (CASE WHEN ((b * %(n)s + k / %(c)s) / (%(rate)s * 2.5))::int %% 2 = 1
                                         THEN 900 ELSE 120 END
                                    * (0.6 + 0.1 * (k %% %(c)s))
                                    * sin((b * %(n)s + k / %(c)s) * (0.35 + 0.05 * (k %% %(c)s)))
                                    + 40 * (random() - 0.5))::smallint
                            FROM generate_series(0, %(n)s * %(c)s - 1) AS k)
               FROM generate_series(0, %(nb)s - 1) AS b
               WHERE %(drop)s = 0 OR b %% %(drop)s <> %(drop)s - 1""",
            {"u": user_id, "d": device_id, "boot": boot, "n": block, "c": channels, "rate": rate,
             "t0": start, "nb": nblocks, "drop": drop_every},
        )
        stored = cur.rowcount * block
    conn.commit()
    return stored


def seed_session(conn, user_id: int, device_id: int, start: datetime, gestures=("fist", "open hand"),
                 repetitions=3, hold_s=2.5, rest_s=2.5) -> dict:
    """A completed session whose intervals follow the plan exactly from `start`."""
    s = repo.create_session(conn, user_id, device_id, list(gestures), repetitions, hold_s, rest_s, name="seeded")
    repo.start_session(conn, s["id"], at=start)
    for i in s["intervals"]:
        repo.mark_interval(conn, i["id"], start + timedelta(milliseconds=i["planned_start_ms"]),
                           start + timedelta(milliseconds=i["planned_end_ms"]))
    end = start + timedelta(milliseconds=s["intervals"][-1]["planned_end_ms"])
    repo.end_session(conn, s["id"], at=end)
    return repo.get_session(conn, s["id"])


def seed_job(conn, user_id: int, session_ids, status="completed", epochs=3, with_model=True) -> dict:
    """A training job as the worker would leave it, with epoch metrics, logs and (optionally) an artifact."""
    job = repo.schedule_job(conn, user_id, session_ids, {"epochs": epochs})
    metrics = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
                "train_acc": 0.5 + 0.1 * e, "val_acc": 0.45 + 0.1 * e} for e in range(epochs)]
    done = status in ("completed", "failed", "canceled")
    with conn.cursor() as cur:
        cur.execute(
            """UPDATE training_jobs SET status = %s, progress = %s, epoch_metrics = %s, started_at = now(),
                      finished_at = CASE WHEN %s THEN now() END, error = %s WHERE id = %s""",
            (status, 100 if status == "completed" else 40, Json(metrics), done,
             "training diverged (seed)" if status == "failed" else None, job["id"]),
        )
        cur.execute("INSERT INTO job_logs (job_id, message) VALUES (%s, 'epoch 1 done'), (%s, 'epoch 2 done')",
                    (job["id"], job["id"]))
        if with_model:
            classes = ["REST", "fist", "open hand"]
            cur.execute(
                """INSERT INTO model_artifacts (user_id, job_id, weights, sha256, size_bytes, classes, channels,
                       sample_rate_hz, window_ms, step_ms, scaler, metrics, metadata)
                   VALUES (%s, %s, %s, 'x', 123456, %s, '{0,1,2,3,4,5,6,7}', 1000, 200, 50, '{}', %s, '{}')""",
                (user_id, job["id"], b"\0" * 16, Json(classes),
                 Json({"accuracy": 0.91, "per_class_accuracy": {"REST": 0.95, "fist": 0.9, "open hand": 0.88},
                       "confusion_matrix": {"classes": classes, "matrix": [[19, 1, 0], [1, 18, 1], [0, 2, 18]]}})),
            )
    conn.commit()
    return repo.get_job(conn, job["id"])


def make_servable(conn, artifact_id: int) -> None:
    """Give a seeded model (placeholder weights) real ones of its classes and channels, so that it loads as the API
    serves it (choosing it to be served checks that)."""
    import psycopg2

    from ml_model.rest.demo_models import random_artifact

    with conn.cursor() as cur:
        cur.execute("SELECT classes, channels, sample_rate_hz, window_ms, step_ms FROM model_artifacts WHERE id = %s",
                    (artifact_id,))
        a = cur.fetchone()
        a = a if isinstance(a, dict) else dict(zip(("classes", "channels", "sample_rate_hz", "window_ms", "step_ms"), a))
        weights, meta = random_artifact(len(a["channels"]), float(a["sample_rate_hz"]), classes=a["classes"],
                                        window_ms=float(a["window_ms"]), step_ms=float(a["step_ms"]))
        cur.execute("UPDATE model_artifacts SET weights = %s, sha256 = %s, size_bytes = %s, scaler = %s, metadata = %s "
                    "WHERE id = %s", (psycopg2.Binary(weights), meta["sha256"], len(weights), Json(meta["scaler"]),
                                      Json(meta), artifact_id))
    conn.commit()


def seed_predictions(conn, user_id: int, n=50, gesture="fist") -> None:
    now = datetime.now(UTC)
    with conn.cursor() as cur:
        for i in range(n):
            t = now - timedelta(milliseconds=100 * (n - i))
            cur.execute(
                """INSERT INTO predictions (user_id, gesture, confidence, device_millis, sample_received,
                       decided_at, latency_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                (user_id, gesture if i % 10 > 3 else "REST", 0.8, 1000.0 + i * 100,
                 t - timedelta(milliseconds=35), t, 35.0),
            )
    conn.commit()
