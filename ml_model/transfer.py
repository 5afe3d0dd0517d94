"""Fine-tuning a pretrained base model to one user's channels and gesture bank.

A *base* is an ordinary artifact (``model.safetensors`` + ``meta.json``, see ``ml_model.artifacts``) trained on
many people by ``ml_model.pretrain``. ``finetune_model`` turns it into a user model with the same contract as
``training.train_model``: raw labelled windows in, ``(model, meta, metrics)`` out, and the result is served
by the same ``Predictor`` (the user's own scaler, channels and classes are in its metadata).

Adaptation (``adapt_model``):
- body (temporal conv blocks): copied from the base;
- input layer (the 1x1 "spatial filter" conv + its batch-norm): copied when the user's channels map onto the
  base's (same count, or an explicit ``channel_map``), otherwise re-initialised for the new channel count;
- output layer: one row per user class; rows of classes the base knows (same name) are copied, the others
  are new.

Optimisation: AdamW with two learning rates: ``lr_head`` for the output and input layers (new or
re-purposed), ``lr_body`` (lower) for the pretrained body. The first ``warmup_epochs`` train only the output
and input layers (body frozen, its batch-norm statistics still adapting to the user), so random new rows
cannot wreck the pretrained features with large early gradients.

Epoch count: with two or more repetitions (groups), the last one is held out to choose the epoch, then the
model is retrained on everything for that many epochs (like ``train_model``). With ONE repetition there is
nothing independent to validate on, so the end of every recording is held out instead (time split:
the last ``val_fraction`` of each (label, group) run of windows, after a gap so no validation window shares
samples with a training window); ``fixed_epochs`` skips validation and trains exactly that many epochs.
Windows of one (label, group) must be in time order for the time split (``recordings_to_windows`` and
``training.windows_from_capture`` produce them that way).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ml_model import preprocessing as pp
from ml_model.model import MAX_CHANNELS, EMGNet
from ml_model.training import (
    TrainingCancelled,
    TrainingDataError,
    class_metrics,
    default_val_group,
    evaluate,
    fit,
    flat_device_channels,
    jsonable,
    torch_session,
)

log = logging.getLogger(__name__)

__all__ = [
    "FINETUNE_DEFAULTS",
    "TrainingCancelled",
    "TrainingDataError",
    "adapt_model",
    "finetune_model",
    "load_base",
    "time_split",
]

ProgressCallback = Callable[[int, int, float, float, "float | None", "float | None"], None]

# Names of the EMGNet parameters by role (see ml_model.model.EMGNet: features.0 = 1x1 input conv,
# features.1 = its batch-norm, head = output linear layer).
INPUT_PREFIXES = ("features.0.", "features.1.")
HEAD_PREFIX = "head."

FINETUNE_DEFAULTS: dict[str, Any] = {
    "sample_rate_hz": None,  # of the user's data; required
    "window_ms": None,  # None = the base's
    "step_ms": None,  # None = the base's
    "channels": None,  # device channel indices to use; None = all
    "channel_map": None,  # per used user channel, the base input channel it corresponds to (or None)
    "filter": None,  # None = the base's filter config
    "max_epochs": 40,
    "patience": 10,
    "fixed_epochs": None,  # train exactly this many epochs, no validation (default: the base's recipe, <= max_epochs)
    "alpha": None,  # WiSE-FT: final weights = base + alpha * (fine-tuned - base); None = recipe / validation
    "warmup_epochs": 3,  # head/input-only epochs at the start (counted in the epochs above)
    "lr_head": 3e-3,
    "lr_body": 1e-3,
    "l2sp": 0.0,  # pull of the copied weights towards the base's (L2-SP); weight decay then only for new layers
    "weight_decay": 1e-2,
    "label_smoothing": 0.1,
    "batch_size": 64,
    "augment": {"channel_gain_std": 0.15, "gain_std": 0.2, "noise_std": 0.05},
    "val_fraction": 0.3,  # share of each recording held out (time split) when there is only one group
    "retrain_full": True,
    "check_fixed": True,  # with a fixed epoch count, first measure the recipe on the validation part (2x time)
    "min_windows_per_class": 10,
    "num_threads": 1,
}


def merge_finetune_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(FINETUNE_DEFAULTS)
    for key, value in (config or {}).items():
        if key not in out:
            raise ValueError(f"unknown fine-tuning config key {key!r}")
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key].update(value)
        else:
            out[key] = value
    return out


# ---- loading / adapting a base ------------------------------------------------------------------------
def load_base(base: Any) -> tuple[EMGNet, dict[str, Any]]:
    """A base as ``(model, meta)``: accepts an artifact directory path, ``(weights_bytes, meta)`` or
    ``(EMGNet, meta)``."""
    from ml_model import artifacts

    if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__"):
        weights, meta = artifacts.read_artifact_dir(base)
        return artifacts.load_artifact(weights, meta), meta
    model, meta = base
    if isinstance(model, (bytes, bytearray, memoryview)):
        return artifacts.load_artifact(bytes(model), meta), dict(meta)
    if not isinstance(model, EMGNet):
        raise TypeError(f"base must be an artifact dir, (weights, meta) or (EMGNet, meta), got {type(model)}")
    return model, dict(meta)


def adapt_model(
    base_model: EMGNet,
    base_meta: Mapping[str, Any],
    n_channels: int,
    classes: Sequence[str],
    channel_map: Sequence[int | None] | None = None,
    seed: int = 0,
) -> tuple[EMGNet, dict[str, Any]]:
    """A new EMGNet for ``n_channels`` inputs and ``classes`` outputs, initialised from the base.

    channel_map[i] = base input channel that user channel i corresponds to (None: no counterpart). Default:
    identity when the channel counts are equal, otherwise the input layer is re-initialised.
    Returns ``(model, info)``; info says what was copied (JSON-able, stored in the meta).
    """
    hp = dict(base_model.hparams)
    base_channels = int(hp["n_channels"])
    base_classes = [str(c) for c in base_meta.get("classes", [])]
    hp.update(n_channels=int(n_channels), n_classes=len(classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EMGNet(**hp)
    src = base_model.state_dict()
    dst = model.state_dict()

    if channel_map is None and n_channels == base_channels:
        channel_map = list(range(n_channels))
    if channel_map is not None:
        channel_map = [None if c is None else int(c) for c in channel_map]
        if len(channel_map) != n_channels:
            raise ValueError(f"channel_map has {len(channel_map)} entries for {n_channels} channels")
        if any(c is not None and not 0 <= c < base_channels for c in channel_map):
            raise ValueError(f"channel_map {channel_map} refers to channels the base ({base_channels}) lacks")
    mapped = channel_map is not None and any(c is not None for c in channel_map)

    for name, tensor in dst.items():
        if name.startswith(HEAD_PREFIX):
            continue
        if name == "features.0.weight":  # (width, n_channels, 1)
            if mapped:
                w = tensor.clone()
                for i, c in enumerate(channel_map):
                    if c is not None:
                        w[:, i] = src[name][:, c]
                dst[name] = w
            continue
        if name.startswith("features.1.") and not mapped:
            continue  # fresh batch-norm for a fresh input layer
        dst[name] = src[name].clone()

    copied_classes = []
    for i, c in enumerate(classes):
        if c in base_classes:
            j = base_classes.index(c)
            dst["head.weight"][i] = src["head.weight"][j]
            dst["head.bias"][i] = src["head.bias"][j]
            copied_classes.append(c)
    model.load_state_dict(dst)
    info = {
        "input_layer": ("mapped" if channel_map != list(range(n_channels)) else "copied") if mapped else "new",
        "channel_map": channel_map,
        "head_classes_from_base": copied_classes,
        "head_classes_new": [c for c in classes if c not in copied_classes],
    }
    return model, info


def param_groups(model: EMGNet, lr_head: float, lr_body: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: fast (input + head) and slow (body), each split into decayed weights / undecayed rest."""
    groups = {("fast", True): [], ("fast", False): [], ("slow", True): [], ("slow", False): []}
    for name, p in model.named_parameters():
        fast = name.startswith(HEAD_PREFIX) or name.startswith(INPUT_PREFIXES)
        groups[("fast" if fast else "slow", p.ndim > 1)].append(p)
    out = []
    for (speed, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": lr_head if speed == "fast" else lr_body,
                        "weight_decay": weight_decay if decay else 0.0, "speed": speed})
    return out


