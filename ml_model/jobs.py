"""Training jobs in PostgreSQL: load a job's capture sessions, train with the shared core, store the artifact,
report progress; and the queue worker that several processes (on several machines) can run side by side.

Queue: rows of `training_jobs` with status 'scheduled', claimed with FOR UPDATE SKIP LOCKED. A running job's
worker beats `heartbeat_at`; a job whose heartbeat is stale (its worker died) is put back in the queue, or
failed after MAX_ATTEMPTS. Cancellation is cooperative: `cancel_requested` is checked after every epoch.

Ownership: a job belongs to the worker named in its `worker` column while it is in-progress. Every write of a
running job (progress, heartbeat, its end) matches `status = 'in-progress' AND worker = <this worker>`, so a
worker that stalled past the stale timeout (its job re-queued, failed or taken by another worker) changes
nothing: it stops and its model is discarded. Completion stores the artifact and sets `completed` in one
transaction, and only if the job was not canceled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import logging
import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import psycopg2
import psycopg2.extensions
from psycopg2.extras import Json, RealDictCursor

from ml_model import artifacts, preprocessing, training
from semg import db, journal, repo
from semg.config import Settings, get_settings

log = logging.getLogger("semg.trainer")

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
MAX_ATTEMPTS = 3
# Job params a user may set (UI / REST) and the training config key each maps to.
_PARAM_KEYS = {"epochs": "max_epochs", "window_ms": "window_ms", "step_ms": "step_ms"}


# Set by the worker's signal handler: the running job stops at its next epoch and goes back to the queue.
_STOP_REQUESTED = threading.Event()


def request_stop() -> None:
    _STOP_REQUESTED.set()


class JobFailed(RuntimeError):
    """The job cannot be done; the message is shown to the user as the job's error."""


class JobUnavailable(ValueError):
    """The job cannot be taken (not found, or not scheduled: e.g. another worker runs it); it is left as is."""


class _JobLost(Exception):
    """This worker no longer holds the job (stale recovery re-queued or failed it, or another worker took it)."""


# ---- loading a job's data ------------------------------------------------------------------------
def _job_row(cur, job_id: int) -> dict:
    cur.execute("SELECT id, user_id, status, params, cancel_requested FROM training_jobs WHERE id = %s", (job_id,))
    row = cur.fetchone()
    if row is None:
        raise JobFailed(f"job {job_id} not found")
    return dict(zip(("id", "user_id", "status", "params", "cancel_requested"), row, strict=True))


