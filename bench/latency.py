"""End-to-end live latency: UDP packet that completes a window -> decision received on NATS.

    python bench/latency.py [--users 1,10,50,100] [--duration 10] [--workers 1] [--packet-ms 50,10]

Starts its own full live path in a temporary state dir on free ports: embedded PostgreSQL and NATS, the API,
the inference worker(s) and the UDP server. For each simulated user it registers a device and inserts a
model (seeded random weights: latency does not depend on training). Then, for each configuration
(200 Hz x 8 channels, 500 Hz x 4 channels) and each user count N, N devices stream in real time (binary
signed packets every --packet-ms, devices staggered within the period) and every decision is matched to the
send time of the packet holding the window's last sample. Sender and receiver are separate processes and
share CLOCK_MONOTONIC.

Packet periods: the first (default 50 ms) is what the platform's own senders send (the ESP32 sketch's
SAMPLES_PER_PACKET, the Myo bridge's --batch); the others (default 10 ms: five times the packets, as from a
bridge run with --batch 2) are measured alongside, interleaved per user count so both see the same machine.

Prints a breakdown per run, then ONE JSON line; the configuration keys hold the first packet period, each
further period has the same shape under "packet_ms_<period>":
    {"packet_ms": 50, "200hz_8ch": {"50": {"p50_ms": .., "p95_ms": .., "p99_ms": .., "decisions_per_s": ..}, ...},
     "500hz_4ch": {...}, "packet_ms_10": {"200hz_8ch": {...}, "500hz_4ch": {...}}}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {"200hz_8ch": (200, 8), "500hz_4ch": (500, 4)}
WARMUP_S = 2.0
SENDER_TICK_S = 0.001
_OWN_VARS = ["POSTGRES_HOST", "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD", "NATS_SERVER", "NATS_USER",
             "NATS_PASSWORD", "SEMG_SERVICE_KEY", "SEMG_UI_PASSWORD", "SEMG_BIND_HOST"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the platform under test ----------------------------------------------------------------------------
class Stack:
    def __init__(self, keep: bool):
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="semg-bench-"))
        os.chmod(self.dir, 0o755)  # the embedded postgres may run as an unprivileged user
        from semg.embedded import free_port
        for var in _OWN_VARS:
            os.environ.pop(var, None)
        self.env = {
            "SEMG_STATE_DIR": str(self.dir), "POSTGRES_PORT": str(free_port()), "NATS_PORT": str(free_port()),
            "API_PORT": str(free_port()), "UI_PORT": str(free_port()), "UDP_PORT": str(free_port(udp=True)),
            "UDP_METRICS_PORT": str(free_port()), "POSTGRES_DB": "sensordb",
            "LOG_LEVEL": os.environ.get("SEMG_BENCH_LOG_LEVEL", "WARNING"),
        }
        os.environ.update(self.env)
        from semg.config import get_settings
        get_settings.cache_clear()
        self.settings = get_settings()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        (self.dir / "logs").mkdir(exist_ok=True)

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        out = open(self.dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=dict(os.environ), stdout=out,
                             stderr=subprocess.STDOUT)
        self.procs.append((name, p))
        return p

    def wait_port(self, port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
        from semg.embedded import port_in_use
        deadline = time.monotonic() + timeout
        while not port_in_use(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; see {self.dir}/logs")
            time.sleep(0.1)

    def wait_http(self, url: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not become healthy; see {self.dir}/logs")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)

    def infrastructure(self) -> None:
        from semg import db
        s = self.settings
        self.wait_port(s.postgres_port, self.start("postgres", "-m", "semg.embedded", "postgres"), "postgres")
        self.wait_port(s.nats_port, self.start("nats", "-m", "semg.embedded", "nats"), "nats")
        db.init(s, wait=60)

    def services(self, workers: int, udp_commit_ms: float | None = None) -> None:
        s = self.settings
        api = self.start("api", "-m", "ml_model.api")
        self.wait_http(f"{s.api_url}/health", api, "api")
        if udp_commit_ms is None:
            udp = self.start("udpserver", "-m", "udpserver.udpserver")
        else:  # what-if experiment: the UDP server with another commit pacing (its class constant)
            code = ("import sys; from udpserver import storage; "
                    f"storage.DbWriter.COMMIT_INTERVAL_S = {udp_commit_ms / 1000!r}; "
                    "from udpserver.udpserver import main; sys.exit(main())")
            udp = self.start("udpserver", "-c", code)
        self.wait_http(f"http://127.0.0.1:{s.udp_metrics_port}/health", udp, "udpserver")
        for i in range(workers):
            self.start(f"inference-{i}", "-m", "ml_model.nat_inference")

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT if name in ("postgres", "nats") else signal.SIGTERM)
        for _name, p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.keep:
            log(f"state and logs kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def provision(conn, n_users: int, rate: int, channels: int, seed0: int) -> list[dict]:
    """Users with a binary device and a (random-weight) model each."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    out = []
    for i in range(n_users):
        u = repo.create_user(conn, f"bench {rate}hz {i}", f"bench-{rate}-{i}-{seed0}@example.org")
        d = repo.register_device(conn, u["id"], channels, rate, name=f"bench-{i}")
        weights, meta = random_artifact(channels, rate, seed=seed0 + i)
        insert_artifact(conn, u["id"], weights, meta)
        out.append({"user_id": u["id"], "device_id": d["id"], "key": bytes.fromhex(d["secret_key_hex"]),
                    "window": meta["window"], "step": meta["step"]})
    return out


