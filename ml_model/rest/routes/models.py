"""Model serving: POST /predict (one user or a batch of several) and the served models' metadata."""

from __future__ import annotations

import base64
import binascii
import logging
import math
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import orjson
import psycopg2
from fastapi import APIRouter, Body, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from ml_model import artifacts
from ml_model import preprocessing as pp
from ml_model.export_names import export_filename, stored_meta
from ml_model.rest import serving
from ml_model.rest.auth import Caller, UserScoped
from ml_model.rest.deps import Conn
from ml_model.rest.pool import DatabaseUnavailable
from ml_model.rest.schemas import (
    ModelInfo,
    PredictItem,
    PredictRequest,
    PredictResponse,
    ServedModelChoose,
    ServedModelState,
    SharedBase,
)
from ml_model.rest.serving import InputError, ServedModel
from ml_model.rest.state import AppState, State
from semg import db, repo
from semg.messages import MODELS_UPDATED, ModelUpdated

router = APIRouter(tags=["models"])
log = logging.getLogger("semg.api.models")

MAX_WINDOWS_PER_REQUEST = 20_000
MAX_VALUES_PER_ITEM = 20_000_000


class NoModelError(LookupError):
    pass


def model_info(m: ServedModel) -> ModelInfo:
    return ModelInfo(
        artifact_id=m.artifact_id, user_id=m.user_id, job_id=m.job_id, classes=m.classes, renamed=dict(m.renamed),
        accuracy=m.accuracy, size_bytes=m.size_bytes, sha256=m.sha256, trained_at=m.created_at, channels=m.meta["channels"],
        n_device_channels=m.n_device_channels, sample_rate_hz=m.meta["sample_rate_hz"],
        window_ms=m.meta["window_ms"], step_ms=m.meta["step_ms"], window=m.window, step=m.step, metrics=m.metrics,
        channel_reference=m.channel_reference, training=m.meta.get("training"),
        environment=m.meta.get("environment"), served=True, chosen=m.chosen_at is not None, chosen_at=m.chosen_at,
    )


