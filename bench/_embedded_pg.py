"""For benches that need a database of their own: an embedded PostgreSQL in a temporary state directory, and one
armband's recording stored in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = 50


@contextlib.contextmanager
def embedded_postgres(prefix: str) -> Iterator[Path]:
    """Start an embedded PostgreSQL on a free port for the settings of this process (SEMG_STATE_DIR etc. are
    set in os.environ), wait for its schema, yield the state directory; stop it and remove everything after."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(state, 0o755)  # the embedded postgres runs unprivileged when we are root
    for var in ("POSTGRES_HOST", "POSTGRES_PASSWORD", "SEMG_BIND_HOST", "SEMG_INTERNAL_BIND_HOST",
                "SEMG_UDP_BIND_HOST"):
        os.environ.pop(var, None)
    from semg.embedded import free_port
    os.environ.update({"SEMG_STATE_DIR": str(state), "POSTGRES_PORT": str(free_port()), "POSTGRES_DB": "sensordb",
                       "NATS_PORT": str(free_port())})
    (state / "logs").mkdir()
    pg = subprocess.Popen([sys.executable, "-m", "semg.embedded", "postgres"], cwd=REPO,
                          stdout=open(state / "logs" / "postgres.log", "ab"), stderr=subprocess.STDOUT)
    try:
        from semg import db
        db.init(wait=90)
        yield state
    finally:
        pg.send_signal(signal.SIGINT)
        try:
            pg.wait(60)
        except subprocess.TimeoutExpired:
            pg.kill()
        shutil.rmtree(state, ignore_errors=True)


def seed_recording(conn, hours: float, rate: float, channels: int, name: str = "Bench") -> dict:
    """A user and one device with `hours` of samples in 50-sample packets (EMG-like noise, which compresses about
    as badly as real EMG). Returns {"user_id", "device_id", "samples"}."""
    from semg import repo
    user = repo.create_user(conn, name, f"{name.lower().replace(' ', '-')}@example.org")
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
    return {"user_id": user["id"], "device_id": dev["id"], "samples": blocks * BLOCK}
