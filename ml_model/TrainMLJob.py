"""Training jobs command line (python-fire): ``python ml_model/TrainMLJob.py <command> ...``.

``evaluate`` trains one model per subject of an offline data set through exactly the code path of the
database ``train`` job (``training.train_model`` -> ``artifacts.save_artifact`` -> ``artifacts.Predictor``)
and tests it on held-out repetitions or other sessions. Progress goes to stderr; the LAST stdout line is
one JSON object of figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fire import decorators as fire_decorators

log = logging.getLogger("TrainMLJob")


def _as_list(value: Any, cast=str, name: str | None = None) -> list | None:
    """A list argument: ``0,1,2`` (a string, also ``[0, 1, 2]`` or space-separated), a tuple or list, or one
    value; each item converted with ``cast`` (a ``UsageError`` naming ``--name`` when one does not convert)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        items: Iterable[Any] = [v for v in text.replace(" ", ",").split(",") if v]
    elif isinstance(value, Iterable):
        items = value
    else:
        items = [value]
    out = []
    for v in items:
        try:
            out.append(cast(v.strip() if isinstance(v, str) else v))
        except (TypeError, ValueError):
            what = "whole numbers" if cast is int else "values"
            raise UsageError(f"{'--' + name if name else 'a list'} must be {what} separated by commas, "
                             f"got {value!r}") from None
    return out


# ---- command-line arguments ---------------------------------------------------------------------------
# Fire would turn `--data-dir 2024` into an int, `--seed 1,2` into a tuple and `--int8 false` into the
# string 'false' (which is truthy). So every command takes its arguments as the strings typed
# (``fire.decorators.SetParseFn(str)``) and converts them with the helpers below: one place, one kind of
# error (``UsageError``: one line on stderr, exit status 2). The helpers also accept real Python values,
# for callers that use ``Jobs`` directly.
class UsageError(ValueError):
    """A command-line argument of the wrong form."""


_raw_args = fire_decorators.SetParseFn(str)
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _flag(name: str, value: Any) -> bool:
    """A boolean flag: real bools, or true/false, yes/no, 1/0 (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"--{name} must be true or false (or yes/no, 1/0), got {value!r}")


def _whole(name: str, value: Any, minimum: int | None = None) -> int:
    """A whole number (``--epochs 3``), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"--{name} must be a whole number, got {value!r}")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise UsageError(f"--{name} must be a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, got {number}")
    return number


def _seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds (``--poll 0.5``)."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not 0 < number < float("inf"):
        raise UsageError(f"--{name} must be a positive number of seconds, got {value!r}")
    return number


def _path(name: str, value: Any) -> str:
    """A path as typed (``--out 2024`` is the folder "2024"), ``~`` expanded, a trailing "/" kept (a folder)."""
    text = str(value)
    if isinstance(value, bool) or not text.strip():
        raise UsageError(f"--{name} must be a path, got {value!r}")
    path = str(Path(text).expanduser())
    return path + os.sep if text.endswith(("/", os.sep)) and not path.endswith(os.sep) else path


def _optional(convert, name: str, value: Any, *args: Any) -> Any:
    return None if value is None else convert(name, value, *args)


