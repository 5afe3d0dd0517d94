"""Pure training core: raw labelled windows in, trained model + metadata + metrics out.

No database, no files: the DB job runner, the ``evaluate`` CLI and the tests all call ``train_model``.

Validation holds out whole repetitions (groups), never random windows: windows overlap by 90 %, so a random
split would put near-copies of validation windows in the training set. Early stopping watches that held-out
group; afterwards the network is retrained on all groups for the chosen number of epochs (``retrain_full``),
because one extra repetition is worth more than the last bit of schedule tuning. The reported validation
metrics always come from the model that did not see the held-out group.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ml_model import preprocessing as pp
from ml_model.model import MAX_CHANNELS, EMGNet, min_window_samples

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float, float, "float | None", "float | None"], None]

DEFAULT_CONFIG: dict[str, Any] = {
    "sample_rate_hz": None,  # required: recorded in the metadata and needed by the filters
    "window_ms": pp.DEFAULT_WINDOW_MS,
    "step_ms": pp.DEFAULT_STEP_MS,
    "channels": None,  # device channel indices to use; None = all
    "filter": dict(pp.DEFAULT_FILTER),
    "model": {"width": 32, "depth": 1, "kernel_size": 9, "dropout": 0.3},
    "max_epochs": 30,
    "patience": 8,
    "min_epochs": 0,  # floor for the epoch count chosen by early stopping (guards against a lucky early peak)
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 1e-2,
    "label_smoothing": 0.1,
    # Augmentation in standardised units: per-window per-channel gain (log-normal), global gain, noise.
    "augment": {"channel_gain_std": 0.15, "gain_std": 0.2, "noise_std": 0.05},
    "val_groups": None,  # groups held out for early stopping; None = default_val_group
    "retrain_full": True,
    "min_windows_per_class": 10,
    # One intra-op thread: these ops are too small to split, and on a busy 2-core host (API, worker, other
    # jobs) two OpenMP threads spin-wait on each other; measured 2.3-14 s with 1 thread vs 84-135 s with 2
    # for the same small training under load.
    "num_threads": 1,
}


class TrainingDataError(ValueError):
    """The training data cannot produce a model; the message says why in user terms."""


class TrainingCancelled(RuntimeError):
    """Raise from a progress callback to stop training cleanly."""


def merge_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with ``config`` (nested dicts merged one level deep)."""
    out = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in (config or {}).items():
        if key not in out:
            raise ValueError(f"unknown training config key {key!r}")
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key].update(value)
        else:
            out[key] = value
    return out


