"""Service processes started by tests in their own process group: wait until they answer, stop them whole."""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def supervisor_command(program: str, env: dict[str, str]) -> list[str]:
    """The command line supervisord.conf runs for `program`, with its %(ENV_X)s filled in from env."""
    conf = configparser.RawConfigParser()
    conf.read(REPO / "supervisord.conf")
    line = conf.get(f"program:{program}", "command")
    return shlex.split(re.sub(r"%\(ENV_(\w+)\)s", lambda m: env[m.group(1)], line))


def wait_until_answers(proc: subprocess.Popen, url: str, what: str, timeout: float = 60,
                       verify: ssl.SSLContext | bool = True) -> None:
    """Poll `url` until it answers 200; fail at once if `proc` exits, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited at start"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
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
