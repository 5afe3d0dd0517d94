"""Trained-model artifacts: safetensors weight bytes + a JSON metadata dict, and the ``Predictor``.

The bytes go into PostgreSQL (bytea) or a directory (``model.safetensors`` + ``meta.json``). Loading never
unpickles anything: weights are read with safetensors and the architecture is rebuilt from ``meta["model"]``.

Metadata keys (all JSON types):
    format, format_version, code_version, created_at (ISO-8601 UTC), size_bytes, sha256,
    classes            class names in model-output order
    channels           device channel indices fed to the model, in order
    n_device_channels  channel count of the raw windows the model expects
    sample_rate_hz, window_ms, step_ms, window, step (window/step in samples)
    filter             filter config (see ``preprocessing.DEFAULT_FILTER``)
    scaler             {"mean": [...], "std": [...]} per used channel
    input_stats        {"mean": [...], "std": [...]} per device channel of the raw training windows (before
                       channel selection and filter: the device's level, e.g. an ADC's DC offset); optional,
                       older artifacts lack it; export checks its files on inputs of this scale
    model              EMGNet constructor hyper-parameters
    training           seed, full training config, chosen epoch count
    metrics            validation metrics of the training run (when given)
    environment        what made it, to reproduce it: python, torch, numpy, scipy and safetensors versions, the
                       CPU architecture and torch's CPU capability (the same seed gives the same weights only with
                       the same code, data, versions and capability), and the code's git commit (``git_commit``,
                       ``git_dirty``: uncommitted changes to tracked files; both null outside a git checkout, e.g.
                       in the Docker image) as it was when this process first saved a model
    job_id, data       (training jobs only) the job, and what it trained on (``ml_model.jobs``)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ml_model import __version__
from ml_model.model import EMGNet
from ml_model.preprocessing import prepare_for_model

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "semg-emgnet"
FORMAT_VERSION = 1
MAX_ARTIFACT_BYTES = 1_000_000
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


_CODE_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _git_state(root: Path = _CODE_ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this code runs from; (None, None) when it is not one (or git is absent).
    Once per process: the code a process runs is what it imported, so a later checkout changes nothing."""
    # --no-optional-locks: a plain `git status` rewrites the index under .git/index.lock, so a git command run in
    # the checkout meanwhile (a commit while tests or the trainer run) failed with "index.lock: File exists"
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if not top or Path(top).resolve() != root.resolve():
            return None, None  # the code is not a checkout of its own, only inside another one (another project's)
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, dirty


def environment() -> dict[str, Any]:
    """What a training ran on (``meta["environment"]``): library versions, CPU, code commit."""
    import safetensors
    import scipy

    commit, dirty = _git_state()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "scipy": scipy.__version__, "safetensors": safetensors.__version__, "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "git_commit": commit, "git_dirty": dirty,
    }


