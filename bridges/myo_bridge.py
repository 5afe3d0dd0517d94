"""Myo armband -> platform bridge: Bluetooth LE EMG notifications in, authenticated binary UDP packets out.

    python -m bridges.myo_bridge --device-id 7 --key 0011...ff --server 127.0.0.1:8081 [--address MAC | --name Myo]

The device must be registered in the platform as a *binary* device with 8 channels at 200 Hz (UI Devices page
or ``semg.repo.register_device``); its id and secret key (hex) come from ``--device-id``/``--key`` or the
environment (``SEMG_MYO_DEVICE_ID``, ``SEMG_MYO_DEVICE_KEY``, ``SEMG_UDP_SERVER`` host:port).

Myo GATT (from Thalmic's ``myohw.h``; 128-bit UUIDs ``d506XXXX-a904-deb9-4748-2c7f4a124842``):
- command characteristic 0x0401 (control service 0x0001): ``set_mode`` = ``01 03 <emg> <imu> <classifier>``,
  emg 0x02 = filtered EMG, 0x03 = raw (unfiltered) EMG; ``set_sleep_mode`` = ``09 01 01`` (never sleep).
- EMG service 0x0005 with FOUR notify characteristics 0x0105, 0x0205, 0x0305, 0x0405 (``EmgData0..3``).
  Each notification is 16 bytes: two consecutive samples of 8 channels, int8. The armband sends 200 samples/s
  in total (50 notifications/s spread round-robin over the four characteristics).

Forwarding (``UdpForwarder``, no Bluetooth involved so it is testable): samples are batched (``--batch``, and at
most ``--max-delay-ms`` old) into binary v1 packets built with ``udpserver.protocol.build_binary``: sequence
numbers count samples from 0 per boot; the boot counter is persisted (``--boot-file``) and incremented at
every start, so the server's replay protection accepts a restarted bridge; likewise when the 32-bit sequence
number would wrap (after 2^32 samples, ~248 days at 200 Hz): the bridge goes on from 0 under the next boot.
``millis0`` is the device time of the packet's first sample: it follows the sample count at the nominal rate
(5 ms per sample), so BLE's late and bunched-up delivery moves neither it nor the sample order. It starts at the
host's monotonic clock (ms since the bridge started) and is re-anchored to that clock, only ever forwards, after
a reconnect and when, over a ``--resync-window-s`` window, even the least delayed notification shows the device
time more than ``--max-drift-ms`` behind the host (notifications lost unnoticed, or an armband slower than
200 Hz; a faster one runs ahead of the host, which the server's rolling clock-offset estimate follows). Delivery
delays only add to (host - device time), so their minimum is the drift; one late burst does not move the clock.

Losses: after a Bluetooth disconnect the bridge reconnects with exponential back-off; the sequence number jumps
by the number of samples the armband produced meanwhile (elapsed time x 200 Hz), so the server counts them as
lost and training never cuts a window across the gap. ``--detect-gaps`` additionally uses the round-robin order
of the four EMG characteristics to notice single lost notifications (off by default: the order is an
observation of the firmware, not part of Thalmic's specification).

``--record FILE`` writes the received notifications as JSON lines ``{"t": s, "char": i, "data": hex}``, and
``{"t": s, "event": "disconnected"}`` where the Bluetooth connection ended; ``--replay FILE`` forwards such a
recording without Bluetooth (tests, demos), counting the samples of each outage as lost as the live bridge did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from udpserver import protocol  # noqa: E402

log = logging.getLogger("myo_bridge")

MYO_BASE_UUID = "d506{:04x}-a904-deb9-4748-2c7f4a124842"
CONTROL_SERVICE = 0x0001
MYO_INFO_CHAR = 0x0101
FIRMWARE_CHAR = 0x0201
COMMAND_CHAR = 0x0401
EMG_SERVICE = 0x0005
EMG_CHARS = (0x0105, 0x0205, 0x0305, 0x0405)

CMD_SET_MODE = 0x01
CMD_VIBRATE = 0x03
CMD_SET_SLEEP_MODE = 0x09
EMG_MODE_NONE = 0x00
EMG_MODE_FILTERED = 0x02  # myohw_emg_mode_send_emg
EMG_MODE_RAW = 0x03  # myohw_emg_mode_send_emg_raw
IMU_MODE_NONE = 0x00
CLASSIFIER_MODE_DISABLED = 0x00
SLEEP_MODE_NEVER = 0x01

MYO_RATE_HZ = 200
MYO_CHANNELS = 8
SAMPLES_PER_NOTIFICATION = 2
NOTIFICATION_SIZE = SAMPLES_PER_NOTIFICATION * MYO_CHANNELS  # 16 bytes

MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 64  # devices.secret_key (db/postgres.sql)

ENV_DEVICE_ID = "SEMG_MYO_DEVICE_ID"
ENV_DEVICE_KEY = "SEMG_MYO_DEVICE_KEY"
ENV_SERVER = "SEMG_UDP_SERVER"


def myo_uuid(short: int) -> str:
    """Full 128-bit UUID string of a Myo service/characteristic from its 16-bit short id."""
    return MYO_BASE_UUID.format(short)


def set_mode_command(emg_mode: int = EMG_MODE_RAW, imu_mode: int = IMU_MODE_NONE,
                     classifier_mode: int = CLASSIFIER_MODE_DISABLED) -> bytes:
    """``myohw_command_set_mode_t``: command 0x01, payload size 3, emg/imu/classifier modes."""
    return bytes([CMD_SET_MODE, 3, emg_mode, imu_mode, classifier_mode])


def sleep_mode_command(never_sleep: bool = True) -> bytes:
    """``myohw_command_set_sleep_mode_t``: 0x09, payload size 1, 1 = never sleep (0 = normal)."""
    return bytes([CMD_SET_SLEEP_MODE, 1, SLEEP_MODE_NEVER if never_sleep else 0])


def vibrate_command(kind: int = 1) -> bytes:
    """Short (1), medium (2) or long (3) vibration: a "connected" cue for the wearer."""
    return bytes([CMD_VIBRATE, 1, kind])


def decode_emg(data: bytes | bytearray | memoryview) -> np.ndarray:
    """One EMG notification (16 bytes) -> (2, 8) int16 array of two consecutive samples (int8 values)."""
    raw = bytes(data)
    if len(raw) != NOTIFICATION_SIZE:
        raise ValueError(f"a Myo EMG notification has {NOTIFICATION_SIZE} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.int8).reshape(SAMPLES_PER_NOTIFICATION, MYO_CHANNELS).astype(np.int16)


def encode_emg(samples: np.ndarray) -> bytes:
    """Inverse of ``decode_emg`` (for recordings and tests): (2, 8) int8-range values -> 16 bytes."""
    arr = np.asarray(samples)
    if arr.shape != (SAMPLES_PER_NOTIFICATION, MYO_CHANNELS) or arr.min() < -128 or arr.max() > 127:
        raise ValueError("expected (2, 8) values in -128..127")
    return arr.astype(np.int8).tobytes()


# ---- boot counter -------------------------------------------------------------------------------------
def default_boot_file(device_id: int) -> Path:
    state = os.environ.get("SEMG_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".local", "state", "semg")
    return Path(state) / "myo_bridge" / f"device-{device_id}.boot"


def next_boot(path: str | os.PathLike) -> int:
    """Read the last boot counter from ``path``, store and return it + 1 (1 when the file does not exist).

    Never lower than the wall-clock seconds of the previous start would allow: if the file was lost, the
    counter restarts at the current Unix time // 60, which is above any counter a bridge that started once
    a minute could have reached, so the server does not reject the new boot as old.
    """
    p = Path(path)
    try:
        last = int(p.read_text().strip())
    except (OSError, ValueError):
        last = int(time.time()) // 60
    boot = (last + 1) & protocol.UINT32_MAX or 1
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(f"{boot}\n")
    os.replace(tmp, p)
    return boot


# ---- forwarding ---------------------------------------------------------------------------------------
class UdpForwarder:
    """Batches decoded samples into binary v1 packets for one registered device and sends them over UDP.

    ``send`` defaults to a UDP socket to ``server``; tests pass a callable that collects the packets.
    """

    def __init__(
        self,
        device_id: int,
        key: bytes,
        boot: int,
        server: tuple[str, int] | None = None,
        *,
        batch: int = 10,
        max_delay_ms: float = 60.0,
        rate_hz: int = MYO_RATE_HZ,
        channels: int = MYO_CHANNELS,
        detect_gaps: bool = False,
        max_drift_ms: float = 100.0,
        resync_window_s: float = 2.0,
        send: Callable[[bytes], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_boot: Callable[[], int] | None = None,
    ) -> None:
        if not 1 <= batch <= (protocol.MAX_PACKET_SIZE - protocol.HEADER_SIZE - protocol.TAG_SIZE) // (2 * channels):
            raise ValueError(f"batch {batch} does not fit in one packet")
        if device_id < 1 or not key:
            raise ValueError("device_id must be >= 1 and the key non-empty")
        self.device_id, self.key, self.boot = int(device_id), bytes(key), int(boot)
        self.batch, self.max_delay_s = int(batch), float(max_delay_ms) / 1000.0
        self.rate_hz, self.channels, self.detect_gaps = int(rate_hz), int(channels), bool(detect_gaps)
        if max_drift_ms <= 0 or resync_window_s <= 0:
            raise ValueError("max_drift_ms and resync_window_s must be positive")
        self.max_drift_ms, self.resync_window_s = float(max_drift_ms), float(resync_window_s)
        self.clock = clock
        # the next boot counter once the sequence numbers are used up (the CLI: the next one from --boot-file)
        self._new_boot = new_boot if new_boot is not None else lambda: (self.boot + 1) & protocol.UINT32_MAX or 1
        self.t0 = clock()
        self.seq = 0  # sequence number of the next sample
        # Device time (ms) of sample seq = _anchor_ms + (seq - _anchor_seq) * 1000 / rate; None until the first
        # notification. _lag_ref = least (host - device time) seen, _lag_min = least in the current window.
        self._anchor_ms: float | None = None
        self._anchor_seq = 0
        self._lag_ref = 0.0
        self._lag_min = float("inf")
        self._window_start = 0.0
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._pending_seq0 = 0
        self._pending_millis0 = 0
        self._pending_since = 0.0
        self._last_char: int | None = None
        self._last_arrival: float | None = None
        self._resumed = False
        self.stats = {"notifications": 0, "bad_notifications": 0, "packets": 0, "samples": 0, "lost_samples": 0,
                      "send_errors": 0, "reconnects": 0, "resyncs": 0}
        if send is None:
            if server is None:
                raise ValueError("give a server (host, port) or a send callable")
            self._sock = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM)
            addr = server

            def send(packet: bytes) -> None:
                self._sock.sendto(packet, addr)
        else:
            self._sock = None
        self._send = send

    # -- input
    def on_notification(self, data: bytes, char_index: int | None = None, arrival: float | None = None) -> None:
        """Handle one EMG notification from characteristic ``char_index`` (0..3) received at ``arrival``
        (clock seconds; now by default)."""
        arrival = self.clock() if arrival is None else arrival
        self.stats["notifications"] += 1
        try:
            samples = decode_emg(data)
        except ValueError as e:
            self.stats["bad_notifications"] += 1
            log.warning("ignored notification: %s", e)
            return
        k = len(samples)
        resumed = self._resumed and self._last_arrival is not None
        if resumed:
            # After a reconnect: the armband kept sampling while we were away.
            missing = max(1, int(round((arrival - self._last_arrival) * self.rate_hz)) - k)
            self.skip(missing)
        elif self.detect_gaps and char_index is not None and self._last_char is not None:
            missed = (char_index - (self._last_char + 1)) % len(EMG_CHARS)
            if missed:
                self.skip(missed * SAMPLES_PER_NOTIFICATION)
        self._resumed = False
        if char_index is not None:
            self._last_char = char_index
        self._last_arrival = arrival
        # The last sample of a notification was taken at the latest when it arrived; earlier ones 1/rate before.
        self.add(samples, arrival - (k - 1) / self.rate_hz, reanchor=resumed)

    def device_ms(self, seq: int) -> float:
        """Device time (ms) of sample ``seq``: the anchor plus the nominal sample period per sample."""
        return (self._anchor_ms or 0.0) + (seq - self._anchor_seq) * 1000.0 / self.rate_hz

    def _reanchor(self, seq: int, ms: float) -> None:
        """Device time of sample ``seq`` becomes ``ms``, but never at or before the previous sample's."""
        if self._anchor_ms is not None:
            ms = max(ms, self.device_ms(seq))
        self._anchor_ms, self._anchor_seq = ms, seq

    def _observe(self, first_time: float, reanchor: bool) -> None:
        """Compare the device time of sample ``self.seq`` with the host clock's ``first_time`` (seconds) and
        re-anchor it when due (first sample, after a reconnect, persistent drift beyond max_drift_ms)."""
        host_ms = (first_time - self.t0) * 1000.0
        now = first_time  # host time of the samples (a replay feeds recorded times faster than the clock runs)
        if self._anchor_ms is None or reanchor:
            # Same relation to the host clock as before (host - device = _lag_ref), forwards only.
            self._reanchor(self.seq, host_ms - (self._lag_ref if self._anchor_ms is not None else 0.0))
            self._lag_min, self._window_start = float("inf"), now
            return
        lag = host_ms - self.device_ms(self.seq)
        self._lag_ref = min(self._lag_ref, lag)  # a less delayed notification: a better reference, clock unmoved
        self._lag_min = min(self._lag_min, lag)
        if now - self._window_start >= self.resync_window_s:
            drift = self._lag_min - self._lag_ref
            if drift > self.max_drift_ms:  # behind the host even for the least delayed notification
                self._reanchor(self.seq, self.device_ms(self.seq) + drift)
                self.stats["resyncs"] += 1
                log.info("device time re-anchored %.0f ms forward (drift from the host clock)", drift)
            self._lag_min, self._window_start = float("inf"), now

    def add(self, samples: np.ndarray, first_time: float | None = None, *, reanchor: bool = False) -> None:
        """Append consecutive samples (k, channels); ``first_time`` = host clock seconds by which the first one
        was taken (now by default), used to anchor the device time and check its drift."""
        samples = np.asarray(samples)
        if samples.ndim != 2 or samples.shape[1] != self.channels:
            raise ValueError(f"expected (k, {self.channels}) samples, got {samples.shape}")
        self._observe(self.clock() if first_time is None else first_time, reanchor)
        i = 0
        while i < len(samples):
            if self.seq > protocol.UINT32_MAX:
                self._next_boot()
            if self._pending_n == 0:
                self._pending_seq0 = self.seq
                self._pending_millis0 = int(round(self.device_ms(self.seq)))
                self._pending_since = self.clock()
            # a packet's sequence numbers are 32-bit: none may run past 2^32 - 1
            take = min(self.batch - self._pending_n, len(samples) - i, protocol.UINT32_MAX + 1 - self.seq)
            self._pending.append(samples[i : i + take])
            self._pending_n += take
            self.seq += take
            i += take
            if self._pending_n >= self.batch:
                self.flush()

    def _next_boot(self) -> None:
        """The sequence numbers are used up: go on from 0 under a new boot counter (the server would reject
        wrapped ones as replays of the current boot), the device time going on unchanged."""
        self.flush()
        ms = self.device_ms(self.seq)
        self.boot = int(self._new_boot())
        self.seq = 0
        if self._anchor_ms is not None:
            self._anchor_ms, self._anchor_seq = ms, 0
        log.info("sequence numbers used up: going on as boot %s", self.boot)

    def skip(self, n_samples: int) -> None:
        """``n_samples`` were lost: send what is pending, then jump the sequence number past them."""
        if n_samples <= 0:
            return
        self.flush()
        self.seq += int(n_samples)
        self.stats["lost_samples"] += int(n_samples)

    def connection_lost(self) -> None:
        """Bluetooth dropped: flush; the next notification will account for the samples missed meanwhile."""
        self.flush()
        self._resumed = True
        self._last_char = None

    # -- output
    def tick(self) -> None:
        """Flush a partial batch that has waited longer than max_delay (call every few ms)."""
        if self._pending_n and self.clock() - self._pending_since >= self.max_delay_s:
            self.flush()

    def flush(self) -> None:
        if not self._pending_n:
            return
        values = np.concatenate(self._pending)
        packet = protocol.build_binary(self.device_id, self.boot, self._pending_seq0, self._pending_millis0,
                                       self.rate_hz, values, self.key)
        self._pending, self._pending_n = [], 0
        try:
            self._send(packet)
        except OSError as e:  # network down: count and go on (the server counts the gap as lost)
            self.stats["send_errors"] += 1
            log.warning("could not send a packet: %s", e)
            return
        self.stats["packets"] += 1
        self.stats["samples"] += len(values)

    def close(self) -> None:
        self.flush()
        if self._sock is not None:
            self._sock.close()


