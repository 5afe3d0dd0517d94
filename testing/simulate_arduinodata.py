"""Emulates arduino/arduinocode.ino on the host: its exact packets and their timing.

Like the sketch: the boot counter is read from "NVS" (a small file) and incremented at every start; a timer
takes one sample of every channel each 1/rate s from about 250 ms after boot, stamped with millis(); samples
wait in a 1024-sample queue (the oldest beyond it are lost, so the server sees a sequence gap) until WiFi is
up, then every SAMPLES_PER_PACKET consecutive samples go out as one binary packet (or each sample as a legacy
text packet). Values are 12-bit ADC readings (0..4095) of synthetic sEMG.

    python testing/simulate_arduinodata.py --device-id 7 --key 0011... --duration 20
    python testing/simulate_arduinodata.py --legacy --user-id 12 --duration 20
    python testing/simulate_arduinodata.py --register --duration 20 --reboot-after 10
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing.emgsynth import EmgSynth, Schedule  # noqa: E402
from udpserver import protocol  # noqa: E402

log = logging.getLogger("arduino-sim")

# the sketch's constants
SAMPLE_RATE_HZ = 500
SAMPLES_PER_PACKET = 25
CHANNELS = 4
QUEUE_SAMPLES = 1024
SETUP_MS = 250            # Serial.begin + delay(200) + WiFi/timer setup before the first sample
DIAG_INTERVAL_S = 5.0


class Nvs:
    """The sketch's Preferences namespace "semg": only the boot counter."""

    def __init__(self, path: Path):
        self.path = path

    def next_boot(self) -> int:
        boot = 0
        if self.path.exists():
            boot = int(json.loads(self.path.read_text()).get("boot", 0))
        boot += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"boot": boot}))
        return boot


