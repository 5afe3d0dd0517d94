"""Drive a whole platform instance as an operator would, for the fault tests and bench/soak.py.

- SupervisedStack: ./start_all.sh on a temporary SEMG_STATE_DIR with free ports; every service under
  supervisord; its XML-RPC (pids, kill -9, stop/start), the UDP server's metrics, a database connection.
- provision(): users with a binary device and a served model each (seeded random weights, as bench/latency.py:
  decisions flow without training).
- Fleet: a separate process streaming every device in real time (binary signed packets, one per tick per
  device), recording when each packet was sent (shared memory, readable while it runs).
- Observer: a thread with an admin NATS connection collecting every decision (emg.predictions.*) and every
  published samples message (emg.samples.*).
- audit(): sent vs stored (sample_blocks) vs published, per packet, by sequence numbers.

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semg import secrets

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "nats", "api", "udpserver", "inference", "trainer", "ui")
_KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "SEMG_VENV", "TMPDIR")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port(udp: bool = False) -> int:
    from semg.embedded import free_port
    return free_port(udp)


def make_state_dir(parent: Path) -> Path:
    """A state dir the embedded PostgreSQL can use when we are root (it runs unprivileged)."""
    d = parent / "state"
    d.mkdir(parents=True, exist_ok=True)
    for p in (d, *d.parents):
        if str(p).startswith("/tmp/") or p == d:
            with contextlib.suppress(PermissionError):
                os.chmod(p, os.stat(p).st_mode | 0o011)
    os.chmod(d, 0o755)
    return d


# ---- the platform under supervisord ------------------------------------------------------------------
class SupervisedStack:
    def __init__(self, state_dir: Path, **extra_env: str):
        self.state_dir = Path(state_dir)
        keep = {k: v for k, v in os.environ.items() if k in _KEEP_ENV}
        self.env = {
            **keep,
            "SEMG_STATE_DIR": str(self.state_dir),
            "POSTGRES_PORT": str(_free_port()), "NATS_PORT": str(_free_port()), "API_PORT": str(_free_port()),
            "UI_PORT": str(_free_port()), "UDP_PORT": str(_free_port(udp=True)),
            "UDP_METRICS_PORT": str(_free_port()), "SEMG_START_TIMEOUT": "300",
        }
        self.env.update(extra_env)
        from semg.config import Settings
        self.settings = Settings(
            semg_state_dir=self.state_dir, postgres_port=int(self.env["POSTGRES_PORT"]),
            nats_port=int(self.env["NATS_PORT"]), api_port=int(self.env["API_PORT"]),
            ui_port=int(self.env["UI_PORT"]), udp_port=int(self.env["UDP_PORT"]),
            udp_metrics_port=int(self.env["UDP_METRICS_PORT"]), postgres_host=None, nats_server=None,
            postgres_db="sensordb", postgres_user="semg", postgres_password=None, nats_user=None,
            nats_password=None, semg_service_key=None, semg_ui_password=None, semg_bind_host="127.0.0.1",
        )
        self.started = False

    # scripts
    def _script(self, name: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / name)], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd="/")

    def start(self, timeout: float = 420) -> float:
        t0 = time.monotonic()
        r = self._script("start_all.sh", timeout)
        if r.returncode != 0:
            raise RuntimeError(f"start_all.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        self.started = True
        return time.monotonic() - t0

    def stop(self, timeout: float = 240) -> subprocess.CompletedProcess:
        r = self._script("stop_all.sh", timeout)
        self.started = False
        return r

    def leftovers(self) -> list[int]:
        from semg.procs import ours
        return ours(str(self.state_dir))

    def log_tail(self, service: str, n: int = 20) -> str:
        p = self.state_dir / "logs" / f"{service}.log"
        with contextlib.suppress(OSError):
            return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
        return ""

    # supervisord
    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport
        pw = (self.settings.secrets_dir / "supervisor_password").read_text().strip()
        transport = SupervisorTransport("semg", pw, f"unix://{self.state_dir / 'run' / 'supervisor.sock'}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self, name: str) -> dict:
        return self.rpc().supervisor.getProcessInfo(name)

    def pids(self) -> dict[str, int]:
        return {p["name"]: p["pid"] for p in self.rpc().supervisor.getAllProcessInfo() if p["pid"]}

    def kill9(self, name: str) -> tuple[int, float]:
        pid = self.info(name)["pid"]
        assert pid, f"{name} has no pid"
        os.kill(pid, signal.SIGKILL)
        return pid, time.monotonic()

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 90) -> float:
        """supervisord runs it again (a new pid, state RUNNING); returns when that was seen."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, xmlrpc.client.Error):
                last = self.info(name)
                if last["statename"] == "RUNNING" and last["pid"] not in (0, old_pid):
                    return time.monotonic()
            time.sleep(0.1)
        raise AssertionError(f"supervisord did not restart {name} within {timeout}s: {last}\n{self.log_tail(name)}")

    def ctl(self, action: str, name: str) -> None:
        """supervisorctl stop/start NAME through the same XML-RPC interface supervisorctl uses."""
        proxy = self.rpc().supervisor
        (proxy.stopProcess if action == "stop" else proxy.startProcess)(name, True)

    # health
    def _get_json(self, url: str, timeout: float = 2.0, headers: dict | None = None) -> tuple[int, dict | None]:
        import httpx
        try:
            r = httpx.get(url, timeout=timeout, headers=headers)
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError):
            return 0, None

    def udp_metrics(self) -> dict:
        code, body = self._get_json(f"http://127.0.0.1:{self.settings.udp_metrics_port}/metrics",
                                    headers={"X-API-Key": secrets.service_api_key(self.settings)})
        assert code == 200 and body, f"UDP metrics unavailable ({code})\n{self.log_tail('udpserver')}"
        return body

    def ready(self, name: str) -> bool:
        """The service does its job again: answers its health check (or supervisord says RUNNING)."""
        s = self.settings
        if name == "api":
            code, body = self._get_json(f"{s.api_url}/health")
            return code == 200 and body.get("status") == "ok"
        if name == "udpserver":
            code, body = self._get_json(f"http://127.0.0.1:{s.udp_metrics_port}/health")
            return code == 200 and body.get("status") == "ok"
        if name == "ui":
            import httpx
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://127.0.0.1:{s.ui_port}/_stcore/health", timeout=2).status_code == 200
            return False
        if name == "postgres":
            from semg.health import check_postgres
            return check_postgres(s)[0]
        if name == "nats":
            from semg.embedded import port_in_use
            return port_in_use(s.nats_port)
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            return self.info(name)["statename"] == "RUNNING"
        return False

    def wait_ready(self, name: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready(name):
                return time.monotonic()
            time.sleep(0.1)
        raise AssertionError(f"{name} not ready within {timeout}s\n{self.log_tail(name)}")

    def connect_db(self):
        from semg import db
        conn = db.connect(self.settings)
        conn.autocommit = True
        return conn

    def ui_health(self) -> dict:
        """What the web UI says about the services: data.health() and the Overview page (AppTest), run in a
        separate process with the instance's environment, as the UI server itself would."""
        code = r"""
import json, sys
sys.path.insert(0, "streamlit_apps")
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("streamlit_apps/Main.py", default_timeout=60)
at.session_state["semg_authenticated"] = True
at.run()
shown = [str(e.value) for kind in ("markdown", "caption", "error", "info", "warning") for e in at.get(kind)]
import data
h = data.health()
print(json.dumps({"health": {k: {"ok": v["ok"], "detail": v["detail"]} for k, v in h.items()},
                  "page": shown, "exceptions": [str(e.value) for e in at.exception]}))
"""
        r = subprocess.run([sys.executable, "-c", code], env={**self.env, "LOG_LEVEL": "ERROR"}, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])


