"""Untrained-but-valid model artifacts for tests and benchmarks (latency does not depend on training).

`random_artifact` builds an EMGNet with seeded random weights and complete metadata through the ML core's
own `save_artifact`, so the API loads it exactly like a trained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg2
import torch
from psycopg2.extras import Json

from ml_model import artifacts
from ml_model import preprocessing as pp
from ml_model.model import EMGNet

DEFAULT_CLASSES = ("REST", "fist", "open", "flex", "extend")


def random_artifact(n_channels: int = 8, sample_rate_hz: float = 200.0, classes: Sequence[str] = DEFAULT_CLASSES,
                    window_ms: float = pp.DEFAULT_WINDOW_MS, step_ms: float = pp.DEFAULT_STEP_MS, seed: int = 0,
                    accuracy: float = 0.5, scale: float = 30.0) -> tuple[bytes, dict[str, Any]]:
    win, step = pp.window_params(window_ms, step_ms, sample_rate_hz)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EMGNet(n_channels, len(classes)).eval()  # the trainer's default architecture
        for m in model.modules():  # non-trivial batch-norm statistics, as a trained model has
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    meta = {
        "classes": list(classes), "channels": list(range(n_channels)), "n_device_channels": n_channels,
        "sample_rate_hz": float(sample_rate_hz), "window_ms": float(window_ms), "step_ms": float(step_ms),
        "window": win, "step": step, "filter": pp.filter_config(None),
        "scaler": {"mean": [0.0] * n_channels, "std": [float(scale)] * n_channels},
    }
    return artifacts.save_artifact(model, meta, {"accuracy": accuracy})


def insert_artifact(conn, user_id: int, weights: bytes, meta: dict[str, Any], job_id: int | None = None) -> int:
    """Store an artifact row the way the trainer does; returns its id."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO model_artifacts (user_id, job_id, weights, sha256, size_bytes, classes, channels,
                   sample_rate_hz, window_ms, step_ms, scaler, metrics, metadata)
               VALUES (%s, %s, %s, %s, %s, %s, %s::smallint[], %s, %s, %s, %s, %s, %s) RETURNING id""",
            (user_id, job_id, psycopg2.Binary(weights), meta["sha256"], len(weights), Json(meta["classes"]),
             list(meta["channels"]), meta["sample_rate_hz"], meta["window_ms"], meta["step_ms"],
             Json(meta["scaler"]), Json(meta.get("metrics", {})), Json(meta)),
        )
        return int(cur.fetchone()[0])