# ---- recordings ---------------------------------------------------------------------------------------
DISCONNECTED = "disconnected"


def read_recording(path: str | os.PathLike) -> list[tuple[float, int | None, bytes | None]]:
    """JSON lines ``{"t": seconds, "char": 0..3, "data": "hex"}`` -> [(t, char, bytes)]; a line
    ``{"t": seconds, "event": "disconnected"}`` (the connection ended there) -> (t, None, None)."""
    out: list[tuple[float, int | None, bytes | None]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                if "event" in rec:
                    if rec["event"] != DISCONNECTED:
                        raise ValueError(f"unknown event {rec['event']!r}")
                    out.append((float(rec["t"]), None, None))
                    continue
                char = rec.get("char")
                if char is not None and (not isinstance(char, int) or not 0 <= char <= 3):
                    raise ValueError(f"char must be 0..3, got {char!r}")
                out.append((float(rec["t"]), char, bytes.fromhex(rec["data"])))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path} line {n}: not a notification record ({e!r})") from None
    return out


def replay(forwarder: UdpForwarder, notifications: Iterable[tuple[float, int | None, bytes | None]],
           speed: float = 1.0, sleep: Callable[[float], Any] = time.sleep) -> dict:
    """Forward recorded notifications at their recorded pace (``speed`` x; 0 = as fast as possible).

    Arrival times are mapped onto the forwarder's clock so packet times follow the recording. A recorded
    disconnect (data None) is one for the forwarder too: the samples of the outage count as lost.
    """
    start = forwarder.clock()
    t_first = None
    for t, char, data in notifications:
        t_first = t if t_first is None else t_first
        due = (t - t_first) / speed if speed > 0 else 0.0
        if speed > 0:
            wait = start + due - forwarder.clock()
            if wait > 0:
                sleep(wait)
        if data is None:
            forwarder.connection_lost()
            continue
        forwarder.on_notification(data, char, arrival=start + (t - t_first) if speed <= 0 else None)
        forwarder.tick()
    forwarder.flush()
    return dict(forwarder.stats)


