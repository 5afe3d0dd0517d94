"""Keyboard only, in headless Chromium: after a confirmation's Yes or Cancel (or a dismissed note) the rerun removes
the focused button, and the browser dropped the focus to the top of the page (document.activeElement was the
body): a keyboard or screen reader user had to find their way back from there. The focus goes to the button that
opened the confirmation, or to the section's heading when that button is gone (uikit.focus_after_rerun).

Only the web UI runs (no training worker: a scheduled job stays scheduled until the test cancels it)."""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import expect
from ui_driver import Ui

from semg import repo, secrets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streamlit_apps"))
import ui_seed  # noqa: E402  (the UI tests' data seeding)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The focused element: its tag and its text as shown (without icons, whose ligature names are aria-hidden or an img)
FOCUSED = """() => {
  const el = document.activeElement;
  if (el === document.body) return "BODY";
  const copy = el.cloneNode(true);
  copy.querySelectorAll('[aria-hidden="true"], [role="img"]').forEach(e => e.remove());
  return el.tagName + " " + copy.textContent.replace(/\\u2060/g, "").replace(/\\s+/g, " ").trim();
}"""


@pytest.fixture
def ui(ui_only, browser_page, screenshots_dir, settings) -> Ui:
    return Ui(browser_page, f"http://127.0.0.1:{settings.ui_port}", screenshots_dir)


def _open(ui: Ui, path: str, title: str) -> None:
    ui.page.goto(f"{ui.base_url}/{path}")
    ui.page.get_by_label("Password", exact=True).fill(secrets.ui_password())
    ui.page.get_by_role("button", name="Sign in").click()
    ui.page.get_by_role("heading", name=re.compile(re.escape(title))).first.wait_for(timeout=30_000)
    ui.wait_idle()


def _press(ui: Ui, button: str) -> None:
    """Enter on `button`, reached as a Tab would (focus() puts no pointer anywhere)."""
    ui.wait_idle()
    ui.page.get_by_role("button", name=button, exact=True).first.focus()
    assert ui.page.evaluate(FOCUSED) == f"BUTTON {button}"
    ui.page.keyboard.press("Enter")


def _focus_on(ui: Ui, expected: str, what: str) -> None:
    """The focus arrives on `expected` (tag and text) once the rerun has drawn the page, and stays there."""
    deadline = time.monotonic() + 20
    while ui.page.evaluate(FOCUSED) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    ui.wait_idle()
    assert ui.page.evaluate(FOCUSED) == expected, f"after {what}"


def _answer(ui: Ui, ask: str, answer: str, expected: str, then: str | None = None) -> None:
    """`ask` opens a confirmation and `answer` closes it (showing `then`): the focus is on `expected` after."""
    _press(ui, ask)
    _press(ui, answer)
    if then:
        ui.text(then)
    _focus_on(ui, expected, answer)


def test_deleting_a_user_keeps_the_keyboard_focus(ui, db_conn):
    """Delete… opens the confirmation (focus on its Cancel, the safe answer); Cancel goes back to Delete…; Yes
    deletes, and with nobody left in the list the focus is on the page's heading. The name carries "</script>",
    quotes and markup: the focus script keeps it as data (the page title would change if any of it ran)."""
    stamp = int(time.time() * 1000)
    name = f'Zoe </script><script>document.title="pwned"</script> "q" & <b>{stamp}'
    repo.create_user(db_conn, name, f"focus-{stamp}@example.org")
    _open(ui, "User_Management", "User Management")
    ui.fill("Search by name or email", f"focus-{stamp}@")
    ask = f"Delete {name}…"
    _press(ui, ask)
    _focus_on(ui, "BUTTON Cancel", "opening the confirmation")
    _press(ui, "Cancel")
    _focus_on(ui, f"BUTTON {ask}", "Cancel")
    _press(ui, ask)
    _focus_on(ui, "BUTTON Cancel", "opening the confirmation again")
    ui.page.keyboard.press("Shift+Tab")
    assert ui.page.evaluate(FOCUSED) == "BUTTON Yes, delete permanently"
    ui.page.keyboard.press("Enter")
    ui.text(f"Deleted {name}")
    _focus_on(ui, "H1 User Management", "Yes")
    assert "pwned" not in ui.page.title()


def test_an_api_keys_dismissed_note_and_revoked_key_keep_the_keyboard_focus(ui, db_conn):
    """"I have saved the key" goes back to the API keys' expander (closed once no key is shown); revoking the user's
    last key (its button gone with it) goes to "Create API key"."""
    stamp = int(time.time() * 1000)
    name = f"Kai Keys {stamp}"
    repo.create_user(db_conn, name, f"keys-{stamp}@example.org")
    _open(ui, "User_Management", "User Management")
    ui.fill("Search by name or email", f"keys-{stamp}@")
    ui.wait_idle()  # the search's rerun: until it ends, other users' (stale) key forms are on the page too
    ui.page.get_by_text(f"API keys of {name}", exact=True).click()
    ui.wait_idle()
    field = ui.page.locator("details", has=ui.page.get_by_text(f"API keys of {name}", exact=True)).get_by_label(
        "Name of the new key", exact=True)
    field.fill("controller")
    _press(ui, "Create API key")
    ui.text("it is shown only once")
    _press(ui, "I have saved the key")
    # the expander closes once the key is no longer shown (as before): its heading has the focus
    _focus_on(ui, f"SUMMARY API keys of {name}", '"I have saved the key"')
    ui.page.keyboard.press("Enter")  # opens it again
    _press(ui, "Revoke key")
    _focus_on(ui, "BUTTON Create API key", "revoking the last key")