def _decode(item: PredictItem) -> np.ndarray:
    if item.data_b64 is None:
        data = item.windows if item.windows is not None else item.samples
        try:
            return np.asarray(data, dtype=np.float32)
        except ValueError:
            raise InputError("ragged array: every window/sample must have the same number of values") from None
    shape = tuple(item.shape or ())
    count = math.prod(shape)
    if count > MAX_VALUES_PER_ITEM:
        raise InputError(f"too many values in one item ({count}; at most {MAX_VALUES_PER_ITEM})")
    try:
        raw = base64.b64decode(item.data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data_b64 is not valid base64") from None
    dtype = _INT16 if item.dtype == "int16" else _FLOAT32
    if len(raw) != count * dtype.itemsize:
        raise InputError(f"data_b64 holds {len(raw)} bytes; shape {list(shape)} of {item.dtype} needs "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


_INT16, _FLOAT32 = np.dtype("<i2"), np.dtype("<f4")


def _windows_for(model: ServedModel, item: PredictItem, x: np.ndarray, budget: int) -> np.ndarray:
    """The item's windows, validated; at most `budget` of them, counted BEFORE anything is cut or copied
    (one oversized item must not cost a gigabyte and stall the inference thread for everyone)."""
    is_samples = item.samples is not None or (item.data_b64 is not None and x.ndim == 2)
    if is_samples and x.ndim == 2:
        count = pp.n_windows(x.shape[0], model.window, model.step)
    else:
        count = x.shape[0] if x.ndim >= 1 else 0
    if count > budget:
        raise InputError(f"too many windows in one request (at most {MAX_WINDOWS_PER_REQUEST})")
    if is_samples:
        x = serving.windows_from_samples(model, x)
    return serving.check_windows(model, x)


def _overflow_detail(model: ServedModel, x: np.ndarray, probs: np.ndarray) -> str:
    bad = int(np.count_nonzero(~np.isfinite(probs).all(axis=1)))
    return (f"user {model.user_id}'s model gives no finite probabilities for {bad} of {len(probs)} windows: their "
            f"values (largest magnitude {float(np.abs(x).max()):.3g}) are far beyond a sensor's; send the raw device "
            f"values as recorded (int16 range, -32768..32767)")


INLINE_MAX_VALUES = 200_000  # ~250 windows of 8 x 100 samples


def _small(items: list[PredictItem]) -> bool:
    total = 0
    for it in items:
        if it.data_b64 is None or it.shape is None:
            return False
        total += math.prod(it.shape)
    return total <= INLINE_MAX_VALUES


def _predict_sync(state: AppState, items: list[PredictItem], batch: bool, with_probs: bool) -> bytes:
    """Runs on the inference thread; returns the JSON of a PredictResponse (built directly: this is the hot
    path, and it is the documented shape). Single requests raise (-> HTTP error); batches report per item."""
    results: list[dict] = []
    work: list[tuple[int, ServedModel, np.ndarray]] = []
    total = 0
    for item in items:
        try:
            model = state.models.get(item.user_id)
            if model is None:
                raise NoModelError(f"user {item.user_id} has no trained model")
            x = _windows_for(model, item, _decode(item), MAX_WINDOWS_PER_REQUEST - total)
            total += len(x)
        except (NoModelError, InputError) as e:
            if not batch:
                raise
            status = 404 if isinstance(e, NoModelError) else 422
            results.append({"user_id": item.user_id, "model_id": None, "classes": [], "window": None, "step": None,
                            "predictions": [], "error": {"status": status, "detail": str(e)}})
            continue
        work.append((len(results), model, x))
        results.append({"user_id": item.user_id, "model_id": model.artifact_id, "classes": model.classes,
                        "window": model.window, "step": model.step, "predictions": [], "error": None})
    probs = serving.predict_many([(m, x) for _, m, x in work], state.models.banks, state.models.live)
    for (slot, model, x), p in zip(work, probs, strict=True):
        if not np.isfinite(p).all():
            # Finite values far beyond any sensor's (~1e25) overflow float32 inside the model: the answer was a 200
            # with null confidences and the first class as the "gesture".
            e = InputError(_overflow_detail(model, x, p))
            if not batch:
                raise e
            results[slot].update(predictions=[], error={"status": 422, "detail": str(e)})
            continue
        classes = model.classes
        top = p.argmax(axis=1)
        conf = p[np.arange(len(p)), top].tolist()
        rows = p.tolist() if with_probs else [None] * len(p)
        results[slot]["predictions"] = [
            {"gesture": classes[k], "confidence": c, "probabilities": r}
            for k, c, r in zip(top.tolist(), conf, rows, strict=True)
        ]
    return orjson.dumps({"results": results})


_SHAPE_NOTE = ("shown with 2 channels of 3 samples: use your model's n_device_channels and window "
               "(GET /models/{user_id}), or the model answers 422 saying what it reads")
PREDICT_EXAMPLES = {
    "windows": {"summary": "one user's raw windows (n_windows x channels x samples)", "description": _SHAPE_NOTE,
                "value": {"user_id": 1, "windows": [[[12, -40, 7], [3, 5, -9]]], "include_probabilities": True}},
    "data_b64": {"summary": "the same as base64 little-endian int16 with its shape (compact)",
                 "description": _SHAPE_NOTE + "; the bytes are numpy's arr.astype('<i2').tobytes()",
                 "value": {"user_id": 1, "data_b64": "AQACAAMABAAFAAYA", "shape": [1, 2, 3], "dtype": "int16"}},
    "samples": {"summary": "a raw recording (n_samples x channels), cut with the model's window and step",
                "value": {"user_id": 1, "samples": [[12, 3], [-40, 5], [7, -9]]}},
    "items": {"summary": "several users in one request (errors reported per item)",
              "value": {"items": [{"user_id": 1, "windows": [[[12, -40, 7], [3, 5, -9]]]},
                                  {"user_id": 2, "data_b64": "AQACAAMABAAFAAYA", "shape": [1, 2, 3]}],
                        "include_probabilities": False}},
}


@router.post("/predict", response_model=PredictResponse)
async def predict(req: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)], caller: Caller,
                  state: State) -> Response:
    """Gesture and class probabilities for each window of one user's data, or of several users' (`items`).

    Windows must have the model's device channel count and window length (see `GET /models/{user_id}`);
    `samples` are cut with the model's own window and step. All windows of a model go through one forward
    pass (small batches of several users' models share one). Single requests answer 404 when the user has
    no model and 422 for data that does not fit it; batch requests answer 200 with an `error` per failed item.

    Body size: at most 256 KiB and 8192 JSON values with a user API key (or one that could not be verified),
    128 MiB with an admin or service key; a larger body is refused with 413 before it is parsed. Send data as
    `data_b64` (base64 of little-endian int16 with its `shape`: 256 KiB hold ~245 windows of 8 x 50 samples, or a
    minute of 8 channels at 200 Hz; as nested lists 8192 values are 20 such windows) rather than nested lists, or
    split it into several requests. A user key may have 2 requests with a body under way at once (429 beyond).
    """
    items = req.as_items()
    for it in items:
        caller.check_user(it.user_id)
    args = (state, items, req.items is not None, req.include_probabilities)
    try:
        if _small(items) and all(state.models.cached(it.user_id) is not None for it in items):
            # Live batches take a few ms: running them on the event loop saves two thread hand-offs, which
            # on a busy machine cost more than the forward pass itself.
            body = _predict_sync(*args)
        else:
            body = await state.run_inference(_predict_sync, *args)
    except NoModelError as e:
        raise HTTPException(404, str(e)) from None
    return Response(body, media_type="application/json")


