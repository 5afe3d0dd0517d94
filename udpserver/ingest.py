"""Packet validation against the device registry and per-device state (sequence numbers, boots, clocks).

`Ingestor.handle(datagram, receive_time)` returns a `Record` ready to be journaled, or a `Reject`.
It does no I/O: the server swaps in device lists loaded from PostgreSQL with `set_devices`, so this is
unit-testable and fast (one dict lookup and an HMAC per binary packet).
"""

from __future__ import annotations

import statistics
import struct
from collections import Counter, deque
from typing import NamedTuple

from udpserver import protocol
from udpserver.clock import WRAP, DeviceClock
from udpserver.protocol import BinaryPacket, LegacyPacket, Reject

# Legacy packets carry no sequence number or boot counter, only millis(). A step back of up to this much
# is a duplicate or reordered packet (rejected as a replay); a larger step back is a device reboot.
LEGACY_STALE_MS = 2000
# Legacy devices sample every 1/rate s and stamp each sample with millis(): a step forward of more than one
# period plus this much (the 1 ms resolution of millis() and the sampler's latency) means packets were lost.
# The period is the registered one, or the device's typical step (median of its last steps) where that is
# longer: a sketch that samples slower than registered (a loop() with delay()) is not one long run of gaps.
LEGACY_GAP_MS = 3.0
LEGACY_STEP_HISTORY = 32
# A legacy clock may run ahead of the server's elapsed time by this much (late earlier packets) before a
# jump forward is taken for a reboot instead.
LEGACY_FORWARD_SLACK_MS = 60_000

# Per-device sample budget of binary devices (a token bucket counted in samples): it refills at the device's
# registered rate times RATE_TOLERANCE and holds at most BURST_S seconds of samples at the registered rate (at
# least BURST_MIN_SAMPLES). A packet with more samples than the budget holds is rejected whole (too_fast), so a
# device, or anyone with its key, cannot fill the database and the shared spool at up to 16 x 10000 values/s
# while registered at 500 Hz. Legitimate bursts stay within it: the sketch's Wi-Fi outage backlog is
# QUEUE_SAMPLES = 1024 samples (2 s at 500 Hz) sent at once, the Myo bridge sends 10-sample packets of a 200 Hz
# stream that Bluetooth delivers bunched (stalls of well under a second), and a server that was busy or
# restarted receives what queued in the socket meanwhile; 30 s covers all of them with room to spare. The
# tolerance is for clocks (a crystal is off by ppm, the sketch's integer timer period by < 1 %) and for how
# packets bunch on the way. BURST_MIN_SAMPLES lets any legal packet through (MAX_BINARY_SAMPLES = 4076 samples of
# one channel) and a whole QUEUE_SAMPLES backlog of a slow device (1024 samples are 20 s at 50 Hz).
RATE_TOLERANCE = 1.25
BURST_S = 30.0
BURST_MIN_SAMPLES = 4096

_INT16 = [struct.Struct(f"<{k}h") for k in range(protocol.MAX_CHANNELS + 1)]


class DeviceInfo(NamedTuple):
    id: int
    user_id: int
    protocol: str            # 'binary' | 'legacy'
    channels: int
    rate_hz: float
    key: bytes | None
    boot_offset: int = 0  # stored boot = the packet's boot + this (moved by "reset boot counter")


class Resume(NamedTuple):
    """Where a device's stream stood, from its last stored (or spooled) block."""

    boot: int
    last_seq: int
    last_millis: float  # unwrapped device time of the last sample
    last_server: float  # unix s when it was received


class Record(NamedTuple):
    user_id: int
    device_id: int
    boot: int
    seq0: int
    n: int
    channels: int
    rate_hz: float
    millis0: float      # unwrapped device clock of the first sample, ms
    time0: float        # that instant on the server clock, unix s
    server_ts: float    # receive time, unix s
    values: bytes       # n * channels int16 LE
    lost: int           # samples missing before this packet (sequence gap)


