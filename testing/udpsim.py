"""Simulated sEMG sensors streaming to the udpserver, in real time, for a bounded duration.

Synthetic signals (testing/emgsynth.py) follow a gesture schedule, so what a model learns from them can
be checked; `--replay DIR` streams recorded Myo-armband files instead. Examples:

    # register 2 users with a binary device each (prints ids and keys), then stream 60 s to them
    python testing/udpsim.py --register --users 2 --duration 60
    # stream as existing devices: binary (id:hex key) and legacy (user id)
    python testing/udpsim.py --device 7:00112233... --legacy-user 12 --rate 500 --channels 4 --duration 30
    # follow a capture session's plan, or a schedule file; write the schedule with absolute times
    python testing/udpsim.py --device 7:... --session 3 --schedule-out /tmp/schedule.json
    # replay recordings (DIR/<subject>/<session>/classe_<i>.dat) 5x faster
    python testing/udpsim.py --register --replay ../shared/data/myo-armband/pretraining --subjects Female0 --speed 5

The server lets a device send at most 1.25x its registered rate, after 30 s of samples at once (its sample
budget, udpserver/PROTOCOL.md): with --speed above 1.25 for longer than that, start it with --rate-tolerance 0
(or the excess is refused as too_fast).

Sends only where --host says (default 127.0.0.1). The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg2

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.emgsynth import DEFAULT_GESTURES, REST, EmgSynth, Interval, Schedule  # noqa: E402
from udpserver import protocol  # noqa: E402

log = logging.getLogger("udpsim")

# Myo armband data set: classe_<i>.dat, gesture = i % 7, repetition = i // 7, 8 channels at 200 Hz
MYO_GESTURES = (REST, "radial_deviation", "wrist_flexion", "ulnar_deviation", "wrist_extension", "fist", "open")
MYO_CHANNELS, MYO_RATE_HZ = 8, 200
_MYO_FILE = re.compile(r"classe_(\d+)\.dat$")


# ---- sources of samples -------------------------------------------------------------------------------
class SynthSource:
    def __init__(self, synth: EmgSynth, schedule: Schedule):
        self.synth, self.schedule = synth, schedule
        self.produced = 0

    def take(self, n: int) -> np.ndarray | None:
        t0 = self.produced / self.synth.rate
        values, _ = self.synth.generate_schedule(self.schedule, t0, n)
        self.produced += n
        return values


class ArraySource:
    """Recorded samples (n, channels); runs out at the end."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.produced = 0

    def take(self, n: int) -> np.ndarray | None:
        if self.produced >= len(self.values):
            return None
        out = self.values[self.produced:self.produced + n]
        self.produced += len(out)
        return out


