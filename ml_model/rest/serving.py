"""Per-user model cache with hot reload, and batched inference over several users' models.

The registry holds the model served to each user (semg.repo.SERVED_MODELS_SQL: the one they chose, or that of
their newest training). A reload builds the
new model completely before one dict assignment swaps it in, so requests in flight keep the model they
started with and none is dropped. Reloads come from `models.updated` on NATS, a slow poll as fallback, and
a cache miss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg2.extras
import torch

from ml_model import artifacts
from ml_model import preprocessing as pp
from ml_model.rest import stacking
from ml_model.rest.pool import ConnectionPool
from semg import repo

log = logging.getLogger("semg.api.models")

# A user with more windows than this in one request runs alone (its own batch is efficient already).
SOLO_MIN_WINDOWS = 16
# About this many windows per stacked pass (bigger grouped convolutions got slower per window); rounds are
# split between items, never inside one model's windows.
MAX_STACK = 64
NEGATIVE_TTL_S = 2.0
TOMBSTONE_S = 300.0  # far longer than any model load that may have started before a user's deletion

# Without meta["data"] (every interval a job trained on, ~65 bytes each): serving never reads it, and it was held
# in memory for every user's model.
_ARTIFACT_COLS = ("id, user_id, job_id, weights, sha256, size_bytes, classes, channels, sample_rate_hz, window_ms, "
                  "step_ms, scaler, metrics, metadata - 'data' AS metadata, created_at")


class InputError(ValueError):
    """The windows/samples do not fit the user's model; the message says how (-> 422)."""


@dataclass(frozen=True)
class ServedModel:
    artifact_id: int
    user_id: int
    job_id: int | None
    created_at: datetime
    size_bytes: int
    sha256: str
    metrics: dict[str, Any]
    meta: dict[str, Any]
    predictor: artifacts.Predictor
    parts: stacking.NetParts | None = None  # set when this model can be stacked with others
    # Models with equal `group` share preprocessing (channels, filter, rate) and architecture, so their
    # windows are prepared and evaluated together (a small int: it is hashed for every request item).
    group: int | None = None
    scaler_mean: np.ndarray | None = None  # (C, 1) float32
    scaler_std: np.ndarray | None = None
    # {class as trained: its gesture's name now} (repo.renamed_classes): answers use the gesture's name now, so a
    # rename shows in live recognition without retraining. names_key: the user's gesture names it was derived from.
    renamed: Mapping[str, str] = field(default_factory=dict)
    names_key: str | None = None
    chosen_at: datetime | None = None  # when the user chose it; None: served as their newest model
    classes: list[str] = field(init=False)
    n_device_channels: int = field(init=False)
    window: int = field(init=False)
    step: int = field(init=False)

    def __post_init__(self) -> None:
        # plain attributes for the hot path (the dataclass is frozen: set once here)
        object.__setattr__(self, "classes", [self.renamed.get(c, c) for c in self.meta["classes"]])
        object.__setattr__(self, "n_device_channels", int(self.meta["n_device_channels"]))
        object.__setattr__(self, "window", int(self.meta["window"]))
        object.__setattr__(self, "step", int(self.meta["step"]))

    @property
    def channel_reference(self) -> dict[str, list] | None:
        """What the live electrode check compares the channels with (pp.channel_reference)."""
        return pp.channel_reference(self.meta)

    @property
    def accuracy(self) -> float | None:
        acc = self.metrics.get("accuracy")
        return float(acc) if isinstance(acc, (int, float)) else None


