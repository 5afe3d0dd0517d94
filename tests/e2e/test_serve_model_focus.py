"""Keyboard only, in headless Chromium: "Serve this model" and "Serve the newest model instead" on the Training Jobs
page each remove the button pressed; the focus goes to the button in its place, or to the job's heading when there
is none (the job's model is then served as the newest). (tests/e2e/test_keyboard_focus.py does the same for the
confirmations; its helpers are used here.)"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from test_keyboard_focus import _focus_on, _open, _press, ui, ui_seed  # noqa: F401 - ui is the fixture used below

from semg import repo

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_serving_a_model_and_the_newest_again_keeps_the_keyboard_focus(ui, db_conn):  # noqa: F811 - the fixture
    stamp = int(time.time() * 1000)
    base = ui_seed.seed_user(db_conn, f"Serve Focus {stamp}", f"serve-{stamp}@example.org", channels=4, rate=500.0)
    uid = base["user"]["id"]
    session = ui_seed.seed_session(db_conn, uid, base["device"]["id"], datetime.now(UTC) - timedelta(minutes=5))
    older = ui_seed.seed_job(db_conn, uid, [session["id"]])
    newest = ui_seed.seed_job(db_conn, uid, [session["id"]])  # the page shows the newest job first
    for job in (older, newest):
        ui_seed.make_servable(db_conn, job["artifact_id"])
    repo.choose_served_model(db_conn, uid, older["artifact_id"])
    _open(ui, f"Training_Jobs_Status?user={uid}", "Training Jobs Status")
    _press(ui, "Serve this model")
    _focus_on(ui, "BUTTON Serve the newest model instead", "Serve this model")
    assert repo.latest_model(db_conn, uid)["id"] == newest["artifact_id"]
    _press(ui, "Serve the newest model instead")  # this job's model is the newest: no button takes its place
    _focus_on(ui, f"H2 Job #{newest['id']} — completed", "Serve the newest model instead")
    served = repo.latest_model(db_conn, uid)
    assert served["id"] == newest["artifact_id"] and served["chosen_at"] is None
