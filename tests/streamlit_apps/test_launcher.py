"""`python -m streamlit_apps`, the README's command for the web UI by hand (and supervisord's): it listens where
the settings say, like every other service, not on every interface as a bare `streamlit run` does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]


def test_the_ui_listens_on_the_bind_host_and_ui_port_only(settings, tmp_path):
    from semg.embedded import free_port

    port = free_port()
    env = {**os.environ, "UI_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("SEMG_BIND_HOST", None)  # the default: 127.0.0.1
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit_apps"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the UI exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the UI did not answer /_stcore/health within 60 s"
            time.sleep(0.3)
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}, listening
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_a_bad_setting_is_one_line(settings):
    r = subprocess.run([sys.executable, "-m", "streamlit_apps"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "UI_PORT": "abc"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "UI_PORT" in r.stderr, r.stderr


def test_readme_and_supervisord_run_the_ui_this_way():
    assert "| `python -m streamlit_apps` |" in (REPO / "README.md").read_text()
    assert "command=%(ENV_SEMG_PYTHON)s -m streamlit_apps\n" in (REPO / "supervisord.conf").read_text()
