"""Loader for the Myo-armband development recordings (Côté-Allard et al., pre-training set).

Layout ``DIR/<subject>/<session>/classe_<i>.dat``: raw little-endian int16, 8 channels interleaved, 200 Hz;
i in 0..27, gesture = i % 7, repetition ("cycle") = i // 7. The data is never copied into the repository;
``default_myo_dir`` finds it next to the repo or through ``SEMG_MYO_DATA``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_model.preprocessing import REST_LABEL, make_windows

MYO_SAMPLE_RATE_HZ = 200.0
MYO_N_CHANNELS = 8
MYO_N_GESTURES = 7
# Output order of the classes; gesture 0 ("neutral") is the platform's rest class.
MYO_CLASS_NAMES = [
    REST_LABEL,
    "radial_deviation",
    "wrist_flexion",
    "ulnar_deviation",
    "wrist_extension",
    "hand_close",
    "hand_open",
]
MYO_DATA_ENV = "SEMG_MYO_DATA"

_FILE_RE = re.compile(r"^classe_(\d+)\.dat$")


@dataclass(frozen=True)
class MyoRecording:
    """One ~5 s hold of one gesture: ``data`` is (n_samples, 8) int16."""

    subject: str
    session: str
    gesture: int
    cycle: int
    data: np.ndarray

    @property
    def label(self) -> str:
        return MYO_CLASS_NAMES[self.gesture]


def default_myo_dir() -> Path:
    """``$SEMG_MYO_DATA`` if set, else ``<repo>/../shared/data/myo-armband/pretraining`` (may not exist)."""
    env = os.environ.get(MYO_DATA_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    return repo.parent / "shared" / "data" / "myo-armband" / "pretraining"


def _folders(path: Path) -> list[str]:
    """Names of the sub-folders, sorted; hidden ones (``.ipynb_checkpoints``, ``.git``) are not data."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_subjects(data_dir: str | os.PathLike) -> list[str]:
    """Subject folder names under ``data_dir``, sorted (hidden folders ignored)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Myo data folder not found: {root}")
    return _folders(root)


def list_sessions(data_dir: str | os.PathLike, subject: str) -> list[str]:
    """Session folder names of one subject, sorted (hidden folders ignored)."""
    return _folders(Path(data_dir) / subject)


def load_session(
    data_dir: str | os.PathLike, subject: str, session: str, cycles: Iterable[int] | None = None
) -> list[MyoRecording]:
    """All recordings of one subject's session (optionally only some cycles), ordered by file index."""
    folder = Path(data_dir) / subject / session
    if not folder.is_dir():
        raise FileNotFoundError(f"session folder not found: {folder}")
    wanted = None if cycles is None else {int(c) for c in cycles}
    found = []
    for path in folder.iterdir():
        m = _FILE_RE.match(path.name)
        if not m:
            continue
        i = int(m.group(1))
        gesture, cycle = i % MYO_N_GESTURES, i // MYO_N_GESTURES
        if wanted is not None and cycle not in wanted:
            continue
        data = np.fromfile(path, dtype="<i2")
        if data.size % MYO_N_CHANNELS:
            raise ValueError(f"{path}: {data.size} values is not a multiple of {MYO_N_CHANNELS} channels")
        found.append((i, MyoRecording(subject, session, gesture, cycle, data.reshape(-1, MYO_N_CHANNELS))))
    return [rec for _, rec in sorted(found, key=lambda item: item[0])]


def recordings_to_windows(
    recordings: Sequence[MyoRecording], win: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window every recording on its own (no window spans two files).

    Returns ``(windows (n, 8, win) int16, labels (n,) object of class names, groups (n,) int64 cycles)``.
    """
    parts, labels, groups = [], [], []
    for rec in recordings:
        w = make_windows(rec.data, win, step)
        parts.append(w)
        labels.append(np.full(len(w), rec.label, dtype=object))
        groups.append(np.full(len(w), rec.cycle, dtype=np.int64))
    if not parts:
        return np.empty((0, MYO_N_CHANNELS, win), np.int16), np.empty(0, object), np.empty(0, np.int64)
    return np.concatenate(parts), np.concatenate(labels), np.concatenate(groups)
