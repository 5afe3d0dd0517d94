"""`python -m streamlit_apps`, the README's command for the web UI by hand (and supervisord's): it listens where
the settings say, like every other service, not on every interface as a bare `streamlit run` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.processes import stop_group, wait_until_answers

REPO = Path(__file__).resolve().parents[2]


def test_the_ui_listens_on_the_bind_host_and_ui_port_only(settings, tmp_path):
    from semg.embedded import free_port

    port = free_port()
    env = {**os.environ, "UI_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env.pop("SEMG_BIND_HOST", None)  # the default: 127.0.0.1
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit_apps"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_until_answers(proc, f"http://127.0.0.1:{port}/_stcore/health", "the UI")
        except AssertionError as e:
            raise AssertionError(f"{e}: {log.read_text()[-2000:]}") from None
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}, listening
    finally:
        stop_group(proc)


def test_a_bad_setting_is_one_line(settings):
    r = subprocess.run([sys.executable, "-m", "streamlit_apps"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "UI_PORT": "abc"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "UI_PORT" in r.stderr, r.stderr


def test_the_ui_darkens_the_light_themes_faded_text_and_keeps_the_dark_theme(settings):
    """Captions are drawn at 60% opacity: Streamlit's default light text and link colours fall under WCAG AA's 4.5:1
    once faded (tests/e2e's test_captions_are_readable_in_the_light_and_the_dark_theme measures them in Chromium).
    The colours are set per theme: a top-level theme.* key would give a browser that prefers dark the light one."""
    from streamlit_apps.__main__ import command

    cmd = command(settings, [])
    theme = {flag: value for flag, value in zip(cmd, cmd[1:], strict=False) if flag.startswith("--theme.")}
    assert {"--theme.light.textColor", "--theme.light.linkColor", "--theme.dark.linkColor",
            "--theme.dark.backgroundColor"} <= set(theme), cmd  # the last for the primary red (test_e2e_browser.py)
    assert all(flag.startswith(("--theme.light.", "--theme.dark.")) for flag in theme), theme


def test_readme_and_supervisord_run_the_ui_this_way():
    assert "| `python -m streamlit_apps` |" in (REPO / "README.md").read_text()
    assert "command=%(ENV_SEMG_PYTHON)s -m streamlit_apps\n" in (REPO / "supervisord.conf").read_text()
