"""SIGTERM ends the inference worker at once while it is still starting (NATS not reachable yet): supervisord and
stop_all.sh wait for it, and a worker deaf to SIGTERM holds every stop up to its kill timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from semg.embedded import free_port

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_stops_a_worker_still_waiting_for_nats(clean_db, state_dir):
    log = Path(state_dir) / "logs" / "test-inference-no-nats.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NATS_PORT": str(free_port()), "SEMG_INFERENCE_PRUNE_FIRST_S": "3600"}
    env.pop("NATS_SERVER", None)
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "ml_model.nat_inference"], cwd=REPO, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"starting on" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # well into its NATS connection attempts
        assert p.poll() is None, log.read_text()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 10 s after SIGTERM:\n{log.read_text()[-2000:]}") from None
        assert code == 0, log.read_text()[-2000:]
        assert time.monotonic() - t0 < 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