# ---- users, devices, models ------------------------------------------------------------------------------
@dataclass
class Device:
    user_id: int
    device_id: int
    key: bytes
    channels: int
    rate: float
    window: int
    step: int
    artifact_id: int = 0


def provision(stack: SupervisedStack, n_users: int, rate: float = 200.0, channels: int = 8, tag: str = "u",
              ) -> list[Device]:
    """n users, each with a binary device and a served model (announced on models.updated)."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    out = []
    conn = stack.connect_db()
    try:
        for i in range(n_users):
            u = repo.create_user(conn, f"{tag} {i}", f"{tag}-{i}-{time.monotonic_ns()}@example.org")
            d = repo.register_device(conn, u["id"], channels, rate, name=f"{tag}-{i}")
            weights, meta = random_artifact(channels, rate, seed=i)
            artifact = insert_artifact(conn, u["id"], weights, meta)
            out.append(Device(u["id"], d["id"], bytes.fromhex(d["secret_key_hex"]), channels, rate, meta["window"],
                              meta["step"], artifact))
    finally:
        conn.close()
    announce_models(stack, [(d.user_id, d.artifact_id) for d in out])
    return out


def prime(stack: SupervisedStack, devices: list[Device], timeout: float = 30) -> None:
    """Wait until the UDP server accepts packets of every device (it loads new devices within ~2 s): one
    packet each on boot 0, so a stream on boot >= 1 is accepted from its first packet."""
    from udpserver.protocol import build_binary
    pending = {d.device_id: d for d in devices}
    seq = 0
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while pending and time.monotonic() < deadline:
            for d in pending.values():
                sock.sendto(build_binary(d.device_id, 0, seq, seq, int(d.rate), np.zeros((1, d.channels)), d.key),
                            ("127.0.0.1", stack.settings.udp_port))
            seq += 1
            time.sleep(0.3)
            known = stack.udp_metrics()["devices"]
            pending = {i: d for i, d in pending.items() if not known.get(str(i), {}).get("accepted_samples")}
    assert not pending, f"the UDP server never accepted devices {sorted(pending)}"


def announce_models(stack: SupervisedStack, pairs: list[tuple[int, int]]) -> None:
    from semg import natsio
    from semg.messages import MODELS_UPDATED, ModelUpdated

    async def send() -> None:
        nc = await natsio.connect("admin", stack.settings)
        for user_id, artifact_id in pairs:
            await nc.publish(MODELS_UPDATED, ModelUpdated(userid=user_id, artifact_id=artifact_id)
                             .model_dump_json().encode())
        await nc.flush()
        await nc.close()

    asyncio.run(asyncio.wait_for(send(), 30))


# ---- streaming devices (own process) ------------------------------------------------------------------------
def _stream(port: int, devices: list[tuple[int, bytes, int]], rate: float, per_packet: int, boot: int,
            n_ticks: int, t_start: float, sent, progress, stop) -> None:
    """Packet k of device d at t_start + k*period + d/n*period; sent[d*n_ticks + k] = when it went out."""
    from udpserver.protocol import build_binary
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    addr = ("127.0.0.1", port)
    n_dev = len(devices)
    period = per_packet / rate
    rng = np.random.default_rng(boot)
    t = np.arange(per_packet)
    for k in range(n_ticks):
        if stop.is_set():
            break
        # a slowly varying amplitude per device, so models see changing input
        base = rng.integers(-400, 400, size=(n_dev, per_packet, devices[0][2]), dtype=np.int16)
        for d, (dev_id, key, _ch) in enumerate(devices):
            due = t_start + (k + d / n_dev) * period
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            seq0 = k * per_packet
            vals = (base[d] * (1 + ((k // 50 + d) % 4))).astype(np.int16) + (t[:, None] % 3).astype(np.int16)
            pkt = build_binary(dev_id, boot, seq0, int(seq0 * 1000 / rate), int(rate), vals, key)
            try:
                sock.sendto(pkt, addr)
            except OSError:  # e.g. ECONNREFUSED reported from an earlier send while the server was down
                with contextlib.suppress(OSError):
                    sock.sendto(pkt, addr)
            sent[d * n_ticks + k] = time.monotonic()
        progress.value = k + 1
    sock.close()


class Fleet:
    """Every device streams in real time from a separate process for at most `duration` seconds."""

    def __init__(self, stack: SupervisedStack, devices: list[Device], duration: float, boot: int = 1,
                 packet_ms: float = 50.0):
        self.devices = devices
        rate = devices[0].rate
        assert all(d.rate == rate and d.channels == devices[0].channels for d in devices)
        self.per_packet = max(1, round(rate * packet_ms / 1000))
        self.period = self.per_packet / rate
        self.n_ticks = int(duration / self.period)
        self.boot = boot
        ctx = mp.get_context("spawn")
        self.sent = ctx.RawArray("d", len(devices) * self.n_ticks)
        np.frombuffer(self.sent, dtype=np.float64)[:] = np.nan
        self.progress = ctx.RawValue("l", 0)
        self.stop_event = ctx.Event()
        self.t_start = time.monotonic() + 1.0
        self.proc = ctx.Process(
            target=_stream, daemon=True,
            args=(stack.settings.udp_port, [(d.device_id, d.key, d.channels) for d in devices], rate,
                  self.per_packet, boot, self.n_ticks, self.t_start, self.sent, self.progress, self.stop_event))
        self.index = {d.device_id: i for i, d in enumerate(devices)}

    def start(self) -> Fleet:
        self.proc.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def wait(self, timeout: float) -> None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.stop()

    def sent_times(self) -> np.ndarray:
        """(devices, ticks) send times (monotonic s), NaN where not sent."""
        return np.frombuffer(self.sent, dtype=np.float64).reshape(len(self.devices), self.n_ticks).copy()


# ---- what comes out of the platform --------------------------------------------------------------------------
@dataclass
class Decision:
    t: float  # monotonic receive time
    user_id: int
    device_id: int | None
    seq: int | None


@dataclass
class Observer:
    stack: SupervisedStack
    samples: bool = True
    decisions: list[Decision] = field(default_factory=list)
    published: list[tuple[int, int, int, int]] = field(default_factory=list)  # device, boot, seq0, n
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, daemon=True, name="observer")
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> Observer:
        self._thread.start()
        assert self._ready.wait(30), f"observer could not subscribe: {self.errors}"
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import orjson

        from semg import natsio
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            nc = await natsio.connect("admin", self.stack.settings, reconnect_time_wait=0.2)
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))
            return

        async def on_decision(msg) -> None:
            try:
                m = orjson.loads(msg.data)
                self.decisions.append(Decision(time.monotonic(), m["userid"], m.get("device_id"), m.get("seq")))
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"decision: {e}")

        async def on_samples(msg) -> None:
            try:
                m = orjson.loads(msg.data)
                self.published.append((m["device_id"], m["boot"], m["seq0"], len(m["values"])))
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"samples: {e}")

        await nc.subscribe("emg.predictions.*", cb=on_decision, pending_msgs_limit=10**6,
                           pending_bytes_limit=1 << 30)
        if self.samples:
            await nc.subscribe("emg.samples.*", cb=on_samples, pending_msgs_limit=10**6,
                               pending_bytes_limit=1 << 30)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        with contextlib.suppress(Exception):
            await nc.close()

    def close(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def first_decisions_after(self, t: float, users: set[int], timeout: float) -> dict[int, float]:
        """user -> receive time of their first decision after t (waits up to `timeout` for all of them)."""
        deadline = time.monotonic() + timeout
        found: dict[int, float] = {}
        scanned = 0
        while True:
            decisions = self.decisions
            for d in decisions[scanned:]:
                if d.t > t and d.user_id in users and d.user_id not in found:
                    found[d.user_id] = d.t
            scanned = len(decisions)
            if len(found) == len(users) or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


# ---- sent vs stored vs published -------------------------------------------------------------------------------
def stored_packets(conn, fleet: Fleet) -> np.ndarray:
    """(devices, ticks) bool: the packet's block is in sample_blocks (one row per accepted packet)."""
    out = np.zeros((len(fleet.devices), fleet.n_ticks), dtype=bool)
    with conn.cursor() as cur:
        cur.execute("SELECT device_id, seq0, n FROM sample_blocks WHERE boot = %s AND device_id = ANY(%s)",
                    (fleet.boot, list(fleet.index)))
        for dev, seq0, n in cur.fetchall():
            k, r = divmod(seq0, fleet.per_packet)
            assert r == 0 and n == fleet.per_packet, f"unexpected block {dev} {seq0} {n}"
            if k < fleet.n_ticks:
                out[fleet.index[dev], k] = True
    return out


