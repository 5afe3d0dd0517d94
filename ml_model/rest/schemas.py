"""Request and response bodies of the REST API (pydantic), as they appear in the OpenAPI docs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

MAX_PREDICT_ITEMS = 1000  # items (users' window batches) in one /predict request; the worker sends no more

Id = Annotated[int, Field(ge=1, le=2**63 - 1)]
# Raw data as nested lists: validation stops at the first bad value. Otherwise each bad value was one error, and
# FastAPI's 422 listed them all: 0.3 MB of empty strings took 1.5 s of the event loop and answered 6 MB.
Values = Annotated[list[float], Field(fail_fast=True)]
Rows = Annotated[list[Values], Field(fail_fast=True)]
Windows = Annotated[list[Rows], Field(fail_fast=True)]
Channel = Annotated[int, Field(ge=0, le=15)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _example(body: dict) -> ConfigDict:
    """An input model's config with the request /docs fills in for "Try it out" (the example Swagger made up from the
    types was refused: 'string' as an email, both single and batch fields in /predict, 'additionalProp1' params)."""
    return ConfigDict(extra="forbid", json_schema_extra={"examples": [body]})


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore", from_attributes=True)


class Message(_Out):
    detail: str


# ---- users -------------------------------------------------------------------------------------------
class UserCreate(_In):
    model_config = _example({"name": "Ada Lovelace", "email": "ada@example.org", "notes": "right forearm"})
    name: str = Field(min_length=1, max_length=200)
    email: str = Field(min_length=3, max_length=320)
    notes: str = Field("", max_length=10000)


class UserUpdate(_In):
    model_config = _example({"notes": "electrodes 2 cm below the elbow"})
    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, min_length=3, max_length=320)
    notes: str | None = Field(None, max_length=10000)


class User(_Out):
    id: int
    name: str
    email: str
    notes: str
    created_at: datetime
    updated_at: datetime
    devices: int | None = None  # counts, in lists
    gestures: int | None = None


class UserDeleted(_Out):
    id: int
    name: str
    email: str
    videos_removed: int = 0


# ---- gestures ----------------------------------------------------------------------------------------
class GestureCreate(_In):
    model_config = _example({"name": "fist", "description": "close the hand firmly", "channels_used": [],
                             "channel_purposes": {"0": "flexors"}})
    name: str = Field(min_length=1, max_length=80)
    description: str = Field("", max_length=2000)
    channels_used: list[Channel] = Field(default_factory=list, max_length=16,
                                         description="0-based device channels (empty = all)")
    channel_purposes: dict[str, str] = Field(default_factory=dict,
                                             description='what each electrode is for, e.g. {"0": "flexors"}')


class GestureUpdate(_In):
    model_config = _example({"description": "close the hand firmly, thumb outside"})
    name: str | None = Field(None, min_length=1, max_length=80)
    description: str | None = Field(None, max_length=2000)
    channels_used: list[Channel] | None = Field(None, max_length=16)
    channel_purposes: dict[str, str] | None = None


class Gesture(_Out):
    id: int
    user_id: int
    name: str
    description: str
    channels_used: list[int]
    channel_purposes: dict[str, Any]
    created_at: datetime


class LibraryGesture(_Out):
    name: str
    description: str


# ---- devices -----------------------------------------------------------------------------------------
class DeviceCreate(_In):
    model_config = _example({"channel_count": 8, "sample_rate_hz": 200, "protocol": "binary", "name": "Myo armband"})
    channel_count: int = Field(ge=1, le=16)
    sample_rate_hz: float = Field(gt=0, le=10000)
    protocol: Literal["binary", "legacy"] = "binary"
    name: str = Field("", max_length=80)


class Device(_Out):
    id: int
    user_id: int
    name: str
    protocol: str
    channel_count: int
    sample_rate_hz: float
    key_rotated_at: datetime | None = None
    created_at: datetime


class DeviceWithKey(Device):
    secret_key_hex: str | None = Field(
        None, description="the device's HMAC key, shown only in this response (None for legacy devices)")


# ---- capture sessions --------------------------------------------------------------------------------
class PlanRequest(_In):
    model_config = _example({"gestures": ["fist"], "repetitions": 3, "hold_s": 3, "rest_s": 2})
    gestures: list[str] = Field(min_length=1, max_length=50)
    repetitions: int = Field(ge=1, le=50)
    hold_s: float = Field(ge=0.5, le=60)
    rest_s: float = Field(ge=0.5, le=60)


class SessionCreate(PlanRequest):
    model_config = _example({"gestures": ["fist"], "repetitions": 3, "hold_s": 3, "rest_s": 2, "device_id": 1,
                             "name": "calibration"})
    device_id: Id | None = None
    name: str = Field("", max_length=200)


class PlannedInterval(_Out):
    ordinal: int
    kind: str
    label: str
    repetition: int
    planned_start_ms: int
    planned_end_ms: int


class Interval(PlannedInterval):
    id: int
    session_id: int
    gesture_id: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    discarded: bool = False


class Session(_Out):
    id: int
    user_id: int
    device_id: int | None = None
    name: str
    status: str
    plan: dict[str, Any]
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    recorded_intervals: int | None = None  # in lists
    intervals: list[Interval] | None = None  # in single-session responses


class SessionStart(_In):
    model_config = _example({})
    at: datetime | None = Field(None, description="actual start (server clock); default now")


class SessionEnd(_In):
    model_config = _example({"status": "completed"})
    status: Literal["completed", "aborted"] = "completed"
    at: datetime | None = Field(None, description="actual end (server clock); default now")


class IntervalAdd(_In):
    """An extra interval appended to a session (a repetition redone); it gets the next ordinal."""

    model_config = _example({"kind": "gesture", "label": "fist", "repetition": 3, "planned_start_ms": 17000,
                             "planned_end_ms": 20000})
    kind: Literal["rest", "gesture"]
    label: str = Field(min_length=1, max_length=80, description="a gesture of the user's bank; REST for kind rest")
    repetition: int = Field(ge=0, le=1000)
    # the columns are 32-bit integers: a bigger value was refused by the database without naming the field
    planned_start_ms: int = Field(ge=0, le=2**31 - 2, description="from the session's start")
    planned_end_ms: int = Field(ge=1, le=2**31 - 1, description="from the session's start")

    @model_validator(mode="after")
    def _ordered(self) -> IntervalAdd:
        if self.planned_end_ms <= self.planned_start_ms:
            raise ValueError("planned_end_ms must be after planned_start_ms")
        return self


class IntervalMark(_In):
    model_config = _example({"started_at": "2026-01-01T10:00:02Z", "ended_at": "2026-01-01T10:00:05Z"})
    started_at: datetime = Field(description="when the cue actually started")
    ended_at: datetime | None = Field(None, description="when it actually ended")


# ---- training jobs -----------------------------------------------------------------------------------
class JobCreate(_In):
    model_config = _example({"session_ids": [1], "params": {"epochs": 30}})
    session_ids: list[Id] = Field(min_length=1, max_length=1000)
    params: dict[str, Any] | None = Field(None, description="training parameters, e.g. {\"epochs\": 30}")


class Job(_Out):
    id: int
    user_id: int
    status: str
    params: dict[str, Any]
    progress: float
    epoch_metrics: list[Any]
    error: str | None = None
    cancel_requested: bool
    attempts: int
    worker: str | None = None
    heartbeat_at: datetime | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    session_ids: list[int] = Field(default_factory=list)
    artifact_id: int | None = None


class JobLog(_Out):
    id: int
    ts: datetime
    level: str
    message: str


# ---- models ------------------------------------------------------------------------------------------
class ChannelReference(_Out):
    """What the live worker's electrode check compares each channel with (ml_model.preprocessing.channel_reference)."""

    channels: list[int] = Field(description="device channels checked: those the model reads that varied in training")
    mean: list[float] = Field(description="their raw level in the training data")
    std: list[float] = Field(description="their raw spread (std) in the training data")


