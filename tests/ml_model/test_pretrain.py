"""Pretraining a base: Myo-armband and NinaPro DB5 loaders, per-subject scaling, the saved artifact, and
``TrainMLJob.py pretrain`` (with --register into model_artifacts as a shared base)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from ml_model import artifacts, ninapro, pretrain
from ml_model import preprocessing as pp
from ml_model.training import TrainingDataError

REPO = Path(__file__).resolve().parents[2]
SMALL = {"max_epochs": 2, "model": {"width": 8}, "n_val_subjects": 1}
TINY_GRID = '{"finetune_epochs": [2], "alpha": [1.0], "scratch_epochs": [2]}'


def write_myo_folder(root: Path, subjects=("Alice", "Bob", "Carol"), seconds: float = 1.5, seed: int = 0) -> Path:
    """A synthetic folder in the Myo-armband layout: <subject>/training0/classe_<i>.dat, int16 x 8 channels."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0.1, 1.0, size=(7, 8))
    for s, subject in enumerate(subjects):
        folder = root / subject / "training0"
        folder.mkdir(parents=True)
        gain = rng.uniform(0.5, 2.0, 8)
        for i in range(28):
            x = rng.standard_normal((int(seconds * 200), 8)) * patterns[i % 7] * gain * 30
            x.astype("<i2").tofile(folder / f"classe_{i}.dat")
    return root


def write_db5_mat(path: Path, subject: int, exercise: int, movements=(1, 2, 3), reps: int = 3,
                  move_s: float = 1.0, rest_s: float = 0.6, seed: int = 0) -> dict:
    """A synthetic NinaPro DB5 file: emg (n, 16), restimulus, rerepetition (rest between movements)."""
    rng = np.random.default_rng(seed + subject)
    parts, stim, rep = [], [], []

    def block(label: int, r: int, seconds: float):
        n = int(seconds * 200)
        amp = 5.0 if label == 0 else 10.0 + 10.0 * np.roll(np.arange(16) == label, exercise)
        parts.append(rng.standard_normal((n, 16)) * amp)
        stim.append(np.full(n, label))
        rep.append(np.full(n, r))

    block(0, 0, rest_s)
    for m in movements:
        for r in range(1, reps + 1):
            block(m, r, move_s)
            block(0, 0, rest_s)
    data = {"emg": np.concatenate(parts), "restimulus": np.concatenate(stim)[:, None],
            "rerepetition": np.concatenate(rep)[:, None], "exercise": np.array([[exercise]]),
            "subject": np.array([[subject]]), "frequency": np.array([[200]])}
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, data)
    return data


# ---- NinaPro DB5 ----------------------------------------------------------------------------------------
def test_db5_mat_windows_follow_labels_and_repetitions(tmp_path):
    data = write_db5_mat(tmp_path / "s1" / "S1_E2_A1.mat", subject=1, exercise=2)
    rec = ninapro.load_db5_mat(tmp_path / "s1" / "S1_E2_A1.mat")
    assert rec["emg"].shape == (data["emg"].shape[0], 16) and rec["exercise"] == 2 and rec["subject"] == "S1"
    assert rec["sample_rate_hz"] == 200.0
    win, step = pp.window_params(250, 25, 200)
    w, y, g = ninapro.db5_windows(rec, win, step)
    assert w.shape[1:] == (16, win) and len(w) == len(y) == len(g)
    assert set(y) == {"REST", "E2_1", "E2_2", "E2_3"}
    assert set(g[y != "REST"]) == {1, 2, 3}
    # the first rest belongs to the first movement's repetition, later rests to the movement before them
    assert set(g[y == "REST"]) == {1, 2, 3}
    # no window straddles a label change: each window equals a slice of one constant-label run
    stim = data["restimulus"].ravel()
    runs = ninapro.runs(stim, data["rerepetition"].ravel())
    n_expected = sum(pp.n_windows(b - a, win, step) for a, b, _, _ in runs)
    assert len(w) == n_expected


