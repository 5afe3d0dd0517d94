"""Wire formats of sensor packets (see PROTOCOL.md): pure functions, bytes in, packet or typed rejection out.

Two formats share the UDP port and are told apart by their first byte:
- binary v1 (first byte 0xE5): header, K samples x C channels int16 LE, HMAC-SHA256 tag (16 bytes);
- legacy text (first byte an ASCII digit): ``userid,millis,v0,...,vN`` as the original sketch sends it.

Nothing here touches state (devices, sequence numbers); udpserver.ingest does that.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import struct
from typing import NamedTuple

import numpy as np
import orjson

MAGIC = b"\xe5\x47"
VERSION = 1
# magic(2) version(1) channels(1) device_id(4) boot(4) seq0(4) millis0(4) rate_hz(2) n_samples(2)
HEADER = struct.Struct("<2sBBIIIIHH")
HEADER_SIZE = HEADER.size  # 24
TAG_SIZE = 16
MAX_CHANNELS = 16
MAX_RATE_HZ = 10_000
# Largest datagram we accept. Devices should stay within one Ethernet MTU (1472 bytes of UDP payload);
# the larger bound lets host-side tools batch more samples per packet.
MAX_PACKET_SIZE = 8192
MAX_BINARY_SAMPLES = (MAX_PACKET_SIZE - HEADER_SIZE - TAG_SIZE) // 2  # values (K * C)
MAX_LEGACY_SIZE = 256
INT16_MIN, INT16_MAX = -32768, 32767
UINT32_MAX = 0xFFFFFFFF
INT64_MAX = (1 << 63) - 1


class Reject(enum.StrEnum):
    """Why a datagram was not accepted; the value is the metrics key."""

    EMPTY = "empty"
    OVERSIZE = "oversize"                    # longer than allowed / than its header announces
    TRUNCATED = "truncated"                  # shorter than its header announces
    BAD_VERSION = "bad_version"              # binary magic with an unknown version
    BAD_HEADER = "bad_header"                # channels / rate / sample count out of range
    BAD_FIELD_COUNT = "bad_field_count"      # legacy text without 1..16 values
    NON_NUMERIC = "non_numeric"              # legacy field that is not a plain decimal integer
    OUT_OF_RANGE = "out_of_range"            # userid < 1, millis > uint32, value outside int16
    UNKNOWN_DEVICE = "unknown_device"        # binary device id not registered
    UNKNOWN_USER = "unknown_user"            # legacy userid without a registered legacy device
    PROTOCOL_MISMATCH = "protocol_mismatch"  # binary packet for a device registered as legacy
    BAD_TAG = "bad_tag"                      # HMAC does not verify under the device key
    CHANNEL_MISMATCH = "channel_mismatch"    # channel count differs from the registered one
    REPLAY = "replay"                        # sequence (legacy: millis) not after the last accepted
    OLD_BOOT = "old_boot"                    # boot counter older than the device's current boot
    TOO_FAST = "too_fast"                    # more samples than the device's registered rate allows (budget)
    NOT_READY = "not_ready"                  # server has not loaded the device list yet
    MALFORMED = "malformed"                  # neither a binary nor a legacy text packet


class BinaryPacket(NamedTuple):
    device_id: int
    boot: int
    seq0: int
    millis0: int        # device clock of the first sample (uint32, wraps)
    rate_hz: int
    channels: int
    n: int              # samples in the packet
    values: bytes       # n * channels int16 little-endian, sample-major
    signed: bytes       # everything the tag covers
    tag: bytes


class LegacyPacket(NamedTuple):
    userid: int
    millis: int
    values: tuple[int, ...]


# ---- binary ----------------------------------------------------------------------------------------
def compute_tag(key: bytes, signed: bytes) -> bytes:
    return hmac.digest(key, signed, hashlib.sha256)[:TAG_SIZE]


def parse_binary(data: bytes) -> BinaryPacket | Reject:
    """Structural checks only (the tag is verified by verify_tag once the device key is known)."""
    size = len(data)
    if size > MAX_PACKET_SIZE:
        return Reject.OVERSIZE
    if size < HEADER_SIZE + TAG_SIZE:
        return Reject.TRUNCATED
    magic, version, channels, device_id, boot, seq0, millis0, rate, n = HEADER.unpack_from(data)
    if magic != MAGIC:
        return Reject.BAD_HEADER
    if version != VERSION:
        return Reject.BAD_VERSION
    if not (1 <= channels <= MAX_CHANNELS and 1 <= rate <= MAX_RATE_HZ and n >= 1 and device_id >= 1):
        return Reject.BAD_HEADER
    end = HEADER_SIZE + 2 * n * channels
    if size < end + TAG_SIZE:
        return Reject.TRUNCATED
    if size > end + TAG_SIZE:
        return Reject.OVERSIZE
    return BinaryPacket(device_id, boot, seq0, millis0, rate, channels, n,
                        data[HEADER_SIZE:end], data[:end], data[end:])


def verify_tag(packet: BinaryPacket, key: bytes) -> bool:
    return hmac.compare_digest(compute_tag(key, packet.signed), packet.tag)


def build_binary(device_id: int, boot: int, seq0: int, millis0: int, rate_hz: int,
                 values: np.ndarray, key: bytes) -> bytes:
    """One binary packet; `values` is an (n, channels) integer array (int16 range)."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError("values must be a 2-D (samples, channels) array")
    n, channels = arr.shape
    head = HEADER.pack(MAGIC, VERSION, channels, device_id, boot & UINT32_MAX, seq0 & UINT32_MAX,
                       millis0 & UINT32_MAX, rate_hz, n)
    signed = head + np.ascontiguousarray(arr, dtype="<i2").tobytes()
    return signed + compute_tag(key, signed)