class ModelInfo(_Out):
    """A trained model as the API serves it (weights excluded)."""

    artifact_id: int
    user_id: int
    job_id: int | None = None
    classes: list[str] = Field(description="the gestures it answers, by their names now (for the served model)")
    renamed: dict[str, str] = Field(
        default_factory=dict, description="{name it was trained under: its gesture's name now} for the gestures "
        "renamed since (the served model answers with the name of now; its metrics keep the old one)")
    accuracy: float | None = Field(None, description="held-out (whole repetition) accuracy")
    size_bytes: int
    sha256: str
    trained_at: datetime
    channels: list[int] = Field(description="device channels the model reads")
    n_device_channels: int
    sample_rate_hz: float
    window_ms: float
    step_ms: float
    window: int = Field(description="window length in samples")
    step: int = Field(description="step between windows in samples")
    metrics: dict[str, Any] = Field(default_factory=dict)
    channel_reference: ChannelReference | None = Field(
        None, description="for the live electrode check; null when unknown (an old artifact with a high-pass filter)")
    training: dict[str, Any] | None = Field(
        None, description="how it was trained: seed, the whole configuration, epochs (README: Reproducing a result)")
    environment: dict[str, Any] | None = Field(
        None, description="what trained it: library versions, CPU capability, git commit; null for older models")
    served: bool = Field(False, description="whether it is the model served to its user now (live recognition)")
    chosen: bool = Field(False, description="served because the user chose it (PUT /users/{user_id}/served-model) "
                                            "rather than as the model of their newest training")
    chosen_at: datetime | None = Field(None, description="when the user chose it (set only when `chosen`)")


class ServedModelChoose(_In):
    model_config = _example({"artifact_id": 1})
    # strict: `true` was taken for model 1 and "3" for model 3 (lax coercion): a switch of live recognition
    # happens only on a number
    artifact_id: Id = Field(strict=True, description="one of the user's models (GET /users/{user_id}/models lists "
                                                     "them)")


class ServedModelState(_Out):
    """Which model is served to a user after a change: the chosen one, or that of their newest training."""

    user_id: int
    artifact_id: int | None = Field(description="the model served now; null when the user has no model")
    job_id: int | None = None
    chosen: bool = Field(description="served because the user chose it; it stays served until a training job "
                                     "queued after the choice stores a model")
    chosen_at: datetime | None = None