def test_db5_subjects_and_bad_files(tmp_path):
    for s in (1, 2):
        for e in (1, 2):
            write_db5_mat(tmp_path / f"s{s}" / f"S{s}_E{e}_A1.mat", subject=s, exercise=e)
    data, info = ninapro.load_db5_subjects(tmp_path, exclude=["S2"], exercises=[1])
    assert list(data) == ["S1"] and info["sample_rate_hz"] == 200.0
    assert info["class_names"] == ["REST", "E1_1", "E1_2", "E1_3"]
    scipy.io.savemat(tmp_path / "broken.mat", {"emg": np.zeros((10, 16))})
    with pytest.raises(ValueError, match="restimulus"):
        ninapro.load_db5_mat(tmp_path / "broken.mat")


def test_pretrain_on_ninapro_folder(tmp_path):
    for s in (1, 2, 3):
        write_db5_mat(tmp_path / "db5" / f"s{s}" / f"S{s}_E1_A1.mat", subject=s, exercise=1)
    assert pretrain.detect_format(tmp_path / "db5") == "ninapro"
    model, meta, metrics = pretrain.pretrain_from_dir(tmp_path / "db5", ["S3"], {**SMALL, "tune_calibration": False})
    assert meta["pretrain"]["source"] == "ninapro-db5" and meta["pretrain"]["subjects"] == ["S1", "S2"]
    assert meta["n_device_channels"] == 16 and meta["classes"] == ["REST", "E1_1", "E1_2", "E1_3"]
    assert meta["sample_rate_hz"] == 200.0 and meta["window"] == 50


# ---- Myo-armband layout -----------------------------------------------------------------------------------
def test_pretrain_myo_layout_saves_a_servable_base(tmp_path):
    root = write_myo_folder(tmp_path / "myo")
    assert pretrain.detect_format(root) == "myo"
    data = pretrain.load_myo_subjects(root, exclude=["Carol"])
    assert sorted(data) == ["Alice", "Bob"] and data["Alice"][0].shape[1:] == (8, 50)
    assert set(data["Alice"][2]) == {0, 1, 2, 3}
    model, meta, metrics = pretrain.pretrain_model(data, {"sample_rate_hz": 200.0, **SMALL, "tune_calibration": False})
    assert meta["pretrain"]["val_subjects"] in (["Alice"], ["Bob"])
    weights, full = pretrain.save_base(model, meta, metrics, tmp_path / "base")
    assert "history" not in full["metrics"] and (tmp_path / "base" / artifacts.WEIGHTS_FILE).is_file()
    pred = artifacts.Predictor.from_dir(tmp_path / "base")
    assert pred.predict_proba(data["Bob"][0][:3]).shape == (3, 7)
    # the pooled scaler of the artifact is the raw-data scale (the base also serves as a generic model)
    pooled = np.concatenate([np.asarray(d[0], np.float64) for d in data.values()])
    assert np.allclose(full["scaler"]["mean"], pooled.mean(axis=(0, 2)), atol=1e-6)
    # and the raw input level of all device channels is recorded for the export's check (export.probe_windows)
    assert np.allclose(full["input_stats"]["mean"], pooled.mean(axis=(0, 2)), atol=1e-6)
    assert np.allclose(full["input_stats"]["std"], pooled.std(axis=(0, 2)), rtol=1e-5)


def test_pretrain_trains_at_least_min_epochs(tmp_path):
    """The epoch count is chosen among epochs >= min_epochs (early stopping cannot end before it), and the
    retraining on all subjects runs that many epochs."""
    data = pretrain.load_myo_subjects(write_myo_folder(tmp_path / "myo"))
    cfg = {"sample_rate_hz": 200.0, **SMALL, "tune_calibration": False, "retrain_full": False, "patience": 1}
    # (without the floor, this data's held-out accuracy peaks at epoch 4 of 5)
    _, meta, metrics = pretrain.pretrain_model(data, {**cfg, "max_epochs": 5, "min_epochs": 5})
    assert len(metrics["history"]) == 5 and metrics["best_epoch"] == 5 and meta["training"]["epochs"] == 5
    # a floor above max_epochs is capped: training still ends, at the last epoch
    _, _, metrics = pretrain.pretrain_model(data, {**cfg, "max_epochs": 2, "min_epochs": 9})
    assert len(metrics["history"]) == 2 and metrics["best_epoch"] == 2


