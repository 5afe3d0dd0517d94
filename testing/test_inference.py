"""Send stored sEMG data to the API's /predict and report accuracy and latency (JSON on the last line).

    # a Myo-format folder (classe_<i>.dat: gesture i % 7, repetition i // 7), e.g. only the 4th repetition
    python testing/test_inference.py --user-id 5 myo ../shared/data/myo-armband/pretraining/Female0/training0 --cycles 3
    # a capture session stored in the database (labels from its intervals' actual times)
    python testing/test_inference.py session 12

Windows are cut with the user's served model's own window and step (GET /models/{user_id}); a window counts
when it lies inside one labelled stretch (one Myo file, or one session interval after the reaction time).
Options: --api-url (default: the configured API), --api-key (default: $SEMG_API_KEY, else the platform's
service key), --batch windows per request.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from ml_model import preprocessing as pp  # noqa: E402

_MYO_FILE = re.compile(r"^classe_(\d+)\.dat$")
MYO_CHANNELS = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- sources: (windows (n, C, win), labels (n,)) ---------------------------------------------------------
def myo_windows(folder: Path, win: int, step: int, cycles: set[int] | None, names: list[str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Windows of every classe_<i>.dat in `folder`, each file on its own (no window spans two files)."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _MYO_FILE.match(p.name)))
    if not found:
        raise SystemExit(f"no classe_<i>.dat files in {folder}")
    xs, ys = [], []
    for i, path in found:
        if cycles is not None and i // 7 not in cycles:
            continue
        data = np.fromfile(path, dtype="<i2")
        data = data[: len(data) // MYO_CHANNELS * MYO_CHANNELS].reshape(-1, MYO_CHANNELS)
        w = pp.make_windows(data, win, step)
        xs.append(w)
        ys.append(np.full(len(w), names[i % 7], dtype=object))
    if not xs:
        raise SystemExit(f"no files of cycles {sorted(cycles or [])} in {folder}")
    return np.concatenate(xs), np.concatenate(ys)


def session_windows(session_id: int, win: int, step: int, reaction_ms: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(user_id, windows, labels) of a stored capture session, labelled by its intervals."""
    import contextlib

    from semg import db, repo
    with contextlib.closing(db.connect()) as conn:
        s = repo.get_session(conn, session_id)
        if s["device_id"] is None or s["started_at"] is None:
            raise SystemExit(f"session {session_id} has no device or was never started")
        t_start = s["started_at"].timestamp() * 1000
        t_end = (s["ended_at"].timestamp() * 1000) if s["ended_at"] else t_start + float(s["plan"].get("total_ms", 0))
        intervals = []
        for iv in s["intervals"]:
            if iv["discarded"]:
                continue
            a = iv["started_at"].timestamp() * 1000 if iv["started_at"] else t_start + iv["planned_start_ms"]
            b = iv["ended_at"].timestamp() * 1000 if iv["ended_at"] else t_start + iv["planned_end_ms"]
            intervals.append({"label": iv["label"], "kind": iv["kind"], "start_ms": a, "end_ms": b})
        with conn, conn.cursor() as cur:
            cur.execute(
                """SELECT boot, seq0, n, channels, sample_rate_hz, extract(epoch FROM device_time0) * 1000, values
                   FROM sample_blocks WHERE device_id = %s AND device_time0 BETWEEN
                        to_timestamp(%s / 1000.0) - interval '1 second' AND to_timestamp(%s / 1000.0)
                   ORDER BY boot, seq0""",
                (s["device_id"], t_start, t_end),
            )
            blocks = cur.fetchall()
    if not blocks:
        raise SystemExit(f"no samples stored for session {session_id}")
    xs, ys = [], []
    run_vals, run_t, expect = [], [], None

    def flush() -> None:
        if not run_vals:
            return
        vals, t = np.concatenate(run_vals), np.concatenate(run_t)
        labels, _ = pp.label_windows(t, intervals, win, step, reaction_ms)
        keep = np.array([lab is not None for lab in labels], dtype=bool)
        if keep.any():
            xs.append(pp.make_windows(vals, win, step)[keep])
            ys.append(labels[keep])

    for boot, seq0, n, ch, rate, t0, values in blocks:
        if expect is not None and (boot, seq0) != expect:  # a gap: windows never span it
            flush()
            run_vals, run_t = [], []
        run_vals.append(np.asarray(values, dtype=np.int16).reshape(n, ch))
        run_t.append(float(t0) + np.arange(n) * 1000.0 / float(rate))
        expect = (boot, seq0 + n)
    flush()
    if not xs:
        raise SystemExit(f"session {session_id}: no window lies inside a labelled interval")
    return s["user_id"], np.concatenate(xs), np.concatenate(ys)


