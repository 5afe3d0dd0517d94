"""Export: ONNX (fp32, int8) and TorchScript files reproduce the PyTorch Predictor on raw windows, carry their
own description, and ``TrainMLJob.py export`` writes them from a job's artifact or an artifact dir."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ml_model import artifacts, export, transfer
from ml_model import preprocessing as pp
from ml_model.model import EMGNet

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4


def _trained_artifact(n_channels: int = 6, channels=None, filt=None, seed: int = 0):
    """A small model trained (a few epochs) on separable synthetic windows; returns weights, meta, test data."""
    from test_transfer import CLASSES, synth_subject

    x, y, g = synth_subject(seed, n_channels=n_channels)
    base = (EMGNet(len(channels or range(n_channels)), len(CLASSES)), {"classes": CLASSES})  # platform width
    cfg = {"sample_rate_hz": 200.0, "fixed_epochs": 6, "channels": channels, "filter": filt}
    model, meta, metrics = transfer.finetune_model(x[g < 3], y[g < 3], g[g < 3], base, cfg, class_names=CLASSES,
                                                   from_scratch=True)
    weights, meta = artifacts.save_artifact(model, meta, metrics)
    return weights, meta, x[g == 3], y[g == 3]


@pytest.fixture(scope="module")
def plain():
    return _trained_artifact()


@pytest.fixture(scope="module")
def filtered():
    """Channel subset in a new order + high-pass and notch filters: all must be inside the exported graph."""
    return _trained_artifact(n_channels=6, channels=[4, 0, 2, 5], filt={"highpass_hz": 20.0, "notch_hz": 50.0}, seed=1)


@pytest.mark.parametrize("case", ["plain", "filtered"])
def test_onnx_and_torchscript_match_pytorch(case, request):
    weights, meta, x, y = request.getfixturevalue(case)
    ref = artifacts.Predictor(weights, meta).predict_proba(x)
    onnx_bytes = export.export_bytes(weights, meta, "onnx")
    probs = export.run_onnx(onnx_bytes, x)
    assert probs.shape == ref.shape
    assert float(np.max(np.abs(probs - ref))) <= TOL
    ts = export.export_bytes(weights, meta, "torchscript")
    assert float(np.max(np.abs(export.run_torchscript(ts, x) - ref))) <= TOL
    # raw int16 windows of any batch size, including one
    assert export.run_onnx(onnx_bytes, x[:1].astype(np.int16)).shape == (1, len(meta["classes"]))


def test_filter_matrix_is_the_preprocessing_filter(filtered):
    _, meta, x, _ = filtered
    fmat = export.filter_matrix(meta)
    chans = pp.select_channels(x[:5].astype(np.float64), meta["channels"])
    expected = pp.apply_filter(chans, meta["filter"], meta["sample_rate_hz"])
    assert np.allclose(chans @ fmat.T.astype(np.float64), expected, atol=1e-3)
    assert export.filter_matrix({**meta, "filter": {}}) is None


def test_int8_is_smaller_and_agrees(plain):
    weights, meta, x, y = plain
    report = export.compare(weights, meta, x, y, formats=("onnx", "onnx-int8"))
    print(json.dumps(report))  # the figures, for the record (pytest -s)
    assert report["onnx"]["max_abs_diff"] <= TOL
    assert report["onnx-int8"]["bytes"] < 0.6 * report["onnx"]["bytes"]
    assert report["onnx-int8"]["top1_agreement"] >= 0.95
    assert abs(report["onnx-int8"]["accuracy_change_points"]) <= 5.0


def test_file_describes_its_input(plain):
    weights, meta, _, _ = plain
    proto = onnx.load_from_string(export.export_bytes(weights, meta, "onnx"))
    info = json.loads({p.key: p.value for p in proto.metadata_props}["semg"])
    assert info["input"]["name"] == export.INPUT_NAME == proto.graph.input[0].name
    assert info["input"]["shape"] == ["batch", meta["n_device_channels"], meta["window"]]
    assert info["classes"] == meta["classes"] and info["scaler"] == meta["scaler"]
    assert len(meta["input_stats"]["mean"]) == meta["n_device_channels"]  # fine-tuned models record it too
    assert "standardisation" in info["includes"]
    extra = {"semg.json": ""}
    torch.jit.load(io.BytesIO(export.export_bytes(weights, meta, "torchscript")), _extra_files=extra)
    assert json.loads(extra["semg.json"])["format"] == "torchscript"
    with pytest.raises(ValueError, match="unknown export format"):
        export.export_bytes(weights, meta, "tflite")


def test_cli_export_artifact_dir(plain, tmp_path):
    weights, meta, x, _ = plain
    artifacts.write_artifact_dir(tmp_path / "art", weights, meta)
    proc = subprocess.run([sys.executable, "ml_model/TrainMLJob.py", "export", "--artifact-dir", str(tmp_path / "art"),
                           "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["check"]["onnx"]["max_abs_diff"] <= TOL and report["int8_bytes"] < report["bytes"]
    side = json.loads(Path(report["sidecar"]).read_text())
    assert side["input"]["name"] == "raw_windows" and side["classes"] == meta["classes"]
    # what made the source model travels with the file (seed, when, versions and commit)
    assert side["source_created_at"] == meta["created_at"] and side["training_seed"] == meta["training"]["seed"]
    assert side["environment"] == meta["environment"] and side["environment"]["torch"]
    probs = export.run_onnx((tmp_path / "m.onnx").read_bytes(), x)
    assert np.max(np.abs(probs - artifacts.Predictor(weights, meta).predict_proba(x))) <= TOL
    assert (tmp_path / "m.int8.onnx").is_file() and (tmp_path / "m.int8.onnx.json").is_file()


def test_cli_export_job_from_database(clean_db, plain, tmp_path):
    from ml_model import jobs
    from semg import repo

    weights, meta, x, _ = plain
    user = repo.create_user(clean_db, "Exporter", "export@example.org")
    with clean_db.cursor() as cur:
        cur.execute("INSERT INTO training_jobs (user_id, params, status) VALUES (%s, '{}', 'completed') RETURNING id",
                    (user["id"],))
        job_id = cur.fetchone()[0]
    jobs.store_artifact(clean_db, user["id"], job_id, weights, {**meta, "job_id": job_id})
    out = tmp_path / "job.pt"
    # --out naming a folder (existing, or to be made: a trailing "/", or a new name without a suffix, which used to
    # become a file of that name, its sidecar "NAME.json" and "NAME.int8.onnx" beside it) puts the file in it, under
    # its usual name
    (tmp_path / "exports").mkdir()
    folders = (str(tmp_path / "exports"), str(tmp_path / "new") + "/", str(tmp_path / "made"))
    # a job without a model says why: it does not exist, or what its status is
    with clean_db.cursor() as cur:
        cur.execute("INSERT INTO training_jobs (user_id, params, status) VALUES (%s, '{}', 'scheduled') RETURNING id",
                    (user["id"],))
        waiting = cur.fetchone()[0]
    runs = [(("export", str(job_id), "--format", "torchscript", "--out", str(out)), 180),
            *((("export", str(job_id), "--int8", "false", "--out", folder), 180) for folder in folders),
            (("export", "999999"), 120), (("export", str(waiting)), 120)]
    with ThreadPoolExecutor(2) as pool:  # independent processes, two at a time (each imports torch)
        procs = list(pool.map(lambda run: subprocess.run([sys.executable, "ml_model/TrainMLJob.py", *run[0]], cwd=REPO,
                                                         capture_output=True, text=True, timeout=run[1]), runs))
    proc, *in_folders, missing_job, waiting_job = procs
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["job_id"] == job_id and report["check"]["torchscript"]["max_abs_diff"] <= TOL
    assert np.max(np.abs(export.run_torchscript(out.read_bytes(), x)
                         - artifacts.Predictor(weights, meta).predict_proba(x))) <= TOL
    for folder, proc in zip(folders, in_folders, strict=True):
        assert proc.returncode == 0, proc.stderr[-3000:]
        path = Path(json.loads(proc.stdout.strip().splitlines()[-1])["path"])
        assert path.parent == Path(folder) and path.name == f"semg-job{job_id}.onnx" and path.is_file()
    for missing, said in ((missing_job, "job 999999 does not exist"),
                          (waiting_job, f"job {waiting} is scheduled: it has no model artifact yet")):
        assert missing.returncode == 2 and said in missing.stderr, missing.stderr


def test_default_file_name_stays_in_the_current_folder(plain, tmp_path, monkeypatch):
    """meta.json can come from anyone: a crafted job_id or sha256 must not steer the file elsewhere."""
    assert export.export_filename({"job_id": 12}, "onnx") == "semg-job12.onnx"
    assert export.export_filename({"job_id": None, "sha256": "model7"}, "torchscript") == "semg-model7.pt"
    for evil in ({"job_id": "x/../../outside/pwned"}, {"job_id": "../../x", "sha256": "../../../etc/y"},
                 {"job_id": -3, "sha256": "/abs/path"}, {"job_id": True, "sha256": ".."}, {"job_id": 1.5}):
        name = export.export_filename(evil, "onnx")
        assert Path(name).name == name and ".." not in name and "/" not in name, (evil, name)
    weights, meta, _, _ = plain
    artifacts.write_artifact_dir(tmp_path / "art", weights, {**meta, "job_id": "x/../../../outside/pwned"})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    report = export.cli_export(artifact_dir=tmp_path / "art", int8=False, check=False)
    assert Path(report["path"]).parent == Path(".") and (tmp_path / "cwd" / report["path"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "cwd"]


@pytest.fixture(scope="module")
def dc_offset():
    """An ESP32-like device: 12-bit ADC values around mid-scale 2048, a high-pass filter to remove that level,
    and a channel subset. Trained with train_model, so the artifact records its raw input statistics."""
    from test_transfer import CLASSES, synth_subject

    from ml_model import training

    x, y, g = synth_subject(0, n_channels=6)
    x = (x.astype(np.int32) + 2048).astype(np.int16)
    cfg = {"sample_rate_hz": 200.0, "max_epochs": 4, "retrain_full": False, "channels": [4, 0, 2, 5],
           "filter": {"highpass_hz": 20.0}, "model": {"width": 8}, "batch_size": 32}
    model, meta, metrics = training.train_model(x[g < 3], y[g < 3], g[g < 3], cfg, class_names=CLASSES)
    weights, meta = artifacts.save_artifact(model, meta, metrics)
    return weights, meta, x[g == 3], y[g == 3]


def test_int8_keeps_its_accuracy_on_a_dc_offset_device(dc_offset):
    """The filter works on raw values 2048 +- a few tens: quantising it to 256 steps of [0, max] destroyed the
    signal (int8 agreement 0.25 on this data before); it stays float32 and only the CNN is quantised."""
    weights, meta, x, y = dc_offset
    report = export.compare(weights, meta, x, y, formats=("onnx", "onnx-int8"))
    print(json.dumps(report))
    assert report["onnx"]["max_abs_diff"] <= TOL
    assert report["onnx-int8"]["top1_agreement"] >= 0.95
    assert abs(report["onnx-int8"]["accuracy_change_points"]) <= 5.0
    graph = onnx.load_from_string(export.export_bytes(weights, meta, "onnx-int8")).graph
    assert [n.op_type for n in graph.node if "filter_t" in n.input] == ["MatMul"]  # the filter is not quantised
    assert any(n.op_type in ("ConvInteger", "MatMulInteger") for n in graph.node)  # the CNN is


def test_the_export_check_probes_at_the_raw_input_level(dc_offset):
    """Without data the export checks its files on random windows: they must sit at the level the device sends
    (recorded as input_stats), not at the filtered scaler's level (0), or a DC-offset bug never shows."""
    weights, meta, x, _ = dc_offset
    assert np.allclose(meta["input_stats"]["mean"], np.asarray(x, np.float64).mean(axis=(0, 2)), atol=5.0)
    probe, what = export.probe_windows(meta)
    assert probe.shape == (256, 6, meta["window"]) and "input_stats" in what
    assert np.allclose(probe.mean(axis=(0, 2)), 2048, atol=10)
    assert export.compare(weights, meta, formats=("onnx-int8",))["onnx-int8"]["top1_agreement"] >= 0.95
    # An older artifact without input_stats: the raw level is unknown, so the probe spans a range of levels.
    old = {k: v for k, v in meta.items() if k != "input_stats"}
    probe, what = export.probe_windows(old)
    assert "does not record its raw input level" in what and probe.min() < -1000 and probe.max() > 3000
    # an unfiltered artifact's scaler is the raw scale of its channels
    plain_probe, what = export.probe_windows({**old, "filter": {}})
    assert "no filter" in what and np.allclose(plain_probe[:, 4].mean(), meta["scaler"]["mean"][0], atol=1.0)
