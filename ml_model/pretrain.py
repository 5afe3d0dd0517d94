"""Pretraining a base model on many people, for ``ml_model.transfer`` to fine-tune per user.

Each subject's windows are standardised with that subject's OWN scaler before they are pooled: a fine-tuned
user model standardises with the user's scaler too, so the base body always sees inputs on the same
per-person scale (electrode contact and skin differ far more between people than between gestures).

Validation holds out whole subjects (``val_subjects``, default: ``n_val_subjects`` drawn at random) to choose
the epoch count (at least ``min_epochs``); with ``retrain_full`` the network is then retrained on every subject
for that many epochs.

The result is an ordinary artifact (``artifacts.save_artifact`` / ``write_artifact_dir``), so the
``Predictor`` can also serve it directly; its ``scaler`` is the pooled raw-data scaler of all subjects (a
generic model), and ``meta["pretrain"]`` records the subjects, the data source and the per-subject scaling.
``register_base`` stores it in ``model_artifacts`` with ``user_id`` NULL (a shared base).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_model import datasets
from ml_model import preprocessing as pp
from ml_model.model import EMGNet
from ml_model.training import DEFAULT_CONFIG, TrainingDataError, class_metrics, evaluate, fit, jsonable, torch_session
from ml_model.transfer import param_groups

log = logging.getLogger(__name__)

PRETRAIN_DEFAULTS: dict[str, Any] = {
    "sample_rate_hz": None,
    "window_ms": pp.DEFAULT_WINDOW_MS,
    "step_ms": pp.DEFAULT_STEP_MS,
    "channels": None,
    "filter": dict(pp.DEFAULT_FILTER),
    # The platform's architecture (training.py) with one more temporal block: a base learns from many people
    # and has the data for it (on the Myo set, depth 2 transferred better than 1: 91 vs 89 % in development).
    "model": {**copy.deepcopy(DEFAULT_CONFIG["model"]), "depth": 2},
    "max_epochs": 20,
    "patience": 5,
    # Floor for the epoch count: the held-out subjects' zero-shot accuracy often peaks after a few epochs, but a
    # longer-trained base fine-tunes better (one-repetition calibration on development subjects that were in
    # neither the base nor the benchmark's test fold: 96.1 vs 95.8 % at 8 fine-tuning epochs, 95.2 vs 94.9 % at 32).
    "min_epochs": 14,
    "batch_size": 256,
    "lr": 3e-3,
    "weight_decay": 1e-2,
    "label_smoothing": 0.1,
    "augment": {"channel_gain_std": 0.15, "gain_std": 0.2, "noise_std": 0.05},
    "val_subjects": None,  # subjects held out to choose the epochs and the calibration recipe
    "n_val_subjects": 3,  # when val_subjects is None: this many drawn at random (seeded), at most all but one
    "retrain_full": True,  # then retrain on all subjects for the chosen epoch count (doubles the time)
    "tune_calibration": True,  # choose the one-repetition fine-tuning recipe on the validation subjects
    "num_threads": 1,
}

ProgressCallback = Callable[[int, int, float, float, "float | None", "float | None"], None]
SubjectData = tuple[np.ndarray, np.ndarray, np.ndarray]  # windows (n, C, win), labels (n,), groups (n,)


def merge_pretrain_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(PRETRAIN_DEFAULTS)
    for key, value in (config or {}).items():
        if key not in out:
            raise ValueError(f"unknown pretraining config key {key!r}")
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key].update(value)
        else:
            out[key] = value
    return out


# ---- data sources -------------------------------------------------------------------------------------
def load_myo_subjects(
    data_dir: str | os.PathLike,
    subjects: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    cycles: Iterable[int] | None = None,
    window_ms: float = pp.DEFAULT_WINDOW_MS,
    step_ms: float = pp.DEFAULT_STEP_MS,
) -> dict[str, SubjectData]:
    """Windows of every (chosen) subject of a Myo-armband folder, all sessions, keyed by subject name.

    Groups are ``session_index * 100 + cycle`` so repetitions of different sessions stay apart.
    """
    win, step = pp.window_params(window_ms, step_ms, datasets.MYO_SAMPLE_RATE_HZ)
    known = datasets.list_subjects(data_dir)
    names = list(subjects) if subjects is not None else known
    drop = set(exclude)
    unknown = sorted((drop | set(names)) - set(known))
    if unknown:  # a typo in --exclude-subjects would otherwise silently pretrain on the subject
        raise TrainingDataError(f"unknown subjects {unknown}: {data_dir} has {known}")
    out: dict[str, SubjectData] = {}
    for subject in names:
        if subject in drop:
            continue
        parts = []
        for k, session in enumerate(datasets.list_sessions(data_dir, subject)):
            recs = datasets.load_session(data_dir, subject, session, cycles)
            w, y, g = datasets.recordings_to_windows(recs, win, step)
            parts.append((w, y, g + 100 * k))
        parts = [p for p in parts if len(p[0])]
        if parts:
            out[subject] = tuple(np.concatenate(z) for z in zip(*parts, strict=True))  # type: ignore[assignment]
    if not out:
        raise TrainingDataError(f"no Myo recordings found under {data_dir} (after excluding {sorted(drop)})")
    return out


def detect_format(data_dir: str | os.PathLike) -> str:
    """``"ninapro"`` when the folder holds NinaPro ``.mat`` files, ``"myo"`` for ``classe_<i>.dat`` folders."""
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if root.is_file() and root.suffix == ".mat":
        return "ninapro"
    if next(root.rglob("*.mat"), None) is not None:
        return "ninapro"
    if next(root.rglob("classe_*.dat"), None) is not None:
        return "myo"
    raise TrainingDataError(f"{root}: neither Myo-armband classe_<i>.dat files nor NinaPro .mat files")


def load_subjects(
    data_dir: str | os.PathLike,
    exclude: Iterable[str] = (),
    subjects: Iterable[str] | None = None,
    window_ms: float = pp.DEFAULT_WINDOW_MS,
    step_ms: float = pp.DEFAULT_STEP_MS,
    fmt: str | None = None,
) -> tuple[dict[str, SubjectData], dict[str, Any]]:
    """Per-subject windows from a Myo or NinaPro DB5 folder; returns ``(data, source_info)``."""
    fmt = fmt or detect_format(data_dir)
    if fmt == "myo":
        data = load_myo_subjects(data_dir, subjects, exclude, None, window_ms, step_ms)
        return data, {"source": "myo-armband", "sample_rate_hz": datasets.MYO_SAMPLE_RATE_HZ,
                      "class_names": list(datasets.MYO_CLASS_NAMES)}
    if fmt == "ninapro":
        from ml_model import ninapro

        data, info = ninapro.load_db5_subjects(data_dir, subjects=subjects, exclude=exclude,
                                               window_ms=window_ms, step_ms=step_ms)
        return data, {"source": "ninapro-db5", **info}
    raise ValueError(f"unknown data format {fmt!r}")


# ---- training -----------------------------------------------------------------------------------------
def _channel_sums(windows: np.ndarray) -> np.ndarray:
    """(n, C, win) -> (2, C) float64: per channel, the sum of the values and of their squares."""
    x = np.asarray(windows, dtype=np.float64)
    return np.stack([x.sum(axis=(0, 2)), (x**2).sum(axis=(0, 2))])


def _pooled_stats(sums: np.ndarray, n: int) -> dict[str, list[float]]:
    """{"mean", "std"} per channel from ``_channel_sums`` added over ``n`` values per channel (std >= 1e-8)."""
    mean = sums[0] / n
    std = np.sqrt(np.maximum(sums[1] / n - mean**2, 0.0))
    return {"mean": mean.tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist()}


def pretrain_model(
    subjects: Mapping[str, SubjectData],
    config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    progress_callback: ProgressCallback | None = None,
    source: str | None = None,
) -> tuple[EMGNet, dict[str, Any], dict[str, Any]]:
    """Train a base model on several subjects' raw windows (per-subject standardisation, see module doc).

    Returns ``(model, meta, metrics)`` like ``training.train_model``; ``metrics`` are on the held-out subjects.
    """
    t0 = time.perf_counter()
    cfg = merge_pretrain_config(config)
    if cfg["sample_rate_hz"] is None:
        raise TrainingDataError("config.sample_rate_hz must be given")
    if int(cfg["max_epochs"]) < 1:  # no epoch would be validated: nothing to choose the model from
        raise ValueError(f"max_epochs must be at least 1, got {cfg['max_epochs']}")
    if len(subjects) < 2:
        raise TrainingDataError("pretraining needs at least 2 subjects (one is held out for validation)")
    names = sorted(subjects)
    if cfg["val_subjects"] is not None:
        val_subjects = sorted(str(v) for v in cfg["val_subjects"])
    else:
        k = max(1, min(int(cfg["n_val_subjects"]), len(names) - 1))
        val_subjects = sorted(random.Random(seed).sample(names, k))
    if set(val_subjects) - set(names) or set(val_subjects) >= set(names):
        raise TrainingDataError(f"val_subjects {val_subjects} must be some but not all of {names}")
    first = subjects[names[0]][0]
    n_dev, win = int(first.shape[1]), int(first.shape[2])
    for s in names:
        w = np.asarray(subjects[s][0])
        if w.shape[1:] != (n_dev, win):
            raise TrainingDataError(f"subject {s} has windows {w.shape[1:]}, expected {(n_dev, win)}")
        if not np.issubdtype(w.dtype, np.number):
            raise TrainingDataError(f"subject {s}: windows must be numeric, got dtype {w.dtype}")
        finite = np.isfinite(w).all(axis=(1, 2))
        if not finite.all():  # fail now, not after hours of training when the metrics are not JSON
            raise TrainingDataError(f"subject {s}: {int((~finite).sum())} of {len(w)} windows contain NaN or "
                                    "infinite values")
    all_labels = np.concatenate([np.asarray(subjects[s][1], dtype=object).astype(str) for s in names])
    classes = [str(c) for c in (class_names if class_names is not None else sorted(set(all_labels)))]
    unknown = sorted(set(all_labels) - set(classes))
    if unknown:
        raise TrainingDataError(f"labels {unknown} are not in class_names {classes}")
    missing = [c for c in classes if c not in set(all_labels)]
    if missing:  # the base would claim (and a fine-tuned model copy) output rows it never trained
        raise TrainingDataError(f"classes {missing} have no windows in the pretraining data (subjects {names})")

    sample_rate = float(cfg["sample_rate_hz"])
    _, step = pp.window_params(cfg["window_ms"], cfg["step_ms"], sample_rate)
    channels = list(range(n_dev)) if cfg["channels"] is None else [int(c) for c in cfg["channels"]]
    meta: dict[str, Any] = {
        "classes": classes, "channels": channels, "n_device_channels": n_dev, "sample_rate_hz": sample_rate,
        "window_ms": float(cfg["window_ms"]), "step_ms": float(cfg["step_ms"]), "window": win, "step": step,
        "filter": pp.filter_config(cfg["filter"]),
    }
    index = {c: i for i, c in enumerate(classes)}
    xs, ys, is_val, pooled_sums, raw_sums, pooled_n = [], [], [], 0.0, 0.0, 0
    for s in names:
        w, y, _ = subjects[s]
        raw_sums = raw_sums + _channel_sums(w)
        unscaled = pp.prepare_unscaled(np.asarray(w), meta)
        pooled_sums = pooled_sums + _channel_sums(unscaled)
        pooled_n += unscaled.shape[0] * unscaled.shape[2]  # as many values per channel as the raw windows
        xs.append(pp.apply_standardizer(unscaled, pp.fit_standardizer(unscaled)))
        ys.append(np.array([index[str(v)] for v in y], dtype=np.int64))
        is_val.append(np.full(len(w), s in val_subjects))
    meta["scaler"] = _pooled_stats(pooled_sums, pooled_n)
    meta["input_stats"] = _pooled_stats(raw_sums, pooled_n)
    x_all = torch.from_numpy(np.concatenate(xs))
    y_all = torch.from_numpy(np.concatenate(ys))
    va_np = np.concatenate(is_val)
    del xs
    tr, va = torch.from_numpy(~va_np), torch.from_numpy(va_np)
    hparams = {"n_channels": len(channels), "n_classes": len(classes), **cfg["model"]}
    max_epochs, patience = int(cfg["max_epochs"]), int(cfg["patience"])
    min_epochs = min(int(cfg["min_epochs"]), max_epochs)
    log.info("pretraining on %d subjects (%d windows, validation subjects %s), classes %s",
             len(names), len(x_all), val_subjects, classes)

    def train(model: EMGNet, sel: torch.Tensor, n_epochs: int, val, on_epoch) -> None:
        lr = float(cfg["lr"])
        fit(model, x_all[sel], y_all[sel], param_groups(model, lr, lr, float(cfg["weight_decay"])), n_epochs,
            batch_size=int(cfg["batch_size"]), augment_cfg=cfg["augment"],
            label_smoothing=float(cfg["label_smoothing"]), gen=gen, val=val, on_epoch=on_epoch)

    with torch_session(seed, int(cfg["num_threads"])):
        gen = torch.Generator().manual_seed(seed)
        model = EMGNet(**hparams)
        init_state = copy.deepcopy(model.state_dict())
        best = {"epoch": 0, "val_loss": math.inf, "val_acc": -1.0, "state": None}
        history: list[dict[str, Any]] = []

        def on_epoch(epoch, tl, ta, vl, vacc) -> bool:
            history.append({"epoch": epoch + 1, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": vacc})
            if epoch + 1 >= min_epochs and (vacc, -vl) > (best["val_acc"], -best["val_loss"]):
                best.update(epoch=epoch + 1, val_loss=vl, val_acc=vacc, state=copy.deepcopy(model.state_dict()))
            log.info("pretrain epoch %d/%d loss %.4f acc %.4f val_loss %.4f val_acc %.4f (%.0f s)",
                     epoch + 1, max_epochs, tl, ta, vl, vacc, time.perf_counter() - t0)
            if progress_callback is not None:
                progress_callback(epoch + 1, max_epochs, tl, ta, vl, vacc)
            return epoch + 1 >= min_epochs and epoch + 1 - best["epoch"] >= patience

        train(model, tr, max_epochs, (x_all[va], y_all[va]), on_epoch)
        model.load_state_dict(best["state"])
        val_loss, val_acc, val_pred = evaluate(model, x_all[va], y_all[va])
        metrics = class_metrics(y_all[va].numpy(), val_pred, classes)
        metrics.update(val_loss=val_loss, best_epoch=best["epoch"], validation=f"held-out subjects {val_subjects}",
                       n_train_windows=int(tr.sum()), n_val_windows=int(va.sum()), history=history)
        calibration = None
        if cfg["tune_calibration"]:
            probe_meta = {**meta, "model": hparams}
            calibration = tune_calibration(model, probe_meta, {s: subjects[s] for s in val_subjects}, seed=seed)
        if cfg["retrain_full"]:
            model = EMGNet(**hparams)
            model.load_state_dict(init_state)
            train(model, torch.ones(len(x_all), dtype=torch.bool), max(1, best["epoch"]), None, None)
        model.eval()

    metrics["retrained_on_all"] = bool(cfg["retrain_full"])
    metrics["train_seconds"] = time.perf_counter() - t0
    meta["model"] = hparams
    meta["training"] = {"seed": seed, "config": jsonable(cfg), "epochs": best["epoch"], "method": "pretrain"}
    meta["pretrain"] = {
        "source": source, "subjects": names, "val_subjects": val_subjects, "per_subject_scaling": True,
        "n_windows": int(len(x_all)), "calibration": calibration,
    }
    return model, meta, metrics


CALIBRATION_GRID: dict[str, tuple] = {
    "finetune_epochs": (4, 8, 16, 32),
    "alpha": (0.5, 0.75, 1.0),
    "scratch_epochs": (16, 32, 64),
}


def tune_calibration(
    model: EMGNet,
    meta: Mapping[str, Any],
    val_subjects: Mapping[str, SubjectData],
    *,
    seed: int = 0,
    grid: Mapping[str, Sequence] | None = None,
) -> dict[str, Any] | None:
    """Choose the one-repetition calibration recipe on subjects the base has not trained on.

    For each validation subject: train on its FIRST group (repetition) only, test on the others, for every
    fine-tuning epoch count x WiSE alpha in ``grid`` and, for a fair comparison, every from-scratch epoch
    count. The recipe with the best mean accuracy is returned (ties: fewer epochs, larger alpha) with the
    whole table; ``transfer.finetune_model`` uses it when a user has a single repetition.
    """
    from ml_model import transfer

    grid = {**CALIBRATION_GRID, **(grid or {})}
    classes = list(meta["classes"])
    table: dict[str, dict[str, list[float]]] = {"finetune": {}, "scratch": {}}
    used = []
    t0 = time.perf_counter()
    for subject, (w, y, g) in sorted(val_subjects.items()):
        groups = np.unique(g)
        if len(groups) < 2:
            continue
        tr, te = g == groups[0], g != groups[0]
        y_te = np.asarray(y, dtype=object)[te].astype(str)
        if set(np.asarray(y, dtype=object)[tr].astype(str)) != set(classes):
            continue  # the first repetition lacks a class: cannot simulate calibration on this subject
        used.append(subject)
        base = (model, dict(meta))
        cfg = {"sample_rate_hz": meta["sample_rate_hz"]}

        def accuracy(m: EMGNet, m_meta: Mapping[str, Any], w=w, te=te, y_te=y_te) -> float:
            _, acc, _ = evaluate(m, torch.from_numpy(pp.prepare_for_model(np.asarray(w)[te], m_meta)),
                                 torch.from_numpy(np.array([classes.index(v) for v in y_te])))
            return acc

        for epochs in grid["finetune_epochs"]:
            ft, ft_meta, _ = transfer.finetune_model(w[tr], y[tr], g[tr], base, {**cfg, "fixed_epochs": int(epochs),
                                                     "alpha": 1.0, "check_fixed": False}, seed=seed, class_names=classes)
            init, info = transfer.adapt_model(model, meta, ft.hparams["n_channels"], classes, None, seed)
            trained = copy.deepcopy(ft.state_dict())
            for alpha in grid["alpha"]:
                ft.load_state_dict(trained)
                transfer.wise_interpolate(ft, init.state_dict(), float(alpha), info, classes)
                table["finetune"].setdefault(f"{int(epochs)}:{float(alpha)}", []).append(accuracy(ft.eval(), ft_meta))
        for epochs in grid["scratch_epochs"]:
            sc, sc_meta, _ = transfer.finetune_model(w[tr], y[tr], g[tr], base,
                                                     {**cfg, "fixed_epochs": int(epochs), "check_fixed": False},
                                                     seed=seed, class_names=classes, from_scratch=True)
            table["scratch"].setdefault(str(int(epochs)), []).append(accuracy(sc, sc_meta))
    if not used:
        return None

    def pick(rows: dict[str, list[float]]) -> tuple[str, float]:
        # best mean accuracy; ties -> fewer epochs, then larger alpha
        def key(item):
            parts = item[0].split(":")
            return (round(float(np.mean(item[1])), 6), -int(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0)
        best = max(rows.items(), key=key)
        return best[0], float(np.mean(best[1]))

    ft_key, ft_acc = pick(table["finetune"])
    sc_key, sc_acc = pick(table["scratch"])
    ep, alpha = ft_key.split(":")
    result = {
        "recipe": {"finetune": {"epochs": int(ep), "alpha": float(alpha)}, "scratch": {"epochs": int(sc_key)}},
        "val_accuracy": {"finetune": round(ft_acc, 5), "scratch": round(sc_acc, 5)},
        "subjects": used,
        "protocol": "train on each subject's first repetition only, test on its other repetitions",
        "table": {m: {k: [round(v, 5) for v in vals] for k, vals in rows.items()} for m, rows in table.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("calibration recipe on %s: fine-tune %s epochs, alpha %s (%.4f); scratch %s epochs (%.4f)",
             used, ep, alpha, ft_acc, sc_key, sc_acc)
    return result


def pretrain_from_dir(
    data_dir: str | os.PathLike,
    exclude_subjects: Iterable[str] = (),
    config: Mapping[str, Any] | None = None,
    *,
    subjects: Iterable[str] | None = None,
    seed: int = 0,
    fmt: str | None = None,
    progress_callback: ProgressCallback | None = None,
) -> tuple[EMGNet, dict[str, Any], dict[str, Any]]:
    """Load a Myo/NinaPro folder and pretrain on it (``exclude_subjects`` are left out entirely)."""
    cfg = dict(config or {})
    window_ms = float(cfg.get("window_ms", pp.DEFAULT_WINDOW_MS))
    step_ms = float(cfg.get("step_ms", pp.DEFAULT_STEP_MS))
    data, info = load_subjects(data_dir, exclude_subjects, subjects, window_ms, step_ms, fmt)
    cfg.setdefault("sample_rate_hz", info["sample_rate_hz"])
    return pretrain_model(data, cfg, seed=seed, class_names=info.get("class_names"),
                          progress_callback=progress_callback, source=info["source"])


def save_base(model: EMGNet, meta: Mapping[str, Any], metrics: Mapping[str, Any], out: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """Write the base as an artifact directory (model.safetensors + meta.json); returns (weights, meta)."""
    from ml_model import artifacts

    slim = {k: v for k, v in metrics.items() if k != "history"}
    weights, full = artifacts.save_artifact(model, meta, slim)
    artifacts.write_artifact_dir(out, weights, full)
    return weights, full


def register_base(weights: bytes, meta: Mapping[str, Any], settings=None) -> int:
    """Insert a base into ``model_artifacts`` with ``user_id`` NULL; returns its artifact id."""
    from ml_model import jobs
    from semg import db
    from semg.config import get_settings

    conn = db.connect(settings or get_settings())
    try:
        return jobs.store_artifact(conn, None, None, weights, dict(meta))  # type: ignore[arg-type]
    finally:
        conn.close()


def list_bases(conn) -> list[dict[str, Any]]:
    """Shared bases (user_id NULL) in ``model_artifacts``, newest first: id, created_at, classes, channels,
    sample rate, window and the pretraining subjects/source."""
    with conn.cursor() as cur:
        cur.execute("""SELECT id, created_at, classes, channels, sample_rate_hz, window_ms, size_bytes,
                              metadata->'pretrain', metrics->'accuracy'
                       FROM model_artifacts WHERE user_id IS NULL ORDER BY created_at DESC, id DESC""")
        rows = cur.fetchall()
    keys = ("id", "created_at", "classes", "channels", "sample_rate_hz", "window_ms", "size_bytes", "pretrain",
            "val_accuracy")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def cli_pretrain(
    data_dir: str,
    out: str,
    exclude_subjects: Sequence[str] | str = (),
    register: bool = False,
    epochs: int | None = None,
    seed: int = 0,
    fmt: str | None = None,
    config: Mapping[str, Any] | None = None,
    settings=None,
) -> dict[str, Any]:
    """What ``TrainMLJob.py pretrain`` does; returns a JSON-able summary. ``settings``: for ``register``."""
    from ml_model import artifacts

    artifacts.check_new_artifact_dir(out)  # before the training, not after it
    if register:  # an unreachable database is said now, not after the training (psycopg2.OperationalError)
        from semg import db
        from semg.config import get_settings

        db.connect(settings or get_settings()).close()
    if isinstance(exclude_subjects, str):
        exclude_subjects = [s for s in exclude_subjects.replace(",", " ").split() if s]
    cfg = dict(config or {})
    if epochs is not None:
        cfg["max_epochs"] = int(epochs)
    model, meta, metrics = pretrain_from_dir(data_dir, list(exclude_subjects), cfg, seed=seed, fmt=fmt)
    weights, meta = save_base(model, meta, metrics, out)
    summary = {
        "out": str(out), "size_bytes": len(weights), "sha256": meta["sha256"], "subjects": meta["pretrain"]["subjects"],
        "val_subjects": meta["pretrain"]["val_subjects"], "val_accuracy": metrics["accuracy"],
        "best_epoch": metrics["best_epoch"], "train_seconds": round(metrics["train_seconds"], 1),
        "channels": meta["channels"], "sample_rate_hz": meta["sample_rate_hz"], "window": meta["window"],
    }
    if register:
        import psycopg2

        from semg.db import first_line

        try:
            summary["artifact_id"] = register_base(weights, meta, settings)
        except psycopg2.Error as e:  # the base is on disk: say where, the training need not be repeated
            raise ConnectionError(
                f"the base was saved in {out} but not registered ({first_line(e)}); once that is fixed: "
                f"python -c \"from ml_model import artifacts, pretrain; "
                f"print(pretrain.register_base(*artifacts.read_artifact_dir('{out}')))\"") from None
    return summary
