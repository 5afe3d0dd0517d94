"""Fixtures for the security tests: the API in-process (TestClient) on an empty database, keys of every role,
and Streamlit pages as AppTests (pages import their helpers from streamlit_apps/, as `streamlit run` does)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

UI_DIR = Path(__file__).resolve().parents[2] / "streamlit_apps"
if str(UI_DIR) not in sys.path:
    sys.path.insert(0, str(UI_DIR))


@pytest.fixture
def api(clean_db, settings):
    from fastapi.testclient import TestClient

    from ml_model.api import app
    with TestClient(app) as client:
        yield client


@pytest.fixture
def admin_key(api, clean_db) -> dict[str, str]:
    from ml_model.rest import keys as keystore
    return {"X-API-Key": keystore.create_key(clean_db, "admin", None, "security test")["key"]}


@pytest.fixture
def user_key(clean_db):
    """user_key(user_id) -> headers of a fresh 'user' key scoped to that user."""
    from ml_model.rest import keys as keystore

    def make(user_id: int) -> dict[str, str]:
        return {"X-API-Key": keystore.create_key(clean_db, "user", user_id, "security test")["key"]}

    return make


@pytest.fixture
def page(settings):
    """page(path, login=True) -> an AppTest of a page file under streamlit_apps/."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()

    def make(path: str, login: bool = True, user_id: int | None = None, timeout: float = 60) -> AppTest:
        at = AppTest.from_file(str(UI_DIR / path), default_timeout=timeout)
        if login:
            at.session_state["semg_authenticated"] = True
        if user_id is not None:
            at.session_state["semg_user_id"] = user_id
        return at

    return make
