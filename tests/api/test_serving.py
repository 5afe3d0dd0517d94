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


def test_bank_matches_other_stackable_architectures():
    """Deeper nets, padded and pooled layers: the fused/unfolded bank equals each model's own forward."""
    import torch
    from torch import nn

    from ml_model.model import EMGNet

    def net(seed: int, padded: bool) -> nn.Module:
        torch.manual_seed(seed)
        m = EMGNet(5, 4, width=6, depth=2, kernel_size=5)
        if padded:  # a padded temporal conv after the 1x1 mix must not be composed with it
            m.features[2] = nn.Conv1d(6, 6, 5, padding=2, bias=True)
            m.features.insert(5, nn.MaxPool1d(2))
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm1d)):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
        return m.eval()

    for padded in (False, True):
        models = [net(s, padded) for s in range(4)]
        parts = [stacking.extract_parts(m) for m in models]
        assert all(p is not None for p in parts)
        x = torch.randn(9, 5, 40)
        idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2])
        with torch.inference_mode():
            got = stacking.Bank(parts).logits(x, idx)
            ref = torch.cat([models[i](x[j:j + 1]) for j, i in enumerate(idx.tolist())])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_a_deleted_users_model_does_not_come_back_from_a_reload_under_way(api, keys, make_user, clean_db,
                                                                          monkeypatch):
    """DELETE /users/{id} while a reload (as after models.updated) is building that user's model."""
    import threading
    import time

    from ml_model.api import app
    from ml_model.rest import serving
    from ml_model.rest.demo_models import insert_artifact, random_artifact

    registry = app.state.semg.models
    user = make_user()
    weights, meta = random_artifact(8, 200.0, seed=0)
    insert_artifact(clean_db, user["id"], weights, meta)
    real_build = serving.build_served

    def slow_build(row):
        time.sleep(0.5)
        return real_build(row)

    monkeypatch.setattr(serving, "build_served", slow_build)
    t = threading.Thread(target=registry.refresh_user, args=(user["id"],))
    t.start()
    time.sleep(0.2)
    assert api.delete(f"/users/{user['id']}", headers=keys.admin).status_code == 200
    t.join()
    assert registry.cached(user["id"]) is None
    assert api.get(f"/models/{user['id']}", headers=keys.admin).status_code == 404
    assert user["id"] not in [m["user_id"] for m in api.get("/models", headers=keys.admin).json()]


def test_a_broken_newest_model_is_loaded_once_not_per_request(api, keys, make_user, clean_db, monkeypatch):
    """Corrupt weights: the user gets 404s (no model served) without a rebuild from the database per request,
    and the next good model is served as soon as it exists."""
    from ml_model.api import app
    from ml_model.rest.demo_models import insert_artifact

    user = make_user()
    weights, meta = random_artifact(8, 200.0, seed=0)
    insert_artifact(clean_db, user["id"], b"not safetensors", meta)
    builds = []
    real_build = serving.build_served
    monkeypatch.setattr(serving, "build_served", lambda row: builds.append(row["id"]) or real_build(row))
    monkeypatch.setattr(serving, "NEGATIVE_TTL_S", 0.0)  # every request would ask the database again
    body = {"user_id": user["id"], "windows": np.zeros((1, 8, 50)).tolist()}
    answers = [api.post("/predict", json=body, headers=keys.service).status_code for _ in range(5)]
    assert answers == [404] * 5 and len(builds) == 1
    good = insert_artifact(clean_db, user["id"], weights, meta)
    app.state.semg.models.refresh_user(user["id"])
    r = api.post("/predict", json=body, headers=keys.service)
    assert r.status_code == 200 and r.json()["results"][0]["model_id"] == good