def published_packets(observer: Observer, fleet: Fleet) -> np.ndarray:
    out = np.zeros((len(fleet.devices), fleet.n_ticks), dtype=bool)
    for dev, boot, seq0, n in list(observer.published):
        if boot != fleet.boot or dev not in fleet.index:
            continue
        a, b = seq0 // fleet.per_packet, (seq0 + n) // fleet.per_packet
        out[fleet.index[dev], a:min(b, fleet.n_ticks)] = True
    return out


@dataclass
class Outage:
    """The UDP server could not accept packets from `t0` to `t1` (monotonic); `accepted` is, per device, the
    last sequence number it reported accepted just before (every packet up to it must be stored)."""

    t0: float
    t1: float
    accepted: dict[int, int]


def audit(conn, fleet: Fleet, observer: Observer | None, outages: list[Outage],
          nats_kills: Sequence[tuple[float, float]] = (), slack_s: float = 0.3) -> dict:
    """Every packet sent is stored, unless it was sent while the UDP server was down (and after the last one
    it had accepted); everything stored is published, but for packets sent from 1 s before NATS was killed -9
    until it was ready again (`nats_kills`: (killed, ready) monotonic): core NATS keeps nothing, so a message it had
    acknowledged but not yet delivered, or one the UDP server sent again before a subscriber was back, is gone
    for that subscriber (counted as unpublished_at_nats_kill). Returns figures and the offending packets."""
    sent = fleet.sent_times()
    was_sent = ~np.isnan(sent)
    stored = stored_packets(conn, fleet)
    excusable = np.zeros_like(was_sent)
    violations_accepted = []
    for o in outages:
        in_window = was_sent & (sent >= o.t0 - slack_s) & (sent <= o.t1 + slack_s)
        excusable |= in_window
        for dev, last_seq in o.accepted.items():
            d = fleet.index.get(dev)
            if d is None or last_seq is None:
                continue
            k_last = last_seq // fleet.per_packet
            miss = np.flatnonzero(was_sent[d, :k_last + 1] & ~stored[d, :k_last + 1])
            if len(miss):
                violations_accepted.append((dev, miss[:10].tolist(), int(len(miss))))
    lost = was_sent & ~stored & ~excusable
    out = {
        "sent_packets": int(was_sent.sum()),
        "stored_packets": int((stored & was_sent).sum()),
        "stored_unsent": int((stored & ~was_sent).sum()),
        "missing_during_outages": int((was_sent & ~stored & excusable).sum()),
        "lost": int(lost.sum()),
        "lost_examples": [(fleet.devices[d].device_id, int(k), float(sent[d, k] - fleet.t_start))
                          for d, k in zip(*np.nonzero(lost), strict=True)][:10],
        "accepted_but_not_stored": violations_accepted,
    }
    if observer is not None:
        pub = published_packets(observer, fleet)
        at_kill = np.zeros_like(was_sent)
        for killed, ready in nats_kills:
            at_kill |= was_sent & (sent >= killed - 1.0) & (sent <= ready)
        out["published_packets"] = int((pub & stored).sum())
        out["unpublished_at_nats_kill"] = int((stored & ~pub & at_kill).sum())
        out["stored_not_published"] = int((stored & ~pub & ~at_kill).sum())
        out["published_not_stored"] = int((pub & ~stored).sum())
        # when they were sent, on the clock of the log's [HH:MM:SS] lines, to set beside the faults injected then
        to_wall = time.time() - time.monotonic()
        out["stored_not_published_examples"] = [
            (fleet.devices[d].device_id, int(k), time.strftime("%H:%M:%S", time.localtime(sent[d, k] + to_wall))
             + f".{int((sent[d, k] + to_wall) % 1 * 1000):03d}")
            for d, k in zip(*np.nonzero(stored & ~pub & was_sent & ~at_kill), strict=True)][:10]
    return out


