"""Fixtures for the live-inference tests: the API as a real server process and inference worker processes,
all against the session's PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up within {timeout}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ApiServer:
    """`python -m ml_model.api` on API_PORT; tests may stop and start it again."""

    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ml_model.api"], cwd=REPO, env=dict(os.environ),
                                         stdout=out, stderr=subprocess.STDOUT)
        _wait_http(f"{self.url}/health", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture
def api_server(clean_db, settings, state_dir):
    """The API as a server process on an empty database."""
    log = Path(state_dir) / "logs" / "test-api.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = ApiServer(settings.api_url, log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workers(api_server, state_dir):
    """Factory: workers(n, *args) starts n inference workers; all are stopped (SIGTERM) at the end."""
    procs: list[subprocess.Popen] = []

    def start(n: int = 1, *args: str) -> list[subprocess.Popen]:
        started = []
        for _ in range(n):
            log = Path(state_dir) / "logs" / f"test-inference-{len(procs)}.log"
            with open(log, "ab") as out:
                p = subprocess.Popen([sys.executable, "-m", "ml_model.nat_inference", *args], cwd=REPO,
                                     env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
            p.log = log  # type: ignore[attr-defined]
            procs.append(p)
            started.append(p)
        return started

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for p in procs:
        _stop(p)


def announce_model(user_id: int, artifact_id: int) -> None:
    """Publish models.updated as the trainer does after storing an artifact."""
    from semg import natsio
    from semg.messages import MODELS_UPDATED, ModelUpdated

    async def send() -> None:
        nc = await natsio.connect("admin")
        await nc.publish(MODELS_UPDATED, ModelUpdated(userid=user_id, artifact_id=artifact_id).model_dump_json().encode())
        await nc.flush()
        await nc.close()

    asyncio.run(send())


@pytest.fixture
def model_user(clean_db):
    """Factory: model_user(channels=8, rate=200, seed=0) -> (user_id, device_id, artifact meta)."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import repo
    n = iter(range(1, 10**6))

    def make(channels: int = 8, rate: float = 200.0, seed: int = 0) -> tuple[int, int, dict]:
        i = next(n)
        user = repo.create_user(clean_db, f"Live {i}", f"live{i}@example.org")
        dev = repo.register_device(clean_db, user["id"], channels, rate)
        weights, meta = random_artifact(channels, rate, seed=seed)
        meta["artifact_id"] = insert_artifact(clean_db, user["id"], weights, meta)
        announce_model(user["id"], meta["artifact_id"])
        return user["id"], dev["id"], meta

    return make
