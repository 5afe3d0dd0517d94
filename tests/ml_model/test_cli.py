"""``TrainMLJob.py``'s command line: arguments arrive as the strings typed and are converted in one place, so a
wrong value ends in one clear line and exit status 2 (never a traceback), boolean flags mean what they say,
and paths that look like numbers are paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ml_model import TrainMLJob
from ml_model.TrainMLJob import UsageError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "ml_model" / "TrainMLJob.py")


def cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_usage_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2 and exactly one line on stderr, holding ``message``."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_flags_accept_true_false_yes_no_1_0_and_nothing_else():
    for value in (True, "true", "True", "YES", "yes", "1", " 1 "):
        assert TrainMLJob._flag("int8", value) is True
    for value in (False, "false", "False", "no", "NO", "0"):
        assert TrainMLJob._flag("int8", value) is False
    for value in ("maybe", "", "2", "ja", ("a",)):
        with pytest.raises(UsageError, match="--int8 must be true or false"):
            TrainMLJob._flag("int8", value)


def test_numbers_and_paths_are_converted_in_one_place():
    assert TrainMLJob._whole("epochs", "3", 1) == 3 and TrainMLJob._whole("seed", 7) == 7
    for bad in ("abc", "1,2", "2.5", (1, 2), True, None):
        with pytest.raises(UsageError, match="--seed must be a whole number"):
            TrainMLJob._whole("seed", bad)
    with pytest.raises(UsageError, match="--epochs must be at least 1, got 0"):
        TrainMLJob._whole("epochs", "0", 1)
    assert TrainMLJob._seconds("poll", "0.2") == 0.2
    for bad in ("abc", "0", "-1", "nan", "inf"):
        with pytest.raises(UsageError, match="--poll must be"):
            TrainMLJob._seconds("poll", bad)
    assert TrainMLJob._path("out", "2024") == "2024" and TrainMLJob._path("out", 2024) == "2024"
    with pytest.raises(UsageError, match="--out must be a path"):
        TrainMLJob._path("out", "")
    assert TrainMLJob._as_list("[0, 1]", int) == [0, 1] and TrainMLJob._as_list("Female0 Male1") == ["Female0", "Male1"]
    with pytest.raises(UsageError, match="--test-cycles must be whole numbers"):
        TrainMLJob._as_list("a,b", int, "test-cycles")


def test_help_lists_every_command(tmp_path):
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr  # fire writes help to stderr when not on a terminal
    assert "SYNOPSIS\n    TrainMLJob.py COMMAND" in text, text
    listed = text.split("COMMANDS", 1)[-1]
    for command in ("cancel", "evaluate", "export", "pretrain", "train", "worker"):
        assert f"\n     {command}\n" in listed, text


def test_wrong_argument_types_are_one_line_and_exit_2(tmp_path):
    missing = str(tmp_path / "nope")
    cases = [
        (("evaluate", "--data-dir", missing, "--test-cycles", "3", "--epochs", "abc"), "--epochs must be a whole number"),
        (("evaluate", "--data-dir", missing, "--test-cycles", "3", "--epochs", "0"), "--epochs must be at least 1"),
        (("evaluate", "--data-dir", missing, "--test-cycles", "3", "--epochs", "-2"), "--epochs must be at least 1"),
        (("evaluate", "--data-dir", missing, "--test-cycles", "3", "--seed", "1,2"), "--seed must be a whole number"),
        (("evaluate", "--data-dir", missing, "--test-cycles", "x,y"), "--test-cycles must be whole numbers"),
        (("evaluate", "--data-dir", missing, "--test-cycles", "3", "--verbose", "perhaps"), "--verbose must be true or false"),
        (("pretrain", "--data-dir", missing, "--out", str(tmp_path / "b"), "--epochs", "0"), "--epochs must be at least 1"),
        (("pretrain", "--data-dir", missing, "--out", str(tmp_path / "b"), "--register", "maybe"),
         "--register must be true or false"),
        (("export", "--artifact-dir", missing, "--int8", "nope"), "--int8 must be true or false"),
        (("worker", "--poll", "abc"), "--poll must be a number of seconds"),
        (("worker", "--once", "sometimes"), "--once must be true or false"),
        # numbers given as paths are paths: these fail only because the folders do not exist
        (("evaluate", "--data-dir", "2024", "--test-cycles", "3"), "not found: 2024"),
        (("pretrain", "--data-dir", missing, "--out", "2024"), "data folder not found"),
        (("evaluate", "--data-dir", missing, "--test-cycles", "3", "--base", "2024"), "not found"),
        (("export", "--artifact-dir", "123", "--out", "123"), "123"),
    ]
    with ThreadPoolExecutor(2) as pool:  # independent processes: two at a time (each starts a Python)
        procs = list(pool.map(lambda case: cli(*case[0], cwd=tmp_path), cases))
    for (_args, message), proc in zip(cases, procs, strict=True):
        assert_usage_error(proc, message)
    assert not (tmp_path / "b").exists() and not (tmp_path / "2024").exists()


def test_int8_false_writes_no_int8_file_and_numeric_paths_work(tmp_path):
    from test_export import _trained_artifact

    from ml_model import artifacts

    weights, meta, _, _ = _trained_artifact()
    artifacts.write_artifact_dir(tmp_path / "2024", weights, meta)
    proc = cli("export", "--artifact-dir", "2024", "--out", "123", "--int8", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # a name without a suffix is a folder to make (fire hands "123" over as a number: still a path)
    assert Path(report["path"]).parent == Path("123") and (tmp_path / report["path"]).is_file()
    assert "int8_path" not in report and not list(tmp_path.rglob("*int8*"))
    proc = cli("export", "--artifact-dir", "2024", "--out", "m.onnx", "--int8", "yes", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "m.int8.onnx").is_file()


def test_evaluate_never_tests_on_training_cycles(tmp_path, monkeypatch):
    """Naming the training session among --test-sessions must not skip the overlap check."""
    from test_pretrain import write_myo_folder

    from ml_model import training

    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob"), seconds=1.0)
    common = ("evaluate", "--data-dir", str(root), "--subjects", "Alice")
    proc = cli(*common, "--test-sessions", "training0", "--train-cycles", "0,1,2", "--test-cycles", "2")
    assert_usage_error(proc, "train cycles [0, 1, 2] and test cycles [2] overlap in session training0")
    proc = cli(*common, "--test-sessions", "training0,testing0", "--train-cycles", "0,1")
    assert_usage_error(proc, "the training session training0 is also a test session: give --test-cycles")

    # Without --train-cycles the tested cycles are left out of training, as without --test-sessions.
    seen = []
    real = training.train_model

    def spy(x, labels, groups, *args, **kwargs):
        seen.append(set(groups.tolist()))
        return real(x, labels, groups, *args, **kwargs)

    monkeypatch.setattr(training, "train_model", spy)
    result = TrainMLJob.evaluate_subjects(str(root), test_sessions=["training0"], test_cycles=[3], subjects=["Alice"],
                                          config={"max_epochs": 1, "model": {"width": 8}})
    assert seen == [{0, 1, 2}] and result["split"]["test_sessions"] == ["training0"]


def test_a_bad_setting_is_one_line_for_every_database_command(tmp_path):
    """export JOB_ID and pretrain --register read the settings too; they used to end in a SettingsError traceback
    (pretrain only after the whole training)."""
    cases = [("export", "5"),
             ("pretrain", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "b"), "--register"),
             ("cancel", "5")]
    with ThreadPoolExecutor(2) as pool:  # independent processes: two at a time (each starts a Python)
        procs = list(pool.map(lambda args: cli(*args, env={"API_PORT": "abc"}), cases))
    for proc in procs:
        assert_usage_error(proc, "API_PORT")


def test_evaluate_on_an_empty_folder_or_with_hidden_folders(tmp_path):
    from test_pretrain import write_myo_folder

    from ml_model import datasets

    (tmp_path / "empty").mkdir()
    assert_usage_error(cli("evaluate", "--data-dir", str(tmp_path / "empty"), "--test-cycles", "3"),
                       "no subject folders in")
    # a notebook's checkpoint folder is not a subject (it used to abort evaluate: no training0 session in it)
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice",), seconds=1.0)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "Alice" / ".cache").mkdir()
    assert datasets.list_subjects(root) == ["Alice"] and datasets.list_sessions(root, "Alice") == ["training0"]
    result = TrainMLJob.evaluate_subjects(str(root), train_cycles=[0, 1, 2], test_cycles=[3],
                                          config={"max_epochs": 1, "model": {"width": 8}})
    assert list(result["accuracy"]) == ["Alice"]


def test_evaluate_reports_per_class_figures_and_confusion_of_its_test_windows(tmp_path):
    """evaluate printed only an accuracy per subject: no per-class figures, no confusion matrix and no window
    counts, so its figures could not be set beside the Jobs page's nor cited with what they were measured on."""
    from test_pretrain import write_myo_folder

    from ml_model import datasets

    root = write_myo_folder(tmp_path / "myo", subjects=("Alice",), seconds=1.0)
    proc = cli("evaluate", "--data-dir", str(root), "--train-cycles", "0,1,2", "--test-cycles", "3", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    test = datasets.load_session(root, "Alice", "training0", cycles=[3])
    n_test = len(datasets.recordings_to_windows(test, 50, 5)[0])  # 250 ms / 25 ms at 200 Hz
    assert result["window_ms"] == 250.0 and result["step_ms"] == 25.0
    assert result["n_windows"]["Alice"]["test"] == n_test > 0
    cm = result["confusion_matrix"]["Alice"]
    matrix = cm["matrix"]
    assert cm["classes"] == datasets.MYO_CLASS_NAMES and len(matrix) == len(cm["classes"])
    assert sum(map(sum, matrix)) == n_test
    assert abs(sum(matrix[i][i] for i in range(len(matrix))) / n_test - result["accuracy"]["Alice"]) < 1e-4
    per_class = result["per_class_accuracy"]["Alice"]
    assert list(per_class) == cm["classes"]
    for i, c in enumerate(cm["classes"]):
        assert per_class[c] == (round(matrix[i][i] / sum(matrix[i]), 5) if sum(matrix[i]) else None)

    from test_export import _trained_artifact

    from ml_model import artifacts

    weights, meta, _, _ = _trained_artifact()
    artifacts.write_artifact_dir(tmp_path / "art", weights, {**meta, "model": {**meta["model"], "heads": 2}})
    proc = cli("export", "--artifact-dir", str(tmp_path / "art"), "--out", str(tmp_path / "m.onnx"))
    assert_usage_error(proc, "do not describe an EMGNet")
