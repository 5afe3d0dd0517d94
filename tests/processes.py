"""Service processes started by tests in their own process group: wait until they answer, stop them whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import httpx


def wait_until_answers(proc: subprocess.Popen, url: str, what: str, timeout: float = 60) -> None:
    """Poll `url` until it answers 200; fail at once if `proc` exits, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited at start"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{what} did not answer {url} within {timeout:g} s"
        time.sleep(0.3)


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session=True), SIGKILL it after `grace` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
