"""Acceptance: a recorded Myo subject replayed through UDP -> udpserver -> NATS -> worker -> /predict gives live
decisions whose accuracy on its fourth repetition is within 3 points of the offline evaluation of the same
model, trained on its first three repetitions."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import require_myo_data
from tests.inference.conftest import REPO, announce_model
from tests.inference.test_fresh_worker_backlog import _wait_handling

pytestmark = pytest.mark.slow

SUBJECT = os.environ.get("SEMG_REPLAY_SUBJECT", "Female0")
RATE, CHANNELS = 200, 8
PACKET = 10  # samples per UDP packet
SPEED = 2.0  # replay twice as fast as real time: bounded test duration, still a live stream


def _require_parts() -> None:
    missing = [m for m in ("udpserver.udpserver", "udpserver.protocol", "ml_model.training", "ml_model.artifacts",
                           "ml_model.datasets") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs the trainer and the UDP server; missing: {', '.join(missing)}")


@pytest.fixture
def udp_server(api_server, settings, state_dir):
    """Factory: start the UDP server (after the devices are registered: it loads them at startup)."""
    procs = []

    def start() -> subprocess.Popen:
        log = Path(state_dir) / "logs" / "test-udpserver-replay.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "udpserver.udpserver", "--spool-dir",
                                     str(Path(state_dir) / "spool-replay")], cwd=REPO, env=dict(os.environ),
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "udpserver did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{settings.udp_metrics_port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _train(recordings, win: int, step: int):
    from ml_model import artifacts, datasets, training
    x, y, g = datasets.recordings_to_windows([r for r in recordings if r.cycle < 3], win, step)
    model, meta, metrics = training.train_model(
        x, y, g, {"sample_rate_hz": float(RATE), "max_epochs": 12, "patience": 4}, seed=0,
        class_names=datasets.MYO_CLASS_NAMES)
    return artifacts.save_artifact(model, meta, metrics)


async def _replay(settings, user_id: int, device_id: int, key: bytes, stream: np.ndarray) -> list:
    """Send the stream as signed packets (SPEED x real time); collect the user's decisions."""
    from semg import natsio
    from semg.messages import PredictionMessage
    from udpserver.protocol import build_binary

    nc = await natsio.connect("admin")
    decisions: list[PredictionMessage] = []

    async def on_decision(msg) -> None:
        decisions.append(PredictionMessage.model_validate_json(msg.data))

    await nc.subscribe(f"emg.predictions.{user_id}", cb=on_decision)
    await nc.flush()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    boot = int(time.time()) & 0xFFFF
    # a boot before the replay's, in real time until the worker decides on it: subscribed and its model loaded
    # (a worker that logged its users may not have its subscription in place yet on a busy machine)
    deadline = time.monotonic() + 30
    a = 0
    while not decisions and time.monotonic() < deadline:
        sock.sendto(build_binary(device_id, boot - 1, a, int(a * 1000 / RATE), RATE, stream[:PACKET], key),
                    ("127.0.0.1", settings.udp_port))
        a += PACKET
        await asyncio.sleep(PACKET / RATE)
    assert decisions, "the worker decided nothing in 30 s"
    await asyncio.sleep(0.5)  # the pre-roll's last decisions
    decisions.clear()
    t0 = time.monotonic()
    for k, a in enumerate(range(0, len(stream), PACKET)):
        pkt = build_binary(device_id, boot, a, int(a * 1000 / RATE), RATE, stream[a:a + PACKET], key)
        sock.sendto(pkt, ("127.0.0.1", settings.udp_port))
        delay = t0 + (k + 1) * PACKET / RATE / SPEED - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    deadline = time.monotonic() + 15
    last = -1
    while time.monotonic() < deadline:  # until the decisions stop coming
        await asyncio.sleep(1.0)
        if len(decisions) == last:
            break
        last = len(decisions)
    sock.close()
    await nc.close()
    return [d for d in decisions if d.boot == boot]


def test_live_accuracy_matches_offline(clean_db, settings, workers, udp_server):
    data_dir = require_myo_data()
    _require_parts()
    from ml_model import artifacts, datasets
    from ml_model import preprocessing as pp
    from ml_model.rest.demo_models import insert_artifact
    from semg import repo

    recordings = datasets.load_session(data_dir, SUBJECT, "training0")
    win, step = pp.window_params(pp.DEFAULT_WINDOW_MS, pp.DEFAULT_STEP_MS, RATE)
    weights, meta = _train(recordings, win, step)

    # offline figure: the same artifact on the 4th repetition, windowed per recording (as evaluate does)
    test = [r for r in recordings if r.cycle == 3]
    xt, yt, _ = datasets.recordings_to_windows(test, win, step)
    labels, _ = artifacts.Predictor(weights, meta).predict(xt.astype(np.float32))
    offline = float(np.mean(np.array(labels) == yt))

    user = repo.create_user(clean_db, "Replay", "replay@example.org")
    dev = repo.register_device(clean_db, user["id"], CHANNELS, RATE)
    announce_model(user["id"], insert_artifact(clean_db, user["id"], weights, meta))
    udp_server()
    proc, = workers(1)
    _wait_handling(proc, user["id"])  # worker: model catalogue and subscriptions

    stream = np.concatenate([r.data for r in test])
    bounds = np.cumsum([0] + [len(r.data) for r in test])  # recording k holds seq bounds[k] .. bounds[k+1]-1
    decisions = asyncio.run(_replay(settings, user["id"], dev["id"], bytes.fromhex(dev["secret_key_hex"]), stream))
    assert decisions, "no live decisions"

    live_ok, raw_ok, n, unsure = 0, 0, 0, 0
    for d in decisions:
        first, last = d.seq - win + 1, d.seq
        k = int(np.searchsorted(bounds, last, side="right") - 1)
        if first < bounds[k]:
            continue  # spans two recordings: offline evaluation has no such window
        label = test[k].label
        n += 1
        live_ok += d.gesture == label
        raw_ok += d.raw_gesture == label
        unsure += d.gesture == "UNKNOWN"
    expected = sum(pp.n_windows(len(r.data), win, step) for r in test)
    live, raw = live_ok / n, raw_ok / n
    report = {"subject": SUBJECT, "offline_accuracy": round(offline, 4), "live_accuracy": round(live, 4),
              "live_raw_accuracy": round(raw, 4), "unknown_share": round(unsure / n, 4), "live_windows": n,
              "offline_windows": expected}
    print(json.dumps(report))
    assert n >= 0.95 * expected, report  # (almost) every window decided live
    assert abs(raw - offline) <= 0.03, report
    assert abs(live - offline) <= 0.03, report
