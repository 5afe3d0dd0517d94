"""Ingestion benchmark: its own PostgreSQL + NATS + udpserver on free ports in a temporary state dir.

Blasts pre-built packets at increasing rates (legacy single-sample text packets, then binary packets of
50 samples x 8 channels), each step for a bounded time, and finds the highest rate with < 0.1 % loss
(loss = 1 - stored / sent). Prints progress on stderr and ONE JSON object as the last stdout line.

    python bench/ingest.py [--step-seconds 5] [--legacy-rates 5000,10000,...] [--batched-rates 100000,...]
"""

from __future__ import annotations

import argparse
import contextlib
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
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semg import secrets  # noqa: E402
from semg.embedded import free_port  # noqa: E402 - below the ephemeral range: no client is given it meanwhile
from udpserver import protocol  # noqa: E402

LOSS_LIMIT = 0.001
CHANNELS = 8
BATCH = 50  # samples per binary packet (840-byte datagrams, within one Ethernet MTU)
LEGACY_DEVICES = 50
BINARY_DEVICES = 100
TARGET_LEGACY_PPS = 20_000
TARGET_BATCHED_SPS = 200_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- process CPU accounting ------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def cpu_of_tree(root: int) -> dict[int, float]:
    """CPU seconds of `root` and its direct children (postgres: postmaster + backends)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st and (int(name) == root or st[0] == root):
                out[int(name)] = st[1]
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


# ---- the stack ---------------------------------------------------------------------------------------
class Stack:
    def __init__(self, keep: bool):
        self.dir = Path(tempfile.mkdtemp(prefix="semg-bench-ingest-"))
        os.chmod(self.dir, 0o755)  # the embedded postgres runs unprivileged when we are root
        self.keep = keep
        for var in ("POSTGRES_HOST", "POSTGRES_PASSWORD", "NATS_SERVER", "NATS_USER", "NATS_PASSWORD",
                    "SEMG_BIND_HOST", "SEMG_INTERNAL_BIND_HOST", "SEMG_UDP_BIND_HOST"):
            os.environ.pop(var, None)
        self.env = {"SEMG_STATE_DIR": str(self.dir), "POSTGRES_PORT": str(free_port()),
                    "NATS_PORT": str(free_port()), "UDP_PORT": str(free_port(udp=True)),
                    "UDP_METRICS_PORT": str(free_port()), "POSTGRES_DB": "sensordb", "LOG_LEVEL": "INFO"}
        os.environ.update(self.env)
        self.procs: dict[str, subprocess.Popen] = {}
        (self.dir / "logs").mkdir()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logf = open(self.dir / "logs" / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, *args], env=dict(os.environ), stdout=logf, stderr=subprocess.STDOUT,
                             cwd=REPO)
        self.procs[name] = p
        return p

    def start(self) -> None:
        from semg import db
        from semg.config import get_settings
        from semg.embedded import port_in_use
        get_settings.cache_clear()
        self._spawn("postgres", ["-m", "semg.embedded", "postgres"])
        self._spawn("nats", ["-m", "semg.embedded", "nats"])
        deadline = time.monotonic() + 90
        while not (port_in_use(int(self.env["POSTGRES_PORT"])) and port_in_use(int(self.env["NATS_PORT"]))):
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.dir}/logs/{name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError("postgres/nats did not start")
            time.sleep(0.1)
        db.init(wait=60)

    def start_udpserver(self) -> subprocess.Popen:
        # the devices send up to 10x their registered 2000 Hz, from step to step: no per-device sample budget
        # (it would refuse that as too_fast and the loss would measure the budget, not the server)
        p = self._spawn("udpserver", ["-m", "udpserver.udpserver", "--stats-interval", "5", "--rate-tolerance", "0"])
        url = f"http://127.0.0.1:{self.env['UDP_METRICS_PORT']}/health"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"udpserver exited; see {self.dir}/logs/udpserver.log")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        return p
            time.sleep(0.2)
        raise RuntimeError("udpserver not healthy")

    def metrics(self) -> dict:
        url = f"http://127.0.0.1:{self.env['UDP_METRICS_PORT']}/metrics?devices=0"
        req = urllib.request.Request(url, headers={"X-API-Key": secrets.service_api_key()})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        for name in ("udpserver", "nats", "postgres"):
            p = self.procs.get(name)
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM if name == "udpserver" else signal.SIGINT)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---- traffic -----------------------------------------------------------------------------------------
class Fleet:
    """Registered devices and their stream positions (so every step continues their sequences)."""

    def __init__(self):
        from semg import db
        rng = np.random.default_rng(7)
        self.noise = rng.integers(-300, 300, size=(4096, CHANNELS)).astype("<i2")
        self.legacy: list[list] = []   # [userid, device_id, millis]
        self.binary: list[list] = []   # [device_id, key, seq, millis]
        with db.connect() as conn, conn.cursor() as cur:
            for i in range(LEGACY_DEVICES):
                cur.execute("INSERT INTO users (name, email) VALUES (%s, %s) RETURNING id",
                            (f"bench legacy {i}", f"bench-legacy-{i}@example.org"))
                uid = cur.fetchone()[0]
                cur.execute("""INSERT INTO devices (user_id, protocol, channel_count, sample_rate_hz)
                               VALUES (%s, 'legacy', %s, 500) RETURNING id""", (uid, CHANNELS))
                self.legacy.append([uid, cur.fetchone()[0], 1000])
            for i in range(BINARY_DEVICES):
                cur.execute("INSERT INTO users (name, email) VALUES (%s, %s) RETURNING id",
                            (f"bench binary {i}", f"bench-binary-{i}@example.org"))
                uid = cur.fetchone()[0]
                key = os.urandom(32)
                cur.execute("""INSERT INTO devices (user_id, protocol, channel_count, sample_rate_hz, secret_key)
                               VALUES (%s, 'binary', %s, 2000, %s) RETURNING id""", (uid, CHANNELS, key))
                self.binary.append([cur.fetchone()[0], key, 0, 1000])
        conn.close()

    def legacy_packets(self, pps: int, seconds: float) -> list[bytes]:
        out = []
        total = int(pps * seconds)
        per_dev_ms = 1000.0 * len(self.legacy) / pps
        rows = self.noise.tolist()
        for i in range(total):
            dev = self.legacy[i % len(self.legacy)]
            dev[2] += per_dev_ms
            v = rows[i % len(rows)]
            out.append(b"%d,%d,%d,%d,%d,%d,%d,%d,%d,%d" % (dev[0], int(dev[2]) & 0xFFFFFFFF, *v))
        return out

    def binary_packets(self, sps: int, seconds: float) -> list[bytes]:
        out = []
        per_dev_rate = max(1, round(sps / len(self.binary)))
        packets = int(sps * seconds) // BATCH
        for i in range(packets):
            dev = self.binary[i % len(self.binary)]
            start = (i * BATCH) % (len(self.noise) - BATCH)
            out.append(protocol.build_binary(dev[0], 1, dev[2], int(dev[3]), min(per_dev_rate, 10000),
                                             self.noise[start:start + BATCH], dev[1]))
            dev[2] += BATCH
            dev[3] += BATCH * 1000.0 / per_dev_rate
        return out


def _send(packets: list[bytes], pps: float, addr: tuple[str, int], result) -> None:
    """Sender process: paced by the clock, in tight loops of pre-built packets."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    send = sock.sendto
    t0 = time.perf_counter()
    i, n = 0, len(packets)
    while i < n:
        due = min(n, int((time.perf_counter() - t0) * pps) + 1)
        if due <= i:
            time.sleep(0.0005)
            continue
        for p in packets[i:due]:
            try:
                send(p, addr)
            except BlockingIOError:
                pass
        i = due
    result.value = time.perf_counter() - t0