# ---- weight-space ensembling (WiSE-FT) ----------------------------------------------------------------
def wise_interpolate(model: EMGNet, init_state: Mapping[str, torch.Tensor], alpha: float,
                     adapt_info: Mapping[str, Any], classes: Sequence[str]) -> None:
    """In place: every weight that came from the base becomes ``init + alpha * (fine-tuned - init)``.

    Fine-tuning on a few seconds of data over-fits the repetition it saw; pulling the weights part of the way
    back to the base keeps what the base learned from many people's repetitions (Wortsman et al. 2022).
    Weights that did not come from the base (new output rows, a re-initialised input layer) are kept as
    trained: interpolating towards a random init would only shrink them. Batch-norm statistics are
    interpolated like the weights.
    """
    if alpha >= 1.0:
        return
    state = model.state_dict()
    base_rows = [i for i, c in enumerate(classes) if c in set(adapt_info.get("head_classes_from_base", []))]
    new_input = adapt_info.get("input_layer") == "new"
    for name, value in state.items():
        if not value.is_floating_point() or name not in init_state:
            continue
        if new_input and name.startswith(INPUT_PREFIXES):
            continue
        mixed = init_state[name] + alpha * (value - init_state[name])
        if name.startswith(HEAD_PREFIX):
            rows = torch.tensor(base_rows, dtype=torch.long)
            value = value.clone()
            value[rows] = mixed[rows]
            state[name] = value
        else:
            state[name] = mixed
    model.load_state_dict(state)


