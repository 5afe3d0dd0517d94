"""What a client that has no credentials can make the services do, through the real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import stop_group, supervisor_command, wait_until_answers

REPO = Path(__file__).resolve().parents[2]


API_MAX_FILES = 512


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (API_MAX_FILES, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.fixture
def ui_server(settings):
    """The web UI exactly as supervisord starts it, on a free port, allowed API_MAX_FILES open files like the
    API below; yields its base URL."""
    from semg.embedded import free_port
    port = free_port()
    env = {**os.environ, "SEMG_PYTHON": sys.executable, "UI_PORT": str(port), "SEMG_BIND_HOST": "127.0.0.1",
           "PYTHONUNBUFFERED": "1"}
    log = open(settings.log_dir / "test-exposure-ui.log", "ab")
    proc = subprocess.Popen(supervisor_command("ui", env), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_few_files)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, base + "/_stcore/health", "the UI (see test-exposure-ui.log)")
        yield base
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def api_server(settings):
    """The API exactly as supervisord starts it, on a free port, allowed API_MAX_FILES open files (as a small
    container may be: connection floods then need few sockets); yields (host, port). One for the module: every
    test here opens its own connections and closes them, and none depends on what the database holds."""
    from semg.embedded import free_port
    port = free_port()
    env = {**os.environ, "SEMG_PYTHON": sys.executable, "API_PORT": str(port), "SEMG_BIND_HOST": "127.0.0.1"}
    log = open(settings.log_dir / "test-exposure-api.log", "ab")
    proc = subprocess.Popen(supervisor_command("api", env), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_few_files)
    try:
        wait_until_answers(proc, f"http://127.0.0.1:{port}/health", "the API (see test-exposure-api.log)")
        yield "127.0.0.1", port
    finally:
        stop_group(proc, grace=20)
        log.close()


def _uploaded_bytes(base: str) -> int:
    """Bytes the UI server holds in its upload store (Streamlit's own /_stcore/metrics)."""
    text = httpx.get(base + "/_stcore/metrics", timeout=5).text
    m = re.search(r'cache_memory_bytes\{cache_type="UploadedFileManager",cache=""\} (\d+)', text)
    return int(m.group(1)) if m else 0


async def _unsigned_session(base: str, xsrf: str, ws_module):
    """Open a browser session the way the page does, without ever giving the password; returns (ws, id)."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    ws = await ws_module.connect(base.replace("http", "ws") + "/_stcore/stream", subprotocols=["streamlit", xsrf],
                                 origin=base, additional_headers={"Cookie": f"_streamlit_xsrf={xsrf}"},
                                 max_size=None)
    msg = BackMsg()
    msg.rerun_script.query_string = ""
    msg.rerun_script.page_script_hash = ""
    await ws.send(msg.SerializeToString())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fm = ForwardMsg()
        fm.ParseFromString(await asyncio.wait_for(ws.recv(), 30))
        if fm.WhichOneof("type") == "new_session":
            return ws, fm.new_session.initialize.session_id
    raise AssertionError("no new_session message within 30 s")


def test_the_ui_keeps_no_file_uploaded_by_a_tab_that_never_signed_in(ui_server):
    import websockets

    base = ui_server
    xsrf = httpx.get(base + "/_stcore/health", timeout=5).cookies["_streamlit_xsrf"]
    headers = {"X-Xsrftoken": xsrf, "Origin": base}
    cookies = {"_streamlit_xsrf": xsrf}
    payload = b"\0" * (1 << 20)

    async def attack() -> list[int]:
        ws, session_id = await _unsigned_session(base, xsrf, websockets)
        await asyncio.sleep(2)  # the login page has run
        statuses = []
        try:
            async with httpx.AsyncClient(timeout=30) as c:
                for i in range(8):
                    r = await c.put(f"{base}/_stcore/upload_file/{session_id}/f{i}", headers=headers,
                                    cookies=cookies, files={"file": ("x.bin", payload)})
                    statuses.append(r.status_code)

                    async def chunks():  # no Content-Length: an empty file, streamed
                        yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="e.bin"\r\n'
                               b"Content-Type: application/octet-stream\r\n\r\n\r\n--b--\r\n")
                    r = await c.put(f"{base}/_stcore/upload_file/{session_id}/e{i}", cookies=cookies,
                                    headers={**headers, "Content-Type": "multipart/form-data; boundary=b"},
                                    content=chunks())
                    statuses.append(r.status_code)
            held = _uploaded_bytes(base)
            # the websocket is still open: before, every file stayed in memory for as long as it was
            assert held == 0, f"the UI holds {held} bytes uploaded without the password (statuses {statuses})"
        finally:
            await ws.close()
        return statuses

    statuses = asyncio.run(attack())
    assert all(s in (204, 413) for s in statuses), statuses
    assert statuses[0] == 413, "a file with a body is refused at once (server.maxUploadSize is 0)"


def test_idle_connections_neither_lock_people_out_of_the_ui_nor_stay_open(ui_server):
    """Streamlit's uvicorn kept a connection that never sent a request open for ever: about as many as the UI
    may open files, from anyone (no password needed), and nobody could load the UI until they went. It now
    has the API's guard: a tab already open (its websocket) keeps working, new visitors get in, and a
    connection that sends nothing is closed (here by the flood, as the oldest waiting; else after
    HEAD_TIMEOUT_S, which test_the_api_closes_connections_that_send_no_request times for the same guard)."""
    import websockets

    from ml_model.rest.connections import HEAD_TIMEOUT_S
    base = ui_server
    host, port = base.removeprefix("http://").split(":")
    xsrf = httpx.get(base + "/_stcore/health", timeout=5).cookies["_streamlit_xsrf"]

    async def scenario() -> None:
        ws, _ = await _unsigned_session(base, xsrf, websockets)  # a tab on the sign-in page
        idle = socket.create_connection((host, int(port)))
        opened = time.monotonic()
        flood: list[socket.socket] = []
        try:
            for _ in range(API_MAX_FILES + 200):
                with contextlib.suppress(OSError):
                    flood.append(socket.create_connection((host, int(port)), timeout=2))
            async with httpx.AsyncClient(timeout=10) as c:
                assert (await c.get(base + "/_stcore/health")).status_code == 200
                assert (await c.get(base + "/")).status_code == 200
            pong = await ws.ping()  # the open tab's websocket survived the flood
            await asyncio.wait_for(pong, 5)
        finally:
            for s in flood:
                s.close()
            await ws.close()
        assert _closed_within(idle, opened + HEAD_TIMEOUT_S + 5 - time.monotonic()), \
            "a connection that sent nothing is still open"
        idle.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("key", [None, "semg_not-a-key"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_the_api_reads_no_body_of_a_caller_without_a_valid_key(api_server, key, framing):
    """FastAPI parses a route's body before it checks the key: a 100 MB JSON body cost the API over 1 GB of
    memory and ~10 s of a blocked event loop (every /predict stalled) before its 401. Now the 401 comes at once,
    while the body is still being sent."""
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if framing == "chunked" else f"Content-Length: {100 * 2**20}\r\n"
    head += f"X-API-Key: {key}\r\n" if key else ""
    first = b'{"user_id": 1, "windows": [[' + b"0.1," * 250_000  # the first MB of the body
    if framing == "chunked":
        first = b"%x\r\n" % len(first) + first + b"\r\n"
    with socket.create_connection(api_server) as s:
        s.sendall(head.encode() + b"\r\n" + first)
        s.settimeout(10)
        try:
            answer = s.recv(4096)
        except TimeoutError:
            answer = b"(no answer within 10 s: the API waits for the rest of the body)"
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"www-authenticate: X-API-Key" in answer.lower().replace(b"x-api-key", b"X-API-Key")


def _closed_within(s: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `s` within `seconds` (sending `trickle` every second meanwhile)."""
    deadline = time.monotonic() + seconds
    s.settimeout(1)
    while time.monotonic() < deadline:
        try:
            if s.recv(4096) == b"":
                return True
        except TimeoutError:
            with contextlib.suppress(OSError):
                s.sendall(trickle)
        except ConnectionError:
            return True
    return False


def test_the_api_closes_connections_that_send_no_request(api_server):
    """uvicorn kept a connection that never sent a whole request head open for ever."""
    from ml_model.rest.connections import HEAD_TIMEOUT_S
    with socket.create_connection(api_server) as idle, socket.create_connection(api_server) as slow:
        opened = time.monotonic()
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        # meanwhile (the head timer runs anyway): a keep-alive connection between requests is not cut short
        with socket.create_connection(api_server) as kept:
            kept.settimeout(10)
            for i in range(2):
                if i:
                    time.sleep(2)
                kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(kept).startswith(b"HTTP/1.1 200")
        assert _closed_within(idle, opened + HEAD_TIMEOUT_S + 5 - time.monotonic()), \
            "a connection that sent nothing is still open"
        assert _closed_within(slow, 5, trickle=b"X-A: b\r\n"), "a connection trickling its head is still open"


def _read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), however the server split its writes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = s.recv(4096)
        assert chunk, f"closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_flood_of_idle_connections_leaves_the_api_reachable(api_server):
    """Connections that send nothing used to hold the API's file descriptors until it could accept no more:
    /health and /predict were unreachable. Now the oldest idle ones are closed for new ones."""
    flood: list[socket.socket] = []
    try:
        for _ in range(API_MAX_FILES + 200):
            with contextlib.suppress(OSError):
                flood.append(socket.create_connection(api_server, timeout=2))
        r = httpx.get(f"http://{api_server[0]}:{api_server[1]}/health", timeout=10)
        assert r.status_code == 200, r.text
    finally:
        for s in flood:
            s.close()