def test_pretrain_rejects_bad_input(tmp_path):
    root = write_myo_folder(tmp_path / "myo", subjects=("Solo",))
    data = pretrain.load_myo_subjects(root)
    with pytest.raises(TrainingDataError, match="at least 2 subjects"):
        pretrain.pretrain_model(data, {"sample_rate_hz": 200.0})
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError):
        pretrain.detect_format(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown pretraining config"):
        pretrain.merge_pretrain_config({"nope": 1})
    two = pretrain.load_myo_subjects(write_myo_folder(tmp_path / "two", subjects=("Alice", "Bob")))
    for epochs in (0, -3):
        with pytest.raises(ValueError, match=f"max_epochs must be at least 1, got {epochs}"):
            pretrain.pretrain_model(two, {"sample_rate_hz": 200.0, **SMALL, "max_epochs": epochs})


def test_unknown_or_unreadable_input_is_named(tmp_path):
    """A typo in the subjects to leave out must not silently pretrain on that subject."""
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob"))
    with pytest.raises(TrainingDataError, match=r"unknown subjects \['Alcie'\]"):
        pretrain.load_myo_subjects(root, exclude=["Alcie"])
    with pytest.raises(TrainingDataError, match="unknown subjects"):
        pretrain.load_myo_subjects(root, subjects=["Alice", "Zed"])
    for s in (1, 2):
        write_db5_mat(tmp_path / "db5" / f"S{s}_E1_A1.mat", subject=s, exercise=1)
    with pytest.raises(ValueError, match=r"unknown subjects \['S9'\]"):
        ninapro.load_db5_subjects(tmp_path / "db5", exclude=["S9"])
    (tmp_path / "db5" / "notes.mat").write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(ValueError, match="notes.mat: not a readable MATLAB .mat file"):
        ninapro.load_db5_subjects(tmp_path / "db5")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "ml_model/TrainMLJob.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_bad_input_is_one_clear_line_and_exit_2(tmp_path):
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob"))
    cases = [
        (("pretrain", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "b")), "data folder not found"),
        (("pretrain", "--data-dir", str(root), "--out", str(tmp_path / "b"), "--exclude-subjects", "Alcie"),
         "unknown subjects ['Alcie']"),
        (("evaluate", "--data-dir", str(tmp_path / "nope"), "--test-cycles", "3"), "not found"),
        (("evaluate", "--data-dir", str(root), "--test-cycles", "3", "--train-cycles", "2,3"), "overlap"),
        (("export", "5", "--format", "keras"), "--format must be onnx or torchscript"),
        (("export", "--artifact-dir", str(tmp_path / "nope")), "nope"),
    ]
    with ThreadPoolExecutor(2) as pool:  # independent processes: two at a time (each starts a Python)
        procs = list(pool.map(lambda case: _cli(*case[0]), cases))
    for (args, message), proc in zip(cases, procs, strict=True):
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    assert not (tmp_path / "b").exists()


def test_cli_says_when_the_database_is_unreachable(settings):
    from semg.embedded import free_port

    closed = str(free_port())
    cases = (("export", "5"), ("cancel", "5"), ("train", "5"))
    with ThreadPoolExecutor(2) as pool:  # independent processes: two at a time (each starts a Python)
        procs = list(pool.map(lambda args: _cli(*args, env={"POSTGRES_PORT": closed}), cases))
    for args, proc in zip(cases, procs, strict=True):
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "database unreachable" in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_cli_pretrain_register_says_the_database_is_unreachable_before_training(settings, tmp_path):
    """It used to pretrain for the whole run, then fail to register; the saved folder then refused a re-run."""
    from semg.embedded import free_port

    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob", "Carol"))
    out = tmp_path / "base"
    proc = _cli("pretrain", "--data-dir", str(root), "--out", str(out), "--epochs", "1", "--register",
                env={"POSTGRES_PORT": str(free_port())})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "TrainMLJob pretrain: database unreachable" in proc.stderr and "Traceback" not in proc.stderr
    assert "pretrain epoch" not in proc.stderr, proc.stderr[-2000:]  # nothing was trained
    assert not out.exists()


