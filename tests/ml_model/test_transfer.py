"""Fine-tuning a pretrained base: layer adaptation to other channels/classes, the one-repetition recipe,
WiSE interpolation, the training-job path (param base_artifact_id) and the evaluate CLI with --base."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_model import artifacts, pretrain, transfer
from ml_model import preprocessing as pp
from ml_model.model import EMGNet
from ml_model.training import TrainingCancelled, TrainingDataError

REPO = Path(__file__).resolve().parents[2]
RATE = 200.0
CLASSES = ["REST", "fist", "open", "point"]
# Per-gesture muscle pattern over 6 electrodes; each synthetic person sees it through their own electrode gains.
PATTERNS = np.array([[0.1] * 6, [1, 0.7, 0.2, 0.1, 0.3, 0.1], [0.1, 0.3, 1, 0.8, 0.1, 0.2],
                     [0.2, 0.1, 0.1, 0.3, 1, 0.9]])
FAST_PRETRAIN = {"sample_rate_hz": RATE, "step_ms": 50.0, "max_epochs": 3, "model": {"width": 8},
                 "n_val_subjects": 1}
FAST_GRID = {"finetune_epochs": (2, 4), "alpha": (0.5, 1.0), "scratch_epochs": (4,)}


def synth_subject(seed: int, reps: int = 4, hold_s: float = 1.5, n_channels: int = 6, classes=CLASSES,
                  step_ms: float = 50.0):
    """Raw int16 windows (n, C, 50) of one synthetic person: (windows, labels, groups=repetition)."""
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.5, 2.0, n_channels)
    win, step = pp.window_params(250, step_ms, RATE)
    ws, ys, gs = [], [], []
    for rep in range(reps):
        for k, c in enumerate(classes):
            n = int(hold_s * RATE)
            amp = np.resize(PATTERNS[CLASSES.index(c) if c in CLASSES else k % len(CLASSES)], n_channels)
            x = rng.standard_normal((n, n_channels)) * amp * gain * 30 * rng.uniform(0.8, 1.2)
            w = pp.make_windows(x.astype(np.int16), win, step)
            ws.append(w)
            ys.append(np.full(len(w), c, dtype=object))
            gs.append(np.full(len(w), rep))
    return np.concatenate(ws), np.concatenate(ys), np.concatenate(gs)


@pytest.fixture(scope="module")
def base():
    """A small base pretrained on 4 synthetic people, with its tuned one-repetition recipe."""
    subjects = {f"P{i}": synth_subject(i) for i in range(4)}
    with small_grid(FAST_GRID):
        model, meta, metrics = pretrain.pretrain_model(subjects, FAST_PRETRAIN, class_names=CLASSES, source="synthetic")
    weights, meta = artifacts.save_artifact(model, meta, {k: v for k, v in metrics.items() if k != "history"})
    return weights, meta


@contextlib.contextmanager
def small_grid(grid):
    """Temporarily shrink the calibration grid (test speed)."""
    old = dict(pretrain.CALIBRATION_GRID)
    pretrain.CALIBRATION_GRID.update(grid)
    try:
        yield
    finally:
        pretrain.CALIBRATION_GRID.clear()
        pretrain.CALIBRATION_GRID.update(old)


def _accuracy(weights, meta, x, y) -> float:
    names, _ = artifacts.Predictor(weights, meta).predict(x)
    return float(np.mean(np.array(names) == np.asarray(y).astype(str)))


# ---- adapting layers ------------------------------------------------------------------------------------
def test_adapt_same_channels_and_classes_copies_everything(base):
    model, meta = transfer.load_base(base)
    adapted, info = transfer.adapt_model(model, meta, 6, CLASSES)
    for name, value in model.state_dict().items():
        assert torch.equal(value, adapted.state_dict()[name]), name
    assert info["input_layer"] == "copied" and info["head_classes_new"] == []


def test_adapt_new_classes_and_channel_count(base):
    model, meta = transfer.load_base(base)
    classes = ["open", "REST", "wave"]  # reordered, one unknown to the base
    adapted, info = transfer.adapt_model(model, meta, 4, classes)
    src, dst = model.state_dict(), adapted.state_dict()
    assert dst["head.weight"].shape == (3, src["head.weight"].shape[1])
    assert torch.equal(dst["head.weight"][0], src["head.weight"][CLASSES.index("open")])
    assert torch.equal(dst["head.weight"][1], src["head.weight"][CLASSES.index("REST")])
    assert not any(torch.equal(dst["head.weight"][2], row) for row in src["head.weight"])
    assert dst["features.0.weight"].shape[1] == 4 and info["input_layer"] == "new"
    body = [k for k in src if not k.startswith(("head.", "features.0.", "features.1."))]
    assert body and all(torch.equal(src[k], dst[k]) for k in body)
    assert info["head_classes_from_base"] == ["open", "REST"] and info["head_classes_new"] == ["wave"]


def test_adapt_with_channel_map(base):
    model, meta = transfer.load_base(base)
    adapted, info = transfer.adapt_model(model, meta, 3, CLASSES, channel_map=[5, None, 0])
    w_src, w_dst = model.state_dict()["features.0.weight"], adapted.state_dict()["features.0.weight"]
    assert torch.equal(w_dst[:, 0], w_src[:, 5]) and torch.equal(w_dst[:, 2], w_src[:, 0])
    assert info["input_layer"] == "mapped"
    with pytest.raises(ValueError):
        transfer.adapt_model(model, meta, 3, CLASSES, channel_map=[9, None, 0])


def test_param_groups_split_fast_and_slow():
    model = EMGNet(6, 4, width=8)
    groups = transfer.param_groups(model, 1e-2, 1e-3, 0.01)
    fast = {id(p) for g in groups if g["speed"] == "fast" for p in g["params"]}
    for name, p in model.named_parameters():
        is_fast = name.startswith(("head.", "features.0.", "features.1."))
        assert (id(p) in fast) == is_fast, name
    assert {g["lr"] for g in groups if g["speed"] == "slow"} == {1e-3}


def test_wise_interpolation_keeps_new_rows():
    init = EMGNet(6, 3, width=8)
    trained = EMGNet(6, 3, width=8)
    info = {"input_layer": "new", "head_classes_from_base": ["a"]}
    init_state = init.state_dict()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    transfer.wise_interpolate(trained, init_state, 0.5, info, ["a", "b", "c"])
    after = trained.state_dict()
    assert torch.allclose(after["head.weight"][0], (before["head.weight"][0] + init_state["head.weight"][0]) / 2)
    assert torch.equal(after["head.weight"][1:], before["head.weight"][1:])
    assert torch.equal(after["features.0.weight"], before["features.0.weight"])  # new input layer: kept
    body = "features.2.weight"
    assert torch.allclose(after[body], (before[body] + init_state[body]) / 2)


# ---- fine-tuning ----------------------------------------------------------------------------------------
def test_base_carries_a_tuned_recipe(base):
    _, meta = base
    cal = meta["pretrain"]["calibration"]
    assert cal["subjects"] == meta["pretrain"]["val_subjects"]
    assert cal["recipe"]["finetune"]["epochs"] in FAST_GRID["finetune_epochs"]
    assert cal["recipe"]["finetune"]["alpha"] in FAST_GRID["alpha"]
    assert cal["recipe"]["scratch"]["epochs"] in FAST_GRID["scratch_epochs"]
    assert meta["pretrain"]["per_subject_scaling"] and meta["pretrain"]["source"] == "synthetic"


def test_one_repetition_finetune_uses_the_base_recipe_and_serves(base):
    x, y, g = synth_subject(42)
    one = g == 0
    seen = []
    model, meta, metrics = transfer.finetune_model(x[one], y[one], g[one], base, {"sample_rate_hz": RATE},
                                                   class_names=CLASSES, progress_callback=lambda *a: seen.append(a))
    recipe = base[1]["pretrain"]["calibration"]["recipe"]["finetune"]
    assert metrics["best_epoch"] == recipe["epochs"] and metrics["alpha"] == recipe["alpha"]
    # the recipe is first checked on the end of each recording (reported), then trained on everything
    assert len(seen) == 2 * recipe["epochs"] and "base" in meta["training"]["validation"]
    assert "time split" in metrics["validation"] and metrics["accuracy"] is not None
    # in fields, for the Jobs page: measured on the ends of the recordings by a model the served one is not
    assert metrics["val_time_fraction"] == 0.3 and metrics["retrained_on_all"] and "val_groups" not in metrics
    # the Jobs page cites the windows the checked model learnt from: not the held-out ends nor the gap before them
    assert 0 < metrics["n_train_windows"] < metrics["n_train_windows"] + metrics["n_val_windows"] < one.sum()
    assert [s[-1] is None for s in seen] == [False] * recipe["epochs"] + [True] * recipe["epochs"]
    assert meta["base"]["sha256"] == base[1]["sha256"] and meta["base"]["used"]
    weights, meta = artifacts.save_artifact(model, meta, metrics)
    assert _accuracy(weights, meta, x[~one], y[~one]) > 0.9
    # the scaler is the person's own, fit on what they recorded
    assert meta["scaler"] == pp.fit_standardizer(pp.prepare_unscaled(x[one], meta))


@pytest.mark.parametrize("from_scratch", [False, True])
def test_the_served_model_is_the_same_with_or_without_the_recipe_check(base, from_scratch):
    """The check measures the recipe and chooses nothing, so the model served must not depend on it (it did
    through the random streams it used up: how the check's part was cut moved accuracy by about a point)."""
    x, y, g = synth_subject(42)
    one = g == 0
    states = []
    for check in (True, False):
        model, _, metrics = transfer.finetune_model(x[one], y[one], g[one], base,
                                                    {"sample_rate_hz": RATE, "check_fixed": check},
                                                    class_names=CLASSES, from_scratch=from_scratch)
        assert bool(metrics["n_val_windows"]) is check
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_a_training_config_without_a_filter_keeps_the_base_filter(base):
    """A job (or evaluate --base) names no filter: the fine-tuned model filters its input as the base did,
    since the base's weights were learned on filtered windows; a filter the config names wins."""
    weights, meta = base
    filtered = (weights, {**meta, "filter": pp.filter_config({"highpass_hz": 20.0})})
    x, y, g = synth_subject(43)
    one = g == 0
    _, got, _ = transfer.finetune_from_training_config(x[one], y[one], g[one], {"sample_rate_hz": RATE,
                                                       "max_epochs": 1}, base=filtered, class_names=CLASSES)
    assert got["filter"] == filtered[1]["filter"]
    own = {"sample_rate_hz": RATE, "max_epochs": 1, "filter": {"notch_hz": 50.0}}
    _, got, _ = transfer.finetune_from_training_config(x[one], y[one], g[one], own, base=filtered,
                                                       class_names=CLASSES)
    assert got["filter"] == pp.filter_config({"notch_hz": 50.0})


def test_a_recipe_is_capped_only_by_a_max_epochs_the_caller_gave(base):
    """The default cap is for validation-chosen epochs: it must not cut a tuned recipe (scratch recipes go up
    to 64 epochs); an explicit max_epochs (--epochs, a job's epochs) does."""
    x, y, g = synth_subject(43)
    one = g == 0
    model, meta = base
    meta = copy.deepcopy(meta)
    long = transfer.FINETUNE_DEFAULTS["max_epochs"] + 2
    meta["pretrain"]["calibration"]["recipe"]["scratch"]["epochs"] = long
    _, _, metrics = transfer.finetune_model(x[one], y[one], g[one], (model, meta), {"sample_rate_hz": RATE},
                                            class_names=CLASSES, from_scratch=True)
    assert metrics["best_epoch"] == long
    _, _, metrics = transfer.finetune_model(x[one], y[one], g[one], (model, meta),
                                            {"sample_rate_hz": RATE, "max_epochs": 3},
                                            class_names=CLASSES, from_scratch=True)
    assert metrics["best_epoch"] == 3


def test_one_repetition_without_recipe_uses_a_time_split(base):
    weights, meta = base
    bare = {**meta, "pretrain": {**meta["pretrain"], "calibration": None}}
    x, y, g = synth_subject(43)
    one = g == 0
    model, fmeta, metrics = transfer.finetune_model(x[one], y[one], g[one], (weights, bare),
                                                    {"sample_rate_hz": RATE, "max_epochs": 4, "patience": 2},
                                                    class_names=CLASSES)
    assert "time split" in metrics["validation"] and metrics["n_val_windows"] > 0
    assert metrics["retrained_on_all"] and metrics["accuracy"] is not None


def test_time_split_never_overlaps():
    labels = np.array(["a"] * 20 + ["b"] * 10, dtype=object)
    groups = np.zeros(30, dtype=int)
    split = transfer.time_split(labels, groups, 0.3, gap=3)
    assert split[:20].tolist() == [0] * 11 + [-1] * 3 + [1] * 6
    assert split[20:].tolist() == [0] * 4 + [-1] * 3 + [1] * 3


def test_more_repetitions_validate_on_the_last_and_choose_alpha(base):
    x, y, g = synth_subject(44)
    sel = g < 2
    model, meta, metrics = transfer.finetune_model(x[sel], y[sel], g[sel], base,
                                                   {"sample_rate_hz": RATE, "max_epochs": 4, "patience": 2},
                                                   class_names=CLASSES)
    assert metrics["validation"] == "held-out group 1" and metrics["alpha"] in transfer.ALPHA_GRID
    assert metrics["retrained_on_all"] and metrics["val_groups"] == [1] and "val_time_fraction" not in metrics


def test_other_channels_and_classes_than_the_base(base):
    classes = ["REST", "fist", "pinch"]
    x, y, g = synth_subject(45, n_channels=4, classes=classes)
    sel = g < 3
    model, meta, metrics = transfer.finetune_model(x[sel], y[sel], g[sel], base,
                                                   {"sample_rate_hz": RATE, "max_epochs": 6}, class_names=classes)
    assert meta["classes"] == classes and meta["n_device_channels"] == 4
    assert meta["base"]["adaptation"]["input_layer"] == "new"
    assert meta["base"]["adaptation"]["head_classes_new"] == ["pinch"]
    weights, meta = artifacts.save_artifact(model, meta, metrics)
    assert _accuracy(weights, meta, x[g == 3], y[g == 3]) > 0.8


def test_from_scratch_uses_the_same_recipe_without_the_weights(base):
    x, y, g = synth_subject(46)
    one = g == 0
    model, meta, metrics = transfer.finetune_model(x[one], y[one], g[one], base, {"sample_rate_hz": RATE},
                                                   class_names=CLASSES, from_scratch=True)
    assert metrics["best_epoch"] == base[1]["pretrain"]["calibration"]["recipe"]["scratch"]["epochs"]
    assert not meta["base"]["used"] and metrics["alpha"] == 1.0


def test_bad_data_and_cancel(base):
    x, y, g = synth_subject(47)
    with pytest.raises(TrainingDataError, match="one class"):
        transfer.finetune_model(x[y == "fist"], y[y == "fist"], g[y == "fist"], base, {"sample_rate_hz": RATE})
    with pytest.raises(TrainingDataError, match="sample_rate_hz"):
        transfer.finetune_model(x, y, g, base, {})
    with pytest.raises(TrainingDataError, match="no channel varied"):  # every electrode at a rail
        transfer.finetune_model(np.full_like(x, 127), y, g, base, {"sample_rate_hz": RATE})

    def cancel(*_a):
        raise TrainingCancelled("stop")

    with pytest.raises(TrainingCancelled):
        transfer.finetune_model(x, y, g, base, {"sample_rate_hz": RATE}, progress_callback=cancel)


# ---- database job and CLI -------------------------------------------------------------------------------
def test_training_job_fine_tunes_a_registered_base(clean_db, base, monkeypatch):
    sys.path.insert(0, str(REPO / "tests" / "ml_model"))
    from test_jobs import CHANNELS, record_session
    from test_jobs import PATTERNS as JOB_PATTERNS

    from ml_model import jobs
    from semg import repo

    u = repo.create_user(clean_db, "Calibrating", "calib@example.org")
    other = repo.create_user(clean_db, "Other", "other@example.org")
    for gesture in JOB_PATTERNS:
        if gesture != "REST":
            repo.add_gesture(clean_db, u["id"], gesture)
    d = repo.register_device(clean_db, u["id"], CHANNELS, 500.0)
    s = record_session(clean_db, u["id"], d["id"], reps=2)
    weights, meta = base
    base_id = jobs.store_artifact(clean_db, None, None, weights, meta)
    foreign_id = jobs.store_artifact(clean_db, other["id"], None, weights, meta)

    job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"epochs": 4, "base_artifact_id": base_id})
    assert jobs.run_job(job["id"]) == "completed", repo.job_logs(clean_db, job["id"])
    model = repo.latest_model(clean_db, u["id"])
    assert model["metadata"]["base"]["artifact_id"] == base_id and model["metadata"]["base"]["used"]
    assert model["metadata"]["n_device_channels"] == CHANNELS and model["metadata"]["base"]["adaptation"]["input_layer"] == "new"
    logs = repo.job_logs(clean_db, job["id"])
    assert any("fine-tuning base model" in entry["message"] for entry in logs)
    assert any(", held-out accuracy " in entry["message"] for entry in logs)  # repetition 2 held out
    # This base is 200 Hz and the sessions 500 Hz: allowed, but the job says so.
    assert [e["level"] for e in logs if "trained at 200 Hz and these sessions are 500 Hz" in e["message"]] == ["WARNING"]
    with clean_db.cursor() as cur:
        cur.execute("SELECT weights FROM model_artifacts WHERE id = %s", (model["id"],))
        served = artifacts.Predictor(bytes(cur.fetchone()[0]), model["metadata"])
    assert served.predict_proba(np.zeros((2, CHANNELS, served.window), np.float32)).shape == (2, 3)

    # one repetition: checked on the ends of its own recordings, and its log said 'held-out accuracy' all the same
    one = record_session(clean_db, u["id"], d["id"], reps=1, minutes_ago=15)
    job1 = repo.schedule_job(clean_db, u["id"], [one["id"]], {"epochs": 2, "base_artifact_id": base_id})
    assert jobs.run_job(job1["id"]) == "completed", repo.job_logs(clean_db, job1["id"])
    done = repo.job_logs(clean_db, job1["id"])[-1]["message"]
    assert "accuracy on the last 30% of its own recordings (nothing held out: it overstates)" in done, done
    assert "held-out" not in done

    # another user's model, or none, is refused when the job is scheduled (one answer for both) ...
    for refused in (foreign_id, 999999):
        with pytest.raises(repo.NotFound, match=f"base model {refused} not found: give the id of a shared base"):
            repo.schedule_job(clean_db, u["id"], [s["id"]], {"base_artifact_id": refused})
    # ... and by the worker when that changed after scheduling
    for change in ("UPDATE model_artifacts SET user_id = %s WHERE id = %s", "DELETE FROM model_artifacts WHERE id = %s"):
        later_id = jobs.store_artifact(clean_db, None, None, weights, meta)
        job = repo.schedule_job(clean_db, u["id"], [s["id"]], {"base_artifact_id": later_id})
        with clean_db, clean_db.cursor() as cur:
            cur.execute(change, (other["id"], later_id) if "UPDATE" in change else (later_id,))
        assert jobs.run_job(job["id"]) == "failed"
        assert ("another user" if "UPDATE" in change else "does not exist") in repo.get_job(clean_db, job["id"])["error"]