# ---- capture-plan helper ------------------------------------------------------------------------------
def windows_from_capture(
    samples: np.ndarray,
    timestamps_ms: np.ndarray,
    intervals: Sequence[Mapping[str, Any]],
    win: int,
    step: int,
    reaction_ms: float = pp.DEFAULT_REACTION_MS,
    seq: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled windows of one recording cued by a capture plan.

    samples: (n_samples, n_channels); timestamps_ms: (n_samples,); seq: (n_samples,) the samples' sequence
    numbers where lost packets were bridged (``pp.MAX_BRIDGE_FRACTION``): windows spanning more are left out.
    Returns ``(windows (n, n_channels, win), labels (n,) object, groups (n,) int64)``. The group is the
    interval's ``cycle`` when given (not None), else the repetition number of its gesture (k-th cue of that label);
    a rest interval belongs to the cycle of the gesture before it, so holding out a cycle holds out its rests.
    """
    labels, index = pp.label_windows(timestamps_ms, intervals, win, step, reaction_ms)
    order = sorted(range(len(intervals)), key=lambda i: float(intervals[i]["start_ms"]))
    cycle_of = np.zeros(max(len(intervals), 1), dtype=np.int64)
    seen: dict[str, int] = {}
    current = 0
    for i in order:
        iv = intervals[i]
        if iv.get("cycle") is not None:
            cycle_of[i] = int(iv["cycle"])
        elif iv.get("kind") == "rest":
            cycle_of[i] = current
        else:
            label = str(iv["label"])
            cycle_of[i] = seen.get(label, 0)
            seen[label] = cycle_of[i] + 1
        if iv.get("kind") != "rest":
            current = int(cycle_of[i])
    keep = index >= 0
    if seq is not None:
        keep &= pp.spans_little_loss(seq, win, step)
    windows = pp.make_windows(samples, win, step)[keep]
    return windows, labels[keep], cycle_of[index[keep]]


# ---- validation of inputs -----------------------------------------------------------------------------
def _check_inputs(
    windows: Any, labels: Any, groups: Any, cfg: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if windows is None or len(windows) == 0:
        raise TrainingDataError("no training data: no labelled windows were recorded")
    try:
        x = np.asarray(windows) if isinstance(windows, np.ndarray) else np.stack([np.asarray(w) for w in windows])
    except ValueError as exc:
        raise TrainingDataError(f"inconsistent channel counts or window lengths between windows ({exc})") from None
    if x.ndim != 3:
        raise TrainingDataError(f"windows must be (n_windows, n_channels, n_samples), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise TrainingDataError(f"windows must be numeric, got dtype {x.dtype}")
    if not 1 <= x.shape[1] <= MAX_CHANNELS:
        raise TrainingDataError(f"{x.shape[1]} channels; the model supports 1..{MAX_CHANNELS}")
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=(1, 2))))
        raise TrainingDataError(f"{bad} windows contain NaN or infinite values")
    y = np.asarray(labels, dtype=object)
    g = np.asarray(groups)
    if y.shape != (len(x),) or g.shape != (len(x),):
        raise TrainingDataError(
            f"need one label and one group per window: {len(x)} windows, {y.size} labels, {g.size} groups"
        )
    if any(lab is None for lab in y):
        raise TrainingDataError("some windows have no label")
    if cfg["sample_rate_hz"] is None or float(cfg["sample_rate_hz"]) <= 0:
        raise TrainingDataError("config.sample_rate_hz must be given (samples per second of the recording)")
    channels = cfg["channels"]
    if channels is not None and (not channels or min(channels) < 0 or max(channels) >= x.shape[1]):
        raise TrainingDataError(f"channels {channels} do not exist in {x.shape[1]}-channel data")
    return x, y, g


def _check_classes(y: np.ndarray, class_names: Sequence[str], min_per_class: int, where: str) -> None:
    names, counts = np.unique(y.astype(str), return_counts=True)
    if len(names) < 2:
        raise TrainingDataError(f"only one class ({names[0] if len(names) else 'none'}) in the {where}; need 2+")
    few = {n: int(c) for n, c in zip(names, counts, strict=True) if c < min_per_class}
    missing = sorted(set(class_names) - set(names))
    if missing:
        raise TrainingDataError(f"classes {missing} have no windows in the {where}")
    if few:
        raise TrainingDataError(f"too few windows in the {where} for {few}; need at least {min_per_class} each")


def default_val_group(y: np.ndarray, groups: np.ndarray) -> Any:
    """The group (repetition) to hold out: the last one of those holding the most classes, among those whose
    classes all keep windows in the other groups. A last repetition cut short (a session aborted in its first
    rest) holds only rest: held out, it chose the epoch count on rest alone and reported its accuracy as the
    model's. Falls back to the last group."""
    unique_groups = np.unique(groups)
    best, best_n = unique_groups[-1], -1
    for gr in unique_groups:
        if not can_hold_out(y, groups, gr):
            continue  # the only windows of some class: training would lack it
        held = len(set(y[groups == gr].tolist()))
        if held >= best_n:
            best, best_n = gr, held
    return _json_scalar(best)


def can_hold_out(y: np.ndarray, groups: np.ndarray, group: Any) -> bool:
    """Whether every class with windows in ``group`` also has windows outside it (y, groups: (n,) per window)."""
    inside = groups == group
    return not set(y[inside].tolist()) - set(y[~inside].tolist())


def flat_device_channels(scaler: Mapping[str, Sequence[float]], channels: Sequence[int]) -> list[int]:
    """The device channels (of the model's ``channels``) that ``scaler`` found flat (``pp.flat_channels``); a
    TrainingDataError when every one was: the model would ignore them all and answer the same whatever the user
    does (a sensor unpowered or unplugged, every input at a rail)."""
    flat = [channels[i] for i in pp.flat_channels(scaler)]
    if len(flat) == len(channels):
        raise TrainingDataError(f"no channel varied in the training data (channels {', '.join(map(str, flat))} "
                                "constant: is the sensor powered and plugged in?); a model of it would recognise "
                                "nothing: check the sensor and record again")
    return flat


# ---- torch plumbing -----------------------------------------------------------------------------------
@contextmanager
def torch_session(seed: int, num_threads: int):
    """Deterministic, thread-limited torch for the duration of training; global state restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(old_threads)
            torch.use_deterministic_algorithms(old_det)


def augment(xb: torch.Tensor, aug: Mapping[str, float], gen: torch.Generator) -> torch.Tensor:
    """Random gains and noise, (B, C, T) -> (B, C, T); mimics electrode contact and effort changes."""
    b, c, _ = xb.shape
    log_gain = torch.zeros(b, c, 1)
    if aug.get("gain_std"):
        log_gain = log_gain + torch.randn(b, 1, 1, generator=gen) * aug["gain_std"]
    if aug.get("channel_gain_std"):
        log_gain = log_gain + torch.randn(b, c, 1, generator=gen) * aug["channel_gain_std"]
    xb = xb * torch.exp(log_gain)
    if aug.get("mix_std"):
        # Small random cross-talk between channels: (I + E) @ x, as when the electrodes sit slightly differently.
        mix = torch.randn(b, c, c, generator=gen) * aug["mix_std"]
        xb = xb + torch.bmm(mix, xb)
    if aug.get("noise_std"):
        xb = xb + torch.randn(xb.shape, generator=gen) * aug["noise_std"]
    return xb


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float, np.ndarray]:
    """Mean cross-entropy, accuracy and predictions (n,) of ``model`` on (x, y), eval mode."""
    model.eval()
    losses, preds = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            losses.append(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum"))
            preds.append(logits.argmax(1))
    pred = torch.cat(preds)
    return float(torch.stack(losses).sum()) / len(x), float((pred == y).float().mean()), pred.numpy()


def one_cycle(total_steps: int, warmup: float = 0.2, floor: float = 0.02) -> Callable[[int], float]:
    """LR factor per step: linear warm-up, then cosine decay to ``floor`` (works for any step count >= 1)."""
    n_warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        progress = min(1.0, (step - n_warm) / max(1, total_steps - n_warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def weight_decay_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups at one learning rate: weights decayed, biases and batch-norm parameters not."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0}]


def fit(
    model: EMGNet,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: list[dict[str, Any]],
    n_epochs: int,
    *,
    batch_size: int,
    augment_cfg: Mapping[str, float],
    label_smoothing: float,
    gen: torch.Generator,
    lr_warmup: float = 0.1,
    warmup_epochs: int = 0,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: Callable[[int, float, float, float | None, float | None], bool] | None = None,
    sample_weight: torch.Tensor | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> None:
    """The one training loop (user models, pretraining, fine-tuning): AdamW over ``groups`` with a one-cycle LR.

    x: (n, C, win) standardised windows, y: (n,) class indices. ``groups`` are AdamW parameter groups
    (``weight_decay_groups``, or ``transfer.param_groups``). ``lr_warmup`` is the warm-up share of all steps.
    During the first ``warmup_epochs`` only the groups not marked ``"speed": "slow"`` step (the body's
    gradients are not computed). ``on_epoch(epoch, train_loss, train_acc, val_loss, val_acc)`` returns True
    to stop. sample_weight (n,) draws batches with these probabilities instead of a plain permutation (class
    balance). penalty() is added to every batch loss (e.g. L2-SP towards the base weights).
    ``augment_cfg["mixup_alpha"]`` > 0 mixes pairs of windows in each batch.
    """
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(n_epochs * steps_per_epoch, warmup=lr_warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    slow = [p for g in groups if g.get("speed") == "slow" for p in g["params"]]
    mixup_alpha = float(augment_cfg.get("mixup_alpha") or 0.0)
    np_rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=gen))) if mixup_alpha > 0 else None
    for epoch in range(n_epochs):
        frozen = epoch < warmup_epochs
        for p in slow:
            p.requires_grad_(not frozen)
        model.train()
        if sample_weight is not None:
            perm = torch.multinomial(sample_weight, len(x), replacement=True, generator=gen)
        else:
            perm = torch.randperm(len(x), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if len(idx) < 2:  # batch-norm cannot train on one window
                sched.step()
                continue
            xb, yb = augment(x[idx], augment_cfg, gen), y[idx]
            if np_rng is not None:
                # Mixup of two windows (the larger weight on the first): smoother class boundaries.
                lam = float(np_rng.beta(mixup_alpha, mixup_alpha))
                lam = max(lam, 1.0 - lam)
                j = torch.randperm(len(idx), generator=gen)
                xb = lam * xb + (1.0 - lam) * xb[j]
                logits = model(xb)
                loss = lam * loss_fn(logits, yb) + (1.0 - lam) * loss_fn(logits, yb[j])
            else:
                logits = model(xb)
                loss = loss_fn(logits, yb)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        for p in slow:
            p.requires_grad_(True)
        val_loss = val_acc = None
        if val is not None:
            val_loss, val_acc, _ = evaluate(model, *val)
        if on_epoch is not None and on_epoch(epoch, total_loss / max(seen, 1), correct / max(seen, 1), val_loss, val_acc):
            break


# ---- public entry point -------------------------------------------------------------------------------
def train_model(
    windows: np.ndarray,
    labels: Sequence[Any],
    groups: Sequence[Any],
    config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    progress_callback: ProgressCallback | None = None,
    class_names: Sequence[str] | None = None,
    init_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> tuple[EMGNet, dict[str, Any], dict[str, Any]]:
    """Train the gesture CNN on raw labelled windows.

    windows: (n, n_device_channels, win) raw samples (any numeric dtype); labels: (n,) class names;
    groups: (n,) repetition/cycle id of each window (whole groups are held out for validation).
    config: overrides of ``DEFAULT_CONFIG`` (``sample_rate_hz`` is required).
    progress_callback(epoch, n_epochs, train_loss, train_acc, val_loss, val_acc) is called after every epoch
    (1-based epoch; val_* are None while retraining on all data); raising from it (e.g. ``TrainingCancelled``)
    aborts training and propagates.
    class_names: output order of the classes; default sorted label names.
    init_state_dict: start from these weights (fine-tuning) instead of a random init; must match the
    architecture from ``config["model"]`` and the class count.

    Returns ``(model, meta, metrics)``: the model in eval mode; ``meta`` everything serving needs (see
    ``ml_model.artifacts``); ``metrics``: ``accuracy`` (= ``val_accuracy``), ``per_class_accuracy`` and
    ``confusion_matrix`` of the held-out repetition, measured on the early-stopped model that did not see it
    (the returned model is then retrained on all data when ``retrain_full``), plus epochs and timings.
    Raises ``TrainingDataError`` for unusable data.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg = merge_config(config)
    x_raw, y_names, g = _check_inputs(windows, labels, groups, cfg)
    classes = [str(c) for c in (class_names if class_names is not None else sorted({str(v) for v in y_names}))]
    if len(set(classes)) != len(classes):
        raise TrainingDataError(f"duplicate class names {classes}")
    y_str = y_names.astype(str)
    unknown = sorted(set(y_str) - set(classes))
    if unknown:
        raise TrainingDataError(f"labels {unknown} are not in class_names {classes}")
    _check_classes(y_str, classes, int(cfg["min_windows_per_class"]), "training data")

    sample_rate = float(cfg["sample_rate_hz"])
    win = int(x_raw.shape[2])
    _, step = pp.window_params(cfg["window_ms"], cfg["step_ms"], sample_rate)
    channels = list(range(x_raw.shape[1])) if cfg["channels"] is None else [int(c) for c in cfg["channels"]]

    unique_groups = np.unique(g)
    if len(unique_groups) < 2:
        raise TrainingDataError("need at least 2 repetitions (groups) so one can be held out for validation")
    val_groups = [default_val_group(y_str, g)] if cfg["val_groups"] is None else list(cfg["val_groups"])
    is_val = np.isin(g, val_groups)
    if not is_val.any() or is_val.all():
        raise TrainingDataError(f"validation groups {val_groups} must hold some but not all windows")
    _check_classes(y_str[~is_val], classes, 1, "training part (without the validation repetition)")

    meta: dict[str, Any] = {
        "classes": classes,
        "channels": channels,
        "n_device_channels": int(x_raw.shape[1]),
        "sample_rate_hz": sample_rate,
        "window_ms": float(cfg["window_ms"]),
        "step_ms": float(cfg["step_ms"]),
        "window": win,
        "step": step,
        "filter": pp.filter_config(cfg["filter"]),
        "input_stats": pp.input_stats(x_raw),
    }
    # The scaler is fit on the training part only, then kept for the retrain so validation stays honest
    # and the final model sees inputs on the same scale.
    unscaled = pp.prepare_unscaled(x_raw, meta)
    meta["scaler"] = pp.fit_standardizer(unscaled, ~is_val)
    if flat := flat_device_channels(meta["scaler"], channels):
        log.warning("channels %s are flat in the training data (electrode off?): the model ignores them", flat)
    x_all = torch.from_numpy(pp.apply_standardizer(unscaled, meta["scaler"]))
    del unscaled
    class_index = {c: i for i, c in enumerate(classes)}
    y_all = torch.from_numpy(np.array([class_index[v] for v in y_str], dtype=np.int64))
    tr, va = torch.from_numpy(~is_val), torch.from_numpy(is_val)

    hparams = {"n_channels": len(channels), "n_classes": len(classes), **cfg["model"]}
    min_samples = min_window_samples(hparams)
    if win < min_samples:
        raise TrainingDataError(
            f"windows of {win} samples are too short for the model (needs {min_samples}); use a longer window_ms"
        )
    max_epochs, patience = int(cfg["max_epochs"]), int(cfg["patience"])
    log.info(
        "training %d windows (%d validation, groups %s), %d channels x %d samples, classes %s",
        len(x_all), int(is_val.sum()), val_groups, len(channels), win, classes,
    )

    def new_model() -> EMGNet:
        model = EMGNet(**hparams)
        if init_state_dict is not None:
            try:
                model.load_state_dict(init_state_dict)
            except RuntimeError as exc:
                raise ValueError(f"init_state_dict does not fit the model {hparams}: {exc}") from None
        return model

    def run(model: EMGNet, sel: torch.Tensor | None, n_epochs: int, val, on_epoch) -> None:
        x, y = (x_all, y_all) if sel is None else (x_all[sel], y_all[sel])
        # A user model warms up over 0.2 of its steps (fine-tuning and pretraining: 0.1), as it always has.
        fit(model, x, y, weight_decay_groups(model, float(cfg["lr"]), float(cfg["weight_decay"])),
            n_epochs, batch_size=int(cfg["batch_size"]), augment_cfg=cfg["augment"],
            label_smoothing=float(cfg["label_smoothing"]), gen=gen, lr_warmup=0.2, val=val, on_epoch=on_epoch)

    with torch_session(seed, int(cfg["num_threads"])):
        gen = torch.Generator().manual_seed(seed)
        model = new_model()
        best = {"epoch": 0, "val_loss": math.inf, "val_acc": 0.0, "state": copy.deepcopy(model.state_dict())}
        ran = {"epochs": 0}

        def on_val_epoch(epoch: int, tl: float, ta: float, vl: float | None, vacc: float | None) -> bool:
            # Select on validation accuracy, ties broken by loss: loss alone over-punishes confident errors.
            ran["epochs"] = epoch + 1
            if (vacc, -vl) > (best["val_acc"], -best["val_loss"]):
                best.update(epoch=epoch + 1, val_loss=vl, val_acc=vacc, state=copy.deepcopy(model.state_dict()))
            log.debug("epoch %d/%d loss %.4f acc %.4f val_loss %.4f val_acc %.4f", epoch + 1, max_epochs, tl, ta, vl, vacc)
            if progress_callback is not None:
                progress_callback(epoch + 1, max_epochs, tl, ta, vl, vacc)
            return epoch + 1 - best["epoch"] >= patience and epoch + 1 >= int(cfg["min_epochs"])

        run(model, tr, max_epochs, (x_all[va], y_all[va]), on_val_epoch)
        model.load_state_dict(best["state"])
        val_loss, val_acc, val_pred = evaluate(model, x_all[va], y_all[va])
        metrics = class_metrics(y_all[va].numpy(), val_pred, classes)
        metrics.update(
            val_loss=val_loss, val_groups=[_json_scalar(v) for v in val_groups], best_epoch=best["epoch"],
            n_train_windows=int((~is_val).sum()), n_val_windows=int(is_val.sum()),
        )

        retrain = bool(cfg["retrain_full"])
        if retrain:
            n_full = max(1, best["epoch"], min(int(cfg["min_epochs"]), max_epochs))
            # Epoch numbers continue after the last validated epoch, so progress never jumps backwards.
            done = ran["epochs"]

            def on_full_epoch(epoch: int, tl: float, ta: float, vl: float | None, vacc: float | None) -> bool:
                if progress_callback is not None:
                    progress_callback(done + epoch + 1, done + n_full, tl, ta, None, None)
                return False

            model = new_model()
            run(model, None, n_full, None, on_full_epoch)
        model.eval()

    metrics["val_accuracy"] = metrics["accuracy"]
    metrics["retrained_on_all"] = retrain
    metrics["final_epochs"] = n_full if retrain else best["epoch"]
    metrics["train_seconds"] = time.perf_counter() - t0
    # CPU time of this process: a fairer speed figure than wall time on a shared machine.
    metrics["train_cpu_seconds"] = time.process_time() - cpu0
    meta["model"] = hparams
    meta["training"] = {
        "seed": seed, "config": jsonable(cfg), "best_epoch": best["epoch"], "epochs": metrics["final_epochs"],
        "retrained_on_all": retrain,
    }
    log.info(
        "validation accuracy %.4f at epoch %d, retrained on all: %s, %.1f s",
        metrics["accuracy"], best["epoch"], retrain, metrics["train_seconds"],
    )
    return model, meta, metrics


def class_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class accuracy (recall) and confusion matrix rows=true, cols=predicted."""
    k = len(classes)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    support = cm.sum(axis=1)
    per_class = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "per_class_accuracy": per_class,
        "confusion_matrix": {"classes": list(classes), "matrix": cm.tolist()},
    }


def evaluate_model(model: nn.Module, x: np.ndarray, labels: Sequence[Any], classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of ``model`` on prepared windows x (n, C, T) with class-name labels (n,)."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[str(v)] for v in labels], dtype=np.int64)
    _, _, pred = evaluate(model, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y))
    return class_metrics(y, pred, classes)


def _json_scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return _json_scalar(obj)
