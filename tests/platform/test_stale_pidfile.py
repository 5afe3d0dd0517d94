"""After a power cut (or a container restart) `run/supervisord.pid` names a PID that another process may have
got since: start_all.sh must not take it for our running supervisord, and stop_all.sh must never signal it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env(state: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    # stop_all.sh never (re)installs the virtualenv: the test's own Python is safe to name
    return {**keep, "SEMG_STATE_DIR": str(state), "SEMG_VENV": str(Path(sys.executable).parent.parent)}


@contextlib.contextmanager
def _pidfile_naming(tmp_path: Path, **env: str) -> Iterator[tuple[Path, subprocess.Popen]]:
    """(state dir, process) where run/supervisord.pid names a live process of ours with `env`: without
    SEMG_INSTANCE it is not the platform's (the PID a reboot handed to someone's editor)."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    proc = subprocess.Popen(["sleep", "120"], cwd=tmp_path, env={"PATH": os.environ["PATH"], **env})
    try:
        (state / "run" / "supervisord.pid").write_text(f"{proc.pid}\n")
        yield state, proc
    finally:
        proc.kill()
        proc.wait()


def _supervisord_pid(env: dict[str, str]) -> subprocess.CompletedProcess:
    """lib.sh's answer to "which PID is our running supervisord?" (exit 1: none)."""
    return subprocess.run(["bash", "-c", '. scripts/lib.sh; SEMG_PYTHON="$SEMG_VENV/bin/python";'
                           ' semg_export_env; semg_supervisord_pid'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_pidfile_naming_a_foreign_process_is_stale(tmp_path):
    with _pidfile_naming(tmp_path) as (state, _):
        r = _supervisord_pid(_env(state))
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)


@pytest.mark.parametrize("given", ["as started", "with a trailing slash"])
def test_pidfile_naming_our_supervisord_is_running(tmp_path, given):
    # stands in for supervisord only as far as the check goes: a live process started for this state dir
    with _pidfile_naming(tmp_path, SEMG_INSTANCE=str(tmp_path / "state")) as (state, ours):
        env = _env(state)
        if given != "as started":
            env["SEMG_STATE_DIR"] += "/"
        r = _supervisord_pid(env)
    assert r.returncode == 0 and r.stdout.strip() == str(ours.pid), (r.stdout, r.stderr)


def test_stop_all_never_signals_the_process_a_stale_pidfile_names(tmp_path):
    with _pidfile_naming(tmp_path) as (state, other):
        r = subprocess.run([str(REPO / "stop_all.sh")], env=_env(state), capture_output=True, text=True,
                           timeout=120, cwd="/")
        assert r.returncode == 0, r.stdout + r.stderr
        assert other.poll() is None, f"stop_all.sh killed PID {other.pid}, not one of the platform's"
        assert "supervisord pid" not in r.stdout
        assert not (state / "run" / "supervisord.pid").exists()
