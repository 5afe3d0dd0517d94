"""Fixtures of the ML-core tests: synthetic labelled windows and the (optional) Myo-armband data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlcore_helpers import FAST_CONFIG, SYNTH_CLASSES, synthetic_windows

from ml_model.datasets import MYO_DATA_ENV, default_myo_dir


@pytest.fixture(scope="session")
def synth_data():
    return synthetic_windows()


@pytest.fixture(scope="session")
def trained_synth(synth_data):
    """(model, meta, metrics) trained once on the synthetic data and shared by the artifact tests."""
    from ml_model.training import train_model

    w, y, g = synth_data
    return train_model(w, y, g, FAST_CONFIG, seed=0, class_names=SYNTH_CLASSES)


@pytest.fixture(scope="session")
def myo_dir() -> Path:
    """The Myo-armband pretraining folder, or skip: the data is never copied into the repository."""
    path = default_myo_dir()
    if not (path / "Female0" / "training0").is_dir():
        pytest.skip(f"Myo-armband data not found at {path} (set {MYO_DATA_ENV} to its 'pretraining' folder)")
    return path


@pytest.fixture
def user_device(clean_db):
    """(user, device) for the job tests: a user with test_jobs' gestures and its 4-channel device."""
    from test_jobs import CHANNELS, PATTERNS, RATE

    from semg import repo

    u = repo.create_user(clean_db, "Trainee", "trainee@example.org")
    for g in PATTERNS:
        if g != "REST":
            repo.add_gesture(clean_db, u["id"], g)
    return u, repo.register_device(clean_db, u["id"], CHANNELS, RATE)