def test_cli_pretrain_registers_a_shared_base(clean_db, tmp_path):
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob", "Carol", "Dave"))
    out = tmp_path / "base"
    code = ("import sys, runpy; from ml_model import pretrain; "
            f"pretrain.CALIBRATION_GRID.update({{k: tuple(v) for k, v in __import__('json').loads('{TINY_GRID}').items()}}); "
            "sys.argv = sys.argv[1:]; runpy.run_path('ml_model/TrainMLJob.py', run_name='__main__')")
    proc = subprocess.run(
        [sys.executable, "-c", code, "TrainMLJob.py", "pretrain", "--data-dir", str(root), "--out", str(out),
         "--exclude-subjects", "Dave", "--epochs", "2", "--register"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["subjects"] == ["Alice", "Bob", "Carol"] and summary["channels"] == list(range(8))
    assert summary["sample_rate_hz"] == 200.0 and summary["window"] == 50
    weights, meta = artifacts.read_artifact_dir(out)
    assert meta["pretrain"]["calibration"]["recipe"]["finetune"] == {"epochs": 2, "alpha": 1.0}
    with clean_db.cursor() as cur:
        cur.execute("SELECT user_id, job_id, sha256, classes FROM model_artifacts WHERE id = %s",
                    (summary["artifact_id"],))
        user_id, job_id, sha, classes = cur.fetchone()
    assert user_id is None and job_id is None and sha == meta["sha256"] and classes == meta["classes"]
    bases = pretrain.list_bases(clean_db)
    assert [b["id"] for b in bases] == [summary["artifact_id"]]
    assert bases[0]["pretrain"]["subjects"] == ["Alice", "Bob", "Carol"]


def test_pretrain_on_real_myo_subjects(tmp_path):
    """Two real people, one epoch: the base must beat chance on a third person it never saw (zero-shot with
    that person's own scaler)."""
    sys.path.insert(0, str(REPO / "tests" / "testing"))
    from tests_conftest_shim import require_myo_data

    from ml_model import datasets

    root = require_myo_data()
    data = pretrain.load_myo_subjects(root, subjects=["Female0", "Male0", "Male2"], step_ms=100.0)
    model, meta, metrics = pretrain.pretrain_model(
        data, {"sample_rate_hz": 200.0, "step_ms": 100.0, "max_epochs": 2, "val_subjects": ["Male2"],
               "tune_calibration": False}, class_names=datasets.MYO_CLASS_NAMES, source="myo-armband")
    assert metrics["accuracy"] > 0.3  # held-out person, 7 classes: chance is 0.14
    assert meta["pretrain"]["subjects"] == ["Female0", "Male0", "Male2"]


def test_nan_or_inf_in_the_data_fails_at_once_naming_where(tmp_path):
    """A NaN used to train to the end and then fail with 'Out of range float values are not JSON compliant'."""
    data = pretrain.load_myo_subjects(write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob")))
    w, y, g = data["Bob"]
    w = w.astype(np.float32)
    w[3, 2, 5], w[7, 0, 0] = np.nan, np.inf
    with pytest.raises(TrainingDataError, match=r"subject Bob: 2 of \d+ windows contain NaN or infinite values"):
        pretrain.pretrain_model({**data, "Bob": (w, y, g)}, {"sample_rate_hz": 200.0, **SMALL})

    for s in (1, 2):
        write_db5_mat(tmp_path / "db5" / f"s{s}" / f"S{s}_E1_A1.mat", subject=s, exercise=1)
    path = tmp_path / "db5" / "s2" / "S2_E1_A1.mat"
    mat = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    emg = mat["emg"].copy()
    emg[10, 3] = np.nan
    scipy.io.savemat(path, {**mat, "emg": emg})
    with pytest.raises(ValueError, match=r"S2_E1_A1.mat: 'emg' has 1 NaN or infinite values"):
        ninapro.load_db5_subjects(tmp_path / "db5")
    # a NaN label would be cast to a huge bogus movement number (a class of its own)
    stim = mat["restimulus"].astype(np.float64)
    stim[5] = np.nan
    scipy.io.savemat(path, {**mat, "restimulus": stim})
    with pytest.raises(ValueError, match=r"S2_E1_A1.mat: 'restimulus' has 1 NaN or infinite values"):
        ninapro.load_db5_subjects(tmp_path / "db5")
    scipy.io.savemat(path, {**mat, "rerepetition": mat["rerepetition"] + 0.5})
    with pytest.raises(ValueError, match=r"'rerepetition' must hold whole numbers"):
        ninapro.load_db5_mat(path)


def test_cli_pretrain_with_nan_is_one_line(tmp_path):
    for s in (1, 2):
        write_db5_mat(tmp_path / "db5" / f"s{s}" / f"S{s}_E1_A1.mat", subject=s, exercise=1)
    path = tmp_path / "db5" / "s1" / "S1_E1_A1.mat"
    mat = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    mat["emg"][0, :2] = np.inf
    scipy.io.savemat(path, mat)
    proc = _cli("pretrain", "--data-dir", str(tmp_path / "db5"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "S1_E1_A1.mat: 'emg' has 2 NaN or infinite values" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_cli_pretrain_checks_out_before_training(tmp_path):
    """A bad --out used to fail only after the whole training."""
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob"))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "old_base").mkdir()
    (tmp_path / "old_base" / artifacts.META_FILE).write_text("{}")
    cases = [(tmp_path / "a_file", "exists and is not a folder"),
             (tmp_path / "a_file" / "base", "is not a folder"),
             (tmp_path / "old_base", "already holds a model artifact")]
    for out, message in cases:
        proc = _cli("pretrain", "--data-dir", str(root), "--out", str(out), "--verbose")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "pretraining on" not in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "old_base" / artifacts.META_FILE).read_text() == "{}"
    artifacts.check_new_artifact_dir(tmp_path / "new" / "base")  # a new folder, or an empty one, is fine
    (tmp_path / "empty").mkdir()
    artifacts.check_new_artifact_dir(tmp_path / "empty")
    assert not (tmp_path / "new").exists()


def test_a_base_never_claims_classes_without_data(tmp_path):
    """Myo folders holding only some gestures used to give a 7-class base with untrained output rows."""
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob"))
    for path in root.rglob("classe_*.dat"):
        if int(path.stem.split("_")[1]) % 7 >= 2:  # keep gestures 0 (REST) and 1 only
            path.unlink()
    data = pretrain.load_myo_subjects(root)
    from ml_model import datasets

    with pytest.raises(TrainingDataError, match=r"classes \['wrist_flexion', .*'hand_open'\] have no windows"):
        pretrain.pretrain_model(data, {"sample_rate_hz": 200.0, **SMALL}, class_names=datasets.MYO_CLASS_NAMES)
    proc = _cli("pretrain", "--data-dir", str(root), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "have no windows in the pretraining data" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_db5_files_that_do_not_fit_are_named(tmp_path):
    write_db5_mat(tmp_path / "s1" / "S1_E1_A1.mat", subject=1, exercise=1)
    data = write_db5_mat(tmp_path / "s1" / "S1_E2_A1.mat", subject=1, exercise=2)
    scipy.io.savemat(tmp_path / "s1" / "S1_E2_A1.mat", {**data, "emg": data["emg"][:, :12]})
    with pytest.raises(ValueError, match=r"S1_E2_A1.mat: 12 emg channels, but .*S1_E1_A1.mat of the same subject S1 "
                                         r"has 16"):
        ninapro.load_db5_subjects(tmp_path)
    bad = tmp_path / "bad.mat"
    for extra, message in (({"exercise": np.zeros((0, 0))}, "'exercise' must be a number"),
                           ({"frequency": np.array([[0]])}, "'frequency' must be a positive sample rate")):
        scipy.io.savemat(bad, {**data, **extra})
        with pytest.raises(ValueError, match=message):
            ninapro.load_db5_mat(bad)
