"""Peak memory of training a user's model on a lot of recordings.

A researcher's job on 40 capture sessions of 3 minutes (8 channels at 500 Hz, the default 250 ms windows every
25 ms) trains on 228 k windows (457 MB of int16). This builds windows of that size (synthetic EMG-like signal,
3 gestures + REST, 10 repetitions per session), runs ``training.train_model`` for ``--epochs`` epochs and reports
the process's peak RSS (its windows are held all along, so the baseline is included).

    python bench/train_memory.py [--sessions 40] [--epochs 1] [--rate 500] [--channels 8]

The LAST stdout line is one JSON object: windows, windows_mb, peak_rss_mb, seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml_model import preprocessing as pp  # noqa: E402
from ml_model import training  # noqa: E402

SESSION_S = 180.0


def windows(sessions: int, rate: float, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    win, step = pp.window_params(pp.DEFAULT_WINDOW_MS, pp.DEFAULT_STEP_MS, rate)
    per_session = int((SESSION_S * rate - win) // step) + 1
    n = sessions * per_session
    rng = np.random.default_rng(seed)
    classes = np.array(["REST", "fist", "open hand", "pinch"], dtype=object)
    # 60 cues per session (rest/gesture alternating), 10 repetitions of each gesture
    cue = (np.arange(per_session) * 60 // per_session)
    label_idx = np.where(cue % 2 == 0, 0, 1 + (cue // 2) % 3)
    labels = np.tile(classes[label_idx], sessions)
    groups = np.tile(cue // 6, sessions).astype(np.int64)
    x = np.empty((n, channels, win), dtype=np.int16)
    gain = np.array([120.0, 700.0, 500.0, 900.0])[np.tile(label_idx, sessions)]
    for i in range(0, n, 4096):  # filled in slices: the generator's float64 never holds them all
        k = slice(i, min(n, i + 4096))
        noise = rng.standard_normal((k.stop - k.start, channels, win))
        x[k] = (2048 + gain[k, None, None] * (0.5 + 0.1 * np.arange(channels))[None, :, None] * noise).astype(np.int16)
    return x, labels, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--channels", type=int, default=8)
    a = ap.parse_args()
    x, y, g = windows(a.sessions, a.rate, a.channels)
    print(f"{len(x)} windows ({x.nbytes >> 20} MB int16); training {a.epochs} epoch(s)", file=sys.stderr)
    t = time.perf_counter()
    training.train_model(x, y, g, {"sample_rate_hz": a.rate, "max_epochs": a.epochs, "retrain_full": False})
    print(json.dumps({"sessions": a.sessions, "windows": len(x), "windows_mb": x.nbytes >> 20,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "seconds": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