class DeviceState:
    __slots__ = ("boot", "last_seq", "clock", "accepted_packets", "accepted_samples", "stored_samples",
                 "published_samples", "lost_samples", "dropped_samples", "rejected", "last_accepted",
                 "last_rejected", "rejected_boot", "rejected_channels", "legacy_steps", "budget", "budget_at",
                 "rate_hz")

    def __init__(self) -> None:
        self.boot: int | None = None
        self.last_seq = -1
        self.clock = DeviceClock()
        self.accepted_packets = 0
        self.accepted_samples = 0
        self.stored_samples = 0
        self.published_samples = 0
        self.lost_samples = 0
        self.dropped_samples = 0
        self.rejected: Counter[str] = Counter()
        # for telling a device's owner why nothing arrives (see udpserver/troubleshooting.py)
        self.last_accepted: float | None = None     # unix s of the last packet that passed validation
        self.last_rejected: dict[str, float] = {}   # reason -> unix s of the last packet rejected for it
        self.rejected_boot: int | None = None       # boot of the last packet rejected as old_boot
        self.rejected_channels: int | None = None   # channels of the last packet rejected as channel_mismatch
        self.legacy_steps: deque[float] = deque(maxlen=LEGACY_STEP_HISTORY)  # ms between legacy samples
        self.budget: float | None = None  # samples the device may still send now (None: a full bucket)
        self.budget_at = 0.0              # unix s the budget was last brought up to date
        # rate_hz of the last accepted binary packet: the rate the device says it samples at, shown against the
        # registered one (training and recognition assume the registered rate; a slower device is not refused)
        self.rate_hz: int | None = None

    def resume(self, r: Resume) -> None:
        self.boot = r.boot
        self.last_seq = r.last_seq
        self.clock.restore(r.last_millis, r.last_server)
        if self.last_accepted is None or r.last_server > self.last_accepted:
            self.last_accepted = r.last_server

    def position(self) -> tuple[int, int] | None:
        return None if self.boot is None else (self.boot, self.last_seq)

    def as_dict(self, now: float, boot_offset: int = 0) -> dict:
        """The counters, with times as ages in seconds before `now` (unix s); boot is the device's own count
        (what its packets carry, as rejected_boot), not the stored one: None when nothing was received since
        its boot counter was last reset (what was received before is under an older offset)."""
        off = self.clock.offset_ms()
        seen = self.last_accepted
        return {
            "boot": None if self.boot is None or self.boot < boot_offset else self.boot - boot_offset,
            "last_seq": self.last_seq,
            "clock_offset_ms": None if off is None else round(off, 3),
            "accepted_packets": self.accepted_packets, "accepted_samples": self.accepted_samples,
            "stored_samples": self.stored_samples, "published_samples": self.published_samples,
            "lost_samples": self.lost_samples, "dropped_samples": self.dropped_samples,
            "rejected": dict(self.rejected),
            "last_accepted_age_s": None if seen is None else round(max(0.0, now - seen), 3),
            "rejected_age_s": {k: round(max(0.0, now - t), 3) for k, t in self.last_rejected.items()},
            "rejected_boot": self.rejected_boot, "rejected_channels": self.rejected_channels,
            "rate_hz": self.rate_hz,
        }