ALPHA_GRID = (0.5, 0.75, 1.0)


def _choose_alpha(model: EMGNet, init_state, adapt_info, classes, val) -> float:
    """The interpolation factor with the best validation accuracy (ties: the larger alpha)."""
    trained = copy.deepcopy(model.state_dict())
    best_alpha, best_acc = 1.0, -1.0
    for alpha in sorted(ALPHA_GRID, reverse=True):
        model.load_state_dict(trained)
        wise_interpolate(model, init_state, alpha, adapt_info, classes)
        _, acc, _ = evaluate(model, *val)
        if acc > best_acc + 1e-9:
            best_alpha, best_acc = alpha, acc
    model.load_state_dict(trained)
    return best_alpha


def base_recipe(base_meta: Mapping[str, Any], method: str) -> dict[str, Any] | None:
    """The one-repetition calibration recipe a pretrained base recommends for ``method`` ("finetune" or
    "scratch"): ``{"epochs": int, "alpha": float}`` chosen by ``pretrain.tune_calibration`` on subjects the
    base did not train on; None when the base has none."""
    recipe = ((base_meta.get("pretrain") or {}).get("calibration") or {}).get("recipe") or {}
    out = recipe.get(method)
    return dict(out) if out else None


# ---- validation split ---------------------------------------------------------------------------------
def time_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float, gap: int) -> np.ndarray:
    """Boolean (n,) validation mask: the last ``val_fraction`` of every run of equal (label, group), in the
    given order, with ``gap`` windows before it dropped from both sides (returned as -1 in ``split``).

    Returns an int8 array: 0 train, 1 validation, -1 unused (the gap).
    """
    n = len(labels)
    out = np.zeros(n, dtype=np.int8)
    keys = np.array([f"{lab}\x00{grp}" for lab, grp in zip(labels, groups, strict=True)], dtype=object)
    for key in dict.fromkeys(keys):  # first-seen order
        idx = np.flatnonzero(keys == key)
        n_val = int(round(len(idx) * val_fraction))
        if n_val < 1 or len(idx) - n_val - gap < 1:
            continue
        out[idx[len(idx) - n_val :]] = 1
        out[idx[len(idx) - n_val - gap : len(idx) - n_val]] = -1
    return out