# ---- sending ------------------------------------------------------------------------------------------
def run(client: httpx.Client, user_id: int, windows: np.ndarray, labels: np.ndarray, batch: int) -> dict:
    preds: list[str] = []
    lat_ms: list[float] = []
    model_id = None
    ints = np.array_equal(windows, np.round(windows)) and np.abs(windows).max() <= 32767
    dtype, np_dtype = ("int16", "<i2") if ints else ("float32", "<f4")
    t_all = time.perf_counter()
    a = 0
    while a < len(windows):
        chunk = np.ascontiguousarray(windows[a:a + batch], dtype=np_dtype)
        body = {"user_id": user_id, "data_b64": base64.b64encode(chunk.tobytes()).decode("ascii"),
                "shape": list(chunk.shape), "dtype": dtype, "include_probabilities": False}
        t = time.perf_counter()
        r = client.post("/predict", json=body)
        limit = re.search(r"at most (\d+) bytes", r.text) if r.status_code == 413 else None
        if limit and len(chunk) > 1:
            # a user key may send less per request than the service key (the 413 says how much): fewer windows
            per_window = len(r.request.content) / len(chunk)
            batch = max(1, min(len(chunk) - 1, int(int(limit.group(1)) * 0.95 / per_window)))
            log(f"the API takes at most {limit.group(1)} bytes per request with this key: {batch} windows each")
            continue
        lat_ms.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"/predict answered {r.status_code}: {r.text[:300]}")
        a += len(chunk)
        res = r.json()["results"][0]
        model_id = res["model_id"]
        preds += [p["gesture"] for p in res["predictions"]]
    elapsed = time.perf_counter() - t_all
    pred = np.array(preds, dtype=object)
    per_class = {str(c): round(float(np.mean(pred[labels == c] == c)), 4) for c in sorted(set(labels.tolist()))}
    lat = np.array(lat_ms)
    return {
        "user_id": user_id, "model_id": model_id, "windows": len(pred),
        "accuracy": round(float(np.mean(pred == labels)), 4), "per_class_accuracy": per_class,
        "requests": len(lat), "windows_per_request": batch,
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p95": round(float(np.percentile(lat, 95)), 2),
                       "p99": round(float(np.percentile(lat, 99)), 2), "mean": round(float(lat.mean()), 2)},
        "windows_per_s": round(len(pred) / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testing/test_inference.py", description=__doc__.splitlines()[0])
    p.add_argument("--api-url", default=None, help="default: the configured API (API_PORT)")
    p.add_argument("--api-key", default=os.environ.get("SEMG_API_KEY"),
                   help="default: $SEMG_API_KEY, else the platform's service key")
    p.add_argument("--user-id", type=int, help="whose model to use (myo: required; session: its user)")
    p.add_argument("--batch", type=int, default=256, help="windows per request (default 256)")
    p.add_argument("--reaction-ms", type=float, default=pp.DEFAULT_REACTION_MS,
                   help="session: skip this long after each cue")
    sub = p.add_subparsers(dest="source", required=True)
    m = sub.add_parser("myo", help="a folder of Myo-format classe_<i>.dat files")
    m.add_argument("folder", type=Path)
    m.add_argument("--cycles", default=None, help="comma-separated repetitions to send (default all), e.g. 3")
    m.add_argument("--labels", default=None, help="7 class names in gesture order (default: the Myo names)")
    s = sub.add_parser("session", help="a capture session stored in the database")
    s.add_argument("session_id", type=int)
    args = p.parse_args(argv)
    if not 1 <= args.batch <= 5000:
        p.error("--batch must be 1..5000")

    from semg import secrets, tls
    from semg.config import get_settings
    settings = get_settings()
    key = args.api_key or secrets.service_api_key(settings)
    client = httpx.Client(base_url=args.api_url or settings.api_url, headers={"X-API-Key": key}, timeout=60,
                          verify=tls.httpx_verify(settings))

    def model_of(user_id: int) -> dict:
        r = client.get(f"/models/{user_id}")
        if r.status_code != 200:
            raise SystemExit(f"GET /models/{user_id} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    if args.source == "myo":
        if args.user_id is None:
            p.error("myo needs --user-id (whose model to test)")
        info = model_of(args.user_id)
        from ml_model.datasets import MYO_CLASS_NAMES
        names = args.labels.split(",") if args.labels else list(MYO_CLASS_NAMES)
        if len(names) != 7:
            p.error("--labels needs 7 names")
        cycles = {int(c) for c in args.cycles.split(",")} if args.cycles else None
        x, y = myo_windows(args.folder, info["window"], info["step"], cycles, names)
        user_id, source = args.user_id, {"myo": str(args.folder), "cycles": sorted(cycles) if cycles else "all"}
    else:
        import contextlib

        from semg import db, repo
        with contextlib.closing(db.connect(settings)) as conn:
            owner = repo.get_session(conn, args.session_id)["user_id"]
        info = model_of(args.user_id or owner)
        user_id, x, y = session_windows(args.session_id, info["window"], info["step"], args.reaction_ms)
        source = {"session": args.session_id}
    unknown = sorted(set(y.tolist()) - set(info["classes"]))
    if unknown:
        log(f"warning: labels {unknown} are not classes of model {info['artifact_id']} ({info['classes']})")
    log(f"sending {len(x)} windows of user {user_id} to {client.base_url}/predict in batches of {args.batch}")
    report = {**source, **run(client, user_id, x, y, args.batch), "model_accuracy": info.get("accuracy")}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