def test_a_pipelined_request_is_not_cut_at_the_head_timeout(api_server, clean_db):
    """A request whose head came while the one before it was answered (HTTP/1.1 pipelining) got the head timer
    when that answer was complete, though its head had arrived: the connection was closed HEAD_TIMEOUT_S later,
    in the middle of its body (or of a longer answer)."""
    from ml_model.rest import keys as keystore
    from ml_model.rest.connections import HEAD_TIMEOUT_S
    key = keystore.create_key(clean_db, "admin", None, "pipelining")["key"]
    body = b'{"name": "Pipelined", "email": "pipelined@example.org"}'
    with socket.create_connection(api_server) as s:
        s.settimeout(HEAD_TIMEOUT_S + 10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-API-Key: " + key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        assert _read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(HEAD_TIMEOUT_S + 2)  # a slow upload: its head came long ago
        s.sendall(body[10:])
        assert _read_response(s).startswith(b"HTTP/1.1 201")


def test_a_user_key_may_have_few_requests_with_a_body_under_way(api_server, clean_db):
    """One user key sending bodies on many connections at once kept the event loop parsing them (and queued their
    windows for the one inference thread) before the live worker's /predict. Now a user key may have
    USER_MAX_IN_FLIGHT requests with a body under way; one more is answered 429 before its body is read. A
    request that ends (answered, or its client gone) frees its place; other keys are not affected."""
    from ml_model.rest import keys as keystore
    from ml_model.rest.auth import USER_MAX_IN_FLIGHT
    from semg import repo
    base = f"http://{api_server[0]}:{api_server[1]}"
    admin = keystore.create_key(clean_db, "admin", None, "in flight")["key"]
    users = [repo.create_user(clean_db, f"In Flight {i}", f"inflight{i}@example.org") for i in range(2)]
    mine, other = (keystore.create_key(clean_db, "user", u["id"], "in flight")["key"] for u in users)
    path = f"/users/{users[0]['id']}"
    body = json.dumps({"notes": "sent slowly"}).encode()

    def started(key: str) -> socket.socket:
        """A PATCH whose head and first bytes are sent, the rest of its body not yet."""
        s = socket.create_connection(api_server)
        s.settimeout(10)
        s.sendall(f"PATCH {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {key}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        return s

    def patch(key: str, notes: str) -> httpx.Response:
        return httpx.patch(base + path, json={"notes": notes}, headers={"X-API-Key": key}, timeout=10)

    def answered(s: socket.socket) -> bool:
        s.settimeout(0.05)
        try:
            s.recv(4096)  # an answer, or the connection closed
            return True
        except TimeoutError:
            return False
        finally:
            s.settimeout(10)

    admins = [started(admin) for _ in range(USER_MAX_IN_FLIGHT + 1)]
    held: list[socket.socket] = []
    try:
        for _attempt in range(5):  # the server reads the held heads in its own order: one may race the probe
            held = [started(mine) for _ in range(USER_MAX_IN_FLIGHT)]
            time.sleep(0.5)
            r = patch(mine, "one too many")
            if r.status_code == 429 and not any(answered(s) for s in held):
                break
            for s in held:
                s.close()
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert f"{USER_MAX_IN_FLIGHT} requests with a body under way" in r.json()["detail"]
        assert httpx.get(base + path, headers={"X-API-Key": mine}, timeout=10).status_code == 200  # no body
        r = httpx.patch(f"{base}/users/{users[1]['id']}", json={"notes": "x"}, headers={"X-API-Key": other})
        assert r.status_code == 200, r.text
        assert patch(admin, "admin, with its own requests under way").status_code == 200, "admin keys are trusted"
        held[0].sendall(body[5:])  # answered: its place is free
        assert _read_response(held[0]).startswith(b"HTTP/1.1 200")
        assert patch(mine, "after an answer").status_code == 200
        held[1].close()  # the client went away mid-body: its place is free too
        deadline = time.monotonic() + 10
        while (r := patch(mine, "after a hang-up")).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        assert patch(mine, "and again").status_code == 200
    finally:
        for s in held + admins:
            s.close()


def test_a_client_that_stops_reading_a_response_is_disconnected(monkeypatch):
    """A client that stopped reading a response (a live decision stream, a download) kept its connection, and
    the response what it held (a live stream's slot of its user's 4), for as long as the client stayed. Now one
    that takes nothing for STALL_S while data waits for it is disconnected and the response ends; a client that
    reads slowly is not. Real uvicorn with the services' protocol, and a streaming response like the live route's
    (here STALL_S is 1 s)."""
    import threading

    import uvicorn
    from fastapi.responses import StreamingResponse

    from ml_model.rest import connections
    from semg.embedded import free_port
    monkeypatch.setattr(connections, "STALL_S", 1.0)
    ended: dict[str, threading.Event] = {}

    async def app(scope, receive, send):
        name = scope["path"].strip("/")
        ended[name] = threading.Event()

        async def chunks():
            try:
                for _ in range(2000):  # 128 MB at most: the test's bound
                    yield b"x" * 65536
                    await asyncio.sleep(0)
            finally:
                ended[name].set()
        await StreamingResponse(chunks(), media_type="application/octet-stream")(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=connections.GuardedHttp,
                                           lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)

        def client(path: str) -> socket.socket:
            s = socket.socket()
            if path == "stalled":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            return s

        stalled, slow = client("stalled"), client("slow")
        received, t0 = 0, time.monotonic()
        with contextlib.closing(stalled), contextlib.closing(slow):
            while time.monotonic() - t0 < 3:  # reads all the time, far slower than it is sent (buffers full)
                received += len(slow.recv(65536))
                time.sleep(0.01)
            assert ended["stalled"].wait(5), "the response to a client that reads nothing never ended"
            assert not ended["slow"].is_set() and received > 0, "a client that reads slowly was cut"
            stalled.settimeout(5)  # the server closed its end: what was sent already, then the end
            with contextlib.suppress(ConnectionResetError):
                while stalled.recv(1 << 20):
                    pass
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_closed_connection_whose_client_leaves_the_end_of_a_response_unread_is_dropped(monkeypatch):
    """The stall guard acts on a full send buffer (64 KB); a response whose unsent end was smaller never filled
    it, and the close that follows (keep-alive timeout, `Connection: close`, the head timer) waited for the client
    to take it for ever: any client on the network could pin a connection per request (with pipelined requests,
    even with 401s), and at max_connections() nobody could connect. Now the end must be taken within STALL_S.
    Real uvicorn with the services' protocol; small socket buffers so the unsent end stays under 64 KB."""
    import threading

    import uvicorn

    from ml_model.rest import connections
    monkeypatch.setattr(connections, "STALL_S", 1.0)

    async def app(scope, receive, send):
        body = b"x" * 40_000
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted connections inherit it
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(app, http=connections.GuardedHttp, lifespan="off", log_level="warning",
                                           timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with contextlib.closing(client):
            client.connect(("127.0.0.1", listener.getsockname()[1]))
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and reads nothing
            conns = server.server_state.connections
            deadline = time.monotonic() + 10
            while not (conns and all(c.cycle is not None and c.cycle.response_complete for c in list(conns))) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            (conn,) = conns
            left = conn.transport.get_write_buffer_size()
            assert 0 < left < 65536 and not conn.flow.write_paused, f"the case is not set up: {left} bytes unsent"
            deadline = time.monotonic() + 15
            while conns and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not conns, "the connection of a client that left a response's end unread was never dropped"
    finally:
        server.should_exit = True
        thread.join(10)
