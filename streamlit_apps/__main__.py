"""The web UI as the platform runs it: ``python -m streamlit_apps [streamlit run options]``.

Listens on SEMG_BIND_HOST:UI_PORT like every other service (a bare ``streamlit run`` listens on every
interface and reports usage statistics), headless, without a file watcher, with readable captions (THEME). Extra
arguments go to ``streamlit run`` after these, so they win (e.g. ``--server.fileWatcherType auto`` while editing pages).

Streamlit serves with uvicorn, which it configures itself; its defaults face a network badly (a connection that
never sends a request is kept for ever: enough of them, with no password, leave the UI unreachable), so
Streamlit runs in this process with the API's guards installed (``guard_streamlits_server``).
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from semg import tls  # noqa: E402
from semg.config import Settings, settings_or_exit  # noqa: E402

# Captions (st.caption) are drawn at 60% opacity, so Streamlit's default light text (#2f2d2b) and links came out at
# 3.9:1 and 3.0:1 on white, under WCAG AA's 4.5:1, and our captions say things that matter. Black text and a
# dark blue link reach 5.7:1 and 4.9:1 (4.8 on the sidebar) once faded; the dark theme's text passes, its link is
# lightened. The primary red is text too (a slider's value) and the background of white text (primary buttons): the
# dark theme's #cf4250 was 3.9:1 on its #171614 background and white on it 4.6:1, and no red reaches 4.5:1 both
# ways on that background; on black it is 4.6:1 (light: 5.2:1 both). Only the [theme.light] / [theme.dark]
# sections: a top-level theme.* key replaces the theme that follows the browser's light/dark preference with one
# custom theme, light for everyone.
THEME = ["--theme.light.textColor", "#000000", "--theme.light.linkColor", "#0000a0",
         "--theme.dark.linkColor", "#b3d4fb", "--theme.dark.backgroundColor", "#000000"]


def command(settings: Settings, extra: list[str]) -> list[str]:
    """The `streamlit run` command line (the launcher runs it in this process: see main)."""
    https = []
    if settings.tls_files is not None:  # HTTPS (semg.tls): the same certificate as the API's
        https = ["--server.sslCertFile", str(settings.tls_files[0]), "--server.sslKeyFile", str(settings.tls_files[1])]
    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("Main.py")),
            "--server.port", str(settings.ui_port), "--server.address", settings.semg_bind_host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.maxUploadSize", "0", *THEME, *https, *extra]


def guard_streamlits_server(tls_context: ssl.SSLContext | None) -> None:
    """Give Streamlit's uvicorn server what the API's has (ml_model.rest.connections): a request head within
    HEAD_TIMEOUT_S and, beyond max_connections(), the oldest connection still waiting for one closed (websockets
    of open tabs are never closed); with HTTPS, our TLS context (uvicorn's own allows its 'TLSv1' cipher list)
    and a bounded handshake. Streamlit has no setting for these, so two of its functions are wrapped; if a
    Streamlit upgrade renames them this fails at start rather than serving unguarded."""
    from streamlit.web import bootstrap
    from streamlit.web.server.starlette import starlette_server

    from ml_model.rest.connections import GuardedHttp, handshake_bound_loop

    kwargs_of = getattr(starlette_server, "_get_uvicorn_config_kwargs", None)
    if kwargs_of is None or not hasattr(bootstrap, "_get_uvloop_loop_factory"):
        raise RuntimeError("this Streamlit version configures its server elsewhere: update "
                           "streamlit_apps.__main__.guard_streamlits_server")

    def guarded_kwargs() -> dict:
        kwargs = kwargs_of()
        kwargs["http"] = GuardedHttp
        if tls_context is not None:
            kwargs["ssl_context_factory"] = lambda _config, _default: tls_context
        return kwargs

    starlette_server._get_uvicorn_config_kwargs = guarded_kwargs
    bootstrap._get_uvloop_loop_factory = lambda: handshake_bound_loop


def main(argv: list[str] | None = None) -> None:
    settings = settings_or_exit("streamlit_apps")
    try:  # loaded here: Streamlit would print a traceback, or prompt for a passphrase
        tls_context = tls.server_context(settings)
    except tls.TlsError as e:
        print(f"streamlit_apps: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cmd = command(settings, sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    guard_streamlits_server(tls_context)
    from streamlit.web import cli

    # In this process, as `streamlit run` (supervisord's signals reach Streamlit itself, as with exec before)
    sys.argv = ["streamlit", *cmd[3:]]
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main()
