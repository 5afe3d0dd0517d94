"""GET /users/{id}/predictions/live: a user's live decisions over HTTP (Server-Sent Events), against the API
process as supervisord starts it and the suite's NATS (an endless response cannot go through TestClient)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ml_model.rest import keys
from semg import natsio, repo
from semg.messages import PredictionMessage, predictions_subject
from tests.processes import REPO, stop_group, supervisor_command, wait_until_answers


@pytest.fixture
def api_process(settings, clean_db):
    from semg.embedded import free_port
    port = free_port()
    env = {**os.environ, "SEMG_PYTHON": sys.executable, "API_PORT": str(port), "SEMG_BIND_HOST": "127.0.0.1"}
    log = open(settings.log_dir / "test-live-api.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(supervisor_command("api", env), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until_answers(proc, f"http://127.0.0.1:{port}/health", "the API (see test-live-api.log)")
        deadline = time.monotonic() + 30  # /health answers before the API's NATS connection is up
        while httpx.get(f"http://127.0.0.1:{port}/health").json()["nats"]["ok"] is not True:
            assert time.monotonic() < deadline, "the API did not connect to NATS"
            time.sleep(0.2)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc, grace=20)
        log.close()


class Stream:
    """Reads one SSE response in a thread: its lines, and the status code, go to queues."""

    def __init__(self, url: str, key: str):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.status: queue.Queue[int] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(url, key), daemon=True)
        self.thread.start()

    def _read(self, url: str, key: str) -> None:
        try:
            with httpx.stream("GET", url, headers={"X-API-Key": key}, timeout=httpx.Timeout(5, read=60)) as r:
                self.status.put(r.status_code)
                for line in r.iter_lines():
                    self.lines.put(line)
        except httpx.HTTPError:
            pass
        finally:
            self.lines.put(None)  # the stream ended

    def events(self, until, timeout: float = 30) -> list[tuple[str, str]]:
        """(event, data) pairs read until `until(pairs)` holds; bounded by `timeout`."""
        got, event, deadline = [], "message", time.monotonic() + timeout
        while not until(got):
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                break
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                got.append((event, line[6:]))
                event = "message"
        return got


def _decision(user_id: int, gesture: str) -> bytes:
    now = time.time()
    return PredictionMessage(userid=user_id, gesture=gesture, confidence=0.9, device_millis=1.0,
                             sample_recv_time=now, decided_time=now).model_dump_json().encode()


def _publish(settings, *messages: tuple[str, bytes]) -> None:
    async def go() -> None:
        nc = await natsio.connect("admin", settings)
        try:
            for subject, data in messages:
                await nc.publish(subject, data)
            await nc.flush(timeout=5)
        finally:
            await nc.close()
    asyncio.run(go())


def test_a_users_live_decisions_reach_their_key_and_nobody_elses(api_process, settings, clean_db):
    """An app acting on decisions (a prosthesis or haptic controller) had to read NATS with credentials that see
    every user's decisions; GET /users/{id}/predictions/live gives one user's, with that user's key."""
    proc, base = api_process
    ann, bob = (repo.create_user(clean_db, n, f"{n}@example.org") for n in ("ann", "bob"))
    ann_key = keys.create_key(clean_db, "user", ann["id"], "controller")
    bob_key = keys.create_key(clean_db, "user", bob["id"], "phone")["key"]
    admin_key = keys.create_key(clean_db, "admin", None, "test")["key"]
    url = f"{base}/users/{ann['id']}/predictions/live"
    assert httpx.get(url, headers={"X-API-Key": bob_key}).status_code == 403
    assert httpx.get(url).status_code == 401
    assert httpx.get(f"{base}/users/999999/predictions/live", headers={"X-API-Key": admin_key}).status_code == 404

    stream = Stream(url, ann_key["key"])
    assert stream.status.get(timeout=30) == 200
    assert stream.lines.get(timeout=30) == f": live decisions of user {ann['id']}"
    _publish(settings, (predictions_subject(ann["id"]), _decision(ann["id"], "fist")),
             (predictions_subject(bob["id"]), _decision(bob["id"], "bob's secret")),
             (predictions_subject(ann["id"]), b'{"not": "a decision"}'),
             (predictions_subject(ann["id"]), _decision(ann["id"], "open hand")))
    got = [(e, d) for e, d in stream.events(lambda g: sum(e == "message" for e, _ in g) >= 2) if e != "stalled"]
    assert [(e, json.loads(d)["gesture"]) for e, d in got] == [("message", "fist"), ("message", "open hand")], got
    assert json.loads(got[0][1])["userid"] == ann["id"]

    # at most 4 streams of one user's decisions, whichever of the user's keys open them
    second = keys.create_key(clean_db, "user", ann["id"], "second")["key"]
    extra = [Stream(url, second) for _ in range(3)]
    assert [x.status.get(timeout=30) for x in extra] == [200, 200, 200]
    third = keys.create_key(clean_db, "user", ann["id"], "third")["key"]
    refused = httpx.get(url, headers={"X-API-Key": third}, timeout=10)
    assert refused.status_code == 429 and "4 live streams per user" in refused.json()["detail"], refused.text

    # revoked (here with the CLI's function, so no cache is told): the stream ends, saying why
    keys.revoke_key(clean_db, ann_key["id"])
    deadline = time.monotonic() + 30
    ended = []
    while not ended:
        assert time.monotonic() < deadline, "the stream of a revoked key went on"
        _publish(settings, (predictions_subject(ann["id"]), _decision(ann["id"], "fist")))
        ended = [d for e, d in stream.events(lambda g: bool(g), timeout=1.0) if e == "end"]
    assert "revoked" in json.loads(ended[0])["reason"]
    rest = [stream.lines.get(timeout=10)]
    while rest[-1] is not None and len(rest) < 100:  # the event's blank line, then the end of the response
        rest.append(stream.lines.get(timeout=10))
    assert rest[-1] is None, rest

    # a stopping API closes the streams still open instead of waiting for them (supervisord would SIGKILL it)
    other = Stream(url, admin_key)
    assert other.status.get(timeout=30) == 200
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=15)
    other.thread.join(timeout=10)
    assert not other.thread.is_alive(), "the stream stayed open after the API stopped"