# ---- sender (own process) ---------------------------------------------------------------------------------
def _sender(port: int, packets: list[list[bytes]], offsets: np.ndarray, period_s: float, t_start: float,
            conn) -> None:
    """Send packets[k][d] at t_start + k*period + offsets[d]; report when each actually went out.

    Sleeps between due times (no busy wait: the CPU is shared with the system under test), waking at most
    every SENDER_TICK_S; what is late is sent at once and timed when sent, so lateness never shows up as
    pipeline latency.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    n_ticks, n_dev = len(packets), len(packets[0])
    sent = np.zeros((n_ticks, n_dev))
    due = (t_start + np.arange(n_ticks)[:, None] * period_s + offsets[None, :]).ravel()
    order = np.argsort(due, kind="stable")
    addr = ("127.0.0.1", port)
    i = 0
    while i < len(order):
        now = time.monotonic()
        while i < len(order) and due[order[i]] <= now:
            k, d = divmod(int(order[i]), n_dev)
            sock.sendto(packets[k][d], addr)
            sent[k, d] = time.monotonic()
            i += 1
        if i < len(order):
            # wake at most every SENDER_TICK_S: 50 devices x 100 packets/s would otherwise be 5000 wake-ups a
            # second of harness CPU taken from the system under test (real devices are other machines)
            time.sleep(max(SENDER_TICK_S, due[order[i]] - time.monotonic()))
    conn.send(sent)
    conn.close()


# ---- one measured run -------------------------------------------------------------------------------------
async def run_once(stack: Stack, devices: list[dict], rate: int, channels: int, duration: float,
                   packet_ms: float, boot: int, breakdown: bool = False) -> tuple[dict, dict]:
    from semg import natsio
    from udpserver.protocol import build_binary

    per_packet = max(1, round(rate * packet_ms / 1000))
    period = per_packet / rate
    n_ticks = int((duration + WARMUP_S) / period)
    n_dev = len(devices)
    rng = np.random.default_rng(boot)
    packets = [[None] * n_dev for _ in range(n_ticks)]
    for d, dev in enumerate(devices):
        sig = rng.integers(-80, 80, size=(n_ticks * per_packet, channels), dtype=np.int16)
        for k in range(n_ticks):
            seq0 = k * per_packet
            packets[k][d] = build_binary(dev["device_id"], boot, seq0, int(seq0 * 1000 / rate), rate,
                                         sig[seq0:seq0 + per_packet], dev["key"])
    offsets = np.arange(n_dev) / n_dev * period  # devices are not synchronised

    received: list[tuple[float, bytes]] = []
    nc = await natsio.connect("admin", stack.settings)

    async def on_decision(msg) -> None:
        received.append((time.monotonic(), msg.data))

    await nc.subscribe("emg.predictions.*", cb=on_decision, pending_msgs_limit=10**6)
    samples_seen: list[tuple[float, bytes]] = []
    if breakdown:
        async def on_samples(msg) -> None:
            samples_seen.append((time.monotonic(), msg.data))
        await nc.subscribe("emg.samples.*", cb=on_samples, pending_msgs_limit=10**6)
    await nc.flush()

    # The harness must not stall its own clocks: a full collection over the ~10^5 prepared packets and the
    # growing list of decisions took up to 90 ms here, which showed up as pipeline latency. Nothing below
    # makes reference cycles, so collection is off until the run is over.
    gc.collect()
    gc.freeze()
    gc.disable()
    parent, child = mp.Pipe(duplex=False)
    t_start = time.monotonic() + 0.5
    proc = mp.get_context("fork").Process(
        target=_sender, args=(stack.settings.udp_port, packets, offsets, period, t_start, child), daemon=True)
    proc.start()
    sent = None
    while sent is None:
        await asyncio.sleep(0.1)
        if parent.poll():
            sent = parent.recv()
    proc.join()
    await asyncio.sleep(1.0)  # the last windows' decisions
    await nc.close()
    gc.enable()
    gc.unfreeze()

    # match decisions to the packet that completed their window
    from semg.messages import PredictionMessage
    by_user = {dev["user_id"]: d for d, dev in enumerate(devices)}
    measure_from = t_start + WARMUP_S
    measure_to = t_start + n_ticks * period
    import orjson
    sample_at: dict[tuple[int, int], float] = {}  # (user, seq) -> when its samples message arrived here
    for t, raw in samples_seen:
        m = orjson.loads(raw)
        for i in range(len(m["values"])):
            sample_at[(m["userid"], m["seq0"] + i)] = t
    lat, server, to_samples, from_samples, slow = [], [], [], [], []
    seen = set()
    dup = 0
    for t_recv, raw in received:
        m = PredictionMessage.model_validate_json(raw)
        d = by_user.get(m.userid)
        if d is None or m.seq is None:
            continue
        k = m.seq // per_packet
        if k >= n_ticks:
            continue
        if (m.userid, m.seq) in seen:
            dup += 1
            continue
        seen.add((m.userid, m.seq))
        t_sent = sent[k, d]
        if measure_from <= t_sent < measure_to:
            lat.append((t_recv - t_sent) * 1000)
            server.append((m.decided_time - m.sample_recv_time) * 1000)
            ts = sample_at.get((m.userid, m.seq))
            if ts is not None:
                to_samples.append((ts - t_sent) * 1000)
                from_samples.append((t_recv - ts) * 1000)
                slow.append((round(t_sent - measure_from, 3), m.userid, round((ts - t_sent) * 1000, 1),
                             round((m.decided_time - m.sample_recv_time) * 1000 - (ts - t_sent) * 1000, 1),
                             round((t_recv - t_sent) * 1000, 1)))
    win, step = devices[0]["window"], devices[0]["step"]
    # windows whose last packet was sent in the measured period
    first = win - 1 + (-win) % step  # first window end on the (seq + 1) % step == 0 grid
    ends = np.arange(first, n_ticks * per_packet, step)
    expected_all = 0
    for e in ends:
        k = e // per_packet
        expected_all += int(np.sum((sent[k] >= measure_from) & (sent[k] < measure_to)))
    lat_a = np.array(lat) if lat else np.array([np.nan])
    srv_a = np.array(server) if server else np.array([np.nan])
    span = measure_to - measure_from
    res = {
        "p50_ms": round(float(np.percentile(lat_a, 50)), 2),
        "p95_ms": round(float(np.percentile(lat_a, 95)), 2),
        "p99_ms": round(float(np.percentile(lat_a, 99)), 2),
        "decisions_per_s": round(len(lat) / span, 1),
    }
    detail = {
        "expected": expected_all, "received": len(lat), "duplicates": dup,
        "ingest_to_decided_p50_ms": round(float(np.percentile(srv_a, 50)), 2),
        "ingest_to_decided_p99_ms": round(float(np.percentile(srv_a, 99)), 2),
        "max_ms": round(float(np.max(lat_a)), 2),
    }
    if slow:  # (s into the run, user, udp->samples ms, samples->decided ms, total ms) of the slowest
        detail["slowest"] = sorted(slow, key=lambda r: -r[-1])[:8]
        if os.environ.get("SEMG_BENCH_DUMP"):  # profiling aid: every matched decision, for offline analysis
            with open(os.environ["SEMG_BENCH_DUMP"], "w") as f:
                json.dump({"measure_from": measure_from, "rows": slow}, f)
        if os.environ.get("SEMG_BENCH_SPIKES"):  # profiling aid: when the slow ones happened
            detail["spikes_at_s"] = sorted({round(r[0], 1) for r in slow if r[3] > 30})
    if to_samples:
        for name, arr in (("udp_to_samples_msg", to_samples), ("samples_msg_to_decision", from_samples)):
            detail[f"{name}_p50_ms"] = round(float(np.percentile(arr, 50)), 2)
            detail[f"{name}_p99_ms"] = round(float(np.percentile(arr, 99)), 2)
    return res, detail


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", default="1,10,50,100", help="comma-separated user counts")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (after warm-up)")
    p.add_argument("--workers", type=int, default=1, help="inference workers in the queue group")
    p.add_argument("--packet-ms", default="50,10",
                   help="comma-separated packet periods of the simulated devices (ms); the first is the headline")
    p.add_argument("--keep", action="store_true", help="keep the temporary state dir and logs")
    p.add_argument("--udp-commit-ms", type=float, default=None,
                   help="what-if: run the UDP server with this commit interval instead of its own")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the samples messages (UDP server stage vs worker+API stage); adds load")
    args = p.parse_args(argv)
    counts = sorted({int(x) for x in args.users.split(",") if x.strip()})
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}")
    if not counts or min(counts) < 1 or max(counts) > 500 or args.duration > 120:
        p.error("user counts must be 1..500 and --duration at most 120 s")
    try:
        periods = list(dict.fromkeys(float(x) for x in args.packet_ms.split(",") if x.strip()))
    except ValueError:
        p.error("--packet-ms takes numbers, e.g. 50,10")
    if not periods or min(periods) < 1 or max(periods) > 1000:
        p.error("packet periods must be 1..1000 ms")

    stack = Stack(args.keep)
    by_period: dict[float, dict[str, dict[str, dict]]] = {pk: {} for pk in periods}
    try:
        log(f"starting PostgreSQL and NATS in {stack.dir}")
        stack.infrastructure()
        from semg import db
        conn = db.connect(stack.settings)
        fleets = {}
        for i, c in enumerate(configs):
            rate, channels = CONFIGS[c]
            log(f"provisioning {max(counts)} users with devices and models for {c}")
            fleets[c] = provision(conn, max(counts), rate, channels, seed0=1000 * i)
        conn.close()
        log("starting API, UDP server and inference worker(s)")
        stack.services(args.workers, args.udp_commit_ms)
        time.sleep(3)  # worker: catalogue + membership
        boot = 1
        for c in configs:
            rate, channels = CONFIGS[c]
            for n in counts:
                for pk in periods:
                    log(f"{c}: {n} users streaming for {args.duration:g} s (+{WARMUP_S:g} s warm-up), "
                        f"a packet every {pk:g} ms")
                    res, detail = asyncio.run(run_once(stack, fleets[c][:n], rate, channels, args.duration,
                                                       pk, boot, args.breakdown))
                    boot += 1
                    by_period[pk].setdefault(c, {})[str(n)] = res
                    log(f"  {json.dumps(res)} {json.dumps(detail)}")
                    time.sleep(1)
    finally:
        stack.stop()
    head = periods[0]
    results: dict[str, Any] = {"packet_ms": _num(head), **by_period[head]}
    for pk in periods[1:]:
        results[f"packet_ms_{_num(pk)}"] = by_period[pk]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