def test_a_device_confirmation_keeps_the_keyboard_focus(ui, db_conn):
    """Cancel and Yes go back to the button that asked (Rotate key…, Delete device…), so does "I have saved the
    key" after a rotation; deleting the last device goes to the Devices heading."""
    stamp = int(time.time() * 1000)
    user = repo.create_user(db_conn, f"Dev Focus {stamp}", f"dev-{stamp}@example.org")
    repo.register_device(db_conn, user["id"], 4, 500.0, name="armband")
    _open(ui, f"Gesture_Management?user={user['id']}", "Gesture Management")
    _answer(ui, "Delete device…", "Cancel", "BUTTON Delete device…")
    _answer(ui, "Rotate key…", "Yes, rotate", "BUTTON Rotate key…", then="shown only once")
    _press(ui, "I have saved the key")
    _focus_on(ui, "BUTTON Rotate key…", '"I have saved the key"')
    _answer(ui, "Delete device…", "Yes, delete", "H2 Devices", then="Deleted device")  # the last device


def test_canceling_a_job_keeps_the_keyboard_focus(ui, db_conn):
    """"Cancel job…" asks first (focus on "No, keep the job", the safe answer), and the page's refreshes every 2 s
    leave the question and the focus where they are; "No" goes back to "Cancel job…"; a job that ends while the
    question is open is not canceled. "Yes" on a job that had not started cancels it, and the button is gone: the
    job's heading has the focus."""
    stamp = int(time.time() * 1000)
    base = ui_seed.seed_user(db_conn, f"Job Focus {stamp}", f"job-{stamp}@example.org", channels=4, rate=500.0)
    uid = base["user"]["id"]
    session = ui_seed.seed_session(db_conn, uid, base["device"]["id"], datetime.now(UTC) - timedelta(minutes=5))
    queued = repo.schedule_job(db_conn, uid, [session["id"]], {"epochs": 1})
    running = ui_seed.seed_job(db_conn, uid, [session["id"]], status="in-progress", epochs=2, with_model=False)
    with db_conn.cursor() as cur:  # 2 of 10 epochs trained
        cur.execute("""UPDATE training_jobs SET params = '{"epochs": 10}' WHERE id = %s""", (running["id"],))
    _open(ui, f"Training_Jobs_Status?user={uid}", "Training Jobs Status")  # the newest job: the running one
    _answer(ui, "Cancel job…", "No, keep the job", "BUTTON Cancel job…")
    _press(ui, "Cancel job…")
    _focus_on(ui, "BUTTON No, keep the job", "opening the confirmation")
    ui.text("Epochs trained so far: 2 of 10.")
    with db_conn.cursor() as cur:  # another epoch: the refresh shows it, the question and the focus stay
        cur.execute("UPDATE training_jobs SET epoch_metrics = epoch_metrics || jsonb_build_array(epoch_metrics -> 0) "
                    "WHERE id = %s", (running["id"],))
    ui.text("Epochs trained so far: 3 of 10.")
    ui.text(f"Cancel job #{running['id']}? Training stops")
    assert ui.page.evaluate(FOCUSED) == "BUTTON No, keep the job"
    with db_conn.cursor() as cur:  # the worker finishes it while the question is open
        cur.execute("UPDATE training_jobs SET status = 'completed', progress = 100, finished_at = now() WHERE id = %s",
                    (running["id"],))
    ui.text("before the cancel was confirmed: nothing was canceled")
    # the note is drawn during the rerun; the question's buttons are taken off when that run ends
    expect(ui.page.get_by_role("button", name="Yes, cancel the job")).to_have_count(0, timeout=20_000)
    assert repo.get_job(db_conn, running["id"])["status"] == "completed"

    ui.select(re.compile("^Job"), re.compile(rf"^job #{queued['id']} "))  # not "User", whose name has "Job" in it
    ui.page.get_by_role("heading", name=re.compile(rf"^Job #{queued['id']} — .*scheduled$")).wait_for()
    _press(ui, "Cancel job…")
    _focus_on(ui, "BUTTON No, keep the job", "opening the confirmation")
    ui.page.keyboard.press("Shift+Tab")
    assert ui.page.evaluate(FOCUSED) == "BUTTON Yes, cancel the job"
    ui.page.keyboard.press("Enter")
    _focus_on(ui, f"H2 Job #{queued['id']} — canceled", "Yes")
    assert repo.get_job(db_conn, queued["id"])["status"] == "canceled"


def test_closing_left_sessions_keeps_the_keyboard_focus(ui, db_conn):
    """"Close it" on a session left open goes to the next one's "Close it", and after the last to the page's
    heading."""
    stamp = int(time.time() * 1000)
    base = ui_seed.seed_user(db_conn, f"Cap Focus {stamp}", f"cap-{stamp}@example.org", channels=4, rate=500.0)
    uid, did = base["user"]["id"], base["device"]["id"]
    for _ in range(2):
        repo.create_session(db_conn, uid, did, ["fist"], 1, 2.0, 2.0, name="left open")
    _open(ui, f"Training_Data_Capture?user={uid}", "Training Data Capture")
    _press(ui, "Close it")
    # the pressed button is itself a focused "Close it": the rerun has drawn the page only once one is left
    expect(ui.page.get_by_role("button", name="Close it", exact=True)).to_have_count(1, timeout=20_000)
    _focus_on(ui, "BUTTON Close it", "closing the first")
    _press(ui, "Close it")
    _focus_on(ui, "H1 Training Data Capture", "closing the last")
