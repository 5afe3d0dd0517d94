"""What a client that has no credentials can make the services do, through the real servers on loopback."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _supervisor_command(program: str, env: dict[str, str]) -> list[str]:
    """The command line supervisord.conf runs for `program`, with its %(ENV_X)s filled in from env."""
    conf = configparser.RawConfigParser()
    conf.read(REPO / "supervisord.conf")
    line = conf.get(f"program:{program}", "command")
    return shlex.split(re.sub(r"%\(ENV_(\w+)\)s", lambda m: env[m.group(1)], line))


@pytest.fixture
def ui_server(settings):
    """The web UI exactly as supervisord starts it, on a free port; yields its base URL."""
    from semg.embedded import free_port
    port = free_port()
    env = {**os.environ, "SEMG_PYTHON": sys.executable, "UI_PORT": str(port), "SEMG_BIND_HOST": "127.0.0.1",
           "PYTHONUNBUFFERED": "1"}
    log = open(settings.log_dir / "test-exposure-ui.log", "ab")
    proc = subprocess.Popen(_supervisor_command("ui", env), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the UI exited at start (see test-exposure-ui.log)"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/_stcore/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the UI did not answer /_stcore/health within 60 s"
            time.sleep(0.3)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
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
