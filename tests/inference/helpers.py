"""Publishing sample streams and collecting decisions on NATS, for the live-inference tests."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from semg.messages import PredictionMessage, SamplesMessage


def expected_ends(seq_first: int, seq_last: int, window: int, step: int) -> list[int]:
    """Sequence numbers of the window ends a contiguous run seq_first..seq_last must produce."""
    first = seq_first + window - 1
    first += (-(first + 1)) % step
    return list(range(first, seq_last + 1, step))


def samples_message(user_id: int, device_id: int, seq0: int, values: np.ndarray, rate: float, boot: int = 0,
                    t0: float | None = None, skew: float = 0.0) -> bytes:
    """Receive times `t0` (default now), on a UDP server host whose clock is `skew` s ahead of this one."""
    n = len(values)
    now = (time.time() if t0 is None else t0) + skew
    millis = [(seq0 + i) * 1000.0 / rate for i in range(n)]
    return SamplesMessage(userid=user_id, device_id=device_id, boot=boot, sample_rate_hz=rate,
                          channels=values.shape[1], seq0=seq0, device_millis=millis, recv_time=[now] * n,
                          values=values.astype(int).tolist()).model_dump_json().encode()


class Collector:
    """Subscribes to emg.predictions.* and keeps every decision."""

    def __init__(self) -> None:
        self.decisions: list[PredictionMessage] = []

    async def start(self, nc) -> None:
        async def cb(msg):
            self.decisions.append(PredictionMessage.model_validate_json(msg.data))
        await nc.subscribe("emg.predictions.*", cb=cb)

    def of(self, user_id: int) -> list[PredictionMessage]:
        return [d for d in self.decisions if d.userid == user_id]

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.decisions) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