# ---- Bluetooth ----------------------------------------------------------------------------------------
async def _find(address: str | None, name: str, timeout: float):
    from bleak import BleakScanner

    if address:
        return await BleakScanner.find_device_by_address(address, timeout=timeout)
    # Any armband advertising the Myo control service, or whose name matches.
    return await BleakScanner.find_device_by_filter(
        lambda d, adv: (name and (d.name or "").lower().startswith(name.lower()))
        or myo_uuid(CONTROL_SERVICE) in [u.lower() for u in (adv.service_uuids or [])],
        timeout=timeout,
    )


def ble_problem(e: BaseException) -> str:
    """A Bluetooth failure as a line that says what to do (bleak's own words name no cause on a host without BlueZ)."""
    text = str(e).strip() or type(e).__name__
    low = text.lower()
    if isinstance(e, FileNotFoundError) or "system_bus_socket" in low:
        return (f"{text}: no D-Bus system bus, which Bluetooth on Linux needs (install and start dbus and bluez, "
                "e.g. `apt install bluez && systemctl start bluetooth`; in a container mount /run/dbus)")
    if "serviceunknown" in low or "org.bluez" in low and "not" in low:
        return f"{text}: the BlueZ daemon is not running (`systemctl start bluetooth`)"
    if "no bluetooth adapters" in low or "adapter" in low and "not found" in low:
        return f"{text}: no Bluetooth adapter (plug one in; `rfkill unblock bluetooth`)"
    return text


