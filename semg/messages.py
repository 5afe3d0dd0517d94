"""JSON payloads on NATS, validated with pydantic on both ends (see ../shared/CONTRACTS.md).

Subjects:
    emg.samples.<userid>      SamplesMessage     UDP server, after the samples are stored
    emg.predictions.<userid>  PredictionMessage  inference worker
    models.updated            ModelUpdated       training job, after the artifact is stored

Header (NATS message header, not payload: consumers that predate it ignore it, and the payload models forbid
extra fields):
    Semg-Published            on emg.samples.*: the UDP server's clock (unix s) when it published the message
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

UserId = Annotated[int, Field(ge=1)]


def samples_subject(userid: int) -> str:
    return f"emg.samples.{userid}"


def predictions_subject(userid: int) -> str:
    return f"emg.predictions.{userid}"


SAMPLES_WILDCARD = "emg.samples.*"
PREDICTIONS_WILDCARD = "emg.predictions.*"
MODELS_UPDATED = "models.updated"
# How often the API looks for new models anyway (a models.updated missed) and for gestures renamed in the web UI.
MODELS_POLL_S = 30.0

# When the UDP server published a samples message, on the clock its recv_time values are on: minus those, how
# long the server held the samples (a backlog after an outage or a restart), whatever the reader's clock says.
PUBLISHED_HEADER = "Semg-Published"


def published_headers(t: float) -> dict[str, str]:
    return {PUBLISHED_HEADER: f"{t:.6f}"}


def published_time(headers: dict[str, str] | None) -> float | None:
    """The Semg-Published time of a message's headers; None if absent or not a finite positive number."""
    raw = headers.get(PUBLISHED_HEADER) if headers else None
    if raw is None:
        return None
    try:
        t = float(raw)
    except ValueError:
        return None
    return t if math.isfinite(t) and t > 0 else None


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplesMessage(_Msg):
    """A run of consecutive samples of one device, column-wise (compact and fast to parse).

    Sample i has sequence number seq0 + i (per device and boot), device clock device_millis[i]
    (unwrapped, ms), server receive time recv_time[i] (unix seconds) and channel values values[i].
    """

    v: Literal[1] = 1
    userid: UserId
    device_id: int = Field(ge=1)
    boot: int = Field(ge=0)
    sample_rate_hz: float = Field(gt=0, le=10000)
    channels: int = Field(ge=1, le=16)
    seq0: int = Field(ge=0)
    device_millis: list[float]
    recv_time: list[float]
    values: list[list[int]]

    @model_validator(mode="after")
    def _consistent(self) -> SamplesMessage:
        n = len(self.values)
        if n == 0:
            raise ValueError("a samples message carries at least one sample")
        if len(self.device_millis) != n or len(self.recv_time) != n:
            raise ValueError("device_millis, recv_time and values must have the same length")
        if any(len(row) != self.channels for row in self.values):
            raise ValueError(f"every sample must have exactly {self.channels} channel values")
        return self


class ChannelFault(_Msg):
    """A channel of the model that looked failed when the window was decided (an electrode off, stuck or railing)."""

    channel: int = Field(ge=0, le=15)  # device channel, 0-based (the UI's ch0, ch1, ...)
    fault: Literal["flat", "saturated"]  # flat: (near) constant; saturated: mostly at an extreme of its range
    seconds: float = Field(ge=0)  # how long it has looked so, up to the window's last sample


class PredictionMessage(_Msg):
    """One live decision for a window of a user's stream."""

    v: Literal[1] = 1
    userid: UserId
    gesture: str = Field(min_length=1, max_length=80)  # 'REST' / 'UNKNOWN' when unsure
    confidence: float = Field(ge=0, le=1)
    raw_gesture: str | None = Field(None, max_length=80)  # the model's own top class before smoothing/threshold
    model_id: int | None = None
    device_id: int | None = None
    # the device's boot: seq and device_millis count from 0 again at each (a sensor reboot), so a decision's place
    # in its user's stream is (device_id, boot, seq), never seq alone
    boot: int | None = Field(None, ge=0)
    seq: int | None = None  # sequence number of the window's last sample (per device and boot)
    device_millis: float  # device clock of the window's last sample (ms since the device's boot)
    sample_recv_time: float  # server receive time of that sample (unix s)
    # when that sample was taken, estimated on the server's clock (unix s): before sample_recv_time by the sensor's
    # packet and network delay, and by however long a sensor kept it through a Wi-Fi drop (its receive time is
    # fresh then); decided_time minus this is the decision's age from the muscle (None from older workers)
    sample_taken_time: float | None = None
    decided_time: float  # when the decision was published (unix s)
    # channels that looked failed (None: all fine); their samples were read as their training level, and with more
    # than a quarter of the model's channels failed the gesture is the unsure label (ml_model.nat_inference)
    channel_faults: list[ChannelFault] | None = Field(None, max_length=16)


class ModelUpdated(_Msg):
    v: Literal[1] = 1
    userid: UserId
    job_id: int | None = None
    artifact_id: int = Field(ge=1)
