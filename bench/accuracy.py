"""Accuracy benchmark: the ``TrainMLJob.py evaluate`` figures on the Myo-armband development set.

Trains one model per subject on cycles 0-2 of session training0 and tests on cycle 3 (whole repetitions are
held out, never random windows). Progress goes to stderr; the last stdout line is one JSON object
(mean_accuracy, per-subject accuracy and train_seconds, median_train_seconds, model_bytes, ...).

    python bench/accuracy.py [--data-dir DIR] [--subjects Female0,Male1] [--epochs N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    try:
        import ml_model  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
    from ml_model.datasets import MYO_DATA_ENV, default_myo_dir
    from ml_model.TrainMLJob import _as_list, _setup_logging, evaluate_subjects

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help=f"Myo pretraining folder (default: ${MYO_DATA_ENV} or ../shared)")
    ap.add_argument("--subjects", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--epochs", type=int, default=None, help="max epochs (default: the training default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data_dir = Path(args.data_dir) if args.data_dir else default_myo_dir()
    if not data_dir.is_dir():
        print(json.dumps({"error": f"Myo data not found at {data_dir}; set {MYO_DATA_ENV}"}))
        return 2
    _setup_logging()
    result = evaluate_subjects(
        data_dir=str(data_dir),
        train_session="training0",
        train_cycles=[0, 1, 2],
        test_cycles=[3],
        subjects=_as_list(args.subjects),
        config={} if args.epochs is None else {"max_epochs": args.epochs},
        seed=args.seed,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
