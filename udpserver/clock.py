"""Device clock -> server clock, per device and boot.

Devices stamp samples with their uint32 millis() counter, which wraps every ~49.7 days and restarts at a
reboot. We unwrap it into a monotone float (ms since the device's boot) and estimate the offset to the
server clock as a running minimum of (server receive time - device time of the packet's last sample):
network and scheduling delays only ever add to that difference, so the minimum over a recent window is the
offset plus the smallest delay, robust to jitter and to bursts of late packets. Two half-windows make the
minimum forget old values, so slow drift between the two clocks is followed.
"""

from __future__ import annotations

import math

WRAP = 1 << 32


class DeviceClock:
    __slots__ = ("last_raw", "last_unwrapped", "last_server", "_window_s", "_bucket_start", "_min_cur",
                 "_min_prev")

    def __init__(self, window_s: float = 20.0):
        self._window_s = window_s / 2
        self.reset()

    def reset(self) -> None:
        """Forget everything (device reboot)."""
        self.last_raw: int | None = None
        self.last_unwrapped = 0.0
        self.last_server = 0.0
        self._bucket_start = 0.0
        self._min_cur = float("inf")
        self._min_prev = float("inf")

    def restore(self, unwrapped_ms: float, server_time: float) -> None:
        """Continue after a server restart from the last stored packet of this boot."""
        self.reset()
        # The stored time of the last sample has a fraction when 1000/rate is not whole, but millis() ticks
        # in whole ms: unwrapping continues from the whole ms it was in, or every later device_millis0 of
        # this boot would carry the fraction.
        whole = math.floor(unwrapped_ms)
        self.last_unwrapped = float(whole)
        self.last_raw = whole % WRAP
        self.last_server = server_time

    def forward_delta(self, raw: int) -> int:
        """Milliseconds from the last packet's millis to `raw` going forward (mod 2^32)."""
        return (raw - self.last_raw) % WRAP if self.last_raw is not None else 0

    def unwrap(self, raw: int, expected_ms: float = 0.0) -> float:
        """Unwrapped device time of `raw` within the current boot: the step from the last packet's millis nearest
        to `expected_ms` (what the sequence numbers say passed; small backward steps stay backward). Without
        it, a device back after more than 24.8 days offline in the same boot would go back in time."""
        if self.last_raw is None:
            return float(raw)
        d = (raw - self.last_raw) % WRAP
        return self.last_unwrapped + d + round((expected_ms - d) / WRAP) * WRAP

    def observe(self, raw: int, unwrapped: float, last_sample_ms: float, server_time: float) -> float:
        """Record an accepted packet; returns the offset (server ms - device ms) to map it with."""
        self.last_raw = raw
        self.last_unwrapped = unwrapped
        self.last_server = server_time
        if server_time - self._bucket_start >= self._window_s:
            self._min_prev = self._min_cur if server_time - self._bucket_start < 2 * self._window_s else float("inf")
            self._min_cur = float("inf")
            self._bucket_start = server_time
        sample = server_time * 1000.0 - last_sample_ms
        if sample < self._min_cur:
            self._min_cur = sample
        return min(self._min_cur, self._min_prev)

    def offset_ms(self) -> float | None:
        m = min(self._min_cur, self._min_prev)
        return None if m == float("inf") else m