@router.get("/bases", response_model=list[SharedBase])
def shared_bases(_: Caller, conn: Conn) -> list[dict]:
    """The shared base models, newest first (any key: they hold no user's data). Fine-tune one in a training job
    with `params.base_artifact_id`; use one pretrained at the sample rate of the sessions."""
    from ml_model import pretrain
    return [{**b, "artifact_id": b["id"]} for b in pretrain.list_bases(conn)]


@router.get("/models", response_model=list[ModelInfo])
async def served_models(caller: Caller, state: State) -> list[ModelInfo]:
    """The model served for every user that has one (a user key sees only its own); 503 until the models have
    been loaded (the API started while the database was unavailable), so no client takes "none" for the list."""
    if not state.models.loaded:
        raise DatabaseUnavailable("database unavailable: the served models are not loaded yet")
    return [model_info(m) for m in sorted(state.models.all(), key=lambda m: m.user_id) if caller.can_access(m.user_id)]


@router.get("/models/{user_id}", response_model=ModelInfo)
async def user_model(user_id: UserScoped, state: State) -> ModelInfo:
    """The user's served model: classes, held-out accuracy, size, when it was trained, window and step."""
    m = state.models.cached(user_id)
    if m is None:
        m = await run_in_threadpool(state.models.get, user_id)
    if m is None:
        raise HTTPException(404, f"user {user_id} has no trained model")
    return model_info(m)


@router.get("/users/{user_id}/models", response_model=list[ModelInfo])
def user_model_history(user_id: UserScoped, conn: Conn) -> list[ModelInfo]:
    """Every model trained for the user, newest first; `served` marks the one served to them (`chosen` when they
    chose it with PUT /users/{user_id}/served-model, else it is the model of their newest training)."""
    repo.get_user(conn, user_id)
    out = []
    for row in repo.list_models(conn, user_id):
        meta = serving.meta_from_row(row)
        acc = (row.get("metrics") or {}).get("accuracy")
        out.append(ModelInfo(
            artifact_id=row["id"], user_id=row["user_id"], job_id=row["job_id"], classes=meta["classes"],
            accuracy=acc if isinstance(acc, (int, float)) else None, size_bytes=row["size_bytes"],
            sha256=row["sha256"], trained_at=row["created_at"], channels=meta["channels"],
            n_device_channels=meta["n_device_channels"], sample_rate_hz=meta["sample_rate_hz"],
            window_ms=meta["window_ms"], step_ms=meta["step_ms"], window=meta["window"], step=meta["step"],
            metrics=row.get("metrics") or {}, channel_reference=pp.channel_reference(meta),
            training=meta.get("training"), environment=meta.get("environment"), served=row["served"],
            chosen=row["chosen_at"] is not None, chosen_at=row["chosen_at"],
        ))
    return out


def _served_state(user_id: int, m: dict | None) -> ServedModelState:
    if m is None:
        return ServedModelState(user_id=user_id, artifact_id=None, chosen=False)
    return ServedModelState(user_id=user_id, artifact_id=m["id"], job_id=m["job_id"],
                            chosen=m["chosen_at"] is not None, chosen_at=m["chosen_at"])


async def _follow_served_change(state: AppState, user_id: int, served: dict | None) -> None:
    """After a user's choice is stored: serve it here at once, and tell the other API instances and the inference
    workers (models.updated). Either failing is logged: the choice is stored and the 30 s poll follows it."""
    try:
        await run_in_threadpool(state.models.refresh_user, user_id)
    except (DatabaseUnavailable, psycopg2.Error) as e:
        log.warning("could not switch user %s's served model here now (%s); the next poll will", user_id,
                    db.first_line(e))
    if served is None:  # no model before or after: nothing to follow
        return
    msg = ModelUpdated(userid=user_id, job_id=served["job_id"], artifact_id=served["id"])
    try:
        if state.nats is None:
            raise ConnectionError("not connected to NATS")
        await state.nats.publish(MODELS_UPDATED, msg.model_dump_json().encode())
        await state.nats.flush(timeout=2)
    except Exception as e:  # noqa: BLE001 - best effort by design, as the trainer's
        log.warning("could not publish models.updated for user %s (%s); the others follow by polling", user_id,
                    db.first_line(e))