async def run_ble(forwarder: UdpForwarder, stop: asyncio.Event, *, address: str | None = None, name: str = "Myo",
                  emg_mode: int = EMG_MODE_RAW, scan_timeout: float = 10.0, max_backoff: float = 30.0,
                  record: Path | None = None, tick_s: float = 0.02) -> None:
    """Connect, enable EMG, forward notifications; reconnect with back-off until ``stop`` is set."""
    from bleak import BleakClient
    from bleak.exc import BleakError

    rec_file = open(record, "a", buffering=1) if record else None  # noqa: SIM115 - closed below
    backoff = 1.0
    first = True
    try:
        while not stop.is_set():
            lost = asyncio.Event()
            try:
                device = await _find(address, name, scan_timeout)
                if device is None:
                    raise ConnectionError(f"no Myo armband found ({address or name!r})")
                async with BleakClient(device, disconnected_callback=lambda _c, ev=lost: ev.set()) as client:
                    log.info("connected to %s (%s)", device.name, device.address)
                    if not first:
                        forwarder.stats["reconnects"] += 1

                    def handler(index: int):
                        def on_data(_char, data: bytearray) -> None:
                            if rec_file is not None:
                                rec_file.write(json.dumps({"t": time.monotonic(), "char": index, "data": bytes(data).hex()}) + "\n")
                            forwarder.on_notification(bytes(data), index)
                        return on_data

                    await client.write_gatt_char(myo_uuid(COMMAND_CHAR), sleep_mode_command(True), response=True)
                    for i, short in enumerate(EMG_CHARS):
                        await client.start_notify(myo_uuid(short), handler(i))
                    await client.write_gatt_char(myo_uuid(COMMAND_CHAR), set_mode_command(emg_mode), response=True)
                    with contextlib.suppress(BleakError):
                        await client.write_gatt_char(myo_uuid(COMMAND_CHAR), vibrate_command(1), response=True)
                    first, backoff = False, 1.0
                    while not stop.is_set() and not lost.is_set():
                        await asyncio.sleep(tick_s)
                        forwarder.tick()
                    if stop.is_set() and client.is_connected:
                        with contextlib.suppress(BleakError, OSError):
                            await client.write_gatt_char(myo_uuid(COMMAND_CHAR), set_mode_command(EMG_MODE_NONE),
                                                         response=True)
            except (TimeoutError, BleakError, OSError, ConnectionError) as e:
                log.warning("Bluetooth: %s", ble_problem(e))
            if rec_file is not None:  # so a replay of the recording loses the outage's samples as we do
                rec_file.write(json.dumps({"t": time.monotonic(), "event": DISCONNECTED}) + "\n")
            forwarder.connection_lost()
            if stop.is_set():
                break
            log.info("reconnecting in %.0f s", backoff)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(max_backoff, backoff * 2)
    finally:
        if rec_file is not None:
            rec_file.close()


