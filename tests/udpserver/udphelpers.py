"""Helpers for the UDP server tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from semg import secrets

REPO = Path(__file__).resolve().parents[2]


class UdpServer:
    def __init__(self, spool_dir: Path, log_path: Path, extra_args: list[str]):
        self.spool_dir = spool_dir
        self.log_path = log_path
        self.args = extra_args
        self.proc: subprocess.Popen | None = None
        self.metrics_url = f"http://127.0.0.1:{os.environ['UDP_METRICS_PORT']}"
        self.addr = ("127.0.0.1", int(os.environ["UDP_PORT"]))

    def start(self, wait_ready: bool = True, timeout: float = 30) -> UdpServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "udpserver.udpserver", "--spool-dir", str(self.spool_dir),
             "--stats-interval", "2", "--refresh-interval", "1", *self.args],
            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"udpserver exited with {self.proc.returncode}: {self.log_tail()}")
            h = self.health()
            if h is not None and (h.get("ready") or not wait_ready):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"udpserver not ready within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def _get(self, path: str):
        try:
            req = urllib.request.Request(self.metrics_url + path, headers={"X-API-Key": secrets.service_api_key()})
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())
        except OSError:
            return None

    def health(self) -> dict | None:
        return self._get("/health")

    def metrics(self) -> dict:
        m = self._get("/metrics")
        assert m is not None, self.log_tail()
        return m

    def wait_for(self, pred, timeout: float = 30, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        m = {}
        while time.monotonic() < deadline:
            m = self._get("/metrics") or {}
            if m and pred(m):
                return m
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; metrics: {json.dumps(m)[:2000]}\n{self.log_tail()}")

    def wait_settled(self, timeout: float = 30) -> dict:
        """Until everything accepted is stored and published."""
        return self.wait_for(lambda m: m["buffered"]["unstored_samples"] == 0
                             and m["buffered"]["unpublished_samples"] == 0
                             and m["samples"]["stored"] + m["samples"]["replayed"] >= m["samples"]["accepted"],
                             timeout, "all accepted samples stored and published")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


# ---- registry ---------------------------------------------------------------------------------------
def add_user(cur, name: str = "Test User", email: str | None = None) -> int:
    email = email or f"user{time.monotonic_ns()}@example.org"
    cur.execute("INSERT INTO users (name, email) VALUES (%s, %s) RETURNING id", (name, email))
    return cur.fetchone()[0]


def add_device(cur, user_id: int, protocol: str = "binary", channels: int = 4, rate: float = 500,
               key: bytes | None = None) -> int:
    if protocol == "binary" and key is None:
        key = os.urandom(32)
    cur.execute("""INSERT INTO devices (user_id, protocol, channel_count, sample_rate_hz, secret_key)
                   VALUES (%s, %s, %s, %s, %s) RETURNING id""", (user_id, protocol, channels, rate, key))
    return cur.fetchone()[0]


def stored_seqs(conn, device_id: int) -> list[tuple[int, int]]:
    """Every stored (boot, seq) of a device, with repetitions if any."""
    with conn.cursor() as cur:
        cur.execute("SELECT boot, seq0, n FROM sample_blocks WHERE device_id = %s ORDER BY boot, seq0", (device_id,))
        return [(b, s + k) for b, s, n in cur.fetchall() for k in range(n)]


# ---- NATS ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def own_nats_server(directory: Path, **conf):
    """A NATS server of the test's own (no authentication) with settings of its own, e.g. max_payload: its URL.
    Point a server at it with the NATS_SERVER environment variable."""
    from semg.embedded import free_port, nats_server_bin, port_in_use
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nats.conf"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, **conf}))
    with open(directory / "nats.log", "ab") as log:
        proc = subprocess.Popen([str(nats_server_bin()), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not port_in_use(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start: see {directory / 'nats.log'}")
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- sending ---------------------------------------------------------------------------------------------
class Sender:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", int(os.environ["UDP_PORT"]))

    def send(self, packets, pace_every: int = 200, pause: float = 0.002) -> None:
        for i, p in enumerate(packets):
            self.sock.sendto(p, self.addr)
            if pace_every and i % pace_every == pace_every - 1:
                time.sleep(pause)  # stay far below the server's limits: these are correctness tests


# ---- NATS ------------------------------------------------------------------------------------------------
class Collector(threading.Thread):
    """Subscribes to emg.samples.> in its own thread and keeps every message (validated)."""

    def __init__(self, settings=None):
        super().__init__(daemon=True)
        self.settings = settings  # None: the session's (cached) settings
        self.messages = []
        self.published: list[float | None] = []  # each message's Semg-Published header
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self):
        asyncio.run(self._main())

    async def _main(self):
        from semg import natsio
        from semg.messages import SamplesMessage, published_time
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        nc = await natsio.connect("admin", self.settings, reconnect_time_wait=0.2)

        async def on_msg(msg):
            try:
                self.messages.append(SamplesMessage.model_validate_json(msg.data))
                self.published.append(published_time(msg.headers))
            except Exception as e:  # noqa: BLE001
                self.errors.append(str(e))

        await nc.subscribe("emg.samples.>", cb=on_msg)
        await nc.flush()
        self._ready.set()
        await self._stop_event.wait()
        with contextlib.suppress(Exception):
            await nc.close()

    def start_and_wait(self) -> Collector:
        self.start()
        assert self._ready.wait(15), "collector could not subscribe"
        return self

    def close(self):
        if self._loop and self._stop_event:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(5)

    def seqs(self, device_id: int) -> list[tuple[int, int]]:
        out = []
        for m in list(self.messages):
            if m.device_id == device_id:
                out.extend((m.boot, m.seq0 + k) for k in range(len(m.values)))
        return sorted(out)

    def wait_samples(self, device_id: int, n: int, timeout: float = 30) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.seqs(device_id)
            if len(set(s)) >= n:
                return s
            time.sleep(0.05)
        return self.seqs(device_id)


class Streamer(threading.Thread):
    """Sends a binary device's packets at a steady pace in the background (bounded by count)."""

    def __init__(self, device_id: int, key: bytes, channels: int, packets_per_s: float, n_packets: int,
                 per_packet: int = 10, boot: int = 1, seq_start: int = 0):
        super().__init__(daemon=True)
        import numpy as np

        from udpserver import protocol
        rng = np.random.default_rng(device_id)
        self.packets = [
            protocol.build_binary(device_id, boot, seq_start + i * per_packet, 1000 + (seq_start + i * per_packet) * 2,
                                  500, rng.integers(-1000, 1000, size=(per_packet, channels)), key)
            for i in range(n_packets)]
        self.interval = 1.0 / packets_per_s
        self.sent = 0
        self.per_packet = per_packet
        self._halt = threading.Event()

    def run(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        addr = ("127.0.0.1", int(os.environ["UDP_PORT"]))
        t0 = time.monotonic()
        for i, p in enumerate(self.packets):
            if self._halt.is_set():
                break
            delay = t0 + i * self.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sock.sendto(p, addr)
            self.sent += 1
        sock.close()

    def halt(self):
        self._halt.set()
        self.join(10)
