"""semg.procs' code stamp: start_all.sh finding the platform already running tells whether it runs the code in
the checkout now, with real processes (their environment is what supervisord passed every service)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semg import procs


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the code the services run, to change as a `git pull` would."""
    repo = tmp_path / "checkout"
    for d in procs.CODE_DIRS:
        shutil.copytree(procs.REPO / d, repo / d, ignore=shutil.ignore_patterns("__pycache__", ".venv"))
    for f in procs.CODE_FILES:
        if (procs.REPO / f).is_file():
            shutil.copy(procs.REPO / f, repo / f)
    return repo


def _running(env_extra: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != procs.CODE_STAMP_VAR} | env_extra
    return subprocess.Popen(["sleep", "60"], env=env)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m semg.procs ...` as start_all.sh runs it (for this checkout)."""
    return subprocess.run([sys.executable, "-m", "semg.procs", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SEMG_STATE_DIR": "/nonexistent"})


def test_a_platform_started_from_other_code_is_told_from_one_running_this_code(checkout):
    """`./stop_all.sh` forgotten before `git pull; ./start_all.sh`: the start said the platform was running and
    left the old code (and the old database schema) in place."""
    stamp = _cli("code-stamp").stdout.strip()
    assert stamp == procs.code_stamp(procs.REPO) == procs.code_stamp(checkout)  # names and contents only
    this, older, unstamped = (_running({procs.CODE_STAMP_VAR: stamp}), _running({procs.CODE_STAMP_VAR: "0" * 16}),
                              _running({}))
    try:
        assert _cli("code-changed", str(this.pid)).returncode == 0
        assert _cli("code-changed", str(older.pid)).returncode == 1
        assert _cli("code-changed", str(unstamped.pid)).returncode == 1  # started by a version from before stamps
        assert not procs.code_changed(this.pid, checkout)
        (checkout / "db" / "migrations" / "9999_from_a_pull.sql").write_text("SELECT 1;\n")
        assert procs.code_changed(this.pid, checkout)
    finally:
        for p in (this, older, unstamped):
            p.kill()
            p.wait()
