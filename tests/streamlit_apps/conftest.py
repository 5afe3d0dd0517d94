"""Page tests run each Streamlit script with streamlit.testing (no browser) against the session's real
PostgreSQL/NATS. Pages import their helpers (data, uikit, ...) from streamlit_apps/, as `streamlit run` does."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

UI_DIR = Path(__file__).resolve().parents[2] / "streamlit_apps"
if str(UI_DIR) not in sys.path:
    sys.path.insert(0, str(UI_DIR))

PAGES = {
    "main": "Main.py",
    "users": "pages/1_User_Management.py",
    "gestures": "pages/2_Gesture_Management.py",
    "capture": "pages/3_Training_Data_Capture.py",
    "kickoff": "pages/4_Kickoff_Training.py",
    "jobs": "pages/5_Training_Jobs_Status.py",
    "live": "pages/6_Realtime_Gesture_Recognition.py",
    "review": "pages/7_Sensor_Data_Review.py",
}


@pytest.fixture(autouse=True)
def _fresh_ui_caches():
    """Health and quality results are cached for seconds/minutes; every test starts without them."""
    import streamlit as st
    st.cache_data.clear()
    yield


@pytest.fixture(autouse=True)
def _no_failed_sign_ins_left():
    """Wrong passwords are counted per address in the UI process (every AppTest is "local" in this one)."""
    import uikit
    uikit.SIGN_IN.clear()
    yield
    uikit.SIGN_IN.clear()


@pytest.fixture(autouse=True)
def _no_capture_runs_left():
    """Capture runs outlive their window in a process-wide registry (a reloaded page takes them over); ids
    restart with every clean database, so no test may find another test's run there."""
    import capture
    capture._RUNS.clear()
    yield
    capture._RUNS.clear()


@pytest.fixture(autouse=True)
def _no_capture_journals(state_dir):
    """Capture journals are files in the shared state dir (and ids restart in every test): none carries over,
    nor does a replay pause left by a test that had the database down."""
    from semg import journal
    journals = state_dir / "capture-journal"
    journal._retry_at = 0.0
    yield
    if journals.is_dir():
        for f in journals.iterdir():
            f.unlink()


@pytest.fixture
def page(settings):
    """page('users', user_id=None, login=True) -> an AppTest of that page, signed in unless login=False."""
    from streamlit.testing.v1 import AppTest

    def make(name: str, user_id: int | None = None, login: bool = True, timeout: float = 60) -> AppTest:
        at = AppTest.from_file(str(UI_DIR / PAGES[name]), default_timeout=timeout)
        if login:
            at.session_state["semg_authenticated"] = True
        if user_id is not None:
            at.session_state["semg_user_id"] = user_id
        return at

    return make


@pytest.fixture
def seeded(clean_db):
    """A user with two gestures, a streaming-looking device, a completed 30 s session with its samples, a
    completed training job with a model, and a few fresh predictions."""
    import ui_seed
    base = ui_seed.seed_user(clean_db)
    uid, did = base["user"]["id"], base["device"]["id"]
    start = datetime.now(UTC) - timedelta(seconds=40)
    ui_seed.seed_samples(clean_db, uid, did, start, 40_000, channels=8, rate=1000.0)
    session = ui_seed.seed_session(clean_db, uid, did, start + timedelta(seconds=2), repetitions=3, hold_s=2.5,
                                   rest_s=2.5)
    job = ui_seed.seed_job(clean_db, uid, [session["id"]])
    ui_seed.seed_predictions(clean_db, uid)
    return {"user": base["user"], "device": base["device"], "session": session, "job": job, "conn": clean_db}


@pytest.fixture
def db_down(monkeypatch, settings):
    """Point the UI at a port where no PostgreSQL listens (as when the database is stopped)."""
    from semg.config import get_settings
    from semg.embedded import free_port
    monkeypatch.setenv("POSTGRES_PORT", str(free_port()))
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()
