"""What GET /users/{id}/predictions/live adds to a decision's way: from its publication on NATS (as the inference
worker publishes it) to an HTTP client of the API reading it from the Server-Sent Events stream.

Starts its own PostgreSQL, NATS and API (as supervisord does) in a temporary state directory; for each variant
(streams open at once, one user each) publishes `--rate` decisions per second per user for `--seconds` and reads
them all back in one asyncio client; variants alternate, `--rounds` times (a noisy machine is noisy for all).

    python bench/live_stream.py [--streams 1,10,50] [--rate 20] [--seconds 10] [--rounds 2]

The LAST stdout line is one JSON object: per variant the p50/p99/max milliseconds from publication to receipt
(one clock: the same machine) and decisions sent/received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from _embedded_pg import embedded_postgres  # noqa: E402


def _start(args: list[str], state: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=open(state / "logs" / f"{name}.log", "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def _variant(base: str, users: list[dict], rate: float, seconds: float) -> dict:
    from semg import natsio
    from semg.messages import PredictionMessage, predictions_subject

    latencies: list[float] = []
    ready = [asyncio.Event() for _ in users]
    received = [0]

    async def read(i: int, user: dict, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", f"{base}/users/{user['id']}/predictions/live",
                                 headers={"X-API-Key": user["key"]}) as r:
            r.raise_for_status()
            event = "message"
            async for line in r.aiter_lines():
                if line.startswith(": live"):
                    ready[i].set()
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event != "message":  # `event: stalled` while none are sent
                    event = "message"
                elif line.startswith("data: "):
                    latencies.append(time.time() - json.loads(line[6:])["decided_time"])
                    received[0] += 1

    limits = httpx.Limits(max_connections=len(users) + 5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=120), limits=limits) as client:
        readers = [asyncio.create_task(read(i, u, client)) for i, u in enumerate(users)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)
        nc = await natsio.connect("admin")
        sent, period, t0 = 0, 1.0 / rate, time.monotonic()
        try:
            for tick in range(int(seconds * rate)):
                await asyncio.sleep(max(0.0, t0 + tick * period - time.monotonic()))
                for u in users:  # as the worker publishes: one decision per window of each user
                    now = time.time()
                    msg = PredictionMessage(userid=u["id"], gesture="fist", confidence=0.9, device_millis=tick * 50.0,
                                            sample_recv_time=now, decided_time=now)
                    await nc.publish(predictions_subject(u["id"]), msg.model_dump_json().encode())
                    sent += 1
            await nc.flush(timeout=10)
            deadline = time.monotonic() + 10
            while received[0] < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    ms = np.array(latencies) * 1000.0
    return {"sent": sent, "received": int(received[0]), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,10,50", help="streams open at once per variant (one user each)")
    ap.add_argument("--rate", type=float, default=20.0, help="decisions per second per user (20: a 50 ms hop)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    variants = [int(x) for x in a.streams.split(",")]
    if not variants or min(variants) < 1 or max(variants) > 64:
        ap.error("--streams: 1..64 each (the API's limit)")
    with embedded_postgres("semg-bench-live-") as state:
        from ml_model.rest import keys
        from semg import db, repo
        from semg.config import get_settings
        from semg.embedded import free_port
        os.environ.update({"API_PORT": str(free_port()), "SEMG_PYTHON": sys.executable})
        get_settings.cache_clear()
        nats = _start(["semg.embedded", "nats"], state, "nats")
        api = _start(["ml_model.api"], state, "api")
        base = get_settings().api_url
        try:
            deadline = time.monotonic() + 90
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=2).json()["nats"]["ok"]:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the API did not come up: see {state / 'logs' / 'api.log'}")
                time.sleep(0.3)
            with contextlib.closing(db.connect()) as conn:
                conn.autocommit = True
                users = []
                for i in range(max(variants)):
                    u = repo.create_user(conn, f"Live {i}", f"live{i}@example.org")
                    users.append({"id": u["id"], "key": keys.create_key(conn, "user", u["id"], "bench")["key"]})
            results: dict[str, dict] = {}
            for r in range(a.rounds):
                for n in (variants if r % 2 == 0 else variants[::-1]):
                    out = asyncio.run(_variant(base, users[:n], a.rate, a.seconds))
                    print(f"round {r} streams {n}: {out}", file=sys.stderr)
                    agg = results.setdefault(f"streams_{n}", {"sent": 0, "received": 0, "p50_ms": [], "p99_ms": [],
                                                              "max_ms": []})
                    agg["sent"] += out["sent"]
                    agg["received"] += out["received"]
                    for k in ("p50_ms", "p99_ms", "max_ms"):
                        agg[k].append(out[k])
        finally:
            _stop(api)
            _stop(nats)
    print(json.dumps({"rate_hz": a.rate, "seconds": a.seconds, "rounds": a.rounds, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
