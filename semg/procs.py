"""Find (and end) processes that belong to one platform instance: those whose environment carries
SEMG_INSTANCE=<its state dir>, which start_all.sh / docker-entrypoint.sh give supervisord and so every service
(not SEMG_STATE_DIR: a user's own shell, editor or `tail -f` may carry that). Used by stop_all.sh to guarantee
nothing of ours is left running.

    python -m semg.procs list
    python -m semg.procs kill      # SIGTERM, then SIGKILL after a grace period
    python -m semg.procs changed PID   # settings that differ between this environment and process PID's
    python -m semg.procs code-stamp    # a digest of the code the services run (start_all.sh gives supervisord)
    python -m semg.procs code-changed PID   # exit 1 when process PID runs other code than is here now
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path


def _ancestors() -> set[int]:
    """This process and its parents (the stop script, a start script that called it): never ours to kill."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def ours(state_dir: str) -> list[int]:
    want = f"SEMG_INSTANCE={state_dir}".encode()
    me = _ancestors()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in me:
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env:
            found.append(int(d.name))
    return sorted(found)


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid} {cmd[:160]}"


def kill_all(state_dir: str, grace: float = 10.0) -> list[int]:
    pids = ours(state_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and ours(state_dir):
        time.sleep(0.2)
    for pid in ours(state_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def changed_settings(pid: int, env: dict[str, str] | None = None) -> list[str]:
    """The settings (semg.config) whose effective values differ between the running process `pid` (supervisord:
    every service got its environment) and `env` (default: ours), as variable names, sorted."""
    from pydantic import SecretStr

    from semg.config import Settings

    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # exited meanwhile, or a zombie nobody reaped: nothing to compare with
        return []
    theirs = dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)

    def effective(environ: dict[str, str]) -> dict:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environ)
        try:
            values = Settings().model_dump()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in values.items()}

    before, now = effective(theirs), effective(dict(os.environ) if env is None else env)
    return sorted(k.upper() for k in now if now[k] != before[k])


REPO = Path(__file__).resolve().parent.parent
# What the services run: their packages, the schema and migrations, the scripts and supervisord's programs, and
# the pinned dependencies. Not tests, benchmarks, docs, the virtualenv or a state directory inside the checkout.
CODE_DIRS = ("semg", "ml_model", "udpserver", "streamlit_apps", "db", "scripts")
CODE_FILES = ("start_all.sh", "stop_all.sh", "supervisord.conf", "requirements.txt", "docker-entrypoint.sh")
CODE_SUFFIXES = (".py", ".sql", ".sh", ".conf", ".txt", ".toml", ".html")
CODE_STAMP_VAR = "SEMG_CODE_STAMP"


def code_stamp(repo: Path = REPO) -> str:
    """A digest of the code files under `repo` (names and contents): it changes with a `git pull`, a `git
    checkout` or an edit, so a start finding the platform already running can tell it runs older code."""
    h = hashlib.sha256()
    files = [repo / f for f in CODE_FILES]
    for d in CODE_DIRS:
        files += [p for p in (repo / d).rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts]
    for path in sorted(p for p in files if p.is_file()):
        h.update(str(path.relative_to(repo)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def code_changed(pid: int, repo: Path = REPO) -> bool:
    """Whether process `pid` (supervisord: every service got its environment) was started with other code than
    is in `repo` now: its CODE_STAMP_VAR differs, or it has none (started by a version from before stamps)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # exited meanwhile: nothing runs the old code
        return False
    theirs = dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)
    return theirs.get(CODE_STAMP_VAR) != code_stamp(repo)


def main() -> int:
    state_dir = os.environ.get("SEMG_STATE_DIR")
    if not state_dir:
        print("semg.procs: SEMG_STATE_DIR is not set", file=sys.stderr)
        return 2
    cmd = sys.argv[1] if len(sys.argv) > 1 else "list"
    if cmd == "code-stamp":
        print(code_stamp())
        return 0
    if cmd == "code-changed":
        return 1 if code_changed(int(sys.argv[2])) else 0
    if cmd == "changed":  # `changed PID`: the settings this shell changed since PID was started
        print(" ".join(changed_settings(int(sys.argv[2]))))
        return 0
    if cmd == "kill":
        for pid in kill_all(state_dir):
            print(f"ended leftover process {pid}")
        return 0
    pids = ours(state_dir)
    for pid in pids:
        print(describe(pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def tune_live_process() -> None:
    """For the live-path services (UDP server, inference worker, API), called once after start-up.

    Each runs an event loop next to helper threads (database writes, inference). CPython hands the GIL to a
    waiting thread only every `switchinterval` (5 ms by default), so a helper busy in Python code can hold
    the loop back that long per hand-off; 1 ms keeps that below the latency budget at a negligible cost.
    Freezing the start-up heap (modules, torch, models) keeps it out of every later full collection.
    """
    import gc

    sys.setswitchinterval(0.001)
    gc.collect()
    gc.freeze()
