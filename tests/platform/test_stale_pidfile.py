"""After a power cut (or a container restart) `run/supervisord.pid` names a PID that another process may have
got since: start_all.sh must not take it for our running supervisord, and stop_all.sh must never signal it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env(state: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    # stop_all.sh never (re)installs the virtualenv: the test's own Python is safe to name
    return {**keep, "SEMG_STATE_DIR": str(state), "SEMG_VENV": str(Path(sys.executable).parent.parent)}


def _foreign_process(tmp_path: Path) -> subprocess.Popen:
    """A live process of ours that is not the platform's (the PID a reboot handed to someone's editor)."""
    return subprocess.Popen(["sleep", "120"], cwd=tmp_path, env={"PATH": os.environ["PATH"]})


def test_pidfile_naming_a_foreign_process_is_stale(tmp_path):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    other = _foreign_process(tmp_path)
    try:
        (state / "run" / "supervisord.pid").write_text(f"{other.pid}\n")
        r = subprocess.run(["bash", "-c", '. scripts/lib.sh; SEMG_PYTHON="$SEMG_VENV/bin/python";'
                            ' semg_export_env; semg_supervisord_pid'],
                           cwd=REPO, env=_env(state), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("given", ["as started", "with a trailing slash"])
def test_pidfile_naming_our_supervisord_is_running(tmp_path, given):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    # stands in for supervisord only as far as the check goes: a live process started for this state dir
    ours = subprocess.Popen(["sleep", "120"], cwd=tmp_path, env={"PATH": os.environ["PATH"], "SEMG_INSTANCE": str(state)})
    try:
        (state / "run" / "supervisord.pid").write_text(f"{ours.pid}\n")
        env = _env(state)
        if given != "as started":
            env["SEMG_STATE_DIR"] += "/"
        r = subprocess.run(["bash", "-c", '. scripts/lib.sh; SEMG_PYTHON="$SEMG_VENV/bin/python";'
                            ' semg_export_env; semg_supervisord_pid'],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == str(ours.pid), (r.stdout, r.stderr)
    finally:
        ours.kill()
        ours.wait()


def test_stop_all_never_signals_the_process_a_stale_pidfile_names(tmp_path):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    other = _foreign_process(tmp_path)
    try:
        (state / "run" / "supervisord.pid").write_text(f"{other.pid}\n")
        r = subprocess.run([str(REPO / "stop_all.sh")], env=_env(state), capture_output=True, text=True,
                           timeout=120, cwd="/")
        assert r.returncode == 0, r.stdout + r.stderr
        assert other.poll() is None, f"stop_all.sh killed PID {other.pid}, not one of the platform's"
        assert "supervisord pid" not in r.stdout
        assert not (state / "run" / "supervisord.pid").exists()
    finally:
        other.kill()
        other.wait()