def per_packet_latencies(observer: Observer, fleet: Fleet, since: float = 0.0) -> np.ndarray:
    """(send time, latency s) of every first decision per (device, window end) after `since`."""
    sent = fleet.sent_times()
    seen = set()
    rows = []
    for d in list(observer.decisions):
        if d.seq is None or d.device_id not in fleet.index or d.t < since:
            continue
        key = (d.device_id, d.seq)
        if key in seen:
            continue
        seen.add(key)
        k = d.seq // fleet.per_packet
        if k >= fleet.n_ticks:
            continue
        ts = sent[fleet.index[d.device_id], k]
        if not np.isnan(ts) and d.t >= ts:
            rows.append((ts, d.t - ts))
    return np.array(rows).reshape(-1, 2)


# ---- memory of every service -----------------------------------------------------------------------------------
def service_memory(stack: SupervisedStack) -> dict[str, dict[str, float]]:
    """MB per service, summed over its process tree: rss, and anon = rss - shared (private heap: what a leak
    grows; for PostgreSQL it leaves out the shared buffer cache, which fills as data arrives)."""
    import psutil
    out = {}
    for name, pid in stack.pids().items():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        rss = anon = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                m = p.memory_info()
                rss += m.rss
                anon += m.rss - m.shared
        out[name] = {"rss_mb": rss / 2**20, "anon_mb": anon / 2**20, "procs": len(procs)}
    return out