class SharedBase(_Out):
    """A shared base model (pretrained on many people, no user's) that a training job may fine-tune from."""

    artifact_id: int = Field(description="give it as a training job's params.base_artifact_id")
    created_at: datetime
    classes: list[str]
    channels: list[int] = Field(description="device channels it was pretrained on")
    sample_rate_hz: float = Field(description="fine-tune it only with sessions recorded at this rate")
    window_ms: float
    size_bytes: int
    val_accuracy: float | None = Field(None, description="held-out accuracy of its pretraining")
    pretrain: dict[str, Any] | None = Field(None, description="what it was pretrained on (source, subjects, ...)")


# ---- predictions -------------------------------------------------------------------------------------
class StoredPrediction(_Out):
    id: int
    user_id: int
    model_id: int | None = None
    gesture: str
    confidence: float
    device_id: int | None = None
    device_millis: float | None = None
    sample_received: datetime | None = None
    decided_at: datetime
    latency_ms: float | None = None
    channel_faults: list[dict[str, Any]] | None = Field(
        None, description="channels that looked failed at the decision: [{channel, fault, seconds}]")


def _check_payload(obj: Any) -> None:
    given = [n for n in ("windows", "samples", "data_b64") if getattr(obj, n) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of windows, samples or data_b64")
    if obj.data_b64 is not None and obj.shape is None:
        raise ValueError("data_b64 needs its shape ([n, channels, window] or [n_samples, channels])")


class PredictItem(_In):
    """One user's data: exactly one of `windows`, `samples` or `data_b64` (+ `shape`)."""

    user_id: Id
    windows: Windows | None = Field(
        None, description="raw windows (n_windows, device_channels, window_samples)")
    samples: Rows | None = Field(
        None, description="a raw recording (n_samples, device_channels), cut with the model's window and step")
    data_b64: str | None = Field(None, description="base64 of a little-endian array (compact form of the above)")
    shape: list[Annotated[int, Field(ge=0, le=10_000_000)]] | None = Field(
        None, min_length=2, max_length=3, description="shape of data_b64: 3-D windows or 2-D samples")
    dtype: Literal["int16", "float32"] = "int16"

    @model_validator(mode="after")
    def _one_payload(self) -> PredictItem:
        _check_payload(self)
        return self


class PredictRequest(_In):
    """Either one user's data (the fields of an item at the top level) or `items` for several users."""

    model_config = _example({"user_id": 1, "windows": [[[12, -40, 7], [3, 5, -9]]], "include_probabilities": True})
    user_id: Id | None = None
    windows: Windows | None = None
    samples: Rows | None = None
    data_b64: str | None = None
    shape: list[Annotated[int, Field(ge=0, le=10_000_000)]] | None = Field(None, min_length=2, max_length=3)
    dtype: Literal["int16", "float32"] = "int16"
    items: list[PredictItem] | None = Field(None, min_length=1, max_length=MAX_PREDICT_ITEMS,
                                            description="batch of several users (errors reported per item)")
    include_probabilities: bool = True

    @model_validator(mode="after")
    def _single_or_batch(self) -> PredictRequest:
        single = [n for n in ("user_id", "windows", "samples", "data_b64", "shape") if getattr(self, n) is not None]
        if self.items is not None and single:
            raise ValueError(f"give either items or a single user's data, not both ({', '.join(single)})")
        if self.items is None:
            if self.user_id is None:
                raise ValueError("user_id is required (or items, for a batch of several users)")
            _check_payload(self)
        return self

    def as_items(self) -> list[PredictItem]:
        if self.items is not None:
            return self.items
        return [PredictItem(user_id=self.user_id, windows=self.windows, samples=self.samples,
                            data_b64=self.data_b64, shape=self.shape, dtype=self.dtype)]


class WindowPrediction(_Out):
    gesture: str
    confidence: float
    probabilities: list[float] | None = Field(None, description="one per class, in the order of `classes`")


class ItemError(_Out):
    status: int
    detail: str


class PredictResult(_Out):
    user_id: int
    model_id: int | None = None
    classes: list[str] = Field(default_factory=list)
    window: int | None = None
    step: int | None = None
    predictions: list[WindowPrediction] = Field(default_factory=list)
    error: ItemError | None = Field(None, description="batch requests only: why this item got no predictions")


class PredictResponse(_Out):
    results: list[PredictResult]


# ---- API keys ----------------------------------------------------------------------------------------
class KeyCreate(_In):
    model_config = _example({"role": "user", "user_id": 1, "name": "prosthesis controller", "read_only": True})
    role: Literal["admin", "user", "service"]
    user_id: Id | None = Field(None, description="required for role 'user', empty otherwise")
    name: str = Field("", max_length=200)
    read_only: StrictBool = Field(False, description="the key may only read (GET): for an app that follows a "
                                  "user's decisions; not for 'service' keys")


class ApiKey(_Out):
    id: int
    user_id: int | None = None
    name: str
    role: str
    read_only: bool = False
    key_prefix: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="the secret key: shown only in this response, only its SHA-256 is stored")
