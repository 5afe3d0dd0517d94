"""The whole platform as subprocesses against the test session's PostgreSQL/NATS, and a headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, Path(__file__).resolve().parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# What each service needs on disk; a missing one skips the steps that need it, naming it.
SERVICE_FILES = {
    "api": "ml_model/api.py",
    "udpserver": "udpserver/udpserver.py",
    "inference": "ml_model/nat_inference.py",
    "trainer": "ml_model/TrainMLJob.py",
}


class Stack:
    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.missing: dict[str, str] = {}

    def command(self, name: str) -> list[str]:
        py = sys.executable
        return {
            "api": [py, "-m", "ml_model.api"],
            "udpserver": [py, "-m", "udpserver.udpserver"],
            "inference": [py, "-m", "ml_model.nat_inference"],
            "trainer": [py, "ml_model/TrainMLJob.py", "worker"],
            # the platform's own launcher (UI_PORT, 127.0.0.1, its theme and connection guards), as supervisord runs it
            "ui": [py, "-m", "streamlit_apps"],
        }[name]

    def start(self, name: str) -> bool:
        rel = SERVICE_FILES.get(name)
        if rel and not (REPO / rel).exists():
            self.missing[name] = rel
            return False
        log = open(self.log_dir / f"e2e-{name}.log", "ab")
        self.procs[name] = subprocess.Popen(self.command(name), cwd=REPO, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return True

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def not_available(self, name: str) -> str | None:
        """Why a service is not there yet (file missing, or its command line does not offer the command:
        exit status 2 = usage error), else None. Any other exit is a crash, which the test reports."""
        if name in self.missing:
            return f"{self.missing[name]} is missing"
        p = self.procs.get(name)
        if p is not None and p.poll() == 2:
            return f"`{' '.join(self.command(name)[1:])}` is not available yet (usage error: {self.tail(name, 3)!r})"
        return None

    def wait_http(self, name: str, url: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(name):
                raise RuntimeError(f"{name} exited early:\n{self.tail(name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"{name} not ready at {url} after {timeout:.0f}s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"e2e-{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    from ui_driver import CHROMIUM
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; "
                    "./run_tests.sh does it); never 'playwright install'")
    return CHROMIUM


@contextlib.contextmanager
def _running(names: tuple[str, ...]):
    """A Stack of these services, each ready; all stopped after."""
    from semg.config import get_settings
    s = get_settings()
    stack = Stack(dict(os.environ), s.log_dir)
    try:
        for name in names:
            stack.start(name)
        if "api" in stack.procs:
            stack.wait_http("api", f"{s.api_url}/health")
        if "udpserver" in stack.procs:
            stack.wait_http("udpserver", f"http://127.0.0.1:{s.udp_metrics_port}/health")
        stack.wait_http("ui", f"http://127.0.0.1:{s.ui_port}/_stcore/health")
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def stack(services, test_env, chromium_path):
    with _running(("api", "udpserver", "inference", "trainer", "ui")) as stack:
        yield stack


@pytest.fixture(scope="module")
def ui_only(services, test_env, chromium_path):
    """The web UI alone, on the test session's database: no worker takes a training job scheduled meanwhile."""
    with _running(("ui",)) as stack:
        yield stack


@pytest.fixture(scope="module")
def screenshots_dir() -> Path:
    d = REPO / "test-artifacts" / "e2e-screenshots"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    print(f"\nE2E screenshots: {d}")
    return d


@pytest.fixture
def browser_page(chromium_path):
    from playwright.sync_api import sync_playwright
    from ui_driver import CHROMIUM_ARGS
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            yield page
        finally:
            browser.close()
