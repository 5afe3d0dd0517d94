"""Calibration benchmark: how well does a pretrained base + ONE repetition per gesture work for a new person?

Leave-subjects-out on the Myo-armband development set (19 people, 7 gestures, 4 repetitions of ~5 s each):

1. pretrain a base on 15 subjects (all their repetitions; epoch count chosen on one of those 15, held out);
2. for each of the 4 left-out subjects, train with repetition 0 ONLY (about 5 s per gesture):
   - ``finetune``: the base adapted and fine-tuned (``ml_model.transfer.finetune_model``),
   - ``scratch``: the same recipe from a random initialisation (same epochs rule, augmentation, sampling);
3. test both on repetitions 1-3 of the subject through the serving path (``artifacts.Predictor``), per window;
4. export each fine-tuned model to ONNX (fp32 and int8) and check it on the same test windows.

Honesty: repetitions 1-3 of the left-out subjects are never used for training, scaling or choosing anything.
With one repetition there is no second one to validate on, so the recipe (epoch count, and for fine-tuning the
WiSE interpolation alpha) is chosen DURING PRETRAINING on 3 of the 15 pretraining subjects, held out from the
base's weights for that purpose (``pretrain.tune_calibration``: their first repetition -> their other ones),
for fine-tuning and for scratch alike; the base is then retrained on all 15. The fine-tuning job also reports a
check accuracy on a time split of repetition 0 (the last 30 % of each recording), which chooses nothing.

Which subjects are left out: ``--held-out A,B,C,D``; by default 4 drawn with ``random.Random(seed)`` from the
sorted subject list (seed 0: Female1, Male1, Male3, Male4, chosen before any result was seen). ``--folds all``
rotates so every subject is left out once (5 pretrainings; the last fold leaves out the remaining 3).

``--train-reps 2`` (or 3) trains on that many repetitions instead and tests on the rest: how much a second
calibration repetition buys. The acceptance figure is the default, one repetition. With two or more, the
fine-tuning job chooses epochs and alpha on its last repetition and retrains on all (as it does for users).

    python bench/calibration.py [--data-dir DIR] [--held-out ...] [--folds 1|all] [--pretrain-epochs N]
                                [--train-reps 1|2|3] [--base-dir DIR (reuse/keep the pretrained bases)] [--no-export]

Progress goes to stderr; the LAST stdout line is one JSON object with ``finetune_mean_accuracy``,
``scratch_mean_accuracy``, per-subject figures, timings and the export figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("calibration")

# Base recipe of the benchmark (and of `TrainMLJob.py pretrain`'s defaults where they agree).
PRETRAIN_CONFIG: dict[str, Any] = {"step_ms": 50.0}


def folds_of(subjects: list[str], seed: int, size: int = 4) -> list[list[str]]:
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    first = sorted(random.Random(seed).sample(sorted(subjects), size))
    rest = [s for s in order if s not in first]
    return [first] + [sorted(rest[i : i + size]) for i in range(0, len(rest), size)]


def _acc(predictor, x, labels) -> float:
    import numpy as np

    pred = np.asarray(predictor.classes)[predictor.predict_proba(x).argmax(axis=1)]
    return float(np.mean(pred == np.asarray(labels).astype(str)))


def get_base(data_dir: Path, held_out: list[str], epochs: int | None, seed: int, base_dir: Path | None,
             model: dict | None) -> tuple[bytes, dict, dict]:
    """Pretrain (or reuse from base_dir) the base for one fold; returns (weights, meta, info)."""
    from ml_model import artifacts, datasets, pretrain

    cfg = {**PRETRAIN_CONFIG, "sample_rate_hz": datasets.MYO_SAMPLE_RATE_HZ}
    if epochs is not None:
        cfg["max_epochs"] = int(epochs)
    if model:
        cfg["model"] = model
    key = hashlib.sha256(json.dumps([sorted(held_out), cfg, seed, str(data_dir)], sort_keys=True).encode()).hexdigest()[:12]
    folder = base_dir / f"base-{key}" if base_dir else None
    if folder is not None and (folder / artifacts.META_FILE).is_file():
        weights, meta = artifacts.read_artifact_dir(folder)
        log.info("reusing base %s (left out %s)", folder, held_out)
        return weights, meta, {"reused": str(folder), "pretrain_seconds": meta.get("metrics", {}).get("train_seconds")}
    t0, c0 = time.perf_counter(), time.process_time()
    subjects = pretrain.load_myo_subjects(data_dir, exclude=held_out, step_ms=cfg["step_ms"])
    mdl, meta, metrics = pretrain.pretrain_model(subjects, cfg, seed=seed, class_names=datasets.MYO_CLASS_NAMES,
                                                 source="myo-armband")
    slim = {k: v for k, v in metrics.items() if k != "history"}
    weights, meta = artifacts.save_artifact(mdl, meta, slim)
    if folder is not None:
        artifacts.write_artifact_dir(folder, weights, meta)
    info = {"pretrain_seconds": round(time.perf_counter() - t0, 1), "pretrain_cpu_seconds": round(time.process_time() - c0, 1),
            "val_subjects": meta["pretrain"]["val_subjects"], "val_accuracy": round(metrics["accuracy"], 4),
            "best_epoch": metrics["best_epoch"], "n_windows": meta["pretrain"]["n_windows"]}
    log.info("pretrained on %d subjects in %.0f s: held-out subject accuracy %.4f at epoch %d",
             len(subjects), info["pretrain_seconds"], metrics["accuracy"], metrics["best_epoch"])
    return weights, meta, info


def run_subject(data_dir: Path, subject: str, base: tuple[bytes, dict], seed: int, export: bool,
                ft_config: dict | None, train_reps: int = 1) -> dict[str, Any]:

    from ml_model import artifacts, datasets, transfer
    from ml_model import preprocessing as pp

    meta_b = base[1]
    win, step = pp.window_params(meta_b["window_ms"], pp.DEFAULT_STEP_MS, datasets.MYO_SAMPLE_RATE_HZ)
    recs = datasets.load_session(data_dir, subject, "training0")
    x0, y0, g0 = datasets.recordings_to_windows([r for r in recs if r.cycle < train_reps], win, step)
    xt, yt, _ = datasets.recordings_to_windows([r for r in recs if r.cycle >= train_reps], win, step)
    # the step the windows were cut at: fine-tuning's check split leaves a window's worth of them out before its
    # end part, counted in windows of that step (the base's 50 ms let 2 of the 25 ms windows overlap training)
    cfg = {"sample_rate_hz": datasets.MYO_SAMPLE_RATE_HZ, "step_ms": pp.DEFAULT_STEP_MS, **(ft_config or {})}
    out: dict[str, Any] = {"n_train_windows": int(len(x0)), "n_test_windows": int(len(xt))}
    zs_meta = dict(meta_b)
    zs_meta["scaler"] = pp.fit_standardizer(pp.prepare_unscaled(x0, zs_meta))  # the person's scale only
    out["zero_shot_accuracy"] = round(_acc(artifacts.Predictor(base[0], zs_meta), xt, yt), 5)
    for method in ("finetune", "scratch"):
        t0, c0 = time.perf_counter(), time.process_time()
        model, meta, metrics = transfer.finetune_model(x0, y0, g0, base, cfg, seed=seed,
                                                       class_names=datasets.MYO_CLASS_NAMES,
                                                       from_scratch=method == "scratch")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        weights, meta = artifacts.save_artifact(model, meta, metrics)
        acc = _acc(artifacts.Predictor(weights, meta), xt, yt)
        check = metrics.get("accuracy")
        out[method] = {"accuracy": round(acc, 5), "epochs": metrics["best_epoch"], "alpha": metrics.get("alpha"),
                       "check_accuracy": None if check is None else round(check, 4),
                       "epochs_from": metrics["validation"], "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)}
        if method == "finetune" and export:
            from ml_model import export as ex

            cmp = ex.compare(weights, meta, xt, yt, formats=("onnx", "onnx-int8"))
            out["export"] = {"onnx_max_abs_diff": cmp["onnx"]["max_abs_diff"],
                             "onnx_bytes": cmp["onnx"]["bytes"], "int8_bytes": cmp["onnx-int8"]["bytes"],
                             "int8_max_abs_diff": cmp["onnx-int8"]["max_abs_diff"],
                             "int8_accuracy": round(cmp["onnx-int8"]["accuracy"], 5),
                             "int8_accuracy_change_points": cmp["onnx-int8"]["accuracy_change_points"],
                             "safetensors_bytes": len(weights)}
    log.info("%s: fine-tuned %.4f, scratch %.4f, zero-shot %.4f (%.1f s / %.1f s)", subject,
             out["finetune"]["accuracy"], out["scratch"]["accuracy"], out["zero_shot_accuracy"],
             out["finetune"]["seconds"], out["scratch"]["seconds"])
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        import ml_model  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
    from ml_model import datasets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help=f"Myo pretraining folder (default ${datasets.MYO_DATA_ENV} or ../shared)")
    ap.add_argument("--held-out", default=None, help="comma-separated subjects to leave out (one fold)")
    ap.add_argument("--folds", default="1", help="1 (default: one fold of 4) or 'all' (every subject left out once)")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="max pretraining epochs (default: pretrain's)")
    ap.add_argument("--model", default=None, help="JSON EMGNet hyper-parameters of the base (default: pretrain's)")
    ap.add_argument("--finetune-config", default=None, help="JSON overrides of transfer.FINETUNE_DEFAULTS")
    ap.add_argument("--train-reps", type=int, default=1, choices=(1, 2, 3),
                    help="repetitions to train on (default 1); the subject's later ones are the test set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-dir", type=Path, default=None, help="keep pretrained bases here and reuse them")
    ap.add_argument("--no-export", action="store_true", help="skip the ONNX export checks")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("calibration", "ml_model.pretrain"):  # progress; -v adds every fine-tuning run and more
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    data_dir = Path(args.data_dir) if args.data_dir else datasets.default_myo_dir()
    if not (data_dir / "Female0").is_dir():
        print(json.dumps({"error": f"Myo data not found at {data_dir}; set {datasets.MYO_DATA_ENV}"}))
        return 2
    subjects = datasets.list_subjects(data_dir)
    if args.held_out:
        folds = [[s for s in args.held_out.replace(" ", ",").split(",") if s]]
        unknown = sorted(set(folds[0]) - set(subjects))
        if unknown:
            ap.error(f"unknown subjects {unknown}")
    else:
        folds = folds_of(subjects, args.seed)
        if args.folds != "all":
            folds = folds[: int(args.folds)]
    try:
        model = json.loads(args.model) if args.model else None
        ft_config = json.loads(args.finetune_config) if args.finetune_config else None
        if ft_config is not None:  # fail now, not after the first pretraining
            from ml_model import transfer

            transfer.merge_finetune_config(ft_config)
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        ap.error(f"--model / --finetune-config: {e}")

    t_all = time.perf_counter()
    per_subject: dict[str, Any] = {}
    fold_info = []
    for k, held in enumerate(folds):
        log.info("fold %d/%d: leaving out %s", k + 1, len(folds), held)
        weights, meta, info = get_base(data_dir, held, args.pretrain_epochs, args.seed, args.base_dir, model)
        cal = meta["pretrain"].get("calibration") or {}
        fold_info.append({"held_out": held, "pretrain_subjects": meta["pretrain"]["subjects"], **info,
                          "base_model": meta["model"], "base_bytes": len(weights),
                          "recipe": cal.get("recipe"), "recipe_subjects": cal.get("subjects"),
                          "recipe_val_accuracy": cal.get("val_accuracy")})
        for subject in held:
            per_subject[subject] = run_subject(data_dir, subject, (weights, meta), args.seed, not args.no_export,
                                               ft_config, args.train_reps)

    def mean(key: str, sub: str | None = None) -> float:
        vals = [(v[key][sub] if sub else v[key]) for v in per_subject.values()]
        return round(statistics.fmean(vals), 5)

    ft, sc = mean("finetune", "accuracy"), mean("scratch", "accuracy")
    result: dict[str, Any] = {
        "finetune_mean_accuracy": ft,
        "scratch_mean_accuracy": sc,
        "gain_points": round(100 * (ft - sc), 2),
        "zero_shot_mean_accuracy": mean("zero_shot_accuracy"),
        "finetune_accuracy": {s: v["finetune"]["accuracy"] for s, v in per_subject.items()},
        "scratch_accuracy": {s: v["scratch"]["accuracy"] for s, v in per_subject.items()},
        "zero_shot_accuracy": {s: v["zero_shot_accuracy"] for s, v in per_subject.items()},
        "finetune_seconds": {s: v["finetune"]["seconds"] for s, v in per_subject.items()},
        "scratch_seconds": {s: v["scratch"]["seconds"] for s, v in per_subject.items()},
        "median_finetune_cpu_seconds": round(statistics.median(v["finetune"]["cpu_seconds"] for v in per_subject.values()), 2),
        "median_scratch_cpu_seconds": round(statistics.median(v["scratch"]["cpu_seconds"] for v in per_subject.values()), 2),
        # what the fine-tuning job itself reports (the Jobs page's figure): with one repetition, measured on the
        # last 30 % of its own recordings, chooses nothing; set beside finetune_accuracy it shows how far it overstates
        "finetune_check_accuracy": {s: v["finetune"]["check_accuracy"] for s, v in per_subject.items()},
        "finetune_epochs": {s: v["finetune"]["epochs"] for s, v in per_subject.items()},
        "scratch_epochs": {s: v["scratch"]["epochs"] for s, v in per_subject.items()},
        "folds": fold_info,
        "n_subjects": len(per_subject),
        "train_repetitions": args.train_reps,
        "protocol": {"train": (f"repetitions 0-{args.train_reps - 1}" if args.train_reps > 1 else "repetition 0")
                     + f" of training0 (about {5 * args.train_reps} s per gesture)",
                     "test": f"repetitions {args.train_reps}-3" if args.train_reps < 3 else "repetition 3",
                     "metric": "per-window accuracy, 250 ms windows every 25 ms, through artifacts.Predictor",
                     "recipe": "epochs and alpha tuned during pretraining on 3 pretraining subjects (see folds)"
                     if args.train_reps == 1 else "epochs and alpha chosen on the last training repetition"},
        "seed": args.seed,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    exports = [v["export"] for v in per_subject.values() if "export" in v]
    if exports:
        result["export"] = {
            "onnx_max_abs_diff": max(e["onnx_max_abs_diff"] for e in exports),
            "int8_max_abs_diff": max(e["int8_max_abs_diff"] for e in exports),
            "onnx_bytes": exports[0]["onnx_bytes"], "int8_bytes": exports[0]["int8_bytes"],
            "safetensors_bytes": exports[0]["safetensors_bytes"],
            "int8_mean_accuracy": round(statistics.fmean(e["int8_accuracy"] for e in exports), 5),
            "int8_accuracy_change_points": round(statistics.fmean(e["int8_accuracy_change_points"] for e in exports), 3),
        }
    log.info("fine-tuned %.4f vs scratch %.4f (+%.2f points), zero-shot %.4f over %d subjects, %.0f s",
             ft, sc, result["gain_points"], result["zero_shot_mean_accuracy"], len(per_subject), result["total_seconds"])
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