def test_evaluate_cli_with_base_on_real_data(tmp_path):
    """``TrainMLJob.py evaluate --base`` on 1 real subject, one training repetition (a tiny base)."""
    sys.path.insert(0, str(REPO / "tests" / "testing"))
    from tests_conftest_shim import require_myo_data

    data = require_myo_data()
    subjects = pretrain.load_myo_subjects(data, subjects=["Female2", "Male2"], step_ms=100.0)
    with small_grid({"finetune_epochs": (2,), "alpha": (1.0,), "scratch_epochs": (2,)}):
        model, meta, metrics = pretrain.pretrain_model(
            subjects, {"sample_rate_hz": 200.0, "step_ms": 100.0, "max_epochs": 2, "n_val_subjects": 1},
            class_names=["REST", "radial_deviation", "wrist_flexion", "ulnar_deviation", "wrist_extension",
                         "hand_close", "hand_open"])
    pretrain.save_base(model, meta, metrics, tmp_path / "base")
    out = subprocess.run(
        [sys.executable, "ml_model/TrainMLJob.py", "evaluate", "--data-dir", str(data), "--subjects", "Female0",
         "--train-cycles", "0", "--test-cycles", "1,2,3", "--base", str(tmp_path / "base")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["base"] == str(tmp_path / "base") and result["n_subjects"] == 1
    assert result["accuracy"]["Female0"] > 0.5  # 7 classes: chance is 0.14


def test_channel_subset_of_the_same_device_maps_the_input_layer(base):
    x, y, g = synth_subject(48)  # 6 channels like the base; the user's gestures use channels 4, 1, 2
    model, meta, metrics = transfer.finetune_model(x[g < 2], y[g < 2], g[g < 2], base,
                                                   {"sample_rate_hz": RATE, "channels": [4, 1, 2], "max_epochs": 3},
                                                   class_names=CLASSES)
    assert meta["base"]["adaptation"]["input_layer"] == "mapped"
    assert meta["base"]["adaptation"]["channel_map"] == [4, 1, 2]
    assert meta["channels"] == [4, 1, 2] and model.hparams["n_channels"] == 3


def test_evaluate_respects_epochs_with_a_base_and_reports_the_epochs_used(base, tmp_path):
    """The base's one-repetition recipe (2 or 4 epochs here) used to override --epochs, and the JSON reported the
    from-scratch default cap (30) instead of what was trained."""
    from test_pretrain import write_myo_folder

    from ml_model.TrainMLJob import evaluate_subjects

    weights, meta = base
    recipe = meta["pretrain"]["calibration"]["recipe"]["finetune"]["epochs"]
    assert recipe > 1
    artifacts.write_artifact_dir(tmp_path / "base", weights, meta)
    root = write_myo_folder(tmp_path / "myo", subjects=("Alice",), seconds=1.0)
    args = {"data_dir": str(root), "train_cycles": [0], "test_cycles": [1], "base": str(tmp_path / "base")}
    capped = evaluate_subjects(**args, config={"max_epochs": 1})
    assert capped["epochs"] == {"Alice": 1} and capped["max_epochs"] == 1
    free = evaluate_subjects(**args)
    assert free["epochs"] == {"Alice": recipe} and free["max_epochs"] == transfer.FINETUNE_DEFAULTS["max_epochs"]


def test_evaluate_refuses_subjects_the_base_was_pretrained_on(tmp_path):
    """A base trains on every repetition of its subjects, the test cycles too: evaluating such a subject with
    ``--base`` used to report a 'test accuracy' on windows the base had learned, without a word."""
    from test_pretrain import write_myo_folder

    from ml_model.TrainMLJob import evaluate_subjects

    root = write_myo_folder(tmp_path / "myo", subjects=("Alice", "Bob", "Carol"), seconds=1.0)
    with small_grid({"finetune_epochs": (1,), "alpha": (1.0,), "scratch_epochs": (1,)}):
        model, meta, metrics = pretrain.pretrain_from_dir(
            root, ["Carol"], {"max_epochs": 1, "model": {"width": 8}, "n_val_subjects": 1})
    pretrain.save_base(model, meta, metrics, tmp_path / "base")
    args = {"data_dir": str(root), "train_cycles": [0], "test_cycles": [3], "base": str(tmp_path / "base"),
            "config": {"max_epochs": 1}}
    with pytest.raises(ValueError, match=r"subjects \['Alice'\] were in the pretraining data of the base"):
        evaluate_subjects(**args, subjects=["Alice", "Carol"])
    assert evaluate_subjects(**args, subjects=["Carol"])["n_subjects"] == 1  # left out of the base: honest
