"""Jobs page: a completed job with a model offers it as ONNX, int8 ONNX and TorchScript downloads, and the
files behind the buttons are models that run outside the platform with the platform's predictions."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from ui_checks import assert_clean, texts

from ml_model import artifacts, export, jobs
from ml_model import preprocessing as pp
from ml_model.model import EMGNet

LABELS = {"onnx": "ONNX", "onnx-int8": "ONNX int8", "torchscript": "TorchScript"}


def _real_artifact(seed: int = 0) -> tuple[bytes, dict]:
    """A (random-weight) 8-channel model with complete serving metadata, as a training job stores it."""
    torch.manual_seed(seed)
    model = EMGNet(8, 3).eval()  # the platform's default size
    rng = np.random.default_rng(seed)
    meta = {"classes": ["REST", "fist", "open hand"], "channels": list(range(8)), "n_device_channels": 8,
            "sample_rate_hz": 1000.0, "window_ms": 200.0, "step_ms": 50.0, "window": 200, "step": 50,
            "filter": pp.filter_config(None),
            "scaler": {"mean": rng.normal(0, 5, 8).tolist(), "std": rng.uniform(50, 200, 8).tolist()}}
    return artifacts.save_artifact(model, meta, {"accuracy": 0.9})


@pytest.fixture
def completed_job(seeded):
    import ui_seed

    conn, uid = seeded["conn"], seeded["user"]["id"]
    job = ui_seed.seed_job(conn, uid, [seeded["session"]["id"]], with_model=False)
    weights, meta = _real_artifact()
    artifact_id = jobs.store_artifact(conn, uid, job["id"], weights, meta)
    return {"user_id": uid, "job": job, "artifact_id": artifact_id, "weights": weights, "meta": meta}


@pytest.fixture
def deferred_downloads(monkeypatch):
    """Records the data callables the page hands to st.download_button (they run when the user clicks)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    recorded: dict[str, object] = {}
    original = MediaFileManager.add_deferred

    def add_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kw):
        recorded[file_name] = data_callable
        return original(self, data_callable, mimetype, coordinates, file_name=file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", add_deferred)
    return recorded


def test_completed_job_offers_onnx_int8_and_torchscript(page, completed_job, deferred_downloads):
    job_id, weights, meta = completed_job["job"]["id"], completed_job["weights"], completed_job["meta"]
    at = page("jobs", user_id=completed_job["user_id"])
    at.run()
    at.selectbox(key="jobs_pick").set_value(job_id)
    at.run()
    assert_clean(at)
    assert "Download the model" in texts(at)
    buttons = {b.label: b for b in at.get("download_button")}
    assert set(LABELS.values()) <= set(buttons), list(buttons)

    names = {fmt: f"semg-job{job_id}{export.EXTENSIONS[fmt]}" for fmt in LABELS}
    assert set(names.values()) <= set(deferred_downloads), list(deferred_downloads)
    files = {fmt: deferred_downloads[name]() for fmt, name in names.items()}  # what a click downloads

    x = np.random.default_rng(1).normal(0, 150, (16, 8, 200)).astype(np.float32)
    ref = artifacts.Predictor(weights, meta).predict_proba(x)
    for fmt in ("onnx", "onnx-int8"):
        model = onnx.load_model_from_string(files[fmt])
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == [export.INPUT_NAME]
        probs = export.run_onnx(files[fmt], x)
        assert probs.shape == ref.shape and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        if fmt == "onnx":
            assert float(np.max(np.abs(probs - ref))) <= 1e-4
    assert len(files["onnx-int8"]) < len(files["onnx"])
    ts = torch.jit.load(io.BytesIO(files["torchscript"]))
    with torch.inference_mode():
        assert float(np.max(np.abs(ts(torch.from_numpy(x)).numpy() - ref))) <= 1e-4


def test_jobs_without_a_usable_model_offer_no_download(page, seeded):
    import ui_seed

    conn, uid = seeded["conn"], seeded["user"]["id"]
    failed = ui_seed.seed_job(conn, uid, [seeded["session"]["id"]], status="failed", with_model=False)
    at = page("jobs", user_id=uid)
    at.run()
    at.selectbox(key="jobs_pick").set_value(failed["id"])
    at.run()
    assert_clean(at)
    assert not at.get("download_button")
    assert "Download the model" not in texts(at)


def test_naming_the_download_files_does_not_load_pytorch():
    """The Jobs page imported ml_model.export (and so PyTorch: +180 MB in the UI process, seconds on its first
    render) only to name its download buttons; the names come from a torch-free module."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ui_dir = Path(__file__).resolve().parents[2] / "streamlit_apps"
    code = ("import sys; import data; "
            "print(data.export_file_name(3, 7, 'onnx-int8'), data.export_file_name(None, 7, 'torchscript'), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ui_dir, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": f"{ui_dir}:{ui_dir.parent}"})
    assert out.stdout.split() == ["semg-job3.int8.onnx", "semg-model7.pt", "False"], (out.stdout, out.stderr)


def test_a_model_downloaded_after_a_rename_names_its_outputs_as_the_gestures_are_now(page, seeded, deferred_downloads):
    """Its outputs were named as trained, so a maker running the file on a phone after renaming 'fist' got 'fist',
    as the platform's live recognition no longer answers (it follows renames)."""
    import json

    import ui_seed

    from semg import repo
    conn, uid, session = seeded["conn"], seeded["user"]["id"], seeded["session"]
    job = ui_seed.seed_job(conn, uid, [session["id"]], with_model=False)
    weights, meta = _real_artifact()
    # what the job recorded of the intervals it learnt from (meta["data"])
    intervals = [[iv["id"], iv["label"], iv["repetition"], 0, 1] for iv in repo.get_session(conn, session["id"])["intervals"]]
    jobs.store_artifact(conn, uid, job["id"], weights, {**meta, "data": {"sessions": [{"id": session["id"],
                                                                                     "intervals": intervals}]}})
    fist = next(g for g in repo.list_gestures(conn, uid) if g["name"] == "fist")
    at = page("jobs", user_id=uid)
    at.run()
    at.selectbox(key="jobs_pick").set_value(job["id"])
    at.run()
    before = onnx.load_model_from_string(deferred_downloads[f"semg-job{job['id']}.onnx"]())
    assert json.loads({p.key: p.value for p in before.metadata_props}["semg"])["classes"] == meta["classes"]

    repo.update_gesture(conn, fist["id"], name="power grip")
    at.run()
    assert_clean(at)
    files = {fmt: deferred_downloads[f"semg-job{job['id']}{export.EXTENSIONS[fmt]}"]() for fmt in LABELS}
    for fmt in ("onnx", "onnx-int8"):
        side = json.loads({p.key: p.value for p in onnx.load_model_from_string(files[fmt]).metadata_props}["semg"])
        assert side["classes"] == ["REST", "power grip", "open hand"] and side["renamed"] == {"fist": "power grip"}
    extra = {"semg.json": ""}
    torch.jit.load(io.BytesIO(files["torchscript"]), _extra_files=extra)
    assert json.loads(extra["semg.json"])["classes"] == ["REST", "power grip", "open hand"]
    # the command line's export of the job (TrainMLJob.py export JOB_ID) names them so too
    _, cli_meta, _ = export.load_job_artifact(job["id"])
    assert cli_meta["classes"] == ["REST", "power grip", "open hand"] and cli_meta["renamed"] == {"fist": "power grip"}
