"""Real recordings (Myo armband, 2 subjects): the loader reads the layout, a short training beats chance by
far on a held-out repetition, and the evaluate CLI runs as a script and ends with one JSON line.
Skipped with a clear reason when the data folder is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ml_model import datasets
from ml_model import preprocessing as pp
from ml_model.TrainMLJob import _as_list, evaluate_subjects

REPO = Path(__file__).resolve().parents[2]


def test_loader_reads_the_layout(myo_dir):
    subjects = datasets.list_subjects(myo_dir)
    assert "Female0" in subjects and len(subjects) >= 2
    recs = datasets.load_session(myo_dir, "Female1", "training0")
    assert len(recs) == 28
    assert {r.gesture for r in recs} == set(range(7)) and {r.cycle for r in recs} == {0, 1, 2, 3}
    assert all(r.data.dtype == np.int16 and r.data.shape[1] == 8 for r in recs)
    only3 = datasets.load_session(myo_dir, "Female1", "training0", cycles=[3])
    assert [r.cycle for r in only3] == [3] * 7
    win, step = pp.window_params(250, 25, datasets.MYO_SAMPLE_RATE_HZ)
    x, labels, groups = datasets.recordings_to_windows(only3, win, step)
    assert x.shape[1:] == (8, 50) and len(x) == len(labels) == len(groups)
    assert set(labels) == set(datasets.MYO_CLASS_NAMES)


def test_short_training_on_two_subjects(myo_dir):
    result = evaluate_subjects(
        str(myo_dir), train_cycles=[0, 1, 2], test_cycles=[3], subjects=["Female2", "Male8"],
        config={"max_epochs": 4},
    )
    assert set(result["accuracy"]) == {"Female2", "Male8"}
    # 7 classes: chance is 14 %; these two subjects are easy, so even 4 epochs must do far better.
    assert result["mean_accuracy"] > 0.85
    assert 0 < result["model_bytes"] <= 1_000_000
    json.dumps(result)


def test_evaluate_cli_runs_as_a_script(myo_dir):
    cmd = [
        sys.executable, "ml_model/TrainMLJob.py", "evaluate", "--data-dir", str(myo_dir),
        "--train-session", "training0", "--train-cycles", "0,1", "--test-cycles", "3",
        "--subjects", "Male8", "--epochs", "2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"mean_accuracy", "accuracy", "train_seconds", "median_train_seconds", "model_bytes"} <= set(last)
    assert list(last["accuracy"]) == ["Male8"] and last["split"]["train_cycles"] == [0, 1]
    assert "Male8" in r.stderr  # progress is logged to stderr


def test_fire_list_quirks():
    assert _as_list((0, 1, 2), int) == [0, 1, 2]
    assert _as_list(3, int) == [3]
    assert _as_list("0,1, 2", int) == [0, 1, 2]
    assert _as_list("Female0,Male1") == ["Female0", "Male1"]
    assert _as_list(None) is None


def test_packet_loss_bench_compares_bridging_with_restarting(myo_dir):
    cmd = [sys.executable, "bench/packet_loss.py", "--data-dir", str(myo_dir), "--subjects", "Male8", "--epochs", "1",
           "--loss", "0.1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["packet_ms"] == 50.0 and last["subjects"] == ["Male8"]
    lossless, lossy = last["loss_0"], last["loss_0.1"]
    assert lossless["bridge"] == lossless["reset"] and lossless["bridge"]["coverage"] == 1.0
    # the same losses: bridging decides windows across a lost packet, restarting waits for a whole window
    assert lossy["bridge"]["coverage"] > lossy["reset"]["coverage"] + 0.1
    assert lossy["bridge"]["windows_spanning_a_loss"] > 0 and lossy["reset"]["windows_spanning_a_loss"] == 0
    assert lossy["bridge"]["max_silence_ms"] < lossy["reset"]["max_silence_ms"]
    bad = subprocess.run([sys.executable, "bench/packet_loss.py", "--loss", "1.5"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--loss" in bad.stderr


def test_accuracy_bench_prints_one_json_line_last(myo_dir):
    cmd = [sys.executable, "bench/accuracy.py", "--data-dir", str(myo_dir), "--subjects", "Male8", "--epochs", "1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["split"] == {"train_session": "training0", "train_cycles": [0, 1, 2],
                             "test_sessions": ["training0"], "test_cycles": [3]}