class EmulatedSketch:
    def __init__(self, send, nvs: Nvs, device_id: int | None, key: bytes | None, user_id: int | None,
                 legacy: bool, rate_hz: int = SAMPLE_RATE_HZ, channels: int = CHANNELS,
                 samples_per_packet: int = SAMPLES_PER_PACKET, wifi_connect_s: float = 1.5, seed: int = 0,
                 schedule: Schedule | None = None):
        self.send = send
        self.nvs = nvs
        self.device_id, self.key, self.user_id, self.legacy = device_id, key, user_id, legacy
        self.rate, self.channels, self.per_packet = rate_hz, channels, samples_per_packet
        self.wifi_connect_s = wifi_connect_s
        self.schedule = schedule or Schedule.cycles()
        self.synth = EmgSynth(channels, rate_hz, seed=seed, gestures=self.schedule.gestures)
        self.stats = {"samples": 0, "packets_sent": 0, "queue_drops": 0, "boots": 0}
        self.boot_at = 0.0
        self.boot()

    def boot(self) -> None:
        """Power-on: new boot counter, millis() from 0, sequence numbers from 0, WiFi connecting."""
        self.boot_counter = self.nvs.next_boot()
        self.boot_at = time.monotonic()
        self.next_seq = 0
        self.queue: deque[tuple[int, int, np.ndarray]] = deque()
        self.batch: list[tuple[int, int, np.ndarray]] = []
        self.stats["boots"] += 1
        log.info("semg: device %s boot %d, %d channels at %d Hz, %s protocol, %d samples/packet",
                 self.device_id, self.boot_counter, self.channels, self.rate, "legacy" if self.legacy else "binary",
                 self.per_packet)

    def millis_of(self, seq: int) -> int:
        return int(SETUP_MS + seq * 1000.0 / self.rate) & 0xFFFFFFFF

    def _sample(self, upto_seq: int) -> None:
        n = upto_seq - self.next_seq
        if n <= 0:
            return
        t0 = (self.millis_of(self.next_seq) - SETUP_MS) / 1000.0
        values, _ = self.synth.generate_schedule(self.schedule, t0, n)
        for k in range(n):
            seq = self.next_seq + k
            if len(self.queue) >= QUEUE_SAMPLES:  # xQueueSend fails: the sample is lost
                self.stats["queue_drops"] += 1
                continue
            self.queue.append((seq, self.millis_of(seq), values[k]))
        self.next_seq += n
        self.stats["samples"] += n

    def _flush(self) -> None:
        if not self.batch:
            return
        seq0, millis0 = self.batch[0][0], self.batch[0][1]
        values = np.stack([b[2] for b in self.batch])
        self.send(protocol.build_binary(self.device_id, self.boot_counter, seq0, millis0, self.rate, values, self.key))
        self.stats["packets_sent"] += 1
        self.batch = []

    def step(self, now: float) -> None:
        """What the timer task and loop() did since the last call."""
        uptime_ms = (now - self.boot_at) * 1000.0
        if uptime_ms >= SETUP_MS:
            self._sample(int((uptime_ms - SETUP_MS) * self.rate / 1000.0) + 1)
        if now - self.boot_at < self.wifi_connect_s:
            return
        while self.queue:
            seq, millis, values = self.queue.popleft()
            if self.legacy:
                self.send(protocol.build_legacy(self.user_id, millis, values.tolist()))
                self.stats["packets_sent"] += 1
                continue
            if self.batch and seq != self.batch[0][0] + len(self.batch):
                self._flush()  # a gap starts a new packet
            self.batch.append((seq, millis, values))
            if len(self.batch) == self.per_packet:
                self._flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python testing/simulate_arduinodata.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device-id", type=int, help="devices.id (binary)")
    p.add_argument("--key", help="device secret key, hex (binary)")
    p.add_argument("--user-id", type=int, help="users.id (legacy)")
    p.add_argument("--legacy", action="store_true", help="send the original text packets")
    p.add_argument("--register", action="store_true", help="register a user and device in the database first")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default UDP_PORT")
    p.add_argument("--rate", type=int, default=SAMPLE_RATE_HZ)
    p.add_argument("--channels", type=int, default=CHANNELS)
    p.add_argument("--samples-per-packet", type=int, default=SAMPLES_PER_PACKET)
    p.add_argument("--duration", type=float, default=20.0, help="seconds to run (max 86400)")
    p.add_argument("--wifi-connect-s", type=float, default=1.5, help="seconds from boot until WiFi is up")
    p.add_argument("--reboot-after", type=float, default=None, help="power-cycle after this many seconds")
    p.add_argument("--nvs", type=Path, help="file holding the boot counter (default $SEMG_STATE_DIR/sim-nvs/...)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.duration <= 86400:
        raise SystemExit("simulate_arduinodata: --duration must be in (0, 86400]")
    from semg.config import settings_or_exit
    settings = settings_or_exit("simulate_arduinodata")
    port = args.port or settings.udp_port
    if args.register:
        from testing.udpsim import register
        reg = register(1, ["legacy" if args.legacy else "binary"], args.channels, args.rate)[0]
        print(json.dumps({"registered": reg}), flush=True)
        args.device_id, args.user_id = reg["device_id"], reg["user_id"]
        args.key = reg["key"]
        time.sleep(2.5)  # a running server reloads its device list every 2 s
    if args.legacy and not args.user_id:
        raise SystemExit("simulate_arduinodata: --legacy needs --user-id (or --register)")
    if not args.legacy and not (args.device_id and args.key):
        raise SystemExit("simulate_arduinodata: binary needs --device-id and --key (or --register)")
    ident = f"user-{args.user_id}" if args.legacy else f"device-{args.device_id}"
    nvs = Nvs(args.nvs or settings.state_dir / "sim-nvs" / f"{ident}.json")

    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = (args.host, port)
    sketch = EmulatedSketch(lambda pkt: sock.sendto(pkt, addr), nvs, args.device_id,
                            bytes.fromhex(args.key) if args.key else None, args.user_id, args.legacy, args.rate,
                            args.channels, args.samples_per_packet, args.wifi_connect_s, args.seed)
    start = time.monotonic()
    next_diag = start + DIAG_INTERVAL_S
    rebooted = False
    while (now := time.monotonic()) - start < args.duration:
        if args.reboot_after is not None and not rebooted and now - start >= args.reboot_after:
            rebooted = True
            sketch.boot()
        sketch.step(now)
        if now >= next_diag:
            next_diag += DIAG_INTERVAL_S
            log.info("semg: boot %d seq %d | samples %d sent %d pkts | queue drops %d | queued %d",
                     sketch.boot_counter, sketch.next_seq, sketch.stats["samples"], sketch.stats["packets_sent"],
                     sketch.stats["queue_drops"], len(sketch.queue))
        time.sleep(0.005)  # loop() waits up to 5 ms for the next sample
    sketch.step(time.monotonic())
    print(json.dumps({"boot": sketch.boot_counter, **sketch.stats, "target": f"{addr[0]}:{addr[1]}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