def meta_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact's metadata, completed from its columns (the columns win: they are what was indexed)."""
    meta = dict(row["metadata"] or {})
    # NFC as the gesture bank (semg.repo, migration 0005): a model trained on a name typed with decomposed accents
    # before then would otherwise answer with a name that is no longer in the bank
    meta["classes"] = [unicodedata.normalize("NFC", c) for c in row["classes"]]
    meta["channels"] = [int(c) for c in row["channels"]]
    meta["sample_rate_hz"] = float(row["sample_rate_hz"])
    meta["window_ms"] = float(row["window_ms"])
    meta["step_ms"] = float(row["step_ms"])
    meta["scaler"] = row["scaler"]
    if "window" not in meta or "step" not in meta:
        meta["window"], meta["step"] = pp.window_params(meta["window_ms"], meta["step_ms"], meta["sample_rate_hz"])
    meta.setdefault("n_device_channels", max(meta["channels"]) + 1)
    return meta


_GROUP_IDS: dict[tuple, int] = {}


def _stacked_matches(served: ServedModel) -> bool:
    """Does the stacked path give the predictor's own probabilities (preprocessing included)?"""
    rng = np.random.default_rng(0)
    raw = rng.integers(-100, 100, size=(3, served.n_device_channels, served.window)).astype(np.float32)
    ref = np.asarray(served.predictor.predict_proba(raw), dtype=np.float32)
    got = predict_many([(served, raw)])[0]
    return got.shape == ref.shape and bool(np.allclose(got, ref, atol=1e-4))


def build_served(row: Mapping[str, Any]) -> ServedModel:
    meta = meta_from_row(row)
    predictor = artifacts.Predictor(bytes(row["weights"]), meta)
    parts = stacking.extract_parts(predictor.model)
    group = None
    if parts is not None:
        key = (parts.signature, int(meta["window"]), int(meta["n_device_channels"]), tuple(meta["channels"]),
               json.dumps(meta.get("filter"), sort_keys=True), float(meta["sample_rate_hz"]))
        group = _GROUP_IDS.setdefault(key, len(_GROUP_IDS))
    served = ServedModel(
        artifact_id=int(row["id"]), user_id=int(row["user_id"]), job_id=row["job_id"], created_at=row["created_at"],
        size_bytes=int(row["size_bytes"]), sha256=row["sha256"], metrics=dict(row["metrics"] or {}), meta=meta,
        predictor=predictor, parts=parts, group=group,
        scaler_mean=np.asarray(meta["scaler"]["mean"], dtype=np.float32)[:, None],
        scaler_std=np.asarray(meta["scaler"]["std"], dtype=np.float32)[:, None],
    )
    if group is not None and not _stacked_matches(served):
        group = None
    if group is None:
        log.info("model %s of user %s runs unstacked (architecture not stackable)", row["id"], row["user_id"])
        served = dataclasses.replace(served, parts=None, group=None)
    return served


def load_row(conn, artifact_id: int) -> dict[str, Any] | None:
    """A stored model with its weights, as build_served takes it; None if there is no such model."""
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(f"SELECT {_ARTIFACT_COLS} FROM model_artifacts WHERE id = %s", (artifact_id,))  # noqa: S608 - constant column list
        row = cur.fetchone()
    return dict(row) if row else None


def choose_if_servable(conn, user_id: int, artifact_id: int) -> dict:
    """repo.choose_served_model, after checking that the model loads as the API would serve it: a model that does
    not (damaged weights, a format this version cannot read) would be stored as chosen while the API went on
    serving the previous one, and every page would say the chosen one is used. repo.Invalid (-> 422) then,
    nothing changed; a model that is not the user's is left to repo.choose_served_model (NotFound)."""
    row = load_row(conn, artifact_id)
    if row is not None and row["user_id"] == user_id:
        try:
            build_served(row)
        except Exception as e:  # noqa: BLE001 - whatever stops it loading stops it being served
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("model %s of user %s cannot be served: %s", artifact_id, user_id, why)
            raise repo.Invalid(f"model {artifact_id} cannot be served: it does not load ({why}). Live recognition "
                               "goes on with the model it uses now; train a new model instead.") from None
    return repo.choose_served_model(conn, user_id, artifact_id)