# ---- public entry point -------------------------------------------------------------------------------
def finetune_model(
    windows: np.ndarray,
    labels: Sequence[Any],
    groups: Sequence[Any],
    base: Any,
    config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    progress_callback: ProgressCallback | None = None,
    class_names: Sequence[str] | None = None,
    from_scratch: bool = False,
) -> tuple[EMGNet, dict[str, Any], dict[str, Any]]:
    """Fine-tune ``base`` (artifact dir, ``(weights, meta)`` or ``(EMGNet, meta)``) on a user's raw windows.

    Same contract as ``training.train_model``: windows (n, n_device_channels, win) raw, labels (n,) class
    names, groups (n,) repetition ids; returns ``(model, meta, metrics)`` with the model in eval mode and a
    ``meta`` that ``artifacts.save_artifact`` / ``Predictor`` accept. ``meta["base"]`` records the base.
    ``from_scratch=True`` runs the same recipe from a random init (the base then only supplies the
    architecture and defaults): the fair comparison for the calibration benchmark.
    Raises ``TrainingDataError`` for unusable data; a progress callback may raise ``TrainingCancelled``.
    """
    t0 = time.perf_counter()
    base_model, base_meta = load_base(base)
    cfg = merge_finetune_config(config)
    x = np.asarray(windows)
    if x.ndim != 3 or len(x) == 0:
        raise TrainingDataError(f"windows must be a non-empty (n, channels, samples) batch, got shape {x.shape}")
    if not 1 <= x.shape[1] <= MAX_CHANNELS:
        raise TrainingDataError(f"{x.shape[1]} channels; the model supports 1..{MAX_CHANNELS}")
    if not np.all(np.isfinite(x)):
        raise TrainingDataError("some windows contain NaN or infinite values")
    y_str = np.asarray(labels, dtype=object).astype(str)
    g = np.asarray(groups)
    if y_str.shape != (len(x),) or g.shape != (len(x),):
        raise TrainingDataError(f"need one label and one group per window ({len(x)} windows)")
    if cfg["sample_rate_hz"] is None or float(cfg["sample_rate_hz"]) <= 0:
        raise TrainingDataError("config.sample_rate_hz must be given")
    classes = [str(c) for c in (class_names if class_names is not None else sorted(set(y_str)))]
    if len(classes) < 2:
        raise TrainingDataError(f"only one class ({classes}) in the training data; need 2+")
    unknown = sorted(set(y_str) - set(classes))
    if unknown:
        raise TrainingDataError(f"labels {unknown} are not in class_names {classes}")
    names, counts = np.unique(y_str, return_counts=True)
    missing = sorted(set(classes) - set(names))
    if missing:
        raise TrainingDataError(f"classes {missing} have no windows in the training data")
    few = {n: int(c) for n, c in zip(names, counts, strict=True) if c < int(cfg["min_windows_per_class"])}
    if few:
        raise TrainingDataError(f"too few windows for {few}; need at least {cfg['min_windows_per_class']} each")

    sample_rate = float(cfg["sample_rate_hz"])
    window_ms = float(cfg["window_ms"] if cfg["window_ms"] is not None else base_meta.get("window_ms", pp.DEFAULT_WINDOW_MS))
    step_ms = float(cfg["step_ms"] if cfg["step_ms"] is not None else base_meta.get("step_ms", pp.DEFAULT_STEP_MS))
    win = int(x.shape[2])
    _, step = pp.window_params(window_ms, step_ms, sample_rate)
    channels = list(range(x.shape[1])) if cfg["channels"] is None else [int(c) for c in cfg["channels"]]
    if not channels or min(channels) < 0 or max(channels) >= x.shape[1]:
        raise TrainingDataError(f"channels {channels} do not exist in {x.shape[1]}-channel data")
    filt = pp.filter_config(cfg["filter"] if cfg["filter"] is not None else base_meta.get("filter"))
    base_rate = base_meta.get("sample_rate_hz")
    if base_rate and abs(float(base_rate) - sample_rate) > 1e-6:
        log.warning("base was trained at %s Hz, user data is %s Hz: its temporal filters see a different time "
                    "scale (fine-tuning still adapts them)", base_rate, sample_rate)

    meta: dict[str, Any] = {
        "classes": classes,
        "channels": channels,
        "n_device_channels": int(x.shape[1]),
        "sample_rate_hz": sample_rate,
        "window_ms": window_ms,
        "step_ms": step_ms,
        "window": win,
        "step": step,
        "filter": filt,
        "input_stats": pp.input_stats(x),
    }

    # Epoch count: explicit fixed_epochs > the base's recipe for one repetition > validation. The recipe is
    # capped only by a max_epochs the caller gave: the default cap (40) is for validation-chosen epochs and
    # must not cut a tuned recipe (a scratch recipe can be 64).
    unique_groups = np.unique(g)
    fixed = cfg["fixed_epochs"]
    alpha = cfg["alpha"]
    recipe_source = "config" if fixed is not None else None
    recipe = base_recipe(base_meta, "scratch" if from_scratch else "finetune")
    if fixed is None and len(unique_groups) == 1 and recipe:
        fixed = int(recipe["epochs"])
        if config and config.get("max_epochs") is not None:
            fixed = min(fixed, int(cfg["max_epochs"]))
        alpha = recipe.get("alpha") if alpha is None else alpha
        recipe_source = "base (tuned on its validation subjects)"
        if fixed < int(recipe["epochs"]):
            recipe_source += f", capped at max_epochs {fixed}"
    if from_scratch:
        alpha = 1.0
    # Validation part: a held-out group (default_val_group), or with a single group the end of every recording.
    # With a fixed epoch count it only measures the recipe (a model trained without that part), the returned
    # model never uses it.
    if len(unique_groups) >= 2:
        held_out = default_val_group(y_str, g)
        split = np.isin(g, [held_out]).astype(np.int8)
        val_kind = f"held-out group {jsonable(held_out)!r}"
        val_info: dict[str, Any] = {"val_groups": [jsonable(held_out)]}
    else:
        gap = int(math.ceil(win / max(step, 1)))
        split = time_split(y_str, g, float(cfg["val_fraction"]), gap)
        val_kind = f"time split: last {cfg['val_fraction']:.0%} of each recording (gap {gap} windows)"
        val_info = {"val_time_fraction": float(cfg["val_fraction"]), "val_gap_windows": gap}
        if not (split == 1).any():
            if fixed is None:
                raise TrainingDataError("recordings are too short to hold out their end for validation; "
                                        "record longer or set fixed_epochs")
            split = np.zeros(len(x), dtype=np.int8)
            val_kind = "none (recordings too short to hold out their end)"
    is_tr, is_va = split == 0, split == 1
    if set(classes) - set(y_str[is_tr]):
        if fixed is None:
            raise TrainingDataError(
                f"classes {sorted(set(classes) - set(y_str[is_tr]))} have no windows outside the validation part")
        is_tr, is_va = np.ones(len(x), dtype=bool), np.zeros(len(x), dtype=bool)
        val_kind = "none (a class has no windows outside the validation part)"
    if fixed is not None:
        val_kind = f"{val_kind} (check only); epoch count fixed by the {recipe_source}"

    # The user's own scaler, fit on the training part only (like train_model). A fixed-epoch final model,
    # trained on everything, gets the scaler of everything.
    unscaled = pp.prepare_unscaled(x, meta)
    meta["scaler"] = pp.fit_standardizer(unscaled, is_tr)
    flat_device_channels(meta["scaler"], meta["channels"])  # raises when no channel varied
    x_all = torch.from_numpy(pp.apply_standardizer(unscaled, meta["scaler"]))
    final_scaler = meta["scaler"] if fixed is None or not is_va.any() else pp.fit_standardizer(unscaled)
    x_final = x_all if final_scaler is meta["scaler"] else torch.from_numpy(pp.apply_standardizer(unscaled, final_scaler))
    del unscaled
    index = {c: i for i, c in enumerate(classes)}
    y_all = torch.from_numpy(np.array([index[v] for v in y_str], dtype=np.int64))
    # Class-balanced sampling: a user's rest class is often much longer than any gesture.
    y_np = y_all.numpy()
    freq = np.bincount(y_np, minlength=len(classes)).astype(np.float64)
    sample_weight = torch.from_numpy(1.0 / freq[y_np])

    channel_map = cfg["channel_map"]
    base_channels = base_meta.get("channels")
    n_in = len(channels)
    if (channel_map is None and base_channels is not None and channels != list(base_channels)
            and base_meta.get("n_device_channels") == x.shape[1]):
        # Same kind of device, another channel selection: electrode c of the user is electrode c of the base.
        channel_map = [list(base_channels).index(c) if c in base_channels else None for c in channels]

    def new_model() -> tuple[EMGNet, dict[str, Any]]:
        if from_scratch:
            hp = {**base_model.hparams, "n_channels": n_in, "n_classes": len(classes)}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return EMGNet(**hp), {"input_layer": "new", "head_classes_from_base": [], "scratch": True}
        return adapt_model(base_model, base_meta, n_in, classes, channel_map, seed)

    epochs_max = int(fixed if fixed is not None else cfg["max_epochs"])
    warm = 0 if from_scratch else int(cfg["warmup_epochs"])
    lr_body = float(cfg["lr_head"] if from_scratch else cfg["lr_body"])
    l2sp = 0.0 if from_scratch else float(cfg["l2sp"])

    def run(model: EMGNet, sel: np.ndarray, n_epochs: int, val, on_epoch, xs: torch.Tensor | None = None) -> None:
        xs = x_all if xs is None else xs
        m = torch.from_numpy(sel)
        groups = param_groups(model, float(cfg["lr_head"]), lr_body, float(cfg["weight_decay"]))
        penalty = None
        if l2sp > 0:
            # L2-SP: the copied (slow) weights are pulled towards the base instead of towards zero.
            anchored = [(p, p.detach().clone()) for g in groups if g["speed"] == "slow" for p in g["params"]]
            for g in groups:
                if g["speed"] == "slow":
                    g["weight_decay"] = 0.0

            def penalty() -> torch.Tensor:
                return 0.5 * l2sp * sum(((p - p0) ** 2).sum() for p, p0 in anchored)

        fit(model, xs[m], y_all[m], groups,
            n_epochs, batch_size=int(cfg["batch_size"]), augment_cfg=cfg["augment"],
            label_smoothing=float(cfg["label_smoothing"]), gen=gen, warmup_epochs=min(warm, n_epochs - 1), val=val,
            on_epoch=on_epoch, sample_weight=sample_weight[m], penalty=penalty)

    metrics: dict[str, Any] = {}
    with torch_session(seed, int(cfg["num_threads"])):
        gen = torch.Generator().manual_seed(seed)
        model, adapt_info = new_model()
        init_state = copy.deepcopy(model.state_dict())
        best = {"epoch": epochs_max, "val_loss": math.inf, "val_acc": -1.0, "state": None}
        total = epochs_max
        if fixed is None:
            va = torch.from_numpy(is_va)
            val = (x_all[va], y_all[va])
            patience = int(cfg["patience"])

            def on_val_epoch(epoch, tl, ta, vl, vacc) -> bool:
                if (vacc, -vl) > (best["val_acc"], -best["val_loss"]):
                    best.update(epoch=epoch + 1, val_loss=vl, val_acc=vacc, state=copy.deepcopy(model.state_dict()))
                if progress_callback is not None:
                    progress_callback(epoch + 1, epochs_max, tl, ta, vl, vacc)
                return epoch + 1 >= warm + 1 and epoch + 1 - best["epoch"] >= patience

            run(model, is_tr, epochs_max, val, on_val_epoch)
            model.load_state_dict(best["state"])
            if alpha is None:  # choose the base/fine-tuned interpolation on the validation part too
                alpha = 1.0 if from_scratch else _choose_alpha(model, init_state, adapt_info, classes, val)
            if alpha < 1.0:
                wise_interpolate(model, init_state, alpha, adapt_info, classes)
            val_loss, val_acc, val_pred = evaluate(model, *val)
            metrics = class_metrics(val[1].numpy(), val_pred, classes)
            metrics.update(val_loss=val_loss, best_epoch=best["epoch"], validation=val_kind,
                           n_train_windows=int(is_tr.sum()), n_val_windows=int(is_va.sum()))
            if cfg["retrain_full"]:
                n_full = max(1, best["epoch"])
                total = epochs_max + n_full
                model, _ = new_model()

                def on_full(epoch, tl, ta, vl, vacc) -> bool:
                    if progress_callback is not None:
                        progress_callback(epochs_max + epoch + 1, total, tl, ta, None, None)
                    return False

                run(model, np.ones(len(x), dtype=bool), n_full, None, on_full)
                if alpha < 1.0:
                    wise_interpolate(model, init_state, alpha, adapt_info, classes)
        else:
            alpha = 1.0 if alpha is None else float(alpha)
            checked = bool(is_va.any()) and bool(cfg["check_fixed"])
            total = 2 * epochs_max if checked else epochs_max

            def on_fixed(offset: int, with_val: bool):
                def cb(epoch, tl, ta, vl, vacc) -> bool:
                    if progress_callback is not None:
                        progress_callback(offset + epoch + 1, total, tl, ta, vl if with_val else None,
                                          vacc if with_val else None)
                    return False
                return cb

            metrics = {"accuracy": None, "n_val_windows": 0}
            if checked:  # the recipe on this person: train without the validation part, measure on it
                va = torch.from_numpy(is_va)
                val = (x_all[va], y_all[va])
                if epochs_max > 0:
                    run(model, is_tr, epochs_max, val, on_fixed(0, True))
                wise_interpolate(model, init_state, alpha, adapt_info, classes)
                val_loss, _, val_pred = evaluate(model, *val)
                metrics = {**class_metrics(val[1].numpy(), val_pred, classes), "val_loss": val_loss,
                           "n_val_windows": int(is_va.sum())}
                # the random streams as if no check had run: the served model is the same with or without it
                # (it chooses nothing), not one that changes with how the check's part was cut
                gen.manual_seed(seed)
                torch.manual_seed(seed)
                model, _ = new_model()
            if epochs_max > 0:
                run(model, np.ones(len(x), dtype=bool), epochs_max, None, on_fixed(total - epochs_max, False),
                    xs=x_final)
            wise_interpolate(model, init_state, alpha, adapt_info, classes)
            meta["scaler"] = final_scaler
            # the windows the model measured learnt from (as when validating); unchecked, the served model's
            metrics.update(validation=val_kind, best_epoch=epochs_max,
                           n_train_windows=int(is_tr.sum()) if checked else len(x))
        model.eval()

    metrics["alpha"] = float(alpha)
    if metrics.get("n_val_windows"):  # what the figures were measured on, in fields (the Jobs page says it)
        metrics.update(val_info)
    # the model served was trained anew on all the data after the one measured (validated or checked)
    metrics["retrained_on_all"] = bool(cfg["retrain_full"]) if fixed is None else bool(metrics.get("n_val_windows"))
    metrics["train_seconds"] = time.perf_counter() - t0
    meta["model"] = model.hparams
    meta["training"] = {"seed": seed, "config": jsonable(cfg), "epochs": best["epoch"], "alpha": float(alpha),
                        "validation": val_kind, "method": "scratch" if from_scratch else "finetune"}
    meta["base"] = {
        "sha256": base_meta.get("sha256"),
        "artifact_id": base_meta.get("artifact_id"),
        "created_at": base_meta.get("created_at"),
        "classes": base_meta.get("classes"),
        "channels": base_channels,
        "sample_rate_hz": base_meta.get("sample_rate_hz"),
        "pretrain": {k: v for k, v in (base_meta.get("pretrain") or {}).items() if k in ("subjects", "source")},
        "adaptation": adapt_info,
        "used": not from_scratch,
    }
    log.info("%s: input layer %s, new classes %s; epochs %s (%s), alpha %s, validation accuracy %s; %.1f s",
             meta["training"]["method"], adapt_info.get("input_layer"), adapt_info.get("head_classes_new", classes),
             best["epoch"], val_kind, alpha, metrics.get("accuracy"), metrics["train_seconds"])
    return model, meta, metrics


