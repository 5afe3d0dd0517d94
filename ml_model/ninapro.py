"""Loader for NinaPro DB5 recordings (two Myo armbands, 16 channels, 200 Hz) for pretraining.

One file per subject and exercise, ``s<k>/S<k>_E<e>_A1.mat`` (MATLAB v5, read with ``scipy.io.loadmat``):
``emg`` (n, 16) raw armband values, ``restimulus`` (n,) the movement actually performed (0 = rest, relabelled
to match the EMG onset), ``rerepetition`` (n,) its repetition 1..6 (0 during rest), and optionally
``exercise`` and ``frequency``. Movement numbers restart in each exercise, so a class is named
``E<exercise>_<movement>`` (rest is the platform's ``REST``).

Windows never straddle a label change: each run of constant (restimulus, rerepetition) is windowed on its own.
The group of a window is its repetition; a rest run belongs to the repetition of the movement before it (the
first rest of a file to the movement after it), so holding out a repetition holds out its rests as well.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from ml_model.preprocessing import DEFAULT_STEP_MS, DEFAULT_WINDOW_MS, REST_LABEL, make_windows, window_params

DB5_SAMPLE_RATE_HZ = 200.0
DB5_N_CHANNELS = 16
_FILE_RE = re.compile(r"^S(\d+)_E(\d+)_A\d+\.mat$", re.IGNORECASE)


def _vector(mat: dict, key: str, path: Path | None = None) -> np.ndarray:
    if key not in mat:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}NinaPro file lacks the variable {key!r} "
                         f"(has {sorted(k for k in mat if not k.startswith('__'))})")
    return np.asarray(mat[key]).reshape(-1)


def _whole_numbers(mat: dict, key: str, path: Path) -> np.ndarray:
    """A label vector (``restimulus``, ``rerepetition``) as int64; NaN, infinite, fractional or negative values
    are an error (cast as they are, a NaN would become a huge bogus movement number)."""
    values = _vector(mat, key, path)
    try:
        values = values.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {key!r} must be numeric, got {values.dtype}") from None
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{path}: {key!r} has {int(bad.sum())} NaN or infinite values")
    bad = (values != np.round(values)) | (values < 0)
    if bad.any():
        raise ValueError(f"{path}: {key!r} must hold whole numbers >= 0; {int(bad.sum())} values are not "
                         f"(e.g. {values[bad][0]:g})")
    return values.astype(np.int64)


def _number(mat: dict, key: str, path: Path) -> float:
    """The first value of a scalar variable (``exercise``, ``subject``, ``frequency``), a finite number."""
    values = _vector(mat, key, path)
    try:
        value = float(values[0])
    except (IndexError, TypeError, ValueError):
        raise ValueError(f"{path}: {key!r} must be a number, got {values!r:.60}") from None
    if not np.isfinite(value):
        raise ValueError(f"{path}: {key!r} must be a finite number, got {value}")
    return value


def load_db5_mat(path: str | os.PathLike) -> dict[str, Any]:
    """One DB5 file -> {emg (n, C) float32, restimulus (n,) int, rerepetition (n,) int, exercise, subject,
    sample_rate_hz}. Exercise/subject come from the variables or else from the file name."""
    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=False)
    except (ValueError, TypeError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({e})") from e
    emg = np.asarray(mat.get("emg"))
    if emg is None or emg.ndim != 2 or emg.size == 0:
        raise ValueError(f"{path}: 'emg' must be an (n_samples, n_channels) matrix")
    stim = _whole_numbers(mat, "restimulus", path)
    rep = _whole_numbers(mat, "rerepetition", path)
    if not len(stim) == len(rep) == len(emg):
        raise ValueError(f"{path}: emg has {len(emg)} samples but restimulus {len(stim)}, rerepetition {len(rep)}")
    m = _FILE_RE.match(path.name)
    exercise = int(_number(mat, "exercise", path)) if "exercise" in mat else (int(m.group(2)) if m else 1)
    subject = f"S{int(_number(mat, 'subject', path))}" if "subject" in mat else (f"S{int(m.group(1))}" if m else path.stem)
    rate = _number(mat, "frequency", path) if "frequency" in mat else DB5_SAMPLE_RATE_HZ
    if rate <= 0:
        raise ValueError(f"{path}: 'frequency' must be a positive sample rate, got {rate:g}")
    try:
        emg = emg.astype(np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'emg' must be a numeric matrix, got {emg.dtype}") from None
    bad = ~np.isfinite(emg)
    if bad.any():
        raise ValueError(f"{path}: 'emg' has {int(bad.sum())} NaN or infinite values "
                         f"(in {int(bad.any(axis=1).sum())} of {len(emg)} samples)")
    return {"emg": emg, "restimulus": stim, "rerepetition": rep, "exercise": exercise,
            "subject": subject, "sample_rate_hz": rate, "path": str(path)}


def class_name(exercise: int, movement: int) -> str:
    return REST_LABEL if movement == 0 else f"E{exercise}_{movement}"


def runs(stim: np.ndarray, rep: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Maximal runs of constant (stimulus, repetition): [(start, end, stimulus, repetition)], end exclusive."""
    n = len(stim)
    if n == 0:
        return []
    change = np.flatnonzero((np.diff(stim) != 0) | (np.diff(rep) != 0)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [n]])
    return [(int(s), int(e), int(stim[s]), int(rep[s])) for s, e in zip(starts, ends, strict=True)]