def evaluate_subjects(
    data_dir: str,
    train_session: str = "training0",
    test_sessions: list[str] | None = None,
    train_cycles: list[int] | None = None,
    test_cycles: list[int] | None = None,
    subjects: list[str] | None = None,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    base: str | None = None,
) -> dict[str, Any]:
    """Per-subject train/test on the Myo-armband layout; returns the figures printed by ``evaluate``.
    ``base``: a pretrained artifact dir to fine-tune from (``ml_model.transfer``) instead of a random init."""
    import numpy as np

    from ml_model import artifacts, datasets, training
    from ml_model import preprocessing as pp

    cfg = training.merge_config({"sample_rate_hz": datasets.MYO_SAMPLE_RATE_HZ, **(config or {})})
    win, step = pp.window_params(cfg["window_ms"], cfg["step_ms"], cfg["sample_rate_hz"])
    subjects = subjects or datasets.list_subjects(data_dir)
    if not subjects:
        raise ValueError(f"no subject folders in {data_dir} (expected <subject>/<session>/classe_<i>.dat)")
    if not test_sessions and not test_cycles:
        raise ValueError("give --test-sessions, or --test-cycles to hold out repetitions of the training session")
    # Testing on the training session (no --test-sessions, or it is one of them) is honest only on cycles the
    # model did not train on: without --train-cycles it trains on the other cycles, with them they must not meet.
    tests_train_session = not test_sessions or train_session in test_sessions
    if tests_train_session and not test_cycles:
        raise ValueError(f"the training session {train_session} is also a test session: give --test-cycles to "
                         "hold out repetitions of it")
    if tests_train_session and train_cycles is not None and set(train_cycles) & set(test_cycles):
        raise ValueError(f"train cycles {train_cycles} and test cycles {test_cycles} overlap in session {train_session}")
    base_artifact = None if base is None else artifacts.read_artifact_dir(base)  # read once, for every subject
    if base_artifact is not None:  # a base learned every repetition of its subjects: none of theirs is held out
        pretrained = base_artifact[1].get("pretrain") or {}
        seen = sorted(set(subjects) & set(pretrained.get("subjects") or []))
        if seen and pretrained.get("source") in (None, "myo-armband"):
            raise ValueError(f"subjects {seen} were in the pretraining data of the base {base} (all their "
                             "repetitions, the test ones too): leave them out with pretrain --exclude-subjects, "
                             "or evaluate other subjects")

    accuracy: dict[str, float] = {}
    per_class: dict[str, dict[str, float | None]] = {}
    confusion: dict[str, dict[str, Any]] = {}
    n_windows: dict[str, dict[str, int]] = {}
    val_accuracy: dict[str, float] = {}
    train_seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    epochs: dict[str, int] = {}
    max_epochs = cfg["max_epochs"]
    model_bytes = 0
    t_all = time.perf_counter()
    for i, subject in enumerate(subjects):
        recs = datasets.load_session(data_dir, subject, train_session, cycles=train_cycles)
        if tests_train_session and train_cycles is None:
            recs = [r for r in recs if r.cycle not in set(test_cycles)]
        x, labels, groups = datasets.recordings_to_windows(recs, win, step)

        def progress(epoch, n_epochs, tl, ta, vl, va, _s=subject):
            val = f" val_loss {vl:.3f} val_acc {va:.3f}" if va is not None else " (all data)"
            log.debug("%s epoch %d/%d loss %.3f acc %.3f%s", _s, epoch, n_epochs, tl, ta, val)

        t0, cpu0 = time.perf_counter(), time.process_time()
        train, train_cfg = training.train_model, cfg
        if base_artifact is not None:  # fine-tune: only the options given here override the fine-tuning defaults
            import functools

            from ml_model import transfer

            train = functools.partial(transfer.finetune_from_training_config, base=base_artifact)
            train_cfg = {"sample_rate_hz": cfg["sample_rate_hz"], **(config or {})}
        model, meta, metrics = train(
            x, labels, groups, train_cfg, seed=seed, progress_callback=progress, class_names=datasets.MYO_CLASS_NAMES
        )
        weights, meta = artifacts.save_artifact(model, meta, metrics)
        # What the training actually did: the final model's epochs, under the cap of the method used
        # (fine-tuning has its own default cap and may take its epoch count from the base's recipe).
        epochs[subject] = int(meta["training"]["epochs"])
        max_epochs = meta["training"]["config"]["max_epochs"]
        train_seconds[subject] = round(time.perf_counter() - t0, 3)
        cpu_seconds[subject] = round(time.process_time() - cpu0, 3)
        model_bytes = max(model_bytes, len(weights))

        # Test through the serving path: the stored bytes, rebuilt, on raw windows.
        predictor = artifacts.Predictor(weights, meta)
        if test_sessions:
            test = [r for s in test_sessions for r in datasets.load_session(data_dir, subject, s, cycles=test_cycles)]
        else:
            test = datasets.load_session(data_dir, subject, train_session, cycles=test_cycles)
        tx, tlabels, _ = datasets.recordings_to_windows(test, win, step)
        if len(tx) == 0:
            raise ValueError(f"{subject}: no test windows in sessions {test_sessions or [train_session]}")
        pred = np.asarray(predictor.classes)[predictor.predict_proba(tx).argmax(axis=1)]
        accuracy[subject] = round(float(np.mean(pred == tlabels.astype(str))), 5)
        # The figures the Jobs page shows for a job (training.class_metrics), here on the test windows.
        index = {c: k for k, c in enumerate(predictor.classes)}
        figures = training.class_metrics(np.array([index[str(v)] for v in tlabels]),
                                         np.array([index[str(v)] for v in pred]), predictor.classes)
        per_class[subject] = {c: None if v is None else round(v, 5) for c, v in figures["per_class_accuracy"].items()}
        confusion[subject] = figures["confusion_matrix"]
        n_windows[subject] = {"train": int(len(x)), "test": int(len(tx))}
        val_accuracy[subject] = round(metrics["accuracy"], 5)
        log.info(
            "[%d/%d] %s: test accuracy %.4f (validation %.4f, epoch %d), %d train / %d test windows, "
            "%.1f s (%.1f s CPU)",
            i + 1, len(subjects), subject, accuracy[subject], metrics["accuracy"], metrics["best_epoch"],
            len(x), len(tx), train_seconds[subject], cpu_seconds[subject],
        )

    return {
        "mean_accuracy": round(statistics.fmean(accuracy.values()), 5),
        "accuracy": accuracy,
        # per subject, on its test windows: recall per class, and the confusion matrix (rows true, columns
        # predicted, classes in the listed order); windows overlap (window_ms long, one every step_ms)
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion,
        "n_windows": n_windows,
        "window_ms": cfg["window_ms"],
        "step_ms": cfg["step_ms"],
        "train_seconds": train_seconds,
        "median_train_seconds": round(statistics.median(train_seconds.values()), 3),
        "model_bytes": model_bytes,
        # CPU seconds of the training process: less distorted than wall time when the host is shared.
        "median_train_cpu_seconds": round(statistics.median(cpu_seconds.values()), 3),
        "mean_val_accuracy": round(statistics.fmean(val_accuracy.values()), 5),
        "n_subjects": len(subjects),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "split": {
            "train_session": train_session, "train_cycles": train_cycles,
            "test_sessions": test_sessions or [train_session], "test_cycles": test_cycles,
        },
        "seed": seed,
        "max_epochs": max_epochs,
        "epochs": epochs,
        "base": base,
    }