# ---- CLI ----------------------------------------------------------------------------------------------
def _server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535 (the server's UDP_PORT), got {text!r}")
    return host.strip("[]"), int(port)


def resolve_server(server: tuple[str, int]) -> tuple[str, int]:
    """HOST:PORT -> (address, port), once at start: a name nobody can resolve is said once instead of failing
    every packet, and no packet waits for a DNS lookup (sendto with a name resolves it each time, in the event
    loop that also receives the armband's notifications)."""
    host, port = server
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        raise SystemExit(f"myo_bridge: --server: cannot resolve {host!r} ({e}): give the address of the "
                         "machine running the UDP server, e.g. 192.168.1.20:8081") from None
    return infos[0][4][0], port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _device_id(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= protocol.UINT32_MAX:
        raise argparse.ArgumentTypeError(f"expected the platform device id (a whole number >= 1), got {text!r}")
    return int(text)


MAX_BATCH = (protocol.MAX_PACKET_SIZE - protocol.HEADER_SIZE - protocol.TAG_SIZE) // (2 * MYO_CHANNELS)
# the most samples whose packet fits one Ethernet/Wi-Fi frame (1500-byte MTU less IPv4 and UDP headers): a bigger
# one travels as IP fragments and is lost whole when any fragment is
ONE_FRAME_BATCH = (1472 - protocol.HEADER_SIZE - protocol.TAG_SIZE) // (2 * MYO_CHANNELS)


def _batch(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_BATCH} samples per packet, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-id", type=_device_id, default=os.environ.get(ENV_DEVICE_ID),
                   help=f"platform device id (binary, 8 channels, 200 Hz); env {ENV_DEVICE_ID}")
    p.add_argument("--key", default=os.environ.get(ENV_DEVICE_KEY),
                   help=f"the device's secret key, hex; env {ENV_DEVICE_KEY}")
    default_server = os.environ.get(ENV_SERVER) or f"127.0.0.1:{os.environ.get('UDP_PORT', '8081')}"
    # a string default: argparse converts it only when --server is not given, and a bad one is a usage error
    p.add_argument("--server", type=_server, default=default_server,
                   help=f"udpserver HOST:PORT (env {ENV_SERVER}; default {default_server})")
    p.add_argument("--address", help="Bluetooth address of the armband (default: first Myo found)")
    p.add_argument("--name", default="Myo", help="advertised name prefix to look for (default Myo)")
    p.add_argument("--filtered", action="store_true", help="ask for the armband's filtered EMG (mode 0x02) "
                   "instead of raw (0x03)")
    p.add_argument("--batch", type=_batch, default=10,
                   help=f"samples per UDP packet (default 10 = 50 ms; above {ONE_FRAME_BATCH} a packet no longer "
                        "fits one network frame and is lost whole when one of its fragments is)")
    p.add_argument("--max-delay-ms", type=_non_negative, default=60.0,
                   help="send a partial batch after this long (default 60)")
    p.add_argument("--max-drift-ms", type=_positive, default=100.0,
                   help="re-anchor the device time to the host clock when it falls this far behind (default 100)")
    p.add_argument("--resync-window-s", type=_positive, default=2.0,
                   help="the drift is the least host-minus-device delay over this window (default 2 s)")
    p.add_argument("--boot-file", type=Path, help="where the boot counter is kept (default under SEMG_STATE_DIR)")
    p.add_argument("--detect-gaps", action="store_true",
                   help="count lost notifications from the round-robin order of the 4 EMG characteristics")
    p.add_argument("--record", type=Path, help="append received notifications to this JSON-lines file")
    p.add_argument("--replay", type=Path, help="forward a recording instead of connecting over Bluetooth")
    p.add_argument("--speed", type=_non_negative, default=1.0,
                   help="--replay pace (0 = as fast as possible); above 1.25 for more than ~30 s of the recording "
                        "the UDP server refuses the excess as too_fast (its per-device sample budget, "
                        "udpserver/PROTOCOL.md) unless it was started with --rate-tolerance 0")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.device_id is None or not args.key:
        raise SystemExit(f"myo_bridge: give --device-id and --key (or {ENV_DEVICE_ID} / {ENV_DEVICE_KEY})")
    try:
        key = bytes.fromhex(args.key.strip())
    except ValueError:
        raise SystemExit("myo_bridge: --key must be hex") from None
    # devices.secret_key is 16..64 bytes (the platform gives 32): any other length is a cut-off or mistyped key,
    # and every packet signed with it would be refused as bad_tag without a word here
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise SystemExit(f"myo_bridge: --key has {2 * len(key)} hex digits; a device key has "
                         f"{2 * MIN_KEY_BYTES}..{2 * MAX_KEY_BYTES} (64 as Gesture Management shows it): "
                         "copy the whole key")
    device_id = int(args.device_id)
    recording = None
    if args.replay:  # read before taking a boot number: a bad file must not use one up
        try:
            recording = read_recording(args.replay)
        except (OSError, ValueError) as e:
            raise SystemExit(f"myo_bridge: --replay: {e}") from None
    server = resolve_server(args.server)
    boot_file = args.boot_file or default_boot_file(device_id)
    boot = next_boot(boot_file)
    if args.batch > ONE_FRAME_BATCH:
        log.warning("--batch %d: each packet is sent in IP fragments (more than %d samples do not fit one network "
                    "frame) and is lost whole when one fragment is; %d or fewer is safer", args.batch,
                    ONE_FRAME_BATCH, ONE_FRAME_BATCH)
    fwd = UdpForwarder(device_id, key, boot, server, batch=args.batch, max_delay_ms=args.max_delay_ms,
                       detect_gaps=args.detect_gaps, max_drift_ms=args.max_drift_ms,
                       resync_window_s=args.resync_window_s, new_boot=lambda: next_boot(boot_file))
    log.info("device %s boot %s -> udp %s:%s", device_id, boot, *server)
    try:
        if recording is not None:
            stats = replay(fwd, recording, speed=args.speed)
        else:
            stop = asyncio.Event()

            async def _main() -> None:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError):
                        loop.add_signal_handler(sig, stop.set)
                await run_ble(fwd, stop, address=args.address, name=args.name,
                              emg_mode=EMG_MODE_FILTERED if args.filtered else EMG_MODE_RAW, record=args.record)

            asyncio.run(_main())
            stats = dict(fwd.stats)
    finally:
        fwd.close()
    print(json.dumps({"device_id": device_id, "boot": fwd.boot, "last_seq": fwd.seq - 1, **stats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
