"""Artifacts: safetensors bytes + JSON metadata round-trip (bytes and directory) without pickle, stay small,
and the Predictor's serving path gives exactly what the model gives on training-prepared windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlcore_helpers import synthetic_windows
from safetensors.torch import load as st_load

from ml_model import artifacts
from ml_model import preprocessing as pp
from ml_model.model import EMGNet

REQUIRED_META = {
    "classes", "channels", "n_device_channels", "sample_rate_hz", "window_ms", "step_ms", "window", "step",
    "filter", "scaler", "model", "training", "metrics", "code_version", "created_at", "size_bytes", "sha256",
    "format", "format_version",
}


def test_bytes_round_trip(trained_synth):
    model, meta, metrics = trained_synth
    weights, full = artifacts.save_artifact(model, meta, metrics)
    assert isinstance(weights, bytes) and len(weights) == full["size_bytes"] <= artifacts.MAX_ARTIFACT_BYTES
    assert REQUIRED_META <= set(full)
    assert json.loads(json.dumps(full, allow_nan=False)) == full
    loaded = artifacts.load_artifact(weights, json.loads(json.dumps(full)))
    assert not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # plain safetensors: no pickle anywhere in the format
    assert set(st_load(weights)) == set(model.state_dict())


def test_metadata_records_the_code_commit_and_library_versions(trained_synth):
    """code_version was a constant ("0.1.0") and no library version was kept: a published figure could not be
    tied to the code and the torch that made the model (the same seed gives the same weights only with both)."""
    import platform
    import subprocess
    from pathlib import Path

    import scipy

    model, meta, metrics = trained_synth
    env = artifacts.save_artifact(model, meta, metrics)[1]["environment"]
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__ and env["scipy"] == scipy.__version__
    assert env["python"] == platform.python_version() and env["machine"] == platform.machine()
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    repo = Path(artifacts.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a checkout; the Docker image has none (then both are null)
        assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)
    else:
        assert env["git_commit"] is None and env["git_dirty"] is None

    weights, _ = artifacts.save_artifact(EMGNet(16, 12), _minimal_meta(16, 12))
    assert len(weights) < 200_000


def test_directory_round_trip(tmp_path, trained_synth):
    model, meta, metrics = trained_synth
    weights, full = artifacts.save_artifact(model, meta, metrics)
    folder = artifacts.write_artifact_dir(tmp_path / "m", weights, full)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]
    w2, m2 = artifacts.read_artifact_dir(folder)
    assert w2 == weights and m2 == full
    pred = artifacts.Predictor.from_dir(folder)
    assert pred.classes == meta["classes"]


def test_tampered_weights_are_rejected(trained_synth):
    model, meta, _ = trained_synth
    weights, full = artifacts.save_artifact(model, meta)
    with pytest.raises(ValueError, match="sha256"):
        artifacts.load_artifact(weights[:-1] + b" ", full)


def test_predictor_matches_training_preparation(trained_synth):
    """Golden test: serving (raw windows -> Predictor) == model on the windows training prepared."""
    model, meta, _ = trained_synth
    weights, full = artifacts.save_artifact(model, meta)
    raw, _, _ = synthetic_windows(reps=1, seed=5)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(pp.prepare_for_model(raw, meta))), dim=1).numpy()
    pred = artifacts.Predictor(weights, full)
    got = pred.predict_proba(raw)
    assert got.shape == (len(raw), len(meta["classes"])) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    labels, conf = pred.predict(raw[:3])
    assert all(lab in meta["classes"] for lab in labels) and conf.shape == (3,)
    with pytest.raises(ValueError):
        pred.predict_proba(raw[:, :2])
    assert pred.predict_proba(raw[:0]).shape == (0, len(meta["classes"]))


def test_predictor_applies_filter_like_training(synth_data):
    from mlcore_helpers import FAST_CONFIG

    from ml_model.training import train_model

    w, y, g = synth_data
    cfg = {**FAST_CONFIG, "max_epochs": 1, "channels": [3, 1], "filter": {"highpass_hz": 20.0, "notch_hz": 50.0}}
    model, meta, _ = train_model(w, y, g, cfg)
    pred = artifacts.Predictor(*artifacts.save_artifact(model, meta))
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(pp.prepare_for_model(w[:40], meta))), 1).numpy()
    np.testing.assert_allclose(pred.predict_proba(w[:40]), expected, rtol=1e-5, atol=1e-6)


def _minimal_meta(n_channels: int, n_classes: int) -> dict:
    win, step = pp.window_params(250, 25, 200)
    return {
        "classes": [f"c{i}" for i in range(n_classes)], "channels": list(range(n_channels)),
        "n_device_channels": n_channels, "sample_rate_hz": 200.0, "window_ms": 250.0, "step_ms": 25.0,
        "window": win, "step": step, "filter": pp.filter_config(None),
        "scaler": {"mean": [0.0] * n_channels, "std": [1.0] * n_channels},
    }


def test_metadata_that_does_not_describe_the_model_is_a_clear_error(tmp_path, trained_synth):
    """A hand-edited or foreign meta.json used to end in a TypeError from EMGNet(**meta['model'])."""
    model, meta, _ = trained_synth
    weights, full = artifacts.save_artifact(model, meta)
    cases = [({**full, "model": {**full["model"], "heads": 2}}, "do not describe an EMGNet.*heads"),
             ({**full, "model": {**full["model"], "width": full["model"]["width"] * 2}}, "weights do not fit"),
             ({k: v for k, v in full.items() if k != "model"}, "no 'model' hyper-parameters")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            artifacts.load_artifact(weights, bad)
    folder = artifacts.write_artifact_dir(tmp_path / "m", weights, full)
    (folder / artifacts.META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        artifacts.read_artifact_dir(folder)


def test_recording_the_commit_leaves_the_checkouts_index_alone(tmp_path):
    """A plain `git status` refreshes the index and writes it back under .git/index.lock: a git command run in the
    checkout at that moment (a commit while the tests or the trainer save a model) failed with 'index.lock: File
    exists'. The state is read without taking that lock, and still right."""
    import os
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org",
                               *args], capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    index = tmp_path / ".git" / "index"
    stamp = index.stat().st_mtime_ns
    os.utime(tmp_path / "f.txt", (1_000_000_000, 1_000_000_000))  # same content, stat no longer as indexed
    assert artifacts._git_state(tmp_path) == (git("rev-parse", "HEAD"), False)
    assert index.stat().st_mtime_ns == stamp
    (tmp_path / "f.txt").write_text("b\n")
    assert artifacts._git_state.__wrapped__(tmp_path) == (git("rev-parse", "HEAD"), True)
    # code copied into a folder of another project's checkout (a venv inside it, say) is not that commit
    (tmp_path / "code").mkdir()
    assert artifacts._git_state.__wrapped__(tmp_path / "code") == (None, None)