def save_artifact(
    model: EMGNet, meta: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
) -> tuple[bytes, dict[str, Any]]:
    """Serialise ``model`` to safetensors bytes and complete its metadata.

    ``meta`` is the dict returned by ``training.train_model``; ``metrics`` (optional) is stored under
    ``meta["metrics"]``. Returns ``(weights_bytes, meta)``; the input dict is not modified.
    """
    # Clone so tensors that share storage or are views serialise independently.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights = st_save(state, metadata={"format": ARTIFACT_FORMAT, "format_version": str(FORMAT_VERSION)})
    out = copy.deepcopy(dict(meta))
    out["model"] = model.hparams
    if metrics is not None:
        out["metrics"] = copy.deepcopy(dict(metrics))
    out.update(
        format=ARTIFACT_FORMAT,
        format_version=FORMAT_VERSION,
        code_version=__version__,
        environment=environment(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        size_bytes=len(weights),
        sha256=hashlib.sha256(weights).hexdigest(),
    )
    json.dumps(out, allow_nan=False)  # fail here, not later in the database, if something is not JSON
    if len(weights) > MAX_ARTIFACT_BYTES:
        raise ValueError(f"artifact is {len(weights)} bytes; the limit is {MAX_ARTIFACT_BYTES}")
    return weights, out


def load_artifact(weights: bytes, meta: Mapping[str, Any]) -> EMGNet:
    """Rebuild the model from ``meta["model"]`` and load ``weights`` (safetensors bytes); eval mode."""
    if meta.get("format", ARTIFACT_FORMAT) != ARTIFACT_FORMAT:
        raise ValueError(f"not a {ARTIFACT_FORMAT} artifact: format {meta.get('format')!r}")
    if int(meta.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise ValueError(f"artifact format_version {meta['format_version']} is newer than this code supports")
    expected = meta.get("sha256")
    if expected and hashlib.sha256(weights).hexdigest() != expected:
        raise ValueError("artifact weights do not match the sha256 in their metadata")
    hparams = meta.get("model")
    if not isinstance(hparams, Mapping):
        raise ValueError(f"artifact metadata has no 'model' hyper-parameters (got {hparams!r:.80})")
    try:
        model = EMGNet(**hparams)
    except (TypeError, ValueError) as e:  # an unknown or missing key, a value of the wrong kind
        raise ValueError(f"artifact 'model' hyper-parameters {dict(hparams)} do not describe an EMGNet: {e}") from None
    try:
        model.load_state_dict(st_load(bytes(weights)), strict=True)
    except RuntimeError as e:
        raise ValueError(f"artifact weights do not fit its 'model' hyper-parameters {dict(hparams)}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval()


def write_artifact_dir(path: str | os.PathLike, weights: bytes, meta: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``meta.json`` into directory ``path`` (created if needed)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS_FILE).write_bytes(weights)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return folder


def check_new_artifact_dir(path: str | os.PathLike) -> Path:
    """Raise an ``OSError`` with a clear message unless ``write_artifact_dir(path)`` can write a NEW artifact:
    ``path`` must not be a file nor already hold an artifact, and its nearest existing folder must be writable.
    Nothing is created. Long jobs (pretraining) call this before the work, not after it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if (folder / WEIGHTS_FILE).exists() or (folder / META_FILE).exists():
        raise FileExistsError(f"{folder} already holds a model artifact; choose a new folder or remove it first")
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {folder}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {folder}: {parent} is not writable")
    return folder


def read_artifact_dir(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """Read ``(weights_bytes, meta)`` written by ``write_artifact_dir``."""
    folder = Path(path)
    weights = (folder / WEIGHTS_FILE).read_bytes()
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except ValueError as e:  # also UnicodeDecodeError
        raise ValueError(f"{folder / META_FILE}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{folder / META_FILE}: expected a JSON object, got {type(meta).__name__}")
    return weights, meta


class Predictor:
    """Preprocessing + model in one call, for the API and the live worker.

    Built from an artifact ``(weights, meta)``; ``predict_proba`` takes raw device windows exactly as they
    arrive (all device channels, ``meta["window"]`` samples) and applies the artifact's own preprocessing.
    """

    def __init__(self, weights: bytes, meta: Mapping[str, Any]) -> None:
        self.meta = copy.deepcopy(dict(meta))
        self.model = load_artifact(weights, self.meta)
        self.classes: list[str] = list(self.meta["classes"])
        self.window: int = int(self.meta["window"])
        self.n_device_channels: int = int(self.meta["n_device_channels"])

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Predictor:
        return cls(*read_artifact_dir(path))

    def predict_proba(self, raw_windows: np.ndarray) -> np.ndarray:
        """raw_windows: (n, n_device_channels, window) -> (n, n_classes) float32 class probabilities."""
        x = np.asarray(raw_windows)
        if x.ndim == 2:
            raise ValueError("expected a batch (n, channels, samples); wrap one window as x[None]")
        if x.ndim != 3 or x.shape[1] != self.n_device_channels or x.shape[2] != self.window:
            raise ValueError(
                f"expected raw windows (n, {self.n_device_channels}, {self.window}), got shape {x.shape}"
            )
        if len(x) == 0:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(prepare_for_model(x, self.meta)))
            return torch.softmax(logits, dim=1).numpy()

    def predict(self, raw_windows: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(n, n_device_channels, window) -> (class name per window, confidence (n,) float32)."""
        proba = self.predict_proba(raw_windows)
        best = proba.argmax(axis=1)
        return [self.classes[i] for i in best], proba[np.arange(len(best)), best]