@router.put("/users/{user_id}/served-model", response_model=ServedModelState)
async def choose_served_model(user_id: UserScoped, body: ServedModelChoose, state: State) -> ServedModelState:
    """Serve the user one of their models from now on, e.g. an earlier one when a new training turned out worse
    ("roll back", no retraining): live recognition switches to it at once. It stays served until a training job
    queued after this choice stores a model (or until `DELETE`). 404 for a model that is not the user's, 422 for one
    that does not load (nothing changes)."""
    def choose() -> dict:
        with state.pool.connection() as conn:
            return serving.choose_if_servable(conn, user_id, body.artifact_id)

    served = await run_in_threadpool(choose)
    await _follow_served_change(state, user_id, served)
    return _served_state(user_id, served)


@router.delete("/users/{user_id}/served-model", response_model=ServedModelState)
async def serve_newest_model(user_id: UserScoped, state: State) -> ServedModelState:
    """Forget the user's choice: serve the model of their newest training again (the training job queued last that
    stored one), at once. `artifact_id` is null when the user has no model."""
    def newest() -> dict | None:
        with state.pool.connection() as conn:
            return repo.serve_newest_model(conn, user_id)

    served = await run_in_threadpool(newest)
    await _follow_served_change(state, user_id, served)
    return _served_state(user_id, served)



# A model export (ml_model.export) takes seconds of CPU: it runs in its own process at low priority, one at a time.
MODEL_EXPORT_TIMEOUT_S = 300
MODEL_EXPORT_RETRY_AFTER_S = 10
_model_export = threading.Lock()


@router.get(
    "/users/{user_id}/models/{artifact_id}/export", response_class=Response,
    responses={200: {"description": "the model file: raw windows (batch, n_device_channels, window) as float32 in, "
                                    "class probabilities out; its description is embedded (ONNX metadata_props "
                                    "'semg', TorchScript extra file semg.json)",
                     "content": {"application/octet-stream": {}}},
               429: {"description": "another model is being exported (Retry-After)",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
)
def export_model(
    user_id: UserScoped, artifact_id: Annotated[int, PathParam(ge=1, le=2**63 - 1)], state: State,
    format: Annotated[Literal["onnx", "onnx-int8", "torchscript"],  # noqa: A002 - the query parameter's name
                      Query(description="onnx (float32), onnx-int8 (CNN weights int8) or torchscript")] = "onnx",
) -> Response:
    """Download one of the user's models (`GET /users/{user_id}/models` lists them) to run off the platform: the
    whole serving path (channel selection, filter, scaler, CNN, softmax) in one file, as the web UI's Training Jobs
    page offers. Takes seconds; one export at a time on the server (429 with Retry-After otherwise)."""
    with state.pool.connection() as conn, conn.cursor() as cur:  # not held while the file is made
        cur.execute("SELECT id, job_id, weights, metadata FROM model_artifacts WHERE id = %s AND user_id = %s",
                    (artifact_id, user_id))
        row = cur.fetchone()
        conn.rollback()
    if row is None:
        raise HTTPException(404, f"user {user_id} has no model {artifact_id} (GET /users/{user_id}/models lists them)")
    meta = stored_meta(row[0], row[1], row[3])
    if not _model_export.acquire(blocking=False):
        raise HTTPException(429, f"another model is being exported: retry in {MODEL_EXPORT_RETRY_AFTER_S} s",
                            headers={"Retry-After": str(MODEL_EXPORT_RETRY_AFTER_S)})
    try:
        with tempfile.TemporaryDirectory(prefix="semg-export-") as tmp:
            src = artifacts.write_artifact_dir(Path(tmp) / "artifact", bytes(row[2]), meta)
            out = Path(tmp) / "model"
            done = subprocess.run([sys.executable, "-m", "ml_model.export", str(src), format, str(out)],
                                  capture_output=True, text=True, timeout=MODEL_EXPORT_TIMEOUT_S, check=False)
            if done.returncode != 0 or not out.exists():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                log.error("export of model %s as %s failed: %s", artifact_id, format, done.stderr[-2000:])
                raise HTTPException(500, f"the export of model {artifact_id} as {format} failed ({last}); the "
                                         "API's log has the details")
            data = out.read_bytes()
    finally:
        _model_export.release()
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{export_filename(meta, format)}"'})