def run_step(stack: Stack, server_pid: int, pg_pid: int, packets: list[bytes], pps: float, samples_per_packet: int,
             settle_timeout: float = 60) -> dict:
    m0 = stack.metrics()
    cpu_s0, cpu_pg0 = cpu_of_tree(server_pid), cpu_of_tree(pg_pid)
    ctx = mp.get_context("fork")
    elapsed = ctx.Value("d", 0.0)
    t0 = time.monotonic()
    proc = ctx.Process(target=_send, args=(packets, pps, ("127.0.0.1", int(stack.env["UDP_PORT"])), elapsed))
    proc.start()
    proc.join()
    sent = len(packets)
    # wait until everything received is stored and published (or it stops moving); remember when the
    # last sample was stored and published, so rates and CPU cover the server's whole work, drain included
    deadline = time.monotonic() + settle_timeout
    last, still, done_at = None, 0, time.monotonic()
    cpu_s1, cpu_pg1 = cpu_of_tree(server_pid), cpu_of_tree(pg_pid)
    while time.monotonic() < deadline:
        m = stack.metrics()
        key = (m["samples"]["stored"], m["samples"]["published"], m["packets"]["received"])
        if key != last:
            done_at = time.monotonic()
            cpu_s1, cpu_pg1 = cpu_of_tree(server_pid), cpu_of_tree(pg_pid)
        if m["buffered"]["unstored_samples"] == 0 and m["buffered"]["unpublished_samples"] == 0 and key == last:
            still += 1
            if still >= 2:
                break
        else:
            still = 0
        last = key
        time.sleep(0.1)
    wall = done_at - t0
    m1 = stack.metrics()
    cpu_server = cpu_delta(cpu_s0, cpu_s1)
    cpu_pg = cpu_delta(cpu_pg0, cpu_pg1)
    d = lambda sec, k: m1[sec][k] - m0[sec][k]  # noqa: E731
    stored = d("samples", "stored")
    sent_samples = sent * samples_per_packet
    send_s = elapsed.value
    return {
        "target_rate": pps, "sent_packets": sent, "send_seconds": round(send_s, 3),
        "achieved_packets_per_s": round(sent / send_s), "sent_samples": sent_samples,
        "received_packets": d("packets", "received"), "accepted_samples": d("samples", "accepted"),
        "stored_samples": stored, "published_samples": d("samples", "published"),
        "rejected_packets": d("packets", "rejected"),
        "kernel_drops": (m1["socket"]["kernel_drops"] or 0) - (m0["socket"]["kernel_drops"] or 0),
        "loss": round(1 - stored / sent_samples, 6) if sent_samples else 0.0,
        # from the first packet sent to the last sample stored and published
        "stored_samples_per_s": round(stored / wall),
        "drain_seconds": round(max(0.0, wall - send_s), 2),
        # percent of one core over that time (the server has a receive thread and a writer thread)
        "server_cpu_pct": round(100 * cpu_server / wall, 1),
        "postgres_cpu_pct": round(100 * cpu_pg / wall, 1),
    }