def _with_names_now(served: ServedModel, conn, names_key: str | None) -> ServedModel:
    """The model answering with its gestures' names of now (see ServedModel.renamed); names_key: the user's
    (repo.gesture_names_keys) as read before the names."""
    renamed = repo.renamed_classes(conn, served.artifact_id, served.meta["classes"])
    return dataclasses.replace(served, renamed=renamed, names_key=names_key)


@dataclass
class ModelRegistry:
    pool: ConnectionPool
    _models: dict[int, ServedModel] = field(default_factory=dict)
    _absent: dict[int, float] = field(default_factory=dict)  # user -> monotonic time of the last "no model"
    _deleted: dict[int, float] = field(default_factory=dict)  # user -> when deleted (tombstones, TOMBSTONE_S)
    _broken: dict[int, int] = field(default_factory=dict)  # user -> newest artifact id that failed to load
    _load_lock: threading.Lock = field(default_factory=threading.Lock)
    banks: Banks = field(default_factory=lambda: Banks())
    loaded: bool = False  # every user's model has been looked up once (until then the cache is not the catalogue)

    @property
    def live(self) -> Mapping[int, ServedModel]:
        """user id -> served model (read-only view for the inference thread)."""
        return self._models

    # ---- reads (hot path: no database) -----------------------------------------------------------
    def cached(self, user_id: int) -> ServedModel | None:
        return self._models.get(user_id)

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def warm_up(self) -> None:
        """One tiny prediction per model group: builds the stacked banks and warms torch before traffic."""
        models = self.all()
        if models:
            predict_many([(m, np.zeros((1, m.n_device_channels, m.window), np.float32)) for m in models],
                         self.banks, self._models)

    def forget(self, user_id: int) -> None:
        """Stop serving a deleted user's model at once (the poll would notice later).

        A reload of that user already under way (e.g. after the user's last training job) read the model
        before the deletion; the tombstone keeps it from installing it afterwards.
        """
        now = time.monotonic()
        self._deleted = {u: t for u, t in self._deleted.items() if now - t < TOMBSTONE_S}
        self._deleted[user_id] = now
        self._models.pop(user_id, None)
        self._absent[user_id] = now

    def get(self, user_id: int) -> ServedModel | None:
        """The served model of a user, loading it on a cache miss (blocking: call from a thread)."""
        m = self._models.get(user_id)
        if m is not None:
            return m
        seen = self._absent.get(user_id)
        if seen is not None and time.monotonic() - seen < NEGATIVE_TTL_S:
            return None
        return self.refresh_user(user_id)

    # ---- reloads ---------------------------------------------------------------------------------
    def _served_id(self, conn, user_id: int) -> dict | None:
        """{"artifact_id", "chosen_at"} of the model to serve the user (repo.served_models), None for none."""
        return repo.served_models(conn, [user_id]).get(user_id)

    def _install(self, user_id: int, served: dict | None, conn) -> ServedModel | None:
        """Serve the user the model `served` names (repo.served_models' entry; None: no model)."""
        current = self._models.get(user_id)
        if served is None:
            self._models.pop(user_id, None)
            self._absent[user_id] = time.monotonic()
            if current is not None:
                log.info("user %s has no model any more", user_id)
            return None
        artifact_id, chosen_at = served["artifact_id"], served["chosen_at"]
        if current is not None and current.artifact_id == artifact_id:
            if current.chosen_at != chosen_at:  # the same weights, chosen now or no longer: no rebuild
                current = dataclasses.replace(current, chosen_at=chosen_at)
                if user_id not in self._deleted:
                    self._models[user_id] = current
            return current
        if self._broken.get(user_id) == artifact_id:  # known bad: never rebuilt per request
            if current is None:
                self._absent[user_id] = time.monotonic()
            return current
        row = load_row(conn, artifact_id)
        if row is None:  # deleted between the two queries: the next refresh sees the new state
            return current
        try:
            model = build_served(row)
        except Exception as e:  # noqa: BLE001 - a broken artifact must not take the service (or old model) down
            log.error("cannot load model %s of user %s: %s", artifact_id, user_id, e)
            self._broken[user_id] = artifact_id
            if current is None:
                self._absent[user_id] = time.monotonic()
            return current
        model = _with_names_now(model, conn, repo.gesture_names_keys(conn, [user_id]).get(user_id))
        model = dataclasses.replace(model, chosen_at=chosen_at)
        if user_id in self._deleted:  # deleted while we loaded it
            return None
        self._models[user_id] = model  # atomic swap: in-flight requests keep their reference
        self._absent.pop(user_id, None)
        log.info("user %s now served by model %s%s (%s classes, window %d, step %d, %s)", user_id, artifact_id,
                 " (chosen)" if chosen_at else "", len(model.classes), model.window, model.step,
                 "stacked" if model.parts else "solo")
        return model

    def refresh_user(self, user_id: int) -> ServedModel | None:
        with self._load_lock, self.pool.connection() as conn:
            before = self._models.get(user_id)
            served = self._install(user_id, self._served_id(conn, user_id), conn)
            if served is not None and served is before:  # a model installed now has its names already
                self._follow_renames([user_id], conn)
            return self._models.get(user_id)

    def follow_renames(self, user_id: int, conn) -> None:
        """After a change to the user's gesture names through this process: answer with them at once."""
        if user_id in self._models:
            try:
                with self._load_lock:
                    self._follow_renames([user_id], conn)
            except psycopg2.Error as e:  # the change is stored: the next poll follows it
                log.warning("could not follow user %s's gesture names now (%s); the next poll will", user_id,
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    def _follow_renames(self, user_ids: Sequence[int], conn) -> None:
        """Answer with the gesture names of now for the users whose gesture names changed since their model was
        installed (same weights: swapped in as a reload is)."""
        keys = repo.gesture_names_keys(conn, user_ids)
        for user_id in user_ids:
            m = self._models.get(user_id)
            if m is None or keys.get(user_id) == m.names_key:
                continue
            renamed = _with_names_now(m, conn, keys.get(user_id))
            if user_id not in self._deleted and self._models.get(user_id) is m:
                self._models[user_id] = renamed
                if renamed.classes != m.classes:
                    log.info("user %s: gestures renamed; model %s now answers %s", user_id, m.artifact_id,
                             ", ".join(renamed.classes))

    def refresh_all(self) -> int:
        """Bring every user's model up to date; returns how many changed."""
        with self._load_lock, self.pool.connection() as conn:
            latest = repo.served_models(conn)
            changed = 0
            for user_id in set(self._models) - set(latest):
                self._install(user_id, None, conn)
                changed += 1
            for user_id, served in latest.items():
                cur_model = self._models.get(user_id)
                if cur_model is None or (cur_model.artifact_id, cur_model.chosen_at) != (served["artifact_id"],
                                                                                       served["chosen_at"]):
                    self._install(user_id, served, conn)
                    changed += 1
            self._follow_renames(list(self._models), conn)
            self.loaded = True
            return changed


# ---- inference ---------------------------------------------------------------------------------------
def check_windows(model: ServedModel, x: np.ndarray) -> np.ndarray:
    """Validate raw windows (n, channels, win) against the model; float32 C-contiguous copy."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError("no windows given")
    if x.ndim != 3:
        raise InputError(f"windows must be 3-D (n_windows, channels, samples), got shape {list(x.shape)}")
    n, c, t = x.shape
    if c != model.n_device_channels:
        raise InputError(f"user {model.user_id}'s model reads {model.n_device_channels}-channel devices; "
                         f"got {c} channels")
    if t != model.window:
        raise InputError(f"user {model.user_id}'s model needs windows of {model.window} samples "
                         f"({model.meta['window_ms']:g} ms at {model.meta['sample_rate_hz']:g} Hz); got {t}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError("windows contain NaN or infinite values")
    return x


def windows_from_samples(model: ServedModel, samples: np.ndarray) -> np.ndarray:
    """Cut a recording (n_samples, channels) into the model's windows (window/step of its metadata)."""
    if samples.ndim != 2:
        raise InputError(f"samples must be 2-D (n_samples, channels), got shape {list(samples.shape)}")
    if samples.shape[1] != model.n_device_channels:
        raise InputError(f"user {model.user_id}'s model reads {model.n_device_channels}-channel devices; "
                         f"got {samples.shape[1]} channels")
    if samples.shape[0] < model.window:
        raise InputError(f"need at least {model.window} samples for one window; got {samples.shape[0]}")
    return pp.make_windows(samples, model.window, model.step)


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).numpy()


