"""Live /predict latency while a user API key sends big JSON bodies.

    python bench/body_limit.py [--big-mb 100] [--parallel 2] [--crowd 16] [--seconds 8]

Starts embedded PostgreSQL and NATS and the API in a temporary state dir on free ports (bench/latency.py's
Stack), with one user, a (random-weight) model and a user key for them. A probe sends what the live inference
worker sends -- one 8 x 50 int16 window as data_b64, with the service key -- every 20 ms and times each answer,
in three phases of --seconds each:

    idle        the probe alone
    big         --parallel clients send, over and over, a --big-mb MB nested-list /predict body with the user key
                (what any user key could do before the per-role body limit: the API parsed it on its event loop)
    at_limit    the same clients send the largest body a user key may send (USER_MAX_BODY_BYTES), built from
                the costliest JSON per byte measured (one-value windows: [[[0]],[[0]],...]); refused (413) before
                parsing since the per-request value limit
    at_value_limit  the costliest body a user key may have parsed now: USER_MAX_JSON_VALUES values as one-value
                windows (answered 422: wrong window shape, after parsing)
    b64_max     the largest valid request a user key may send: 245 windows of 8 x 50 as data_b64, each answered
                with 245 decisions (what the inference thread does for it, before the live worker's windows)
    crowd       one process keeps --crowd connections (more than a user key may have under way) sending the
                at_value_limit body at once (asyncio: the crowd itself costs this machine little CPU)

Prints progress on stderr, then ONE JSON line:
    {"user_limit_bytes": .., "user_limit_values": .., "idle": {"p50_ms": .., "p99_ms": .., "max_ms": .., "probes": ..},
     "big": {..., "attack_status": {"413": n}, "attack_bytes": ..}, "at_limit": {...}, "at_value_limit": {...},
     "b64_max": {...}, "crowd": {...}}
To compare with the code before the limit, run the same file from a checkout of that code.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing as mp
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PROBE_PERIOD_S = 0.02


def _stats(lat: list[float]) -> dict:
    if not lat:
        return {"probes": 0}
    a = np.array(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "max_ms": round(float(a.max()), 1), "probes": len(a)}


def _probe(url: str, headers: dict, body: bytes, stop: threading.Event, out: list[float], failed: Counter) -> None:
    import httpx
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t = time.perf_counter()
            r = c.post(url, content=body, headers=headers)
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                failed[str(r.status_code)] += 1
            time.sleep(max(0.0, PROBE_PERIOD_S - (time.perf_counter() - t)))


def _attack(url: str, headers: dict, body: bytes, stop, results) -> None:
    """In its own process: the probe measures the API, not this process's GIL."""
    import httpx
    status: Counter = Counter()
    while not stop.is_set():
        with httpx.Client(timeout=120) as c:  # a new connection each time: a 413 may close it mid-body
            try:
                status[str(c.post(url, content=body, headers=headers).status_code)] += 1
            except httpx.HTTPError as e:
                status[type(e).__name__] += 1
                time.sleep(0.05)
    results.put(dict(status))


def _crowd(url: str, headers: dict, body: bytes, clients: int, stop, results) -> None:
    """In its own process: `clients` connections at once, each sending as soon as it has its answer (asyncio, so
    the crowd costs this machine little CPU of its own)."""
    import asyncio

    import httpx

    async def run() -> Counter:
        status: Counter = Counter()
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
            async def one() -> None:
                while not stop.is_set():
                    try:
                        status[str((await c.post(url, content=body, headers=headers)).status_code)] += 1
                    except httpx.HTTPError as e:
                        status[type(e).__name__] += 1
                        await asyncio.sleep(0.05)
            await asyncio.gather(*(one() for _ in range(clients)))
        return status

    results.put(dict(asyncio.run(run())))