def test_silence_is_flagged_once_so_a_controller_stops_acting_on_the_last_gesture(api_process, settings, clean_db):
    """Decisions come every model step while the sensor streams (REST included); when it stops (power, Wi-Fi) or
    an outage on the way stops them, the stream went silent and a controller saw nothing but the keep-alive 15 s
    later, acting on the last gesture meanwhile. It now gets `event: stalled` once per silence, saying which
    decision was the last."""
    _proc, base = api_process
    user = repo.create_user(clean_db, "ann", "ann@example.org")
    key = keys.create_key(clean_db, "user", user["id"], "controller")["key"]
    stream = Stream(f"{base}/users/{user['id']}/predictions/live", key)
    assert stream.status.get(timeout=30) == 200
    first = stream.events(lambda g: bool(g), timeout=10)  # nothing decided yet: flagged as well
    assert [(e, json.loads(d)["last"]) for e, d in first] == [("stalled", None)], first

    now = time.time()
    decision = PredictionMessage(userid=user["id"], gesture="fist", confidence=0.9, device_id=3, boot=2, seq=499,
                                 device_millis=2500.0, sample_recv_time=now, decided_time=now)
    _publish(settings, (predictions_subject(user["id"]), decision.model_dump_json().encode()))
    got = stream.events(lambda g: len(g) >= 2, timeout=10)
    assert [e for e, _ in got] == ["message", "stalled"], got
    stalled = json.loads(got[1][1])
    assert stalled["last"] == {"device_id": 3, "boot": 2, "seq": 499, "decided_time": now}, stalled
    assert stalled["seconds"] >= 1.0


def test_a_revoked_key_reading_slowly_gets_nothing_decided_after_the_check(api_process, settings, clean_db):
    """The key was checked only once the decisions waiting for a client were all sent: a client that stopped
    reading (or read a little slower than decisions came, so some were always waiting) got, whenever it read
    again, up to 256 decisions made after its key was revoked, however long after. The key is now checked before
    each decision is sent once a check is due."""
    from urllib.parse import urlsplit

    from ml_model.rest.routes.live import KEY_RECHECK_S

    _proc, base = api_process
    user = repo.create_user(clean_db, "ann", "ann@example.org")
    key = keys.create_key(clean_db, "user", user["id"], "controller")
    address = urlsplit(base)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that stops reading fills up soon
    s.settimeout(30)
    with s:
        s.connect((address.hostname, address.port))
        s.sendall(f"GET /users/{user['id']}/predictions/live HTTP/1.1\r\nHost: {address.netloc}\r\n"
                  f"X-API-Key: {key['key']}\r\n\r\n".encode())
        head = b""
        while b"live decisions of user" not in head:
            chunk = s.recv(4096)
            assert chunk and len(head) < 65536, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head

        # decisions the client does not read: more than the socket buffers and the stream's queue hold (~13 MB)
        def decision(gesture: str) -> bytes:
            now = time.time()
            return PredictionMessage(userid=user["id"], gesture=gesture, confidence=0.9, raw_gesture="x" * 80,
                                     device_millis=1.0, sample_recv_time=now, decided_time=now
                                     ).model_dump_json().encode()

        subject = predictions_subject(user["id"])
        for batch in range(40):
            _publish(settings, *[(subject, decision(f"before-{batch}-{i}")) for i in range(1000)])
            time.sleep(0.05)
        keys.revoke_key(clean_db, key["id"])
        _publish(settings, *[(subject, decision(f"after-{i}")) for i in range(20)])
        time.sleep(KEY_RECHECK_S + 1)  # the key's check is due

        received, deadline = bytearray(), time.monotonic() + 60
        while time.monotonic() < deadline and len(received) < 64 * 2**20:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
            if b"event: end" in received:
                break
    assert b"event: end" in received, received[-500:]
    assert b'"gesture":"after-' not in received, "decisions made after the key was revoked were sent"