def load_myo_subject(session_dir: Path) -> tuple[np.ndarray, Schedule]:
    """The 28 files of one recording session in order, and the schedule of what was held when."""
    files = sorted((int(m.group(1)), p) for p in session_dir.iterdir() if (m := _MYO_FILE.search(p.name)))
    if not files:
        raise FileNotFoundError(f"no classe_<i>.dat files in {session_dir}")
    chunks, intervals, t = [], [], 0.0
    for i, path in files:
        data = np.fromfile(path, dtype="<i2")
        data = data[: len(data) // MYO_CHANNELS * MYO_CHANNELS].reshape(-1, MYO_CHANNELS)
        dur = len(data) / MYO_RATE_HZ
        label = MYO_GESTURES[i % 7]
        intervals.append(Interval("rest" if label == REST else "gesture", label, t, t + dur, i // 7))
        chunks.append(data)
        t += dur
    return np.concatenate(chunks), Schedule(intervals)


# ---- simulated devices ---------------------------------------------------------------------------------
@dataclass
class SimDevice:
    protocol: str                 # 'binary' | 'legacy'
    channels: int
    rate_hz: float
    source: SynthSource | ArraySource
    schedule: Schedule
    device_id: int | None = None  # binary
    key: bytes | None = None      # binary
    user_id: int | None = None    # legacy (informational for binary)
    boot: int = 1
    name: str = ""
    seq: int = 0                  # next sample's sequence number
    millis_start: float = 0.0     # device clock of sample 0
    packets: int = 0
    samples: int = 0
    dropped_packets: int = 0
    done: bool = False
    _pending: list = field(default_factory=list)

    def millis_of(self, seq: int) -> int:
        return int(self.millis_start + seq * 1000.0 / self.rate_hz) & 0xFFFFFFFF

    def label_of_seq(self, seq: int) -> str:
        return self.schedule.label_at(seq / self.rate_hz)

    def describe(self) -> dict:
        return {"protocol": self.protocol, "device_id": self.device_id, "user_id": self.user_id,
                "channels": self.channels, "rate_hz": self.rate_hz, "boot": self.boot, "name": self.name,
                "packets": self.packets, "samples": self.samples, "dropped_packets": self.dropped_packets}


class Simulation:
    """Streams every device in real time (times `speed`); `run()` is bounded by duration."""

    def __init__(self, devices: list[SimDevice], host: str = "127.0.0.1", port: int = 8081, batch: int = 25,
                 speed: float = 1.0, loss: float = 0.0, seed: int = 0):
        self.devices, self.batch, self.speed, self.loss = devices, batch, speed, loss
        self.addr = (host, port)
        self.rng = random.Random(seed)
        self.t0_unix: float | None = None
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)

    def _send(self, dev: SimDevice, packet: bytes) -> None:
        if self.loss and self.rng.random() < self.loss:
            dev.dropped_packets += 1
            return
        self.sock.sendto(packet, self.addr)
        dev.packets += 1

    def _emit(self, dev: SimDevice, values: np.ndarray, final: bool = False) -> None:
        if dev.protocol == "legacy":
            for row in values.tolist():
                self._send(dev, protocol.build_legacy(dev.user_id, dev.millis_of(dev.seq), row))
                dev.seq += 1
                dev.samples += 1
            return
        if len(values):
            dev._pending.append(values)
        buf = np.concatenate(dev._pending) if dev._pending else np.zeros((0, dev.channels), np.int16)
        while len(buf) >= self.batch or (final and len(buf)):
            part, buf = buf[: self.batch], buf[self.batch:]
            self._send(dev, protocol.build_binary(dev.device_id, dev.boot, dev.seq, dev.millis_of(dev.seq),
                                                  int(round(dev.rate_hz)), part, dev.key))
            dev.seq += len(part)
            dev.samples += len(part)
        dev._pending = [buf] if len(buf) else []

    def run(self, duration_s: float, tick_s: float = 0.01) -> dict:
        """Stream until duration_s (wall clock) has passed or every source ran out."""
        t0 = time.monotonic()
        self.t0_unix = time.time()
        for dev in self.devices:
            if dev.protocol == "legacy" and not dev.millis_start:
                # a clock that keeps counting across runs, so a re-run is neither a reboot nor a replay
                dev.millis_start = (self.t0_unix * 1000.0) % 2**32
        deadline = t0 + duration_s
        while True:
            now = time.monotonic()
            elapsed = min(now, deadline) - t0
            for dev in self.devices:
                if dev.done:
                    continue
                due = int(elapsed * self.speed * dev.rate_hz) - dev.source.produced
                if due > 0:
                    values = dev.source.take(due)
                    if values is None or len(values) < due:
                        dev.done = True
                    if values is not None:
                        self._emit(dev, values, final=dev.done)
            if now >= deadline or all(d.done for d in self.devices):
                break
            time.sleep(max(0.0, tick_s - (time.monotonic() - now)))
        for dev in self.devices:
            self._emit(dev, np.zeros((0, dev.channels), np.int16), final=True)
        return self.summary(time.monotonic() - t0)

    def summary(self, elapsed: float) -> dict:
        return {"t0_unix": self.t0_unix, "elapsed_s": round(elapsed, 3), "target": f"{self.addr[0]}:{self.addr[1]}",
                "packets": sum(d.packets for d in self.devices), "samples": sum(d.samples for d in self.devices),
                "devices": [d.describe() for d in self.devices]}

    def schedules_json(self) -> dict:
        return {"t0_unix": self.t0_unix, "speed": self.speed,
                "devices": [{**d.describe(), "schedule": d.schedule.to_json(
                    None if self.t0_unix is None else self.t0_unix)} for d in self.devices]}


# ---- registration ----------------------------------------------------------------------------------------
def register(n: int, protocols: list[str], channels: int, rate_hz: float, names: list[str] | None = None) -> list[dict]:
    """Create n users with one device each in the configured database (semg.repo, like the UI does)."""
    from semg import db, repo
    out = []
    tag = f"{int(time.time())}-{os.getpid()}"
    with contextlib.closing(db.connect()) as conn:
        for i in range(n):
            name = names[i] if names else f"Simulated user {i + 1}"
            user = repo.create_user(conn, name, f"sim-{tag}-{i}@example.org", notes="created by testing/udpsim.py")
            proto = protocols[i % len(protocols)]
            dev = repo.register_device(conn, user["id"], channels, rate_hz, protocol=proto, name=f"udpsim {name}")
            out.append({"user_id": user["id"], "device_id": dev["id"], "protocol": proto, "channels": channels,
                        "sample_rate_hz": rate_hz, "key": dev.get("secret_key_hex")})
    return out


def session_schedule(session_id: int) -> tuple[Schedule, float | None]:
    """The plan of a capture session (as the capture UI cues it), and when the session started recording
    (unix time; None unless it is recording now): the UI cues each interval at that start plus its offset."""
    from semg import db
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute("""SELECT kind, label, repetition, planned_start_ms, planned_end_ms FROM session_intervals
                       WHERE session_id = %s AND NOT discarded ORDER BY ordinal""", (session_id,))
        rows = cur.fetchall()
        cur.execute("""SELECT extract(epoch FROM started_at) FROM capture_sessions
                       WHERE id = %s AND status = 'recording'""", (session_id,))
        started = cur.fetchone()
    if not rows:
        raise SystemExit(f"udpsim: capture session {session_id} has no intervals")
    schedule = Schedule.from_plan([dict(zip(("kind", "label", "repetition", "planned_start_ms", "planned_end_ms"),
                                            r, strict=True)) for r in rows])
    return schedule, (float(started[0]) if started and started[0] is not None else None)


def follow_from(devices: list[SimDevice], schedule: Schedule, started_unix: float, now_unix: float,
                speed: float = 1.0) -> None:
    """Shift a recording session's schedule so that its intervals fall when the capture UI cues them (the
    session started before the simulator: without this every label would be late by the difference)."""
    lag = now_unix - started_unix
    shifted = Schedule([Interval(i.kind, i.label, (i.start_s - lag) * speed, (i.end_s - lag) * speed, i.repetition)
                        for i in schedule.intervals])
    if lag > schedule.duration_s:
        log.warning("capture session started %.0f s ago and its plan (%.0f s) is over: streaming rest", lag,
                    schedule.duration_s)
    for dev in devices:
        if isinstance(dev.source, SynthSource):
            dev.source.schedule = dev.schedule = shifted


# ---- command line ---------------------------------------------------------------------------------------
def _device_arg(text: str) -> tuple[int, bytes]:
    try:
        dev, key = text.split(":", 1)
        return int(dev), bytes.fromhex(key)
    except ValueError:
        raise argparse.ArgumentTypeError("expected DEVICE_ID:HEXKEY") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python testing/udpsim.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", default="127.0.0.1", help="udpserver address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="udpserver port (default UDP_PORT)")
    p.add_argument("--device", type=_device_arg, action="append", default=[], metavar="ID:HEXKEY",
                   help="stream as this binary device (repeatable)")
    p.add_argument("--legacy-user", type=int, action="append", default=[], metavar="USERID",
                   help="stream legacy text packets for this user (repeatable)")
    p.add_argument("--register", action="store_true",
                   help="create users and devices in the configured database first and print them")
    p.add_argument("--users", type=int, default=1, help="how many to --register (default 1)")
    p.add_argument("--protocol", choices=["binary", "legacy", "both"], default="binary",
                   help="protocol of --register'ed devices (both: alternate)")
    p.add_argument("--rate", type=float, default=500.0, help="samples/s per device (default 500)")
    p.add_argument("--channels", type=int, default=4, help="channels per device (default 4)")
    p.add_argument("--batch", type=int, default=25, help="samples per binary packet (default 25)")
    p.add_argument("--boot", type=int, default=None, help="boot counter of binary devices (default: from the clock)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to stream (default 30, max 86400)")
    p.add_argument("--gestures", default=",".join(DEFAULT_GESTURES), help="gestures of the default schedule")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--hold", type=float, default=3.0, help="seconds each gesture is held")
    p.add_argument("--rest", type=float, default=2.0, help="seconds of rest before each gesture")
    p.add_argument("--schedule", type=Path, help="JSON schedule (intervals with start_s/end_s or planned_*_ms)")
    p.add_argument("--session", type=int, help="follow this capture session's planned intervals (timed from its start while it records)")
    p.add_argument("--schedule-out", type=Path, help="write the schedule(s) with absolute times here")
    p.add_argument("--replay", type=Path, metavar="DIR", help="stream DIR/<subject>/<session>/classe_<i>.dat files")
    p.add_argument("--subjects", help="comma-separated subjects to replay (default: all)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="replay/simulation speed factor (default 1; above 1.25 for more than ~30 s the server "
                        "refuses the excess as too_fast unless started with --rate-tolerance 0)")
    p.add_argument("--loss", type=float, default=0.0, help="fraction of packets to drop on purpose (default 0)")
    p.add_argument("--start-delay", type=float, default=None,
                   help="seconds to wait before streaming (default 2.5 after --register: the server reloads "
                        "its device list every 2 s, so earlier packets would be rejected as unknown)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, LookupError, psycopg2.Error) as e:  # database down, no such file, bad JSON
        from semg.db import first_line
        where = "database: " if isinstance(e, psycopg2.Error) else ""
        print(f"udpsim: {where}{first_line(e)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.duration <= 86400 or args.speed <= 0 or not 0 <= args.loss < 1:
        raise SystemExit("udpsim: --duration must be in (0, 86400], --speed > 0, --loss in [0, 1)")
    if not 1 <= args.channels <= protocol.MAX_CHANNELS or not 1 <= args.batch:
        raise SystemExit("udpsim: --channels must be 1..16 and --batch >= 1")
    port = args.port
    if port is None:
        from semg.config import settings_or_exit
        port = settings_or_exit("udpsim").udp_port

    recordings: list[tuple[str, np.ndarray, Schedule]] = []
    if args.replay:
        wanted = set(args.subjects.split(",")) if args.subjects else None
        for subject in sorted(p for p in args.replay.iterdir() if p.is_dir()):
            if wanted and subject.name not in wanted:
                continue
            for session in sorted(p for p in subject.iterdir() if p.is_dir()):
                values, sched = load_myo_subject(session)
                recordings.append((f"{subject.name}/{session.name}", values, sched))
        if not recordings:
            raise SystemExit(f"udpsim: nothing to replay in {args.replay}")
        channels, rate = MYO_CHANNELS, float(MYO_RATE_HZ)
    else:
        channels, rate = args.channels, args.rate

    devices_spec: list[dict] = []
    if args.register:
        n = len(recordings) if recordings else args.users
        protos = ["binary", "legacy"] if args.protocol == "both" else [args.protocol]
        devices_spec = register(n, protos, channels, rate, [r[0] for r in recordings] or None)
        for d in devices_spec:
            print(json.dumps({"registered": d}), flush=True)
    devices_spec += [{"protocol": "binary", "device_id": d, "key": k.hex()} for d, k in args.device]
    devices_spec += [{"protocol": "legacy", "user_id": u} for u in args.legacy_user]
    if not devices_spec:
        raise SystemExit("udpsim: no devices: pass --device ID:KEY, --legacy-user ID or --register")

    session_started = None
    if args.session:
        schedule, session_started = session_schedule(args.session)
    elif args.schedule:
        schedule = Schedule.load(args.schedule)
    else:
        gestures = [g.strip() for g in args.gestures.split(",") if g.strip()]
        schedule = Schedule.cycles(gestures, args.repetitions, args.hold, args.rest)

    boot = args.boot if args.boot is not None else int(time.time()) & 0xFFFFFFFF
    devices = []
    for i, spec in enumerate(devices_spec):
        if recordings:
            name, values, sched = recordings[i % len(recordings)]
            source = ArraySource(values)
        else:
            name, sched = f"synthetic seed {args.seed + i}", schedule
            source = SynthSource(EmgSynth(channels, rate, seed=args.seed * 1000 + i,
                                          gestures=schedule.gestures or DEFAULT_GESTURES), sched)
        devices.append(SimDevice(spec["protocol"], channels, rate, source, sched, device_id=spec.get("device_id"),
                                 key=bytes.fromhex(spec["key"]) if spec.get("key") else None,
                                 user_id=spec.get("user_id"), boot=boot, name=name,
                                 millis_start=float(random.Random(i).randint(1000, 5000))
                                 if spec["protocol"] == "binary" else 0.0))
    delay = args.start_delay if args.start_delay is not None else (2.5 if args.register else 0.0)
    if delay > 0:
        time.sleep(min(delay, 60.0))
    if session_started is not None:
        follow_from(devices, schedule, session_started, time.time(), args.speed)
    sim = Simulation(devices, args.host, port, batch=args.batch, speed=args.speed, loss=args.loss, seed=args.seed)
    log.info("streaming %d device(s) to %s:%d for up to %.0f s (schedule %.0f s, speed %g)", len(devices),
             args.host, port, args.duration, schedule.duration_s if not recordings else recordings[0][2].duration_s,
             args.speed)
    try:
        summary = sim.run(args.duration)
    except KeyboardInterrupt:
        summary = sim.summary(float("nan"))
    if args.schedule_out:
        args.schedule_out.write_text(json.dumps(sim.schedules_json(), indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