def sweep(name: str, stack: Stack, server_pid: int, pg_pid: int, rates: list[int], build, samples_per_packet: int,
          step_s: float, rate_to_pps) -> dict:
    steps, best = [], None
    for rate in rates:
        packets = build(rate, step_s)
        step = run_step(stack, server_pid, pg_pid, packets, rate_to_pps(rate), samples_per_packet)
        step["rate"] = rate
        # sustained = nothing lost, the sender really achieved the rate, and the server kept up instead of
        # living off its socket buffer (which would overflow in a longer run)
        step["kept_up"] = step["drain_seconds"] <= max(1.0, 0.1 * step_s)
        ok = (step["loss"] < LOSS_LIMIT and step["achieved_packets_per_s"] >= 0.97 * rate_to_pps(rate)
              and step["kept_up"])
        step["ok"] = ok
        steps.append(step)
        log(f"{name} {rate:>8}/s: sent {step['sent_packets']} pkts in {step['send_seconds']}s "
            f"({step['achieved_packets_per_s']}/s), stored {step['stored_samples']}/{step['sent_samples']} samples, "
            f"loss {step['loss']:.4%}, drain {step['drain_seconds']}s, server CPU {step['server_cpu_pct']}%, "
            f"postgres CPU {step['postgres_cpu_pct']}% "
            f"-> {'ok' if ok else 'FAIL'}")
        if ok:
            best = step
        else:
            break
    return {"best": best, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-seconds", type=float, default=10.0, help="sending time per rate step")
    p.add_argument("--legacy-rates", default="10000,20000,30000,40000,50000,60000",
                   help="legacy packets/s to try, in order (stops at the first step with >= 0.1 %% loss)")
    p.add_argument("--batched-rates", default="200000,400000,800000,1200000,1600000,2000000",
                   help="samples/s in binary packets to try, in order")
    p.add_argument("--keep", action="store_true", help="keep the temporary state dir (logs) afterwards")
    args = p.parse_args(argv)
    legacy_rates = [int(x) for x in args.legacy_rates.split(",") if x]
    batched_rates = [int(x) for x in args.batched_rates.split(",") if x]

    stack = Stack(args.keep)
    result: dict = {}
    try:
        log(f"state dir {stack.dir}: starting postgres + nats")
        stack.start()
        fleet = Fleet()
        server = stack.start_udpserver()
        pg_pid = stack.procs["postgres"].pid
        log(f"udpserver pid {server.pid}, postgres pid {pg_pid}; {os.cpu_count()} CPUs")
        legacy = sweep("legacy", stack, server.pid, pg_pid, legacy_rates, fleet.legacy_packets, 1,
                       args.step_seconds, lambda r: r)
        batched = sweep("batched", stack, server.pid, pg_pid, batched_rates, fleet.binary_packets, BATCH,
                        args.step_seconds, lambda r: r / BATCH)
        m = stack.metrics()
        from semg import db
        with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT coalesce(sum(n), 0) FROM sample_blocks")
            in_db = int(cur.fetchone()[0])
        s = m["samples"]
        result = {
            "legacy_max_packets_per_s": legacy["best"]["rate"] if legacy["best"] else 0,
            "batched_max_samples_per_s": batched["best"]["rate"] if batched["best"] else 0,
            "legacy_best": legacy["best"], "batched_best": batched["best"],
            "totals": {"sent_samples": sum(st["sent_samples"] for st in legacy["steps"] + batched["steps"]),
                       "accepted": s["accepted"], "stored": s["stored"], "published": s["published"],
                       "in_database": in_db, "lost_after_acceptance": s["accepted"] - in_db,
                       "stored_not_published": s["stored"] - s["published"],
                       "rejected": m["packets"]["rejected"], "dropped": s["dropped"]},
            "steps": {"legacy": legacy["steps"], "batched": batched["steps"]},
            "targets": {"legacy_packets_per_s": TARGET_LEGACY_PPS, "batched_samples_per_s": TARGET_BATCHED_SPS,
                        "max_loss": LOSS_LIMIT},
            "machine": {"cpus": os.cpu_count(), "step_seconds": args.step_seconds,
                        "channels": CHANNELS, "samples_per_binary_packet": BATCH},
        }
        result["targets_met"] = (result["legacy_max_packets_per_s"] >= TARGET_LEGACY_PPS
                                 and result["batched_max_samples_per_s"] >= TARGET_BATCHED_SPS
                                 and result["totals"]["lost_after_acceptance"] == 0
                                 and result["totals"]["stored_not_published"] == 0)
    except Exception as e:  # noqa: BLE001 - always end with the JSON line
        log(f"benchmark failed: {e}")
        result = {"error": str(e), "legacy_max_packets_per_s": 0, "batched_max_samples_per_s": 0, **result}
    finally:
        stack.stop()
    print(json.dumps(result))
    return 0 if result.get("targets_met") else 1


if __name__ == "__main__":
    sys.exit(main())