def db5_windows(
    rec: dict[str, Any], win: int, step: int, include_rest: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(windows (n, C, win) float32, labels (n,) object, groups (n,) int64 repetition) of one loaded file."""
    segs = runs(rec["restimulus"], rec["rerepetition"])
    # Repetition of each rest run: the movement before it, else the one after it.
    reps = [r for _, _, s, r in segs]
    last = None
    for i, (_, _, s, r) in enumerate(segs):
        if s != 0:
            last = r
        elif last is not None:
            reps[i] = last
    nxt = None
    for i in range(len(segs) - 1, -1, -1):
        s, r = segs[i][2], segs[i][3]
        if s != 0:
            nxt = r
        elif reps[i] == 0 and nxt is not None:
            reps[i] = nxt
    ws, ls, gs = [], [], []
    for (a, b, s, _), r in zip(segs, reps, strict=True):
        if s == 0 and not include_rest:
            continue
        w = make_windows(rec["emg"][a:b], win, step)
        if len(w):
            ws.append(w)
            ls.append(np.full(len(w), class_name(rec["exercise"], s), dtype=object))
            gs.append(np.full(len(w), r, dtype=np.int64))
    c = rec["emg"].shape[1]
    if not ws:
        return np.empty((0, c, win), np.float32), np.empty(0, object), np.empty(0, np.int64)
    return np.concatenate(ws), np.concatenate(ls), np.concatenate(gs)


def find_db5_files(data_dir: str | os.PathLike) -> list[Path]:
    root = Path(data_dir)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.mat") if p.is_file())


def load_db5_subjects(
    data_dir: str | os.PathLike,
    subjects: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    exercises: Iterable[int] | None = None,
    window_ms: float = DEFAULT_WINDOW_MS,
    step_ms: float = DEFAULT_STEP_MS,
    include_rest: bool = True,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict[str, Any]]:
    """Windows per subject of every DB5 file under ``data_dir``; returns ``(data, info)`` with info
    ``{sample_rate_hz, class_names, files}``. Subjects are named ``S<k>``."""
    files = find_db5_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no NinaPro .mat files under {data_dir}")
    want = None if subjects is None else set(subjects)
    drop, ex_ok = set(exclude), None if exercises is None else {int(e) for e in exercises}
    per: dict[str, list] = {}
    first_file: dict[str, tuple[str, int]] = {}  # subject -> (its first used file, channel count)
    rate = None
    used = []
    movements: set[tuple[int, int]] = set()
    seen: set[str] = set()
    for path in files:
        rec = load_db5_mat(path)
        seen.add(rec["subject"])
        if (want is not None and rec["subject"] not in want) or rec["subject"] in drop:
            continue
        if ex_ok is not None and rec["exercise"] not in ex_ok:
            continue
        if rate is None:
            rate = rec["sample_rate_hz"]
        elif abs(rate - rec["sample_rate_hz"]) > 1e-6:
            raise ValueError(f"{path}: sample rate {rec['sample_rate_hz']} Hz differs from {rate} Hz")
        win, step = window_params(window_ms, step_ms, rate)
        w, y, g = db5_windows(rec, win, step, include_rest)
        n_ch = int(rec["emg"].shape[1])
        earlier, earlier_ch = first_file.setdefault(rec["subject"], (str(path), n_ch))
        if n_ch != earlier_ch:
            raise ValueError(f"{path}: {n_ch} emg channels, but {earlier} of the same subject {rec['subject']} has "
                             f"{earlier_ch}")
        if len(w):
            per.setdefault(rec["subject"], []).append((w, y, g))
            used.append(str(path))
            movements |= {(rec["exercise"], int(s)) for s in np.unique(rec["restimulus"]) if s != 0}
    unknown = sorted((drop | (want or set())) - seen)
    if unknown:
        raise ValueError(f"unknown subjects {unknown}: the NinaPro files under {data_dir} are of {sorted(seen)}")
    if not per:
        raise FileNotFoundError(f"no usable NinaPro recordings under {data_dir} for the chosen subjects/exercises")
    data = {s: tuple(np.concatenate(z) for z in zip(*parts, strict=True)) for s, parts in per.items()}
    names = ([REST_LABEL] if include_rest else []) + [class_name(e, m) for e, m in sorted(movements)]
    return data, {"sample_rate_hz": rate, "class_names": names, "files": used}  # type: ignore[return-value]
