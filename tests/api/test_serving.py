"""Stacked multi-user inference gives exactly each model's own probabilities (no database needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from ml_model.rest import serving, stacking
from ml_model.rest.demo_models import random_artifact


def _served(uid: int, channels: int = 8, rate: float = 200.0, **kw) -> serving.ServedModel:
    w, m = random_artifact(channels, rate, seed=uid, **kw)
    row = dict(id=uid, user_id=uid, job_id=None, weights=w, sha256=m["sha256"], size_bytes=len(w),
               classes=m["classes"], channels=m["channels"], sample_rate_hz=rate, window_ms=m["window_ms"],
               step_ms=m["step_ms"], scaler=m["scaler"], metrics={}, metadata=m, created_at=datetime.now(UTC))
    return serving.build_served(row)


def test_stacked_batches_match_each_predictor():
    models = {u: _served(u) for u in range(1, 31)}
    models.update({u: _served(u, channels=4, rate=500.0) for u in range(31, 36)})
    models[36] = _served(36, classes=("REST", "a", "b"))
    assert all(m.group is not None for m in models.values())
    rng = np.random.default_rng(0)
    items = []
    for m in models.values():
        n = int(rng.integers(1, 40))  # some above SOLO_MIN_WINDOWS: those run on their own
        items.append((m, rng.integers(-120, 120, (n, m.n_device_channels, m.window)).astype(np.float32)))
    banks = serving.Banks()
    for _ in range(2):  # second round reuses the banks
        out = serving.predict_many(items, banks, models)
        for (m, x), p in zip(items, out, strict=True):
            np.testing.assert_allclose(p, m.predictor.predict_proba(x), atol=1e-5)


def test_reloaded_model_rebuilds_the_bank():
    models = {1: _served(1), 2: _served(2)}
    banks = serving.Banks()
    x = np.ones((1, 8, 50), np.float32)
    serving.predict_many([(models[1], x), (models[2], x)], banks, models)
    models[2] = _served(7)  # user 2's new model
    p = serving.predict_many([(models[2], x)], banks, models)[0]
    np.testing.assert_allclose(p, models[2].predictor.predict_proba(x), atol=1e-5)


def test_unknown_architecture_runs_on_its_own(monkeypatch):
    monkeypatch.setattr(stacking, "extract_parts", lambda model: None)
    m = _served(3)
    assert m.group is None and m.parts is None
    x = np.ones((2, 8, 50), np.float32)
    np.testing.assert_allclose(serving.predict_many([(m, x)])[0], m.predictor.predict_proba(x), atol=1e-6)