def load_base_artifact(conn, artifact_id: Any, user_id: int | None) -> tuple[bytes, dict[str, Any]]:
    """``(weights, meta)`` of a ``model_artifacts`` row usable as a base by ``user_id``: a shared base
    (``user_id`` NULL) or one of the user's own models. Raises ``TrainingDataError`` (a user-facing message)."""
    try:
        aid = int(artifact_id)
    except (TypeError, ValueError):
        raise TrainingDataError(f"base_artifact_id must be a model artifact id, got {artifact_id!r}") from None
    with conn.cursor() as cur:
        cur.execute("SELECT user_id, weights, metadata FROM model_artifacts WHERE id = %s", (aid,))
        row = cur.fetchone()
    if row is None:
        raise TrainingDataError(f"base model {aid} does not exist (deleted?)")
    owner, weights, meta = row
    if owner is not None and owner != user_id:
        raise TrainingDataError(f"base model {aid} belongs to another user; use a shared base or your own model")
    meta = dict(meta)
    meta["artifact_id"] = aid
    return bytes(weights), meta


def finetune_from_training_config(
    windows: np.ndarray,
    labels: Sequence[Any],
    groups: Sequence[Any],
    config: Mapping[str, Any] | None = None,
    *,
    base: Any,
    seed: int = 0,
    progress_callback: ProgressCallback | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[EMGNet, dict[str, Any], dict[str, Any]]:
    """Drop-in for ``training.train_model`` (same arguments, a *training* config) that fine-tunes ``base``.

    The data keys of the training config (rate, window, step, channels) carry over, as the caller cut its
    windows with them; the filter only when the config names one, else the base's (the base's filters were
    learned on filtered input); an explicit ``max_epochs`` too; everything else uses ``FINETUNE_DEFAULTS``
    (the from-scratch optimiser settings do not apply to fine-tuning). Used by the DB jobs (param
    ``base_artifact_id``) and ``TrainMLJob.py evaluate --base``.
    """
    from ml_model import training

    given = dict(config or {})
    cfg = training.merge_config(given)
    ft: dict[str, Any] = {k: cfg[k] for k in ("sample_rate_hz", "window_ms", "step_ms", "channels")}
    ft["filter"] = given.get("filter")
    for key in ("max_epochs", "patience", "min_windows_per_class", "num_threads"):
        if key in given:
            ft[key] = given[key]
    return finetune_model(windows, labels, groups, base, ft, seed=seed, progress_callback=progress_callback,
                          class_names=class_names)
