"""Live recognition under packet loss: the worker bridging lost packets vs starting a new run at every gap.

    python bench/packet_loss.py [--subjects Female0,Male0,...] [--loss 0.01,0.05,0.1] [--packet 10] [--epochs N] [--seed 0]

For each Myo subject a model is trained on repetitions 0-2 (as ``bench/accuracy.py``); repetition 3 is then
streamed gesture after gesture, in packets of ``--packet`` samples (10 = the Myo bridge's default batch, 50 ms),
through the live worker's own buffer (``ml_model.nat_inference.UserStream``), each packet lost with the given
probability (the same losses for both variants). The windows the buffer cuts are predicted through the serving
path (``artifacts.Predictor``). Variants, side by side on the same losses:
  - ``bridge``: the worker as shipped (a gap of up to a quarter window is bridged: a window across it holds the
    `window` received samples before its end, MAX_BRIDGE_FRACTION);
  - ``reset``: ``bridge_fraction=0``, every gap starts a new run (the worker before bridging).
Figures per loss rate and variant: ``coverage`` (decided windows / windows of the lossless stream that end on a
received sample), ``accuracy`` (of the decided windows; windows spanning two gestures are not scored), the same for the decided
windows that span a lost packet (``accuracy_spanning_a_loss``: bridged ones; the reset variant has none),
``p99_silence_ms`` (99th percentile of the time between consecutive decisions) and ``max_silence_ms``.
Progress goes to stderr; stdout is ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SUBJECTS = "Female0,Female2,Male0,Male2,Male6,Male9"


def _stream(stream_cls, spec, data: np.ndarray, kept: np.ndarray, packet: int, bridge_fraction: float, msg_cls):
    """Feed `data` (n, ch) as packets (kept[i]: packet i arrives); returns the decided windows and their end seqs."""
    stream = stream_cls(1, spec, votes=1, bridge_fraction=bridge_fraction)
    wins, ends = [], []
    for i in np.flatnonzero(kept):
        a = int(i) * packet
        chunk = data[a:a + packet]
        if not len(chunk):
            continue
        msg = msg_cls(userid=1, device_id=1, boot=1, sample_rate_hz=spec.sample_rate_hz, channels=data.shape[1],
                      seq0=a, device_millis=[5.0 * (a + j) for j in range(len(chunk))],
                      recv_time=[1e9 + 0.005 * (a + j) for j in range(len(chunk))], values=chunk.tolist())
        ready = stream.append(msg, arrival=0.0)
        if ready is not None:
            wins.append(ready.windows)
            ends.append(ready.end_seq)
    if not wins:
        return np.empty((0, data.shape[1], spec.window), np.float32), np.empty(0, np.int64)
    return np.concatenate(wins), np.concatenate(ends)


def main(argv: list[str] | None = None) -> int:
    try:
        import ml_model  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
    from ml_model import artifacts, datasets, training
    from ml_model import preprocessing as pp
    from ml_model.nat_inference import MAX_BRIDGE_FRACTION, ModelSpec, UserStream
    from semg.messages import SamplesMessage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help=f"Myo pretraining folder (default: ${datasets.MYO_DATA_ENV} "
                                                     "or ../shared)")
    ap.add_argument("--subjects", default=DEFAULT_SUBJECTS, help="comma-separated (default: %(default)s)")
    ap.add_argument("--loss", default="0.01,0.05,0.1", help="packet loss probabilities (default: %(default)s)")
    ap.add_argument("--packet", type=int, default=10, help="samples per packet (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=None, help="max epochs (default: the training default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        losses = [float(v) for v in args.loss.split(",")]
    except ValueError:
        ap.error(f"--loss must be comma-separated probabilities, got {args.loss!r}")
    if not all(0 <= p < 1 for p in losses):
        ap.error("--loss probabilities must be in [0, 1)")
    if args.packet < 1:
        ap.error("--packet must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        ap.error("--epochs must be at least 1")
    data_dir = Path(args.data_dir) if args.data_dir else datasets.default_myo_dir()
    if not data_dir.is_dir():
        print(json.dumps({"error": f"Myo data not found at {data_dir}; set {datasets.MYO_DATA_ENV}"}))
        return 2
    subjects = [s for s in args.subjects.split(",") if s]
    t_all = time.perf_counter()
    variants = {"bridge": MAX_BRIDGE_FRACTION, "reset": 0.0}
    # per loss, variant: summed counts over subjects, and every silence (ms) between decisions
    acc = {p: {v: {"decided": 0, "correct": 0, "scored": 0, "reference": 0, "silences": [], "gap_scored": 0,
                   "gap_correct": 0} for v in variants}
           for p in [0.0, *losses]}
    cfg = training.merge_config({"sample_rate_hz": datasets.MYO_SAMPLE_RATE_HZ,
                                 **({} if args.epochs is None else {"max_epochs": args.epochs})})
    win, step = pp.window_params(cfg["window_ms"], cfg["step_ms"], cfg["sample_rate_hz"])
    for si, subject in enumerate(subjects):
        recs = datasets.load_session(data_dir, subject, "training0")
        x, labels, groups = datasets.recordings_to_windows([r for r in recs if r.cycle != 3], win, step)
        model, meta, metrics = training.train_model(x, labels, groups, cfg, seed=args.seed,
                                                    class_names=datasets.MYO_CLASS_NAMES)
        predictor = artifacts.Predictor(*artifacts.save_artifact(model, meta, metrics))
        spec = ModelSpec(1, tuple(predictor.classes), predictor.n_device_channels, cfg["sample_rate_hz"],
                         predictor.window, int(meta["step"]))
        test = [r for r in recs if r.cycle == 3]
        data = np.concatenate([r.data for r in test])
        label = np.concatenate([np.full(len(r.data), r.label, dtype=object) for r in test])
        rec_id = np.concatenate([np.full(len(r.data), i) for i, r in enumerate(test)])
        n_packets = -(-len(data) // args.packet)
        rng = np.random.default_rng(args.seed * 1000 + si)
        for p in acc:
            kept = rng.random(n_packets) >= p
            received = np.repeat(kept, args.packet)[:len(data)]
            ends_all = np.arange(spec.window - 1, len(data))
            ends_all = ends_all[(ends_all + 1) % spec.step == 0]
            reference = int(received[ends_all].sum())
            for name, fraction in variants.items():
                windows, ends = _stream(UserStream, spec, data, kept, args.packet, fraction, SamplesMessage)
                a = acc[p][name]
                a["reference"] += reference
                a["decided"] += len(ends)
                if len(ends):
                    one = rec_id[ends] == rec_id[ends - spec.window + 1]  # not spanning two gestures
                    pred = np.asarray(predictor.classes)[predictor.predict_proba(windows[one]).argmax(1)]
                    hit = pred == label[ends[one]].astype(str)
                    a["scored"] += int(one.sum())
                    a["correct"] += int(hit.sum())
                    lost_cum = np.concatenate([[0], np.cumsum(~received)])
                    spans_gap = (lost_cum[ends[one] + 1] - lost_cum[ends[one] - spec.window + 1]) > 0
                    a["gap_scored"] += int(spans_gap.sum())
                    a["gap_correct"] += int(hit[spans_gap].sum())
                    a["silences"] += (np.diff(ends) * 1000.0 / spec.sample_rate_hz).tolist()
        print(f"[{si + 1}/{len(subjects)}] {subject} done ({time.perf_counter() - t_all:.0f} s)", file=sys.stderr,
              flush=True)

    result: dict = {"packet_samples": args.packet, "packet_ms": args.packet * 1000.0 / cfg["sample_rate_hz"],
                    "window_samples": win, "step_samples": step, "subjects": subjects}
    for p, by_variant in acc.items():
        out = result[f"loss_{p:g}"] = {}
        for name, a in by_variant.items():
            s = np.asarray(a["silences"]) if a["silences"] else np.zeros(1)
            out[name] = {"coverage": round(a["decided"] / max(a["reference"], 1), 4),
                         "accuracy": round(a["correct"] / max(a["scored"], 1), 4),
                         "windows_spanning_a_loss": a["gap_scored"],
                         "accuracy_spanning_a_loss": round(a["gap_correct"] / a["gap_scored"], 4) if a["gap_scored"]
                         else None,
                         "p99_silence_ms": round(float(np.percentile(s, 99)), 1),
                         "max_silence_ms": round(float(s.max()), 1)}
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
