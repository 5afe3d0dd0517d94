"""Synthetic data helpers of the ML-core tests (imported by the tests and their conftest)."""

from __future__ import annotations

import numpy as np

from ml_model import preprocessing as pp

SYNTH_RATE = 200.0
SYNTH_CLASSES = ["REST", "fist", "open"]
# Per-class amplitude of each channel: a distinct muscle pattern per gesture.
SYNTH_PATTERNS = {"REST": [0.1, 0.1, 0.1, 0.1], "fist": [1.0, 0.7, 0.2, 0.1], "open": [0.1, 0.3, 1.0, 0.8]}


def synthetic_windows(reps: int = 3, hold_s: float = 2.0, seed: int = 0, n_channels: int = 4):
    """Raw int16-range windows of 3 gestures x ``reps`` repetitions: (windows, labels, groups)."""
    rng = np.random.default_rng(seed)
    win, step = pp.window_params(pp.DEFAULT_WINDOW_MS, pp.DEFAULT_STEP_MS, SYNTH_RATE)
    n = int(hold_s * SYNTH_RATE)
    ws, ls, gs = [], [], []
    for rep in range(reps):
        for label, amp in SYNTH_PATTERNS.items():
            amp = np.resize(np.asarray(amp), n_channels)
            x = rng.standard_normal((n, n_channels)) * amp * 40 * rng.uniform(0.8, 1.25) + 3.0
            w = pp.make_windows(x.astype(np.int16), win, step)
            ws.append(w)
            ls.append(np.full(len(w), label, dtype=object))
            gs.append(np.full(len(w), rep))
    return np.concatenate(ws), np.concatenate(ls), np.concatenate(gs)


# Tiny, fast config for the synthetic tests: a few epochs are plenty for separable patterns.
FAST_CONFIG = {"sample_rate_hz": SYNTH_RATE, "max_epochs": 4, "patience": 3, "batch_size": 32, "model": {"width": 8}}