class Ingestor:
    def __init__(self, rate_tolerance: float = RATE_TOLERANCE, burst_s: float = BURST_S) -> None:
        """`rate_tolerance` 0 turns the per-device sample budget off (see RATE_TOLERANCE)."""
        self.rate_tolerance = rate_tolerance
        self.burst_s = burst_s
        self.devices: dict[int, DeviceInfo] = {}
        self.legacy_by_user: dict[int, DeviceInfo] = {}
        self.states: dict[int, DeviceState] = {}
        self.rejected: Counter[str] = Counter()
        self.rejected_device: int | None = None  # the device id the last rejected packet named, if any
        self.ready = False

    # ---- registry -------------------------------------------------------------------------------
    def set_devices(self, devices: dict[int, DeviceInfo], resume: dict[int, Resume]) -> list[int]:
        """Swap in a freshly loaded device list. `resume` must cover every device new to the list.

        Returns the ids of devices that are new. States of devices no longer registered are dropped.
        """
        new = [d for d in devices if d not in self.devices]
        for dev_id in list(self.states):
            if dev_id not in devices:
                del self.states[dev_id]
        for dev_id in new:
            st = self.states.setdefault(dev_id, DeviceState())
            r = resume.get(dev_id)
            if r is not None and (st.position() is None or (r.boot, r.last_seq) > st.position()):
                st.resume(r)
        self.devices = devices
        self.legacy_by_user = {d.user_id: d for d in devices.values() if d.protocol == "legacy"}
        self.ready = True
        return new

    def state(self, device_id: int) -> DeviceState:
        st = self.states.get(device_id)
        if st is None:
            st = self.states[device_id] = DeviceState()
        return st

    # ---- packets --------------------------------------------------------------------------------
    def _reject(self, reason: Reject, device_id: int | None = None, now: float = 0.0) -> Reject:
        self.rejected[reason.value] += 1
        self.rejected_device = device_id
        if device_id is not None:
            st = self.state(device_id)
            st.rejected[reason.value] += 1
            st.last_rejected[reason.value] = now
        return reason

    def handle(self, data: bytes, now: float) -> Record | Reject:
        if not self.ready:
            return self._reject(Reject.NOT_READY)
        first = data[0] if data else -1
        # the two formats directly (protocol.parse does the same dispatch; this is the hot path)
        if 0x30 <= first <= 0x39:
            pkt = protocol.parse_legacy(data)
            if type(pkt) is LegacyPacket:
                return self._legacy(pkt, now)
        elif first == protocol.MAGIC[0]:
            pkt = protocol.parse_binary(data)
            if type(pkt) is BinaryPacket:
                return self._binary(pkt, now)
        else:
            pkt = protocol.parse(data)
        return self._reject(pkt)

    def _binary(self, p: BinaryPacket, now: float) -> Record | Reject:
        dev = self.devices.get(p.device_id)
        if dev is None:
            self._reject(Reject.UNKNOWN_DEVICE)
            self.rejected_device = p.device_id  # for the log line; no state is kept for ids nobody registered
            return Reject.UNKNOWN_DEVICE
        if dev.key is None:
            return self._reject(Reject.PROTOCOL_MISMATCH, dev.id, now)
        if not protocol.verify_tag(p, dev.key):
            return self._reject(Reject.BAD_TAG, dev.id, now)
        if p.channels != dev.channels:
            self.state(dev.id).rejected_channels = p.channels
            return self._reject(Reject.CHANNEL_MISMATCH, dev.id, now)
        st = self.state(dev.id)
        clock = st.clock
        lost = 0
        boot = p.boot + dev.boot_offset
        new_boot = False
        if st.boot is not None:
            if boot < st.boot:
                st.rejected_boot = p.boot
                return self._reject(Reject.OLD_BOOT, dev.id, now)
            if boot == st.boot:
                if p.seq0 <= st.last_seq:
                    return self._reject(Reject.REPLAY, dev.id, now)
                lost = p.seq0 - st.last_seq - 1
            else:
                lost = p.seq0  # the new boot started at 0
                new_boot = True
        tolerance = self.rate_tolerance
        if tolerance:  # the sample budget (after the tag: nobody else can spend a device's budget)
            rate = dev.rate_hz
            cap = self.burst_s * rate
            if cap < BURST_MIN_SAMPLES:
                cap = BURST_MIN_SAMPLES
            budget = st.budget
            if budget is None:
                budget = cap
            else:
                elapsed = now - st.budget_at
                if elapsed > 0.0:
                    budget += elapsed * rate * tolerance
                    if budget > cap:
                        budget = cap
            st.budget_at = now  # also after a step back of the clock: refills go on from there
            n = p.n
            if n > budget:
                st.budget = budget
                return self._reject(Reject.TOO_FAST, dev.id, now)
            st.budget = budget - n
        if new_boot:
            clock.reset()
        # the sequence numbers say how long it was since the last packet (one per sample): its millis alone do
        # not, once it was offline for half of their 2^32 ms range or more (after a new boot: unused, no last packet)
        millis0 = clock.unwrap(p.millis0, (p.seq0 - st.last_seq) * 1000.0 / p.rate_hz)
        last_ms = millis0 + (p.n - 1) * 1000.0 / p.rate_hz
        offset = clock.observe(p.millis0, millis0, last_ms, now)
        st.boot = boot
        st.last_seq = p.seq0 + p.n - 1
        st.lost_samples += lost
        st.last_accepted = now
        st.rate_hz = p.rate_hz
        return Record(dev.user_id, dev.id, boot, p.seq0, p.n, p.channels, float(p.rate_hz), millis0,
                      (millis0 + offset) / 1000.0, now, p.values, lost)

    def _legacy(self, p: LegacyPacket, now: float) -> Record | Reject:
        dev = self.legacy_by_user.get(p.userid)
        if dev is None:
            return self._reject(Reject.UNKNOWN_USER)
        channels = len(p.values)
        if channels != dev.channels:
            self.state(dev.id).rejected_channels = channels
            return self._reject(Reject.CHANNEL_MISMATCH, dev.id, now)
        st = self.state(dev.id)
        clock = st.clock
        raw = p.millis
        lost = 0
        if st.boot is None:
            boot, seq, millis = 0, 0, float(raw)
        else:
            forward = clock.forward_delta(raw)
            elapsed_ms = max(0.0, now - clock.last_server) * 1000.0
            if forward <= elapsed_ms + LEGACY_FORWARD_SLACK_MS:
                period = 1000.0 / dev.rate_hz
                if forward - period > LEGACY_GAP_MS and st.legacy_steps:
                    period = max(period, statistics.median(st.legacy_steps))
                if forward - period > LEGACY_GAP_MS:  # the samples in between are lost: skip their numbers
                    lost = round(forward / period) - 1
                st.legacy_steps.append(forward)
                boot, seq, millis = st.boot, st.last_seq + 1 + lost, clock.last_unwrapped + forward
            elif WRAP - forward <= LEGACY_STALE_MS:
                return self._reject(Reject.REPLAY, dev.id, now)
            else:  # the clock went back by more than a reordering could explain: the device rebooted
                boot, seq, millis = st.boot + 1, 0, float(raw)
                clock.reset()
        offset = clock.observe(raw, millis, millis, now)
        st.boot = boot
        st.last_seq = seq
        st.lost_samples += lost
        st.last_accepted = now
        return Record(dev.user_id, dev.id, boot, seq, 1, channels, dev.rate_hz, millis,
                      (millis + offset) / 1000.0, now, _INT16[channels].pack(*p.values), lost)