def phase(url: str, probe: tuple[dict, bytes], attack: tuple[dict, bytes] | None, parallel: int,
          seconds: float, crowd: int = 0) -> dict:
    ctx = mp.get_context("fork")  # before the probe thread starts
    stop, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_attack, args=(url, *attack, stop, results)) for _ in range(parallel)] \
        if attack is not None else []
    if crowd:
        procs.append(ctx.Process(target=_crowd, args=(url, *attack, crowd, stop, results)))
    for pr in procs:
        pr.start()
    probe_stop, lat, failed = threading.Event(), [], Counter()
    prober = threading.Thread(target=_probe, args=(url, *probe, probe_stop, lat, failed))
    prober.start()
    time.sleep(seconds)
    probe_stop.set()
    prober.join()
    stop.set()
    status: Counter = Counter()
    for _ in procs:
        status.update(results.get())
    for pr in procs:
        pr.join()
    out = _stats(lat)
    if failed:
        out["probe_failures"] = dict(failed)
    if attack is not None:
        out["attack_status"] = dict(status)
        out["attack_bytes"] = len(attack[1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big-mb", type=float, default=100, help="size of the big nested-list body (MB)")
    p.add_argument("--parallel", type=int, default=2, help="attacking clients at once")
    p.add_argument("--crowd", type=int, default=16, help="connections at once in the crowd phase")
    p.add_argument("--seconds", type=float, default=8, help="length of each phase")
    p.add_argument("--keep", action="store_true", help="keep the temporary state dir and logs")
    args = p.parse_args(argv)
    if not 0 < args.big_mb <= 128 or not 1 <= args.parallel <= 8 or not 1 <= args.crowd <= 64 \
            or not 1 <= args.seconds <= 60:
        p.error("--big-mb 0..128, --parallel 1..8, --crowd 1..64, --seconds 1..60")

    from latency import Stack, log, provision

    try:
        from ml_model.rest.errors import USER_MAX_BODY_BYTES
        user_limit = USER_MAX_BODY_BYTES
    except ImportError:  # the code before the per-role limit
        user_limit = 256 * 2**10
    try:
        from ml_model.rest.errors import USER_MAX_JSON_VALUES
        user_values = USER_MAX_JSON_VALUES
    except ImportError:  # the code before the per-request value limit: measure what it became
        user_values = 8192
    stack = Stack(args.keep)
    results: dict = {"user_limit_bytes": user_limit, "user_limit_values": user_values}
    try:
        log(f"starting PostgreSQL and NATS in {stack.dir}")
        stack.infrastructure()
        from ml_model.rest import keys
        from semg import db, secrets
        conn = db.connect(stack.settings)
        (user,) = provision(conn, 1, 200, 8, seed0=0)
        user_key = keys.create_key(conn, "user", user["user_id"], "bench user")["key"]
        conn.close()
        api = stack.start("api", "-m", "ml_model.api")
        stack.wait_http(f"{stack.settings.api_url}/health", api, "api")
        url = f"{stack.settings.api_url}/predict"
        json_headers = {"Content-Type": "application/json"}
        window = np.random.default_rng(0).integers(-300, 300, (1, 8, 50)).astype("<i2")
        probe_body = json.dumps({"user_id": user["user_id"], "data_b64": base64.b64encode(window.tobytes()).decode(),
                                 "shape": [1, 8, 50], "include_probabilities": False}).encode()
        probe = ({**json_headers, "X-API-Key": secrets.service_api_key(stack.settings)}, probe_body)
        mine = {**json_headers, "X-API-Key": user_key}
        head = b'{"user_id": %d, "windows": [' % user["user_id"]
        win = b"[" + b",".join([b"[" + b",".join([b"-123"] * 50) + b"]"] * 8) + b"]"
        big = head + b",".join([win] * int(args.big_mb * 1e6 // (len(win) + 1))) + b"]}"
        at_limit = head + b",".join([b"[[0]]"] * ((user_limit - len(head) - 2) // 6)) + b"]}"
        assert len(at_limit) <= user_limit
        # user_id and the windows list are 2 values, each one-value window 3 more ([[0]], [0], 0)
        at_values = head + b",".join([b"[[0]]"] * ((user_values - 2) // 3)) + b"]}"
        try:
            from ml_model.rest.errors import json_values
            assert json_values(at_values) <= user_values
        except ImportError:
            pass
        most = np.random.default_rng(1).integers(-300, 300, (245, 8, 50)).astype("<i2")
        b64_max = json.dumps({"user_id": user["user_id"], "data_b64": base64.b64encode(most.tobytes()).decode(),
                              "shape": list(most.shape), "include_probabilities": False}).encode()
        assert len(b64_max) <= user_limit
        log("warming up")
        phase(url, probe, None, 0, 2)
        for name, attack, parallel in (("idle", None, 0), ("big", (mine, big), args.parallel),
                                       ("at_limit", (mine, at_limit), args.parallel),
                                       ("at_value_limit", (mine, at_values), args.parallel),
                                       ("b64_max", (mine, b64_max), args.parallel),
                                       ("crowd", (mine, at_values), 0)):
            log(f"phase {name} ({args.seconds:g} s)")
            results[name] = phase(url, probe, attack, parallel, args.seconds, args.crowd if name == "crowd" else 0)
            log(f"  {json.dumps(results[name])}")
    finally:
        stack.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
