"""The very first ./start_all.sh cut short (power lost, Ctrl-C) while it created the virtualenv: the next run
finishes the set-up instead of failing on a virtualenv without pip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_virtualenv_left_without_pip_is_completed(tmp_path):
    repo = tmp_path / "repo"  # the set-up step alone, with nothing to install
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "lib.sh", repo / "scripts" / "lib.sh")
    (repo / "requirements.txt").write_text("")
    # what `python -m venv` leaves when stopped before it installed pip
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")], check=True)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    env["PIP_NO_INDEX"] = "1"  # offline: upgrading pip itself is best effort
    r = subprocess.run(["bash", "-c", ". scripts/lib.sh; semg_setup_venv runtime"], cwd=repo, capture_output=True,
                       text=True, timeout=300, env={**env, "SEMG_REPO": str(repo)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "has no pip" in r.stdout
    subprocess.run([str(repo / ".venv" / "bin" / "python"), "-m", "pip", "--version"], check=True,
                   capture_output=True)
    assert (repo / ".venv" / ".semg-installed-runtime").exists()
