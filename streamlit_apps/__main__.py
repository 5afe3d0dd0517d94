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

from semg.config import Settings, settings_or_exit  # noqa: E402


def command(settings: Settings, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("Main.py")),
            "--server.port", str(settings.ui_port), "--server.address", settings.semg_bind_host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.maxUploadSize", "0", *extra]


def main(argv: list[str] | None = None) -> None:
    cmd = command(settings_or_exit("streamlit_apps"), sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the same process: supervisord's signals reach Streamlit itself


if __name__ == "__main__":
    main()