def _session_samples(cur, device_id: int, t_from, t_to, max_gap: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All samples of a device between two server times.

    Returns (values (n, channels) int16, time_ms (n,) server-clock ms since epoch, run_id (n,), seq (n,))
    where run_id changes wherever the sequence numbers jump by more than ``max_gap`` lost samples, or go back,
    or the boot changes (a reboot): windows never span such a jump; smaller gaps are bridged as the live
    worker bridges them (``preprocessing.MAX_BRIDGE_FRACTION``).
    """
    cur.execute(  # a block begun before t_from may hold samples after it (a slow device's long packet)
        f"""SELECT boot, seq0, n, channels, sample_rate_hz, extract(epoch FROM device_time0)::float8 * 1000.0, values
            FROM sample_blocks WHERE {repo.BLOCKS_OVERLAPPING}
            ORDER BY boot, seq0""",
        {"d": device_id, "t0": t_from, "t1": t_to},
    )
    from_ms = t_from.timestamp() * 1000.0
    rows = [r for r in cur.fetchall() if r[5] + r[2] * 1000.0 / r[4] > from_ms]  # blocks ending before: none of theirs
    if not rows:
        return np.zeros((0, 1), np.int16), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    channels = {r[3] for r in rows}
    if len(channels) != 1:
        raise JobFailed(f"device {device_id} changed its channel count during the session ({sorted(channels)})")
    c = channels.pop()
    values = np.concatenate([np.asarray(r[6], dtype=np.int16).reshape(r[2], c) for r in rows])
    times = np.concatenate([r[5] + np.arange(r[2]) * (1000.0 / r[4]) for r in rows])
    starts_new_run = np.ones(len(rows), dtype=bool)
    for i in range(1, len(rows)):
        prev, cur_ = rows[i - 1], rows[i]
        starts_new_run[i] = not (prev[0] == cur_[0] and 0 <= cur_[1] - (prev[1] + prev[2]) <= max_gap)
    run_of_block = np.cumsum(starts_new_run)
    run_id = np.repeat(run_of_block, [r[2] for r in rows])
    seq = np.concatenate([r[1] + np.arange(r[2], dtype=np.int64) for r in rows])
    return values, times, run_id, seq


# Label of a deleted gesture's intervals: they keep their place in the session (the intervals around them end
# where they did) but none of their windows trains. Gesture names cannot hold a NUL, so none equals it.
_DELETED = "\x00deleted gesture"


def load_job_data(conn, job_id: int, config: dict, max_window_bytes: int | None = None) -> dict[str, Any]:
    """Labelled raw windows of every session of the job.

    Returns {windows (n, channels, win), labels (n,), groups (n,), sample_rate_hz, channels_used, sessions,
    deleted_gestures, stride (samples between windows), thinned (k: every k-th window of config's step),
    used (per labelled session: its id, device and the intervals that labelled it, as ``training_data`` keeps them),
    group_sessions (None: the groups are the intervals' repetitions; else {group: session id}, when every session
    holds a single repetition and the sessions are the groups)}.
    max_window_bytes: when the windows at config's step would exceed this as float32, every k-th is cut instead.
    Raises JobFailed with a user-facing message for unusable data.
    """
    with conn, conn.cursor() as cur:
        # One snapshot for every read: a gesture renamed (or deleted) between two sessions' label reads trained
        # one gesture as two classes (or as one from some of its sessions only)
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        job = _job_row(cur, job_id)
        cur.execute(
            """SELECT s.id, s.device_id, d.channel_count, d.sample_rate_hz
               FROM training_job_sessions js JOIN capture_sessions s ON s.id = js.session_id
               LEFT JOIN devices d ON d.id = s.device_id
               WHERE js.job_id = %s ORDER BY s.id""",
            (job_id,),
        )
        sessions = cur.fetchall()
        if not sessions:
            raise JobFailed("the job has no capture sessions")
        return _load_sessions(cur, job["user_id"], sessions, config, max_window_bytes)


def load_sessions_data(conn, user_id: int, session_ids: Sequence[int], config: dict,
                       max_window_bytes: int | None = None) -> dict[str, Any]:
    """``load_job_data`` for chosen sessions of a user instead of a job's (to test a model on them): the same
    windows and labels, read in one snapshot (every k-th above max_window_bytes, as load_job_data). Raises
    JobFailed naming a session that is not the user's."""
    ids = sorted({int(i) for i in session_ids})
    if not ids:
        raise JobFailed("choose at least one session")
    with conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur.execute(
            """SELECT s.id, s.device_id, d.channel_count, d.sample_rate_hz
               FROM capture_sessions s LEFT JOIN devices d ON d.id = s.device_id
               WHERE s.id = ANY(%s) AND s.user_id = %s ORDER BY s.id""",
            (ids, int(user_id)),
        )
        sessions = cur.fetchall()
        if missing := sorted(set(ids) - {s[0] for s in sessions}):
            raise JobFailed(f"session {missing[0]} not found for user {user_id}")
        return _load_sessions(cur, int(user_id), sessions, config, max_window_bytes, training_all=False)


def _load_sessions(cur, user_id: int, sessions: list[tuple], config: dict, max_window_bytes: int | None,
                   training_all: bool = True) -> dict[str, Any]:
    """The body of ``load_job_data``: sessions are (id, device_id, channel_count, sample_rate_hz) rows.
    training_all: every gesture recorded must give windows (a model must learn each); a test of a model just
    counts the windows there are."""
    if any(s[1] is None for s in sessions):
        raise JobFailed(f"session {next(s[0] for s in sessions if s[1] is None)} has no device (it was deleted)")
    counts = {s[2] for s in sessions}
    if len(counts) != 1:
        raise JobFailed(f"inconsistent channel counts across the chosen sessions: {sorted(counts)}")
    rates = {float(s[3]) for s in sessions}
    if len(rates) != 1:
        raise JobFailed(f"the chosen sessions were recorded at different sample rates: {sorted(rates)} Hz")
    rate = rates.pop()
    n_channels = counts.pop()

    # Channel selection from the gesture bank: the union of the channels the user's gestures use.
    cur.execute("SELECT channels_used FROM gestures WHERE user_id = %s", (user_id,))
    used = sorted({int(c) for (chs,) in cur.fetchall() for c in (chs or [])})
    if any(c >= n_channels for c in used):
        raise JobFailed(f"the gesture bank uses channel {max(used)} but the device has {n_channels} channels")
    channels_used = used or None

    win, step = preprocessing.window_params(config["window_ms"], config["step_ms"], rate)
    all_w, all_l, all_g = [], [], []
    recorded: dict[str, dict] = {}  # class -> its longest recorded hold (ms) and sessions
    deleted: dict[str, set] = {}  # name of a gesture deleted from the bank -> sessions holding its recordings
    unmarked = []  # sessions none of whose intervals has its actual times: nothing in them is labelled
    labelled = []  # (session, device, intervals, first start, last end)
    used = []  # what each session contributed, for the artifact's metadata (meta["data"])
    for session_id, device_id, _, _ in sessions:
        cur.execute(
            """SELECT label, kind, repetition, started_at, ended_at, planned_end_ms - planned_start_ms,
                      kind = 'gesture' AND gesture_id IS NULL, id
               FROM session_intervals
               WHERE session_id = %s AND started_at IS NOT NULL AND NOT discarded ORDER BY started_at, ordinal""",
            (session_id,),
        )
        ivs = cur.fetchall()
        if not ivs:
            unmarked.append(session_id)
            continue
        intervals, last_end = _session_intervals(session_id, ivs)
        for iv in intervals:
            if iv["label"] == _DELETED:
                deleted.setdefault(iv["name"], set()).add(session_id)
                continue
            name = preprocessing.REST_LABEL if iv["kind"] == "rest" else str(iv["label"])
            seen = recorded.setdefault(name, {"hold_ms": 0.0, "sessions": set()})
            seen["hold_ms"] = max(seen["hold_ms"], iv["end_ms"] - iv["start_ms"])
            seen["sessions"].add(session_id)
        labelled.append((session_id, device_id, intervals, ivs[0][3], last_end))
        used.append({"id": session_id, "device_id": device_id, "intervals": [
            [iv["id"], preprocessing.REST_LABEL if iv["kind"] == "rest" else iv["name"], iv["cycle"],
             round(iv["start_ms"], 3), round(iv["end_ms"], 3)] for iv in intervals if iv["label"] != _DELETED]})
    thinned = 1
    if max_window_bytes and labelled:  # counted before any window is cut: the int16 windows are large too
        total = 0
        for _, device_id, _, t_from, t_to in labelled:
            cur.execute(f"SELECT coalesce(sum(n), 0) FROM sample_blocks WHERE {repo.BLOCKS_OVERLAPPING}",
                        {"d": device_id, "t0": t_from, "t1": t_to})
            total += int(cur.fetchone()[0])
        need = total / step * n_channels * win * 4  # float32, as training holds them
        thinned = max(1, math.ceil(need / max_window_bytes))
    stride = step * thinned
    all_s = []  # the labelled session (its index) of each window
    for k, (_session_id, device_id, intervals, t_from, last_end) in enumerate(labelled):
        values, times, run_id, seq = _session_samples(cur, device_id, t_from, last_end,
                                                      preprocessing.max_bridged(win))
        for run in np.unique(run_id):
            sel = run_id == run
            if sel.sum() < win:
                continue
            w, lab, grp = training.windows_from_capture(values[sel], times[sel], intervals, win, stride,
                                                        seq=seq[sel])
            kept = lab != _DELETED
            w, lab, grp = w[kept], lab[kept], grp[kept]
            if len(w):
                all_w.append(w)
                all_l.append(lab)
                all_g.append(grp)
                all_s.append(np.full(len(w), k))
    if not all_w:
        # A session captured through the API whose intervals were never marked looked like a silent device.
        if unmarked:
            raise JobFailed(f"no data in the chosen sessions: {_sessions(unmarked)} no interval with its actual "
                            "start and end, so no sample is labelled (the capture page records them as "
                            "it cues each interval; through the API: POST /intervals/{id}/mark for each)"
                            + ("" if len(unmarked) == len(sessions) else "; in the others no samples were recorded "
                               "during their cues"))
        raise JobFailed("no data in the chosen sessions: no samples were recorded during their gesture/rest cues "
                        "(is the device streaming while you capture?)")
    found = {str(v) for v in np.concatenate(all_l)}
    if deleted and not found - {preprocessing.REST_LABEL}:
        raise JobFailed(f"the chosen sessions hold no gesture of the bank, only rest and deleted gestures "
                        f"({_describe_deleted(deleted)}), which do not train")
    if training_all:
        _check_every_class_has_windows(recorded, found, win, rate)
    labels, groups, group_sessions = np.concatenate(all_l), np.concatenate(all_g), None
    window_session = np.concatenate(all_s)
    if len(np.unique(groups)) == 1 and _a_session_can_be_held_out(labels, window_session):
        # Every session holds one repetition (e.g. a one-repetition calibration recorded again later): they would
        # all be repetition 1, leaving nothing to hold out (training from scratch refused, fine-tuning could only
        # check on the ends of the same recordings), so the sessions are the repetitions.
        groups = window_session
        group_sessions = {int(k): labelled[int(k)][0] for k in np.unique(window_session)}
    cut_from = set(np.unique(window_session).tolist())
    used = [u for k, u in enumerate(used) if k in cut_from]  # a session that gave no window did not train
    return {
        "windows": np.concatenate(all_w), "labels": labels, "groups": groups, "group_sessions": group_sessions,
        "sample_rate_hz": rate, "channels_used": channels_used, "sessions": [s[0] for s in sessions],
        "deleted_gestures": _describe_deleted(deleted), "stride": stride, "thinned": thinned, "used": used,
    }


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _sessions(ids: list[int]) -> str:
    return f"session {ids[0]} has" if len(ids) == 1 else f"sessions {', '.join(map(str, ids))} have"


def score_job_model(conn, job_id: int, session_ids: Sequence[int], max_window_bytes: int | None = None,
                    batch: int = 2048) -> dict[str, Any]:
    """A job's model tested on chosen sessions of its user (e.g. recorded on another day, or a second repetition
    recorded after a one-repetition calibration): the Jobs page's figures (``training.class_metrics``) on their
    windows, cut as the model cuts them (its window and step). Windows of gestures the model does not know are
    left out and counted; sessions the job trained on are named (their figures are not held out).
    Raises JobFailed (a user-facing message) for a missing job or model, another user's session, another sample
    rate or channel count, or no window of the model's classes.
    max_window_bytes: above this (the windows as float32), every k-th window is tested (``stride_ms`` apart), as
    training thins them: the windows of hours of sessions would otherwise fill the memory of the caller (the UI)."""
    from ml_model.rest.serving import meta_from_row  # the model as it is served (older metadata completed, NFC)

    with conn, conn.cursor() as cur, conn.cursor(cursor_factory=RealDictCursor) as by_name:
        job = _job_row(cur, job_id)
        by_name.execute("SELECT id, weights, classes, channels, sample_rate_hz, window_ms, step_ms, scaler, metadata "
                        "FROM model_artifacts WHERE job_id = %s ORDER BY created_at DESC, id DESC LIMIT 1", (job_id,))
        row = by_name.fetchone()
        cur.execute("SELECT session_id FROM training_job_sessions WHERE job_id = %s", (job_id,))
        trained_on = {r[0] for r in cur.fetchall()}
    if row is None:
        raise JobFailed(f"job {job_id} has no model ({job['status']})")
    artifact_id, weights, meta = row["id"], bytes(row["weights"]), meta_from_row(row)
    data = load_sessions_data(conn, job["user_id"], session_ids,
                              {"window_ms": meta["window_ms"], "step_ms": meta["step_ms"]}, max_window_bytes)
    if abs(data["sample_rate_hz"] - float(meta["sample_rate_hz"])) > 1e-6:
        raise JobFailed(f"the model was trained at {float(meta['sample_rate_hz']):g} Hz and these sessions were "
                        f"recorded at {data['sample_rate_hz']:g} Hz")
    n_device = int(meta["n_device_channels"])
    if data["windows"].shape[1] != n_device:
        raise JobFailed(f"the model reads a {n_device}-channel device and these sessions were recorded with "
                        f"{data['windows'].shape[1]} channels")
    renamed = repo.renamed_classes(conn, artifact_id, meta["classes"])
    classes = [renamed.get(str(c), str(c)) for c in meta["classes"]]
    labels = data["labels"].astype(str)
    known = np.isin(labels, classes)
    unknown, counts = np.unique(labels[~known], return_counts=True)
    if not known.any():
        raise JobFailed(f"none of these sessions' gestures ({', '.join(unknown)}) is one of the model's "
                        f"({', '.join(classes)})")
    predictor = artifacts.Predictor(weights, meta)
    kept = np.flatnonzero(known)  # batches taken from the windows as they are: no copy of all of them
    pred = np.concatenate([predictor.predict_proba(data["windows"][kept[i:i + batch]]).argmax(axis=1)
                           for i in range(0, len(kept), batch)])
    index = {c: i for i, c in enumerate(classes)}
    figures = training.class_metrics(np.array([index[v] for v in labels[known]]), pred, classes)
    per_class, n_per_class = np.unique(labels[known], return_counts=True)
    return {
        "job_id": job_id, "artifact_id": artifact_id, "user_id": job["user_id"], "sessions": data["sessions"],
        **figures,
        "n_windows": int(known.sum()),
        "windows_per_class": {str(c): int(k) for c, k in zip(per_class, n_per_class, strict=True)},
        "not_in_model": {str(c): int(k) for c, k in zip(unknown, counts, strict=True)},
        "renamed": renamed,  # the model's class -> the gesture's name now
        "window_ms": float(meta["window_ms"]), "step_ms": float(meta["step_ms"]),
        "stride_ms": float(meta["step_ms"]) * data["thinned"],  # the windows tested are this far apart
        # figures on sessions the model learnt from are not a test of it
        "trained_on": sorted(trained_on & set(data["sessions"])),
    }


def _a_session_can_be_held_out(labels: np.ndarray, window_session: np.ndarray) -> bool:
    """Whether some session, held out, leaves every class it holds windows in the others (as
    ``training.default_val_group`` needs of a held-out group). labels, window_session: (n,) per window."""
    sessions = np.unique(window_session)
    return len(sessions) >= 2 and any(training.can_hold_out(labels, window_session, k) for k in sessions)


def _sessions_holding(used: list[dict], repetitions: list) -> list[int] | None:
    """The sessions (of ``used``) with an interval of one of ``repetitions``; None when that is all of them."""
    reps = {int(r) for r in repetitions}
    holding = [sess["id"] for sess in used if any(int(iv[2]) in reps for iv in sess["intervals"])]
    return holding if len(holding) < len(used) else None


def _nothing_to_hold_out(data: Mapping[str, Any]) -> str:
    """repo.nothing_to_hold_out for data of a single group (scheduling refuses such jobs; one queued before that
    check existed, or whose intervals gave fewer windows than they promised, still ends here)."""
    sessions_of: dict[str, set] = {}  # gesture -> the sessions holding it
    for sess in data["used"]:
        for iv in sess["intervals"]:
            if iv[1] != preprocessing.REST_LABEL:
                sessions_of.setdefault(iv[1], set()).add(sess["id"])
    return repo.nothing_to_hold_out(len(data["used"]), sorted(g for g, ids in sessions_of.items() if len(ids) == 1))


def _describe_deleted(deleted: Mapping[str, set]) -> str:
    return "; ".join(f"{name!r} (sessions {sorted(ids)})" for name, ids in sorted(deleted.items()))


def _session_intervals(session_id: int, rows: list[tuple]) -> tuple[list[dict], datetime.datetime]:
    """The labelling intervals of a session from its recorded interval rows (label, kind, repetition,
    started_at, ended_at, planned length ms, gesture deleted, id) ordered by start, and when the last one ends. An interval marked
    without an end lasts its planned length but never past the next cue (a client's cue timer may run a little
    early). Intervals whose marked times overlap cannot label the samples between them: JobFailed names them."""
    intervals, last_end = [], rows[0][3]
    for i, (label, kind, rep, started, ended, planned_ms, deleted, interval_id) in enumerate(rows):
        ended = repo.interval_label_end(started, ended, planned_ms, rows[i + 1][3] if i + 1 < len(rows) else None)
        last_end = max(last_end, ended)
        intervals.append({"id": interval_id, "label": _DELETED if deleted else label, "name": label, "kind": kind,
                          "cycle": rep,
                          "started_at": started,
                          "start_ms": started.timestamp() * 1000.0, "end_ms": ended.timestamp() * 1000.0})
    latest = None  # the interval so far that ends last
    for iv in intervals:
        if latest is not None and iv["start_ms"] < latest["end_ms"]:
            raise JobFailed(f"session {session_id}: the recorded times of {_describe(latest)} and {_describe(iv)} "
                            f"overlap by {(latest['end_ms'] - iv['start_ms']) / 1000:.3f} s, so their samples have "
                            "no single label: correct their times or discard one of them")
        if latest is None or iv["end_ms"] > latest["end_ms"]:
            latest = iv
    return intervals, last_end


def _describe(iv: Mapping[str, Any]) -> str:
    t = iv["started_at"].astimezone(datetime.UTC)
    what = "the rest" if iv["kind"] == "rest" else repr(iv["name"])
    return f"{what} of repetition {iv['cycle'] + 1} (started {t:%H:%M:%S}.{t.microsecond // 1000:03d} UTC)"


def _check_every_class_has_windows(recorded: Mapping[str, dict], found: set[str], win: int, rate: float) -> None:
    """JobFailed naming each class recorded in the sessions that yields no window: the model would silently
    lack it (e.g. holds shorter than the reaction time plus one window, or no samples during its holds)."""
    problems = []
    for name in sorted(set(recorded) - found):
        hold_ms, sessions = recorded[name]["hold_ms"], sorted(recorded[name]["sessions"])
        need_ms = preprocessing.DEFAULT_REACTION_MS + win * 1000.0 / rate
        if hold_ms < need_ms:
            why = (f"its longest hold is {hold_ms / 1000:.2f} s, shorter than the "
                   f"{preprocessing.DEFAULT_REACTION_MS / 1000:g} s reaction time plus one window "
                   f"({need_ms / 1000:.2f} s): record it with longer holds")
        else:
            why = "no complete window of samples was recorded during its holds (device not streaming, lost packets)"
        problems.append(f"{name!r} (sessions {sessions}): {why}")
    if problems:
        raise JobFailed("no training windows for " + "; ".join(problems)
                        + "; the model could not recognise it: record it again or leave those sessions out")


# ---- job state -----------------------------------------------------------------------------------
def _log(conn, job_id: int, message: str, level: str = "INFO") -> None:
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO job_logs (job_id, level, message) VALUES (%s, %s, %s)", (job_id, level, message))
    log.log(logging.getLevelName(level), "job %s: %s", job_id, message)


# Matches a job only while `worker` still holds it: appended to every write of a running job.
_OWNED = "id = %(job)s AND status = 'in-progress' AND worker = %(worker)s"


def _finish(conn, job_id: int, worker: str, status: str, error: str | None = None) -> bool:
    """End the job as canceled/failed if `worker` still holds it; False (nothing written) otherwise."""
    with conn, conn.cursor() as cur:
        cur.execute(f"""UPDATE training_jobs SET status = %(status)s, error = %(error)s, finished_at = now(),
                               heartbeat_at = now()
                        WHERE {_OWNED} RETURNING id""",
                    {"status": status, "error": error, "job": job_id, "worker": worker})
        return cur.fetchone() is not None


INTERVAL_COLUMNS = ["id", "label", "repetition", "start_ms", "end_ms"]


def training_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a job's model was trained on (``meta["data"]``), so that a figure can be reproduced after the sessions
    change: each session with the intervals that labelled it (their times as training read them, ms since the
    epoch on the server clock; an interval corrected or discarded later keeps its id but not these), the windows
    per class, the repetitions (0-based, as stored), what the held-out groups are and how far apart the windows
    were cut."""
    classes, counts = np.unique(np.asarray(data["labels"]).astype(str), return_counts=True)
    return {
        "sessions": data["used"], "interval_columns": INTERVAL_COLUMNS,
        "n_windows": int(len(data["labels"])),
        "windows_per_class": {str(c): int(k) for c, k in zip(classes, counts, strict=True)},
        "repetitions": sorted({int(iv[2]) for sess in data["used"] for iv in sess["intervals"]}),
        # what the groups training holds out are: the intervals' repetitions, or (each session holding one) the
        # sessions, then {group: session id}
        "groups": "sessions" if data.get("group_sessions") else "repetitions",
        "group_sessions": data.get("group_sessions"),
        "window_stride": int(data["stride"]), "thinned": int(data["thinned"]),
        "left_out_deleted_gestures": data["deleted_gestures"] or None,
    }


def training_config(params: Mapping[str, Any], sample_rate_hz: float, channels: list[int] | None) -> dict:
    cfg: dict[str, Any] = {"sample_rate_hz": sample_rate_hz, "channels": channels}
    for key, target in _PARAM_KEYS.items():
        if params.get(key) is not None:
            cfg[target] = params[key]
    return cfg


def _publish_model_updated(settings: Settings, user_id: int, job_id: int | None, artifact_id: int,
                           service: str = "trainer") -> None:
    """Tell the API to hot-reload; if NATS is unreachable the API's slow poll picks the model up anyway.
    service: the NATS identity that sends it (the web UI's, when a user chose the model served)."""
    from semg import natsio
    from semg.messages import MODELS_UPDATED, ModelUpdated

    async def _send() -> None:
        nc = await natsio.connect_once(service, settings)
        try:
            msg = ModelUpdated(userid=user_id, job_id=job_id, artifact_id=artifact_id)
            await nc.publish(MODELS_UPDATED, msg.model_dump_json().encode())
            await nc.flush(timeout=2)
        finally:
            await nc.close()

    try:
        asyncio.run(asyncio.wait_for(_send(), timeout=5))
    except Exception as e:  # noqa: BLE001 - best effort by design
        log.warning("could not publish models.updated for job %s (%s); the API will find it by polling", job_id, e)


def store_artifact(conn, user_id: int | None, job_id: int | None, weights: bytes, meta: dict) -> int:
    with conn, conn.cursor() as cur:
        return _insert_artifact(cur, user_id, job_id, weights, meta)


def _insert_artifact(cur, user_id: int | None, job_id: int | None, weights: bytes, meta: dict) -> int:
    cur.execute(
        """INSERT INTO model_artifacts (user_id, job_id, weights, sha256, size_bytes, classes, channels,
               sample_rate_hz, window_ms, step_ms, scaler, metrics, metadata)
           VALUES (%s, %s, %s, %s, %s, %s, %s::smallint[], %s, %s, %s, %s, %s, %s) RETURNING id""",
        (user_id, job_id, psycopg2.Binary(weights), hashlib.sha256(weights).hexdigest(), len(weights),
         Json(meta["classes"]), list(meta["channels"]), meta["sample_rate_hz"], meta["window_ms"],
         meta["step_ms"], Json(meta["scaler"]), Json(meta.get("metrics", {})), Json(meta)),
    )
    return cur.fetchone()[0]


def _complete(conn, user_id: int, job_id: int, worker: str, weights: bytes, meta: dict) -> tuple[str, int | None]:
    """Store the model and mark the job completed in ONE transaction, only while `worker` holds the job and
    no cancel was asked: a model is served exactly when its job says completed.

    Returns ("completed", artifact id), ("canceled", None) or ("lost", None)."""
    with conn, conn.cursor() as cur:
        cur.execute(f"""UPDATE training_jobs SET status = 'completed', error = NULL, finished_at = now(),
                               heartbeat_at = now(), progress = 100
                        WHERE {_OWNED} AND NOT cancel_requested RETURNING id""", {"job": job_id, "worker": worker})
        if cur.fetchone() is not None:
            return "completed", _insert_artifact(cur, user_id, job_id, weights, meta)
        # Still ours, so the cancel came while the model was being saved: honour it, store nothing.
        cur.execute(f"""UPDATE training_jobs SET status = 'canceled', finished_at = now(), heartbeat_at = now()
                        WHERE {_OWNED} RETURNING id""", {"job": job_id, "worker": worker})
        return ("canceled" if cur.fetchone() is not None else "lost"), None


def run_job(job_id: int, settings: Settings | None = None, worker: str | None = None) -> str:
    """Train job `job_id` to the end and return how it ended.

    worker=None (``TrainMLJob.py train JOB_ID``): claim the job, which must be scheduled, for this process;
    JobUnavailable if it is not (a job another worker runs is never run twice). worker=<name>: run the job this
    worker claimed with claim_next. The job's heartbeat is beaten from its own thread while it runs.

    Returns "completed" (with an artifact), "failed" (with the cause), "canceled", "scheduled" (re-queued: the
    worker is stopping, or the database connection was lost) or "lost" (this worker no longer holds the job, or
    could not reach the database to say how it ended: nothing of the run was stored; the job row belongs to
    whoever took it, or to stale recovery).
    """
    s = settings or get_settings()
    me = worker or _worker_name()
    conn = db.connect(s)
    beat: _Heartbeat | None = None
    try:
        with conn, conn.cursor() as cur:
            if worker is None:
                cur.execute(f"""UPDATE training_jobs SET {_CLAIM_SET} WHERE id = %(job)s AND status = 'scheduled'
                                RETURNING user_id, params, cancel_requested""", {"job": job_id, "worker": me})
            else:
                cur.execute(f"""UPDATE training_jobs SET heartbeat_at = now(), error = NULL WHERE {_OWNED}
                                RETURNING user_id, params, cancel_requested""", {"job": job_id, "worker": me})
            row = cur.fetchone()
            if row is not None and worker is None:
                cur.execute("INSERT INTO job_logs (job_id, message) VALUES (%s, %s)", (job_id, f"taken by {me}"))
        if row is None:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT status, worker FROM training_jobs WHERE id = %s", (job_id,))
                found = cur.fetchone()
            if worker is None:
                if found is None:
                    raise JobUnavailable(f"job {job_id} not found")
                held = f" (worker {found[1]})" if found[0] == "in-progress" and found[1] else ""
                raise JobUnavailable(f"job {job_id} is {found[0]}{held}; only a scheduled job can be trained")
            log.warning("job %s: no longer held by %s (%s); not running it", job_id, me,
                        "deleted" if found is None else f"{found[0]}, worker {found[1]}")
            return "lost"
        beat = _Heartbeat(s, job_id, me)
        beat.start()
        user_id, params, cancel_requested = row
        try:
            if cancel_requested:
                if not _finish(conn, job_id, me, "canceled"):
                    return _lost(conn, job_id, me, "before training started")
                _log(conn, job_id, "canceled before training started")
                return "canceled"
            return _train(conn, s, job_id, me, user_id, params or {})
        except Exception as e:  # noqa: BLE001 - e.g. the connection died while ending the job: never crash
            reason = db.first_line(e)
            if isinstance(e, psycopg2.Error) and _connection_lost(conn):
                return _requeue_after_connection_loss(s, job_id, me, reason)
            log.error("job %s: %s\n%s", job_id, reason, traceback.format_exc())
            return _fail(conn, s, job_id, me, f"internal error: {type(e).__name__}: {reason}")
    finally:
        if beat is not None:
            beat.stop.set()
        conn.close()


def _connection_lost(conn) -> bool:
    return bool(conn.closed)


def _fail(conn, s: Settings, job_id: int, worker: str, message: str) -> str:
    """Record the failure if `worker` still holds the job; returns the run's outcome ("failed" or "lost").

    A dead connection is replaced for this; if the database stays unreachable the job is left in-progress
    without heartbeat and stale recovery re-queues it."""
    with contextlib.suppress(psycopg2.Error):
        conn.rollback()
    try:
        with contextlib.ExitStack() as stack:
            if _connection_lost(conn):
                conn = stack.enter_context(contextlib.closing(db.connect(s)))
            if not _finish(conn, job_id, worker, "failed", message):
                return _lost(conn, job_id, worker, f"failing it ({message})")
            _log(conn, job_id, f"failed: {message}", "ERROR")
            return "failed"
    except psycopg2.Error as e:
        log.error("job %s: could not record its failure (%s): %s; stale recovery will re-queue it",
                  job_id, message, db.first_line(e))
        return "lost"


def _lost(conn, job_id: int, worker: str, when: str) -> str:
    """This worker no longer holds the job: write nothing to the job row, only say so in the job's log."""
    with contextlib.suppress(psycopg2.Error):
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT status, worker FROM training_jobs WHERE id = %s", (job_id,))
            found = cur.fetchone()
        conn.rollback()
        if found is not None:
            _log(conn, job_id, f"worker {worker} lost this job ({found[0]}"
                               f"{', now held by ' + found[1] if found[1] else ''}) {when}; it stopped, nothing "
                               "of its run was stored", "WARNING")
            return "lost"
    log.warning("job %s: worker %s lost this job %s; nothing stored", job_id, worker, when)
    return "lost"


def _requeue_after_connection_loss(s: Settings, job_id: int, worker: str, reason: str) -> str:
    """The job's database connection died mid-training (restart, failover): the job is not at fault, so it
    goes back to the queue at once (failed after MAX_ATTEMPTS tries, as stale recovery does)."""
    try:
        with contextlib.closing(db.connect(s)) as conn:
            with conn, conn.cursor() as cur:
                cur.execute(f"""UPDATE training_jobs
                                SET status = CASE WHEN cancel_requested THEN 'canceled'
                                                  WHEN attempts >= %(max)s THEN 'failed' ELSE 'scheduled' END,
                                    error = CASE WHEN attempts >= %(max)s AND NOT cancel_requested THEN %(error)s
                                            ELSE NULL END,
                                    finished_at = CASE WHEN attempts >= %(max)s OR cancel_requested THEN now()
                                                  ELSE NULL END,
                                    worker = NULL, progress = 0, epoch_metrics = '[]'
                                WHERE {_OWNED} RETURNING status""",
                            {"max": MAX_ATTEMPTS, "error": f"database connection lost: {reason}",
                             "job": job_id, "worker": worker})
                row = cur.fetchone()
            if row is None:
                return _lost(conn, job_id, worker, "while its database connection was lost")
            _log(conn, job_id, f"database connection lost ({reason}); job "
                               f"{'re-queued' if row[0] == 'scheduled' else row[0]}", "WARNING")
            return row[0]
    except psycopg2.Error as e:
        log.error("job %s: database connection lost (%s) and not back (%s); stale recovery will re-queue it",
                  job_id, reason, db.first_line(e))
        return "lost"


def _train(conn, s: Settings, job_id: int, worker: str, user_id: int, params: dict) -> str:
    t0 = time.monotonic()
    try:
        base_cfg = training.merge_config({"sample_rate_hz": 1.0, **_window_overrides(params)})
        # Labels of capture windows that could not store them yet wait in journals: store them before reading.
        replayed = journal.replay_interval_journals(connection=lambda: contextlib.nullcontext(conn))
        if replayed["stored"]:
            _log(conn, job_id, f"stored {replayed['stored']} capture label change(s) that were waiting in journals")
        _log(conn, job_id, "loading capture sessions")
        data = load_job_data(conn, job_id, base_cfg, s.semg_train_max_window_mb * 2**20)
        if data["thinned"] > 1:
            _log(conn, job_id, f"the sessions hold more training windows than SEMG_TRAIN_MAX_WINDOW_MB "
                               f"({s.semg_train_max_window_mb} MB) allows: training uses every "
                               f"{_ordinal(data['thinned'])} window (one every "
                               f"{data['stride'] * 1000 / data['sample_rate_hz']:g} ms); the model serves as set")
        if data["deleted_gestures"]:
            _log(conn, job_id, f"left out the recordings of gestures deleted from the bank: {data['deleted_gestures']}"
                               "; add a gesture of the same name to train them again")
        cfg = training_config(params, data["sample_rate_hz"], data["channels_used"])
        n = len(data["windows"])
        classes, counts = np.unique(data["labels"].astype(str), return_counts=True)
        _log(conn, job_id, f"{n} windows from sessions {data['sessions']}: "
                           + ", ".join(f"{c}={k}" for c, k in zip(classes, counts, strict=True)))
        epochs: list[dict] = []

        def progress(epoch, n_epochs, train_loss, train_acc, val_loss, val_acc):
            epochs.append({"epoch": epoch, "train_loss": _f(train_loss), "train_acc": _f(train_acc),
                           "val_loss": _f(val_loss), "val_acc": _f(val_acc)})
            with conn, conn.cursor() as cur:
                cur.execute(f"""UPDATE training_jobs SET progress = %(p)s, epoch_metrics = %(m)s, heartbeat_at = now()
                                WHERE {_OWNED} RETURNING cancel_requested""",
                            {"p": min(99.0, 100.0 * epoch / max(n_epochs, 1)), "m": Json(epochs),
                             "job": job_id, "worker": worker})
                row = cur.fetchone()
            if row is None:  # taken from us: stop training, as for a cancel, and write nothing more
                raise _JobLost()
            if row[0]:
                raise training.TrainingCancelled(f"job {job_id} canceled")
            if _STOP_REQUESTED.is_set():
                raise _WorkerStopping()

        train = training.train_model
        if params.get("base_artifact_id") is not None:  # fine-tune a pretrained base (ml_model.transfer)
            from ml_model import transfer

            base = transfer.load_base_artifact(conn, params["base_artifact_id"], user_id)
            _log(conn, job_id, f"fine-tuning base model {params['base_artifact_id']}")
            base_rate = base[1].get("sample_rate_hz")
            if base_rate and abs(float(base_rate) - data["sample_rate_hz"]) > 1e-6:
                # Allowed (the API may want it), but the user should know why accuracy may disappoint.
                _log(conn, job_id, f"the base model was trained at {float(base_rate):g} Hz and these sessions are "
                                   f"{data['sample_rate_hz']:g} Hz: its filters see another time scale; a base of "
                                   "the same rate, or training from scratch, may be more accurate", "WARNING")
            train = functools.partial(transfer.finetune_from_training_config, base=base)
        if train is training.train_model and len(np.unique(data["groups"])) < 2:
            raise JobFailed(_nothing_to_hold_out(data))
        if data["group_sessions"]:
            _log(conn, job_id, "each chosen session holds one repetition: the sessions are taken as the repetitions, "
                               "so one of them can be held out to measure the model")
        model, meta, metrics = train(
            data["windows"], data["labels"], data["groups"], cfg, seed=int(params.get("seed", 0)),
            progress_callback=progress,
        )
        if data["group_sessions"] and metrics.get("val_groups"):  # the Jobs page names the session held out
            metrics["val_sessions"] = [data["group_sessions"][int(g)] for g in metrics["val_groups"]]
        elif metrics.get("val_groups") and (holding := _sessions_holding(data["used"], metrics["val_groups"])):
            # sessions of different lengths (a 1-repetition calibration with a 3-repetition one): the repetition
            # held out is not one 'of every session'
            metrics["val_repetition_sessions"] = holding
        if flat := training.flat_device_channels(meta["scaler"], meta["channels"]):
            _log(conn, job_id, f"channel{'s' if len(flat) > 1 else ''} {', '.join(map(str, flat))} did not vary in "
                               "the training data (an electrode off or disconnected?): the model ignores "
                               f"{'them' if len(flat) > 1 else 'it'}; reattach and record again to use "
                               f"{'them' if len(flat) > 1 else 'it'}", "WARNING")
        meta["job_id"] = job_id
        meta["data"] = training_data(data)
        meta["train_seconds"] = round(time.monotonic() - t0, 2)
        weights, meta = artifacts.save_artifact(model, meta, metrics)
        outcome, artifact_id = _complete(conn, user_id, job_id, worker, weights, meta)
        if outcome == "canceled":
            _log(conn, job_id, "canceled while its model was being saved; no model was stored")
            return "canceled"
        if outcome == "lost":
            return _lost(conn, job_id, worker, "while saving its model")
        acc = metrics.get("val_accuracy", metrics.get("accuracy"))
        # a one-repetition fine-tune checks itself on the ends of its own recordings: nothing was held out
        measured = (f"accuracy on the last {metrics['val_time_fraction']:.0%} of its own recordings (nothing held "
                    "out: it overstates)" if metrics.get("val_time_fraction") is not None else "held-out accuracy")
        _log(conn, job_id, f"completed in {time.monotonic() - t0:.1f}s: artifact {artifact_id}, "
                           f"{len(weights)} bytes, {measured} {acc}")
        _publish_model_updated(s, user_id, job_id, artifact_id)  # only now: the model is committed and served
        return "completed"
    except _JobLost:
        return _lost(conn, job_id, worker, "during training")
    except _WorkerStopping:
        conn.rollback()
        with conn, conn.cursor() as cur:  # another worker takes it from the start
            cur.execute(f"""UPDATE training_jobs SET status = 'scheduled', worker = NULL, progress = 0,
                                   epoch_metrics = '[]' WHERE {_OWNED} RETURNING id""",
                        {"job": job_id, "worker": worker})
            requeued = cur.fetchone() is not None
        if not requeued:
            return _lost(conn, job_id, worker, "as its worker stopped")
        _log(conn, job_id, "worker stopped; job re-queued", "WARNING")
        return "scheduled"
    except training.TrainingCancelled:
        conn.rollback()
        if not _finish(conn, job_id, worker, "canceled"):
            return _lost(conn, job_id, worker, "as it was canceled")
        _log(conn, job_id, "canceled during training; no model was stored")
        return "canceled"
    except (training.TrainingDataError, JobFailed) as e:
        return _fail(conn, s, job_id, worker, str(e))
    except psycopg2.Error as e:
        reason = db.first_line(e)
        if _connection_lost(conn):
            return _requeue_after_connection_loss(s, job_id, worker, reason)
        return _fail(conn, s, job_id, worker, f"database error: {reason}")
    except Exception as e:  # noqa: BLE001 - any other bug still ends the job with its cause, never "stuck"
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        return _fail(conn, s, job_id, worker, f"internal error: {type(e).__name__}: {e}")


class _WorkerStopping(Exception):
    """The worker is shutting down (SIGTERM): leave the job for another worker."""


def _window_overrides(params: Mapping[str, Any]) -> dict:
    return {k: params[k] for k in ("window_ms", "step_ms") if params.get(k) is not None}


def _f(v) -> float | None:
    return None if v is None else round(float(v), 5)


# ---- the queue worker ----------------------------------------------------------------------------
def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _stale_after_s(default: float = STALE_AFTER_S) -> float:
    """SEMG_JOB_STALE_AFTER_S overrides STALE_AFTER_S (fault tests use ~10 s); never below 2 heartbeats."""
    try:
        value = float(os.environ.get("SEMG_JOB_STALE_AFTER_S", default))
    except ValueError:
        return default
    return max(2 * HEARTBEAT_S, value)


def recover_stale_jobs(conn, stale_after_s: float | None = None, max_attempts: int = MAX_ATTEMPTS) -> list[int]:
    """Jobs whose worker stopped beating: back to the queue, or failed after max_attempts tries.

    stale_after_s defaults to STALE_AFTER_S (or SEMG_JOB_STALE_AFTER_S when set)."""
    if stale_after_s is None:
        stale_after_s = _stale_after_s()
    with conn, conn.cursor() as cur:
        cur.execute(
            """UPDATE training_jobs
               SET status = CASE WHEN attempts >= %(max)s OR cancel_requested THEN
                                 CASE WHEN cancel_requested THEN 'canceled' ELSE 'failed' END
                            ELSE 'scheduled' END,
                   error = CASE WHEN attempts >= %(max)s AND NOT cancel_requested
                           THEN 'the training worker stopped responding ' || attempts || ' times' ELSE error END,
                   finished_at = CASE WHEN attempts >= %(max)s OR cancel_requested THEN now() ELSE NULL END,
                   worker = NULL
               WHERE status = 'in-progress' AND heartbeat_at < now() - make_interval(secs => %(stale)s)
               RETURNING id, status""",
            {"max": max_attempts, "stale": stale_after_s},
        )
        changed = cur.fetchall()
        for job_id, status in changed:
            cur.execute("INSERT INTO job_logs (job_id, level, message) VALUES (%s, 'WARNING', %s)",
                        (job_id, f"its worker stopped responding; job {'re-queued' if status == 'scheduled' else status}"))
    return [j for j, _ in changed]


# How a worker takes a job: a fresh run (the progress of an earlier, lost run is not this run's).
_CLAIM_SET = """status = 'in-progress', worker = %(worker)s, started_at = now(), heartbeat_at = now(),
                attempts = attempts + 1, error = NULL, progress = 0, epoch_metrics = '[]'"""


# Claims are made one at a time (a transaction-level advisory lock, two-int form): a claim's choice depends on the
# jobs the others took (turns), which it cannot see while another claim is not committed.
CLAIM_LOCK = (0x5E3C21, 1)


# The next job in turn (see claim_next), as one statement; EXPLAIN-able by the tests with a worker name.
CLAIM_SQL = f"""UPDATE training_jobs SET {_CLAIM_SET}
WHERE id = (WITH waiting AS (SELECT DISTINCT user_id FROM training_jobs WHERE status = 'scheduled'),
                 -- per waiting user from indexes (0007), not an aggregate over all their jobs
                 turn AS (SELECT w.user_id,
                                 (SELECT count(*) FROM training_jobs r
                                  WHERE r.user_id = w.user_id AND r.status = 'in-progress') AS running,
                                 (SELECT max(r.started_at) FROM training_jobs r
                                  WHERE r.user_id = w.user_id) AS last_start
                          FROM waiting w)
            SELECT j.id FROM training_jobs j JOIN turn USING (user_id)
            WHERE j.status = 'scheduled'
            ORDER BY turn.running, turn.last_start NULLS FIRST, j.created_at, j.id
            FOR UPDATE OF j SKIP LOCKED LIMIT 1)
RETURNING id"""


def claim_next(conn, worker: str | None = None) -> int | None:
    """Take the next scheduled job (skipping ones other workers hold) and mark it in-progress for `worker`
    (default: this process); run it with run_job(job_id, worker=worker).

    Users take turns: the oldest job of the user with the fewest jobs in progress, among those the user whose
    last job started longest ago (or never). Oldest-first let one user's queue (a script, or 30 retrains
    scheduled at once) keep everyone else's first job waiting until all of it was trained. Claims are made one
    at a time (CLAIM_LOCK), so two workers claiming at once do not both take the same user's turn."""
    me = worker or _worker_name()
    with conn, conn.cursor() as cur:
        # before the UPDATE, whose snapshot then holds the claim made meanwhile (READ COMMITTED)
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", CLAIM_LOCK)
        cur.execute(CLAIM_SQL, {"worker": me})
        row = cur.fetchone()
        if row:
            cur.execute("INSERT INTO job_logs (job_id, message) VALUES (%s, %s)", (row[0], f"taken by worker {me}"))
    return row[0] if row else None


class _Heartbeat(threading.Thread):
    """Beats a job's heartbeat from its own connection while the job runs (data loading can take a while),
    only while `worker` holds the job: a worker that lost it must not keep another worker's job 'alive'."""

    def __init__(self, settings: Settings, job_id: int, worker: str):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.settings, self.job_id, self.worker, self.stop = settings, job_id, worker, threading.Event()

    def beat(self) -> bool:
        """One beat; False when the job is no longer this worker's (nothing was written)."""
        with contextlib.closing(db.connect(self.settings)) as conn, conn, conn.cursor() as cur:
            cur.execute(f"UPDATE training_jobs SET heartbeat_at = now() WHERE {_OWNED} RETURNING id",
                        {"job": self.job_id, "worker": self.worker})
            return cur.fetchone() is not None

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                if not self.beat():
                    # The training notices at its next epoch (its progress update matches no row) and stops.
                    log.warning("job %s is no longer held by %s; heartbeat stopped", self.job_id, self.worker)
                    return
            except psycopg2.Error as e:
                log.warning("heartbeat for job %s failed: %s", self.job_id, e)


def worker_loop(settings: Settings | None = None, poll_s: float = 1.0, once: bool = False,
                stop: threading.Event | None = None) -> None:
    """Take and run jobs until stopped (SIGTERM sets `stop` between jobs; a running job is re-queued by the
    stale-heartbeat rule if the process dies)."""
    s = settings or get_settings()
    stop = stop or threading.Event()
    conn = None
    me = _worker_name()
    log.info("training worker %s waiting for jobs", me)
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = db.connect(s, application_name=db.TRAINER_APPLICATION_NAME)
            recover_stale_jobs(conn)
            job_id = claim_next(conn, me)
        except psycopg2.Error as e:
            log.warning("database not reachable (%s); retrying", str(e).strip().splitlines()[0])
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(2.0)
            continue
        if job_id is None:
            if once:
                break
            stop.wait(poll_s)
            continue
        try:
            status = run_job(job_id, s, worker=me)
            log.info("job %s %s", job_id, status)
        except Exception:  # noqa: BLE001 - one job's trouble (e.g. the database gone) must not end the worker
            log.exception("job %s: the worker could not run it; its heartbeat stops and stale recovery "
                          "re-queues it", job_id)
            # The loop's connection may have died with the job's: start from a fresh one.
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()
            conn = None
            stop.wait(1.0)
        if once:
            break
    if conn is not None:
        conn.close()
