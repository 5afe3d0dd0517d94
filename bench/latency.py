"""End-to-end live latency: UDP packet that completes a window -> decision received on NATS.

    python bench/latency.py [--users 1,10,50,100] [--duration 10] [--workers 1] [--packet-ms 50,10] [--tls off]

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

HTTPS: --tls off,on measures plain HTTP and HTTPS (SEMG_TLS_CERT_FILE / SEMG_TLS_KEY_FILE, a self-signed
ECDSA P-256 certificate made at start in the temp dir) in one run. The API, UDP server and worker(s) are restarted
with or without the pair between variants, in the order off,on for the first user count, on,off for the next, and
so on (one restart per user count; both variants see the same machine, and each comes first as often as the
other). PostgreSQL, NATS and the provisioned users stay. Default: off only, exactly as before.

Prints a breakdown per run, then ONE JSON line; the configuration keys hold the first packet period, each
further period has the same shape under "packet_ms_<period>":
    {"packet_ms": 50, "200hz_8ch": {"50": {"p50_ms": .., "p95_ms": .., "p99_ms": .., "decisions_per_s": ..}, ...},
     "500hz_4ch": {...}, "packet_ms_10": {"200hz_8ch": {...}, "500hz_4ch": {...}}}
With --tls other than "off", the keys above hold the first variant ("tls": "off"), each further variant has the
same shape (without "packet_ms") under "tls_<variant>", and "api_connections" says, per variant and run, how
many TCP connections to the API were opened during the run (each one a TLS handshake under HTTPS) beside the
decisions received: the worker keeps its connections alive, so a count near the decisions would be a defect.
    {"packet_ms": 50, "tls": "off", "200hz_8ch": {...}, "tls_on": {"200hz_8ch": {...}},
     "api_connections": {"tls_off": {"200hz_8ch": {"50": {"new": 0, "decisions": 812}}}, "tls_on": {...}}}
(per packet period other than the first, api_connections has a "packet_ms_<period>" key as above.)
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
             "NATS_PASSWORD", "SEMG_SERVICE_KEY", "SEMG_UI_PASSWORD", "SEMG_BIND_HOST", "SEMG_INTERNAL_BIND_HOST",
             "SEMG_UDP_BIND_HOST", "SEMG_TLS_CERT_FILE", "SEMG_TLS_KEY_FILE"]
TLS_VARIANTS = ("off", "on")


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
        self.tls: str | None = None  # the variant the services run with ("off"/"on"), None while stopped

    def set_tls(self, on: bool) -> None:
        """Point this process's environment (inherited by the services started next) and settings at HTTPS or
        plain HTTP."""
        if on:
            cert, key = self.dir / "tls" / "cert.pem", self.dir / "tls" / "key.pem"
            if not cert.exists():
                make_self_signed(cert, key)
            os.environ.update(SEMG_TLS_CERT_FILE=str(cert), SEMG_TLS_KEY_FILE=str(key))
        else:
            os.environ.pop("SEMG_TLS_CERT_FILE", None)
            os.environ.pop("SEMG_TLS_KEY_FILE", None)
        from semg.config import get_settings
        get_settings.cache_clear()
        self.settings = get_settings()

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

        from semg import tls
        verify = tls.httpx_verify(self.settings)  # the pinned bench certificate under HTTPS
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not become healthy; see {self.dir}/logs")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1, verify=verify).status_code == 200:
                    return
            time.sleep(0.2)

    def infrastructure(self) -> None:
        from semg import db
        s = self.settings
        self.wait_port(s.postgres_port, self.start("postgres", "-m", "semg.embedded", "postgres"), "postgres")
        self.wait_port(s.nats_port, self.start("nats", "-m", "semg.embedded", "nats"), "nats")
        db.init(s, wait=60)

    def services(self, workers: int, udp_commit_ms: float | None = None, tls: str = "off") -> None:
        self.set_tls(tls == "on")
        self.tls = tls
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
        self.wait_http(f"{s.service_url(s.udp_metrics_port)}/health", udp, "udpserver")
        for i in range(workers):
            self.start(f"inference-{i}", "-m", "ml_model.nat_inference")

    def stop_services(self) -> None:
        """Stop the API, UDP server and worker(s); PostgreSQL and NATS keep running."""
        self._stop([(n, p) for n, p in self.procs if n not in ("postgres", "nats")])
        self.procs = [(n, p) for n, p in self.procs if n in ("postgres", "nats")]
        self.tls = None

    def _stop(self, procs: list[tuple[str, subprocess.Popen]]) -> None:
        for name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT if name in ("postgres", "nats") else signal.SIGTERM)
        for _name, p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    def stop(self) -> None:
        # the services first, while NATS is still there for the worker and the UDP server to drain into
        self.stop_services()
        self._stop(self.procs)
        if self.keep:
            log(f"state and logs kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def make_self_signed(cert: Path, key: Path) -> None:
    """A self-signed ECDSA P-256 certificate (CN semg-bench, 127.0.0.1 and localhost, one day) and its key, made
    here: with the `cryptography` package if importable (streamlit-webrtc's aiortc and the dev dependency trustme
    pull it in), else with the openssl command."""
    cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", "/CN=semg-bench", "-keyout", str(key), "-out", str(cert),
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True)
    else:
        pk = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "semg-bench")])
        now = datetime.datetime.now(datetime.UTC)
        crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                           x509.DNSName("localhost")]), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .sign(pk, hashes.SHA256()))
        key.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.chmod(0o600)


def tcp_peers(port: int) -> set[tuple[str, int]]:
    """The far ends of the TCP sockets of this network namespace with `port` at one end, in any state, listening
    sockets aside (from /proc/net/tcp and tcp6). A connection closed gracefully stays listed (TIME_WAIT) for
    60 s on the side that closed first, so two snapshots up to a minute apart show every connection opened
    between them, however short-lived (only one reset on both sides would escape)."""
    out: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state == "0A":  # LISTEN
                    continue
                lport, rport = int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)
                if lport == port:
                    out.add((remote, rport))  # the API's end: keyed by the client's address and port
                elif rport == port:
                    out.add((local, lport))  # the client's end (e.g. in TIME_WAIT)
    return out


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
    api_port = stack.settings.api_port
    peers_before = tcp_peers(api_port)
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
    new_connections = len(tcp_peers(api_port) - peers_before)
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
        "api_new_connections": new_connections, "decisions_all": len(received),
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
    p.add_argument("--tls", default="off",
                   help="comma-separated: off (plain HTTP), on (HTTPS, a self-signed certificate); with both, "
                        "the services are restarted between them, alternating per user count; the first is the "
                        "headline")
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
    variants = list(dict.fromkeys(v.strip() for v in args.tls.split(",") if v.strip()))
    if not variants or any(v not in TLS_VARIANTS for v in variants):
        p.error("--tls takes off, on or both, e.g. off,on")

    stack = Stack(args.keep)
    # variant -> period -> config -> user count -> figures (conns: the same for the API connection counts)
    by_period = {v: {pk: {} for pk in periods} for v in variants}
    conns = {v: {pk: {} for pk in periods} for v in variants}
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
        boot = 1
        turn = 0  # user counts so far: the variants' order flips with each (off,on / on,off / ...)
        for c in configs:
            rate, channels = CONFIGS[c]
            for n in counts:
                for v in (variants if turn % 2 == 0 else variants[::-1]):
                    if stack.tls != v:
                        if stack.tls is not None:
                            stack.stop_services()
                        log(f"starting API, UDP server and inference worker(s), HTTPS {v}")
                        stack.services(args.workers, args.udp_commit_ms, tls=v)
                        time.sleep(3)  # worker: catalogue + membership
                    for pk in periods:
                        log(f"{c}: {n} users streaming for {args.duration:g} s (+{WARMUP_S:g} s warm-up), "
                            f"a packet every {pk:g} ms" + (f", HTTPS {v}" if variants != ["off"] else ""))
                        res, detail = asyncio.run(run_once(stack, fleets[c][:n], rate, channels, args.duration,
                                                           pk, boot, args.breakdown))
                        boot += 1
                        by_period[v][pk].setdefault(c, {})[str(n)] = res
                        conns[v][pk].setdefault(c, {})[str(n)] = {"new": detail["api_new_connections"],
                                                                  "decisions": detail["decisions_all"]}
                        log(f"  {json.dumps(res)} {json.dumps(detail)}")
                        time.sleep(1)
                turn += 1
    finally:
        stack.stop()

    def shaped(per_period: dict) -> dict[str, Any]:
        out = dict(per_period[periods[0]])
        for pk in periods[1:]:
            out[f"packet_ms_{_num(pk)}"] = per_period[pk]
        return out

    results: dict[str, Any] = {"packet_ms": _num(periods[0])}
    if variants != ["off"]:
        results["tls"] = variants[0]
    results.update(shaped(by_period[variants[0]]))
    if variants != ["off"]:
        for v in variants[1:]:
            results[f"tls_{v}"] = shaped(by_period[v])
        results["api_connections"] = {f"tls_{v}": shaped(conns[v]) for v in variants}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
