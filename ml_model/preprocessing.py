"""Signal preprocessing shared by training and serving.

Every function is pure and vectorised (array in, array out). ``prepare_for_model`` is the single entry point
that turns raw device windows into model input; training calls it on its training windows and the
``Predictor`` calls it on live windows, so the two can never drift apart.

Conventions: a *recording* is ``(n_samples, n_channels)``; a batch of *windows* is
``(n_windows, n_channels, win)`` (channels first, as the CNN expects).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REST_LABEL = "REST"
DEFAULT_WINDOW_MS = 250.0
DEFAULT_STEP_MS = 25.0
DEFAULT_REACTION_MS = 300.0
# A lost packet (a gap of at most this fraction of a window) is bridged rather than ending the run: a window across
# it holds the window's worth of received samples before its end (measured samples only; sEMG is noise-like, so
# the seam changes neither the level nor the spectrum the model reads). Windows spanning more lost samples are
# not used. Without it, each lost packet (25 samples on the ESP32 sketch) cost the live worker a whole window
# (250 ms) without decisions, and training every window across it (bench/packet_loss.py: at 5 % loss 96 % of
# windows decided instead of 76 %, 98.3 % vs 98.5 % of them right).
MAX_BRIDGE_FRACTION = 0.25

# Filters are off by default: the Myo armband already band-limits its output, and on the development set
# neither a high-pass nor a notch improved validation accuracy. Devices with a DC drift can turn on
# ``highpass_hz``; the config travels with the model so serving filters exactly like training.
DEFAULT_FILTER: dict[str, Any] = {"highpass_hz": None, "notch_hz": None, "notch_q": 30.0, "order": 4}


# ---- windows ------------------------------------------------------------------------------------------
def window_params(window_ms: float, step_ms: float, sample_rate_hz: float) -> tuple[int, int]:
    """Window length and step in samples for the given durations (rounded, at least 1 sample)."""
    if window_ms <= 0 or step_ms <= 0 or sample_rate_hz <= 0:
        raise ValueError("window_ms, step_ms and sample_rate_hz must be positive")
    # Round half up (Python's round() is half-to-even, which would make 12.5 -> 12 but 13.5 -> 14).
    win = max(1, int(math.floor(window_ms * sample_rate_hz / 1000.0 + 0.5)))
    step = max(1, int(math.floor(step_ms * sample_rate_hz / 1000.0 + 0.5)))
    return win, step


def n_windows(n_samples: int, win: int, step: int) -> int:
    """Number of complete windows ``make_windows`` cuts from ``n_samples`` samples."""
    return 0 if n_samples < win else (n_samples - win) // step + 1


def make_windows(x: np.ndarray, win: int, step: int) -> np.ndarray:
    """Cut a recording into overlapping windows without copying.

    x: (n_samples, n_channels) -> (n_windows, n_channels, win), window i = ``x[i*step : i*step+win].T``.
    Returns a read-only strided view (copy it before writing); an empty batch if the recording is too short.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected (n_samples, n_channels), got shape {x.shape}")
    if win < 1 or step < 1:
        raise ValueError("win and step must be >= 1")
    if x.shape[0] < win:
        return np.empty((0, x.shape[1], win), dtype=x.dtype)
    # sliding_window_view over the sample axis gives (n_samples-win+1, n_channels, win) as a view.
    return np.lib.stride_tricks.sliding_window_view(x, win, axis=0)[::step]


def max_bridged(win: int, fraction: float = MAX_BRIDGE_FRACTION) -> int:
    """How many lost samples a window of ``win`` may span (``fraction`` of it): training and the live worker
    alike bridge such a gap (a window across it holds the ``win`` received samples before its end)."""
    return int(win * fraction)


def spans_little_loss(seq: np.ndarray, win: int, step: int) -> np.ndarray:
    """Which windows of ``make_windows(x, win, step)`` span at most ``max_bridged(win)`` lost samples.

    seq: (n_samples,) sequence number of each received sample (increasing) -> (n_windows,) bool.
    """
    seq = np.asarray(seq)
    if len(seq) < win:
        return np.zeros(0, dtype=bool)
    starts = np.arange(0, len(seq) - win + 1, step)
    return seq[starts + win - 1] - seq[starts] + 1 - win <= max_bridged(win)