@contextlib.contextmanager
def _user_errors(command: str):
    """Bad input or an unreachable database ends the command with one clear line on stderr and exit status 2,
    not a traceback (the library code raises these with messages meant for the user)."""
    import psycopg2

    from semg.db import first_line

    try:
        yield
    except psycopg2.OperationalError as e:
        print(f"TrainMLJob {command}: database unreachable: {first_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, LookupError, OSError) as e:  # TrainingDataError is a ValueError, FileNotFoundError an OSError
        print(f"TrainMLJob {command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class Jobs:
    """Training job commands: ``train JOB_ID``, ``worker``, ``cancel JOB_ID`` (database jobs), ``evaluate``
    (offline per-subject accuracy on a recorded data set), ``pretrain`` (a base model for fine-tuning) and
    ``export JOB_ID`` (ONNX / TorchScript for running off the server) and ``score JOB_ID --sessions ...`` (its
    model tested on other sessions)."""

    @_raw_args
    def evaluate(
        self,
        data_dir: str,
        train_session: str = "training0",
        test_sessions: Any = None,
        train_cycles: Any = None,
        test_cycles: Any = None,
        subjects: Any = None,
        epochs: int | None = None,
        seed: int = 0,
        verbose: bool = False,
        base: str | None = None,
    ) -> None:
        """Train one model per subject on ``train_session`` (optionally only ``train_cycles``) and test it on
        ``test_sessions``, or with no test session on ``test_cycles`` of the training session (whenever the
        training session is tested, ``test_cycles`` must not meet ``train_cycles``; without ``train_cycles`` it
        trains on the other cycles). ``epochs`` caps the epochs (default: the training default), also those a
        base's recipe asks for. ``base``: fine-tune this pretrained artifact dir (from ``pretrain``) instead of
        training from scratch; one training cycle is then enough. Prints one JSON line of figures last
        (``max_epochs``: the cap in force, ``epochs``: per subject, the epochs the final model trained)."""
        with _user_errors("evaluate"):
            verbose = _flag("verbose", verbose)
            epochs = _optional(_whole, "epochs", epochs, 1)
            args = {
                "data_dir": _path("data-dir", data_dir),
                "train_session": str(train_session),
                "test_sessions": _as_list(test_sessions, name="test-sessions"),
                "train_cycles": _as_list(train_cycles, int, "train-cycles"),
                "test_cycles": _as_list(test_cycles, int, "test-cycles"),
                "subjects": _as_list(subjects, name="subjects"),
                "config": {} if epochs is None else {"max_epochs": epochs},
                "seed": _whole("seed", seed),
                "base": _optional(_path, "base", base),
            }
        _setup_logging(verbose)
        with _user_errors("evaluate"):
            result = evaluate_subjects(**args)
        log.info(
            "mean accuracy %.4f over %d subjects, median training %.1f s, model %d bytes",
            result["mean_accuracy"], result["n_subjects"], result["median_train_seconds"], result["model_bytes"],
        )
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    @_raw_args
    def pretrain(
        self,
        data_dir: str,
        out: str,
        exclude_subjects: Any = None,
        register: bool = False,
        epochs: int | None = None,
        seed: int = 0,
        verbose: bool = False,
    ) -> None:
        """Pretrain a base model on every subject of ``data_dir`` (Myo-armband folders or NinaPro DB5 .mat
        files) except ``exclude_subjects``, write it as an artifact dir ``out``; ``register`` also stores it
        in model_artifacts as a shared base (user_id NULL). Prints one JSON line last (ml_model.pretrain)."""
        with _user_errors("pretrain"):
            verbose = _flag("verbose", verbose)
            args = {
                "data_dir": _path("data-dir", data_dir),
                "out": _path("out", out),
                "exclude_subjects": _as_list(exclude_subjects, name="exclude-subjects") or [],
                "register": _flag("register", register),
                "epochs": _optional(_whole, "epochs", epochs, 1),
                "seed": _whole("seed", seed),
            }
        _setup_logging(verbose)
        from ml_model import pretrain
        from semg.config import settings_or_exit

        if args["register"]:  # a bad setting is one line now, not a traceback after the training
            args["settings"] = settings_or_exit("TrainMLJob pretrain")
        with _user_errors("pretrain"):
            summary = pretrain.cli_pretrain(**args)
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()

    @_raw_args
    def export(self, job_id: int | None = None, format: str = "onnx", out: str | None = None,  # noqa: A002
               artifact_dir: str | None = None, int8: bool = True, verbose: bool = False) -> None:
        """Export a job's model (or ``--artifact-dir``) to ``--format onnx`` (plus an int8 variant) or
        ``torchscript``: the file takes raw windows and returns probabilities; a sidecar JSON describes it.
        Prints one JSON line last: paths, sizes, max abs difference vs PyTorch (ml_model.export)."""
        with _user_errors("export"):
            verbose = _flag("verbose", verbose)
            args = {
                "job_id": None if job_id is None else _job_id(job_id),
                "fmt": str(format),
                "out": _optional(_path, "out", out),
                "artifact_dir": _optional(_path, "artifact-dir", artifact_dir),
                "int8": _flag("int8", int8),
            }
        _setup_logging(verbose)
        from ml_model import export
        from semg.config import settings_or_exit

        if args["job_id"] is not None:  # the job's artifact is in the database
            args["settings"] = settings_or_exit("TrainMLJob export")
        with _user_errors("export"):
            report = export.cli_export(**args)
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()

    @_raw_args
    def score(self, job_id: int, sessions: Any = None, verbose: bool = False) -> None:
        """Test a job's model on chosen capture sessions of its user (``--sessions 12,13``), e.g. recorded on
        another day: prints one JSON line with the accuracy, per-class accuracy (recall) and confusion matrix of
        their windows, as the Jobs page shows a job's, plus the windows counted, those of gestures the model does
        not know (left out) and which of the sessions the job trained on (``trained_on``: not a test there)."""
        with _user_errors("score"):
            verbose = _flag("verbose", verbose)
            ids = _as_list(sessions, int, "sessions")
            if not ids:
                raise UsageError("--sessions: give the capture session ids to test the model on (e.g. 12,13)")
        job_id = _job_id(job_id)
        _setup_logging(verbose)
        from ml_model import jobs
        from semg import db
        from semg.config import settings_or_exit

        settings = settings_or_exit("TrainMLJob score")
        with _user_errors("score"), contextlib.closing(db.connect(settings)) as conn:
            try:
                result = jobs.score_job_model(conn, job_id, ids, settings.semg_train_max_window_mb * 2**20)
            except jobs.JobFailed as e:
                raise ValueError(str(e)) from None
        log.info("job %s's model on sessions %s: accuracy %.4f over %d windows", job_id, result["sessions"],
                 result["accuracy"], result["n_windows"])
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()

    @_raw_args
    def train(self, job_id: int, verbose: bool = False) -> None:
        """Take one scheduled job from the database and train it now, with a heartbeat, as the worker does for
        each job it takes. Exit status 0 when the job completed, 1 when it failed, was canceled or was taken
        from this process (the job row says why), 2 when it is not scheduled (e.g. a worker already runs it:
        it is left alone, never trained twice)."""
        with _user_errors("train"):
            verbose = _flag("verbose", verbose)
        job_id = _job_id(job_id)
        _setup_logging(verbose)
        from ml_model import jobs
        from semg.config import settings_or_exit

        settings = settings_or_exit("TrainMLJob train")
        _yield_to_live_path(settings.semg_train_nice)
        with _user_errors("train"):
            status = jobs.run_job(job_id, settings)
        sys.stdout.write(json.dumps({"job_id": job_id, "status": status}) + "\n")
        sys.stdout.flush()
        if status != "completed":
            raise SystemExit(1)

    @_raw_args
    def worker(self, poll: float = 1.0, once: bool = False, verbose: bool = False) -> None:
        """Long-running: take scheduled jobs from the PostgreSQL queue (FOR UPDATE SKIP LOCKED, so several
        workers on several machines share it) and train them; re-queue jobs whose worker died.
        SIGTERM/SIGINT stop it after the current epoch's job state is saved."""
        with _user_errors("worker"):
            poll, once, verbose = _seconds("poll", poll), _flag("once", once), _flag("verbose", verbose)
        _setup_logging(verbose)
        import signal
        import threading

        from ml_model import jobs
        from semg.config import settings_or_exit

        settings = settings_or_exit("TrainMLJob worker")
        _yield_to_live_path(settings.semg_train_nice)
        stop = threading.Event()

        def _stop(signum, _frame):
            log.info("signal %s: stopping after the current job", signum)
            stop.set()
            jobs.request_stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        jobs.worker_loop(settings, poll_s=poll, once=once, stop=stop)

    @_raw_args
    def cancel(self, job_id: int) -> None:
        """Cancel a scheduled job at once, or ask a running job to stop (it ends as canceled)."""
        job_id = _job_id(job_id)
        _setup_logging(False)
        from semg import db, repo
        from semg.config import settings_or_exit

        settings = settings_or_exit("TrainMLJob cancel")
        with _user_errors("cancel"), contextlib.closing(db.connect(settings)) as conn:  # RepoError is a ValueError
            job = repo.cancel_job(conn, job_id)
        sys.stdout.write(json.dumps({"job_id": job["id"], "status": job["status"],
                                     "cancel_requested": job["cancel_requested"]}) + "\n")


def _job_id(value: Any) -> int:
    try:
        job_id = int(value)
    except (TypeError, ValueError):
        print(f"TrainMLJob: JOB_ID must be a whole number, got {value!r}", file=sys.stderr)
        raise SystemExit(2) from None
    if job_id < 1:
        print("TrainMLJob: JOB_ID must be positive", file=sys.stderr)
        raise SystemExit(2)
    return job_id


def _yield_to_live_path(nice: int) -> None:
    """Lower this process's priority to SEMG_TRAIN_NICE: training saturates a core for tens of seconds and
    must not take it from the live path (UDP server, inference worker, API) on a small shared machine."""
    current = os.nice(0)
    if nice > current:
        os.nice(nice - current)
        log.info("training at nice %d (SEMG_TRAIN_NICE)", nice)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    import fire

    # Fire would print a command's return value; commands write their own output, so return None.
    # An instance, not the class: with the class, `--help` shows the constructor ("TrainMLJob.py -") and no commands.
    fire.Fire(Jobs())


if __name__ == "__main__":
    try:
        import ml_model  # noqa: F401
    except ImportError:
        # Run as a script from a checkout that is not pip-installed: make the repo root importable.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
