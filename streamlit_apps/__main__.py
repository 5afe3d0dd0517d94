"""The web UI as the platform runs it: ``python -m streamlit_apps [streamlit run options]``.

Listens on SEMG_BIND_HOST:UI_PORT like every other service (a bare ``streamlit run`` listens on every
interface and reports usage statistics), headless, without a file watcher. Extra arguments go to
``streamlit run`` after these, so they win (e.g. ``--server.fileWatcherType auto`` while editing pages).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from semg import tls  # noqa: E402
from semg.config import Settings, settings_or_exit  # noqa: E402


def command(settings: Settings, extra: list[str]) -> list[str]:
    https = []
    if settings.tls_files is not None:  # HTTPS (semg.tls): the same certificate as the API's
        https = ["--server.sslCertFile", str(settings.tls_files[0]), "--server.sslKeyFile", str(settings.tls_files[1])]
    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("Main.py")),
            "--server.port", str(settings.ui_port), "--server.address", settings.semg_bind_host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.maxUploadSize", "0", *https, *extra]


def main(argv: list[str] | None = None) -> None:
    settings = settings_or_exit("streamlit_apps")
    if problem := tls.problem(settings):  # checked here: Streamlit would print a traceback, or prompt for a passphrase
        print(f"streamlit_apps: {problem}", file=sys.stderr)
        raise SystemExit(2)
    cmd = command(settings, sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the same process: supervisord's signals reach Streamlit itself


if __name__ == "__main__":
    main()