def values_array(values: bytes, channels: int) -> np.ndarray:
    """(n, channels) int16 view of a packet's value bytes (no copy)."""
    return np.frombuffer(values, dtype="<i2").reshape(-1, channels)


# ---- legacy text -------------------------------------------------------------------------------------
# Fast path: the whole datagram in one regex; the slow path below only classifies rejects.
# Leading zeros are allowed (PROTOCOL.md: digits only); after them the digit counts bound the magnitude.
_LEGACY = re.compile(rb"0*[0-9]{1,19},0*[0-9]{1,10}(?:,-?0*[0-9]{1,5}){1,16}(?:\r?\n)?")
_INT = re.compile(rb"-?[0-9]+")


def parse_legacy(data: bytes) -> LegacyPacket | Reject:
    """``userid,millis,v0,...,vN``: 1..16 values, each a decimal integer in int16 range.

    userid is a positive integer, millis the device's uint32 millis(). One trailing newline is tolerated.
    """
    if len(data) > MAX_LEGACY_SIZE:
        return Reject.OVERSIZE
    if _LEGACY.fullmatch(data) is None:
        return _classify_legacy(data)
    # The regex admits only digits, commas and minus signs, so the text is a JSON array body: orjson
    # converts all fields in C, ~3x faster than int() per field. JSON refuses leading zeros; we do not.
    try:
        fields = orjson.loads(b"[" + data + b"]")
    except orjson.JSONDecodeError:
        fields = list(map(int, data.split(b",")))
    userid, millis = fields[0], fields[1]
    values = tuple(fields[2:])
    if userid < 1 or userid > INT64_MAX or millis > UINT32_MAX \
            or min(values) < INT16_MIN or max(values) > INT16_MAX:
        return Reject.OUT_OF_RANGE
    return LegacyPacket(userid, millis, values)


def _classify_legacy(data: bytes) -> Reject:
    if not data:
        return Reject.EMPTY
    body = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    fields = body.split(b",")
    if not 3 <= len(fields) <= 2 + MAX_CHANNELS:
        return Reject.BAD_FIELD_COUNT
    for i, f in enumerate(fields):
        if _INT.fullmatch(f) is None or (i < 2 and f.startswith(b"-")):
            return Reject.NON_NUMERIC if _INT.fullmatch(f) is None else Reject.OUT_OF_RANGE
    return Reject.OUT_OF_RANGE  # digits only, but too many of them


def build_legacy(userid: int, millis: int, values) -> bytes:
    return (f"{userid},{millis & UINT32_MAX}," + ",".join(str(int(v)) for v in values)).encode()


# ---- dispatch ------------------------------------------------------------------------------------------
def parse(data: bytes) -> BinaryPacket | LegacyPacket | Reject:
    if not data:
        return Reject.EMPTY
    if data[0] == MAGIC[0]:
        return parse_binary(data)
    if 0x30 <= data[0] <= 0x39:
        return parse_legacy(data)
    return Reject.OVERSIZE if len(data) > MAX_PACKET_SIZE else Reject.MALFORMED