@dataclass
class _BankEntry:
    bank: stacking.Bank
    index: dict[int, int]  # artifact id -> position in the bank
    mean: np.ndarray  # (K, C, 1)
    std: np.ndarray


class Banks:
    """Stacked parameters per model group, rebuilt when a needed model is not in it (a model was added or
    reloaded). Used from the inference thread only."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[_BankEntry, list[ServedModel]]] = {}

    def get(self, group: int, needed: Sequence[ServedModel], live: Mapping[int, ServedModel]) -> _BankEntry:
        hit = self._entries.get(group)
        if hit is not None and all(m.artifact_id in hit[0].index for m in needed):
            return hit[0]
        # keep the members that are still served, add the new ones
        members = {m.artifact_id: m for m in (hit[1] if hit else []) if live.get(m.user_id) is m}
        members.update((m.artifact_id, m) for m in needed)
        models = list(members.values())
        entry = _BankEntry(
            bank=stacking.Bank([m.parts for m in models]),
            index={m.artifact_id: i for i, m in enumerate(models)},
            mean=np.stack([m.scaler_mean for m in models]), std=np.stack([m.scaler_std for m in models]),
        )
        self._entries[group] = (entry, models)
        return entry


def predict_many(items: Sequence[tuple[ServedModel, np.ndarray]], banks: Banks | None = None,
                 live: Mapping[int, ServedModel] | None = None) -> list[np.ndarray]:
    """Probabilities (n_i, n_classes_i) for each (model, validated raw windows) item.

    Items with few windows and a stackable model are prepared and evaluated together with the other items
    of their group (one forward pass for all of them); the others use their own predictor (one forward
    pass over all their windows).
    """
    banks = banks if banks is not None else Banks()
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (model, x) in enumerate(items):
        if model.group is not None and len(x) < SOLO_MIN_WINDOWS:
            groups.setdefault(model.group, []).append(i)
        else:
            out[i] = np.asarray(model.predictor.predict_proba(x), dtype=np.float32)
    with torch.inference_mode():
        for group, idx in groups.items():
            models = [items[i][0] for i in idx]
            entry = banks.get(group, models, live if live is not None else {})
            counts = [len(items[i][1]) for i in idx]
            which = np.repeat([entry.index[m.artifact_id] for m in models], counts)
            raw = np.concatenate([items[i][1] for i in idx]) if len(idx) > 1 else items[idx[0]][1]
            # the artifact's own preprocessing (channels, filter), then each window's own scaler
            x = pp.prepare_unscaled(raw, models[0].meta)
            x = ((x - entry.mean[which]) / entry.std[which]).astype(np.float32, copy=False)
            xt, wt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(which)
            # passes of about MAX_STACK windows, cut between items: a model's windows share one pass
            cuts, size = [0], 0
            for n in counts:
                if size and size + n > MAX_STACK:
                    cuts.append(cuts[-1] + size)
                    size = 0
                size += n
            cuts.append(len(which))
            probs = np.concatenate([_softmax(entry.bank.logits(xt[a:b], wt[a:b])) for a, b in zip(cuts, cuts[1:], strict=False)])
            a = 0
            for i, n in zip(idx, counts, strict=True):
                out[i] = probs[a:a + n]
                a += n
    return out  # type: ignore[return-value]