# ---- labelling from a capture plan --------------------------------------------------------------------
def label_windows(
    timestamps_ms: np.ndarray,
    intervals: Sequence[Mapping[str, Any]],
    win: int,
    step: int,
    reaction_ms: float = DEFAULT_REACTION_MS,
) -> tuple[np.ndarray, np.ndarray]:
    """Label the windows of a recording from the capture plan that cued it.

    timestamps_ms: (n_samples,) non-decreasing time of each sample.
    intervals: dicts ``{label, start_ms, end_ms, kind: 'rest'|'gesture'}``, half-open ``[start_ms, end_ms)``,
        non-overlapping. The first ``reaction_ms`` after each cue are skipped (the user is still moving).
    Returns ``(labels, interval_index)``, both (n_windows,) for ``make_windows(x, win, step)``: a window gets
    the label of the interval that contains all its samples (``REST`` for rest intervals), otherwise
    ``None`` and index -1 (straddles a boundary, falls in the reaction time, or lies outside the plan).
    """
    t = np.asarray(timestamps_ms, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError("timestamps_ms must be 1-D")
    count = n_windows(t.shape[0], win, step)
    labels = np.full(count, None, dtype=object)
    index = np.full(count, -1, dtype=np.int64)
    if count == 0 or not intervals:
        return labels, index

    starts = np.array([float(iv["start_ms"]) for iv in intervals])
    ends = np.array([float(iv["end_ms"]) for iv in intervals])
    order = np.argsort(starts, kind="stable")
    s_sorted, e_sorted = starts[order], ends[order]
    if np.any(e_sorted < s_sorted) or np.any(s_sorted[1:] < e_sorted[:-1]):
        raise ValueError("capture-plan intervals must have end >= start and must not overlap")

    first = np.arange(count) * step
    t_first, t_last = t[first], t[first + win - 1]
    # Intervals are sorted and disjoint, so only the last one starting at or before the window can hold it.
    k = np.searchsorted(s_sorted, t_first, side="right") - 1
    valid = k >= 0
    kk = np.where(valid, k, 0)
    valid &= (t_first >= s_sorted[kk] + reaction_ms) & (t_last < e_sorted[kk])

    names = np.array(
        [REST_LABEL if iv.get("kind") == "rest" else str(iv["label"]) for iv in intervals], dtype=object
    )
    index[valid] = order[kk[valid]]
    labels[valid] = names[index[valid]]
    return labels, index


# ---- channel selection and filtering ------------------------------------------------------------------
def select_channels(x: np.ndarray, channels: Sequence[int] | None, axis: int = 1) -> np.ndarray:
    """Keep the given channel indices (in that order) along ``axis``; ``None`` keeps all.

    Works for recordings (n_samples, n_channels) and windows (n_windows, n_channels, win), both axis 1.
    """
    if channels is None:
        return x
    channels = list(channels)
    n = x.shape[axis]
    if not channels or min(channels) < 0 or max(channels) >= n:
        raise ValueError(f"channel indices {channels} invalid for {n} channels")
    return np.take(x, channels, axis=axis)


def filter_config(cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Complete filter config (defaults filled in), JSON-serialisable."""
    out = dict(DEFAULT_FILTER)
    out.update(cfg or {})
    return out


def _filter_sos(cfg: Mapping[str, Any], sample_rate_hz: float) -> np.ndarray | None:
    from scipy import signal  # here, not at the top: the live worker uses this module's windowing, not filters

    nyquist = sample_rate_hz / 2.0
    sections = []
    if cfg.get("highpass_hz"):
        hp = float(cfg["highpass_hz"])
        if not 0 < hp < nyquist:
            raise ValueError(f"highpass_hz {hp} must be in (0, {nyquist})")
        sections.append(signal.butter(int(cfg.get("order", 4)), hp, btype="highpass", fs=sample_rate_hz, output="sos"))
    if cfg.get("notch_hz"):
        f0 = float(cfg["notch_hz"])
        if not 0 < f0 < nyquist:
            raise ValueError(f"notch_hz {f0} must be in (0, {nyquist})")
        b, a = signal.iirnotch(f0, float(cfg.get("notch_q", 30.0)), fs=sample_rate_hz)
        sections.append(signal.tf2sos(b, a))
    return np.vstack(sections) if sections else None


def apply_filter(windows: np.ndarray, cfg: Mapping[str, Any] | None, sample_rate_hz: float) -> np.ndarray:
    """Zero-phase filter each window independently along the last axis.

    windows: (..., win) -> same shape, float64. Filtering per window (not per stream) is what lets serving
    reproduce training exactly from nothing but the window. Identity when no filter is configured.
    """
    sos = _filter_sos(filter_config(cfg), sample_rate_hz)
    if sos is None:
        return windows
    win = windows.shape[-1]
    padlen = min(3 * (2 * len(sos) + 1), win - 1)
    from scipy import signal

    return signal.sosfiltfilt(sos, np.asarray(windows, dtype=np.float64), axis=-1, padlen=padlen)


# ---- standardisation ----------------------------------------------------------------------------------
# A channel whose spread is at most this share of the liveliest channel's carries nothing (an electrode off or
# disconnected: constant, at a rail, or one odd sample); the scaler gives it this many times the liveliest's std.
FLAT_RELATIVE_STD = 1e-3
FLAT_STD_FACTOR = 1e6


# Values converted to float64 at a time for channel statistics: a float64 copy of all the windows of a long job
# (40 sessions of 3 min at 500 Hz: 228 k windows, 1.8 GB) and its squared deviations took 4 GB.
STATS_CHUNK_VALUES = 1 << 20


def channel_mean_std(windows: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64) of (n_windows, n_channels, win) windows over windows and samples, as
    ``mean(axis=(0, 2))`` / ``std(axis=(0, 2))`` in float64, of the windows where ``rows`` is True (all if None);
    computed a few MB at a time, never on a float64 copy of them all."""
    w = np.asarray(windows)
    per = max(1, STATS_CHUNK_VALUES // max(1, w.shape[1] * w.shape[2]))
    picked = None if rows is None else np.flatnonzero(np.asarray(rows, dtype=bool))

    def chunks():  # the same chunks as for w[rows], so both give the same figures to the last bit
        for i in range(0, w.shape[0] if picked is None else len(picked), per):
            yield np.asarray(w[i:i + per] if picked is None else w[picked[i:i + per]], dtype=np.float64)

    total, count = np.zeros(w.shape[1]), 0
    for c in chunks():
        total += c.sum(axis=(0, 2))
        count += c.shape[0] * c.shape[2]
    mean = total / count if count else np.full(w.shape[1], np.nan)
    squares = np.zeros(w.shape[1])
    for c in chunks():
        d = c - mean[None, :, None]
        squares += np.square(d, out=d).sum(axis=(0, 2))
    return mean, np.sqrt(squares / count) if count else np.full(w.shape[1], np.nan)


def fit_standardizer(windows: np.ndarray, rows: np.ndarray | None = None) -> dict[str, list[float]]:
    """Per-channel mean/std over all windows and samples (only the windows where ``rows`` is True, if given).

    windows: (n_windows, n_channels, win) -> ``{"mean": [n_channels], "std": [n_channels]}`` (JSON-able).
    Fit on training data only. A flat channel gets a std ``FLAT_STD_FACTOR`` times the liveliest channel's,
    so it stays ~0 whatever it carries later: the model never learnt from it, and an electrode that was off
    while recording and is on at serving must not feed it values in the thousands (``flat_channels``).
    """
    mean, std = channel_mean_std(windows, rows)
    flat = std <= max(FLAT_RELATIVE_STD * float(std.max(initial=0.0)), 1e-8)
    std[flat] = FLAT_STD_FACTOR * max(float(std[~flat].max(initial=0.0)), 1.0)
    return {"mean": mean.tolist(), "std": std.tolist()}


def flat_channels(params: Mapping[str, Sequence[float]]) -> list[int]:
    """Indices of the channels ``fit_standardizer`` found flat, from its result: their std is at least
    ``FLAT_STD_FACTOR`` times the smallest (live channels' stds are within 1/``FLAT_RELATIVE_STD`` of each other),
    or exactly ``FLAT_STD_FACTOR`` (what every channel gets when all are flat)."""
    std = np.asarray(params["std"], dtype=np.float64)
    if std.size == 0:
        return []
    # every channel flat: each got FLAT_STD_FACTOR (times 1, there being no liveliest), none larger than another
    return [int(i) for i in np.flatnonzero((std >= FLAT_STD_FACTOR * float(std.min())) | (std == FLAT_STD_FACTOR))]


def input_stats(raw_windows: np.ndarray) -> dict[str, list[float]]:
    """Per-device-channel mean/std of raw windows (all device channels, before selection and filter).

    Recorded in the artifact as ``input_stats``: the level (e.g. an ADC's DC offset, which a high-pass filter
    removes from everything the scaler sees) and spread of what the device sends, so an export can be checked
    on inputs of the real scale (``export.probe_windows``). Same form as ``fit_standardizer`` (a constant
    channel's std is 1).
    """
    mean, std = channel_mean_std(raw_windows)
    return {"mean": mean.tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist()}


def apply_standardizer(windows: np.ndarray, params: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(n_windows, n_channels, win) -> float32 same shape, ``(x - mean) / std`` per channel."""
    mean = np.asarray(params["mean"], dtype=np.float32)[None, :, None]
    std = np.asarray(params["std"], dtype=np.float32)[None, :, None]
    if windows.shape[1] != mean.shape[1]:
        raise ValueError(f"standardizer has {mean.shape[1]} channels, windows have {windows.shape[1]}")
    out = np.asarray(windows).astype(np.float32)  # a copy, scaled in place (no temporary of the same size)
    out -= mean
    out /= std
    return out


# ---- the one entry point ------------------------------------------------------------------------------
def prepare_unscaled(raw_windows: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Channel selection + filter (everything before standardisation); training fits its scaler on this.

    raw_windows: (n, n_device_channels, win) -> (n, len(meta["channels"]), win) float32/float64.
    """
    x = np.asarray(raw_windows)
    if x.ndim != 3:
        raise ValueError(f"expected raw windows (n, channels, win), got shape {x.shape}")
    x = select_channels(x, meta.get("channels"), axis=1)
    return apply_filter(x.astype(np.float32, copy=False), meta.get("filter"), float(meta["sample_rate_hz"]))


def prepare_for_model(raw_windows: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Raw device windows -> model input; used verbatim by training and by serving.

    raw_windows: (n, n_device_channels, win) -> (n, len(meta["channels"]), win) float32, with the channels,
    filter and scaler recorded in ``meta`` (keys ``channels``, ``filter``, ``sample_rate_hz``, ``scaler``).
    """
    return apply_standardizer(prepare_unscaled(raw_windows, meta), meta["scaler"])


# ---- live electrode check -----------------------------------------------------------------------------
# An electrode that comes off or rails while live is judged over the last FAULT_WINDOW_S of a channel's raw
# samples against the channel's level and spread in the training data (``channel_reference``).
FAULT_WINDOW_S = 1.0
# Flat: a spread at most this share of the training spread. The quietest second of any channel in the Myo set
# (rest, 19 subjects, 1 s windows) has 2.4 % of it; a constant or a stuck reading has 0.
FAULT_FLAT_RATIO = 0.01
# Saturated: at least this share of the samples sit on the second's highest or lowest value, that value being
# FAULT_EXTREME_SIGMAS training stds or more from the training level (clipping at a rail). Real strong gestures
# in the Myo set clip too, but at most 16 % of a second.
FAULT_SATURATED_SHARE = 0.5
FAULT_EXTREME_SIGMAS = 2.0
# More than this share of a model's checked channels failed: its decisions are worth nothing (four of 8 Myo
# channels read as their training level: about half right, at an unchanged confidence; see nat_inference).
FAULT_MAX_SHARE = 0.25
CHANNEL_OK, CHANNEL_FLAT, CHANNEL_SATURATED = 0, 1, 2
FAULT_NAMES = {CHANNEL_FLAT: "flat", CHANNEL_SATURATED: "saturated"}


def channel_faults(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Which channels of a stretch of raw samples look failed: an electrode off, stuck or railing.

    x: (n_samples, n_channels) raw samples of the channels to judge (any order of samples: only their
    distribution counts); mean, std: (n_channels,) each channel's level and spread in the training data.
    Returns (n_channels,) int8: CHANNEL_OK, CHANNEL_FLAT (spread <= FAULT_FLAT_RATIO * std; a constant always)
    or CHANNEL_SATURATED (>= FAULT_SATURATED_SHARE of the samples at an extreme FAULT_EXTREME_SIGMAS * std or
    more from ``mean``). Fewer than 2 samples: all OK (nothing to judge).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (n_samples, n_channels), got shape {x.shape}")
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != (x.shape[1],) or std.shape != (x.shape[1],):
        raise ValueError(f"mean and std must have shape ({x.shape[1]},), got {mean.shape} and {std.shape}")
    out = np.full(x.shape[1], CHANNEL_OK, dtype=np.int8)
    n = x.shape[0]
    if n < 2:
        return out
    xt = np.ascontiguousarray(x.T)  # channels first: reductions along rows are 2-5 times faster (the live worker)
    hi, lo = xt.max(axis=1), xt.min(axis=1)
    flat = (hi == lo) | (xt.std(axis=1) <= FAULT_FLAT_RATIO * std)
    far = FAULT_EXTREME_SIGMAS * std
    at_hi = np.count_nonzero(xt == hi[:, None], axis=1) * (hi - mean >= far)
    at_lo = np.count_nonzero(xt == lo[:, None], axis=1) * (mean - lo >= far)
    out[at_hi + at_lo >= FAULT_SATURATED_SHARE * n] = CHANNEL_SATURATED
    out[flat] = CHANNEL_FLAT
    return out


def too_many_faults(n_failed: int, n_checked: int) -> bool:
    """Whether ``n_failed`` of ``n_checked`` channels failed is too many to decide (FAULT_MAX_SHARE)."""
    return n_failed > FAULT_MAX_SHARE * n_checked


def _constant_before_flat_factor(meta: Mapping[str, Any], channels: Sequence[int]) -> list[int]:
    """Indices (of ``channels``) of the channels an artifact trained before ``FLAT_STD_FACTOR`` found constant:
    the scaler then gave such a channel a std of exactly 1 (and ``input_stats`` its device channel too), which
    ``flat_channels`` does not recognise. Their model reads them at that constant, as it did before an upgrade;
    checked live, a rail or an unwired input it was trained on looked like a failed electrode, and two of four
    made every decision unsure. A channel that varied is not exactly 1 in both but for a fluke."""
    std = meta["scaler"]["std"]
    stats = (meta.get("input_stats") or {}).get("std")
    return [i for i in range(len(channels))
            if float(std[i]) == 1.0 and (stats is None or float(stats[channels[i]]) == 1.0)]


def channel_reference(meta: Mapping[str, Any]) -> dict[str, list] | None:
    """What the live electrode check compares with, from a model's metadata: ``{"channels", "mean", "std"}``,
    the device channels the model reads and that varied in training (a channel flat then is ignored by the
    model, so its electrode does not matter), with their raw level and spread in the training data.

    From ``input_stats`` (raw device channels); artifacts from before it was recorded have only the scaler,
    which is in raw units unless a high-pass filter ran first (then: None, nothing is checked). None as well for
    metadata without a scaler (not a trained model's).
    """
    if "std" not in (meta.get("scaler") or {}):
        return None
    channels = [int(c) for c in meta.get("channels") or range(int(meta["n_device_channels"]))]
    flat = set(flat_channels(meta["scaler"])) | set(_constant_before_flat_factor(meta, channels))
    used = [i for i in range(len(channels)) if i not in flat]
    stats = meta.get("input_stats")
    if stats:
        mean = [float(stats["mean"][channels[i]]) for i in used]
        std = [float(stats["std"][channels[i]]) for i in used]
    elif not filter_config(meta.get("filter")).get("highpass_hz"):
        mean = [float(meta["scaler"]["mean"][i]) for i in used]
        std = [float(meta["scaler"]["std"][i]) for i in used]
    else:
        return None
    return {"channels": [channels[i] for i in used], "mean": mean, "std": std}
