"""End to end in headless Chromium: a person signs in, creates themself, adds gestures, registers an armband,
records a guided session with the (fake) webcam while the armband streams (testing/udpsim.py's synthetic
device), reviews it, trains a model, watches the job complete and sees live decisions.

Every service runs as a subprocess against the test session's PostgreSQL/NATS. Steps that need a service
which does not exist yet skip with its name. Screenshots of every page go to test-artifacts/e2e-screenshots.
"""

from __future__ import annotations

import contextlib
import re
import time
from datetime import UTC, datetime

import pytest
from playwright.sync_api import expect
from ui_driver import Ui

from semg import db, repo, secrets

pytestmark = [pytest.mark.browser, pytest.mark.slow]

GESTURES = ["fist", "open hand"]
CHANNELS, RATE = 4, 500.0
REPS, HOLD, REST = 3, 2.5, 2.0


def _conn():
    conn = db.connect()
    conn.autocommit = True
    return conn


def _wait(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_the_whole_journey_in_a_browser(stack, browser_page, screenshots_dir, settings):
    from sim_wearer import SimulatedWearer
    for needed in ("api", "udpserver"):
        if why := stack.not_available(needed):
            pytest.skip(f"{why}: the capture needs it")
    ui = Ui(browser_page, f"http://127.0.0.1:{settings.ui_port}", screenshots_dir)
    conn = _conn()
    wearer = None
    try:
        # 1. sign in, create a user, gestures and a device
        ui.login(secrets.ui_password())
        ui.shot("overview-start")
        email = f"e2e-{int(time.time())}@example.org"
        ui.create_user("Erin Example", email)
        ui.shot("user-management")
        user = next(u for u in repo.list_users(conn, search=email))
        ui.add_gestures(GESTURES)
        device_id, key = ui.register_device(CHANNELS, RATE)
        ui.shot("gesture-management-device-key")
        assert {g["name"] for g in repo.list_gestures(conn, user["id"])} == set(GESTURES)
        registered = repo.get_device(conn, device_id)
        assert (registered["channel_count"], float(registered["sample_rate_hz"])) == (CHANNELS, RATE), registered
        ui.click("I have saved the key")

        # 2. the armband starts streaming: the capture page proves it
        wearer = SimulatedWearer(device_id, key, CHANNELS, RATE, settings.udp_port, GESTURES).start()
        ui.goto("Training Data Capture", "Training Data Capture")
        ui.text(re.compile(rf"device #{device_id} streaming"), timeout=30)
        webcam = ui.start_webcam()
        ui.fill("Repetitions", str(REPS))
        ui.fill("Hold (s)", str(HOLD))
        ui.fill("Rest (s)", str(REST))
        ui.shot("capture-ready")

        # 3. the guided session: the wearer follows the cue
        ui.click("Start session")
        session = _wait(lambda: next((s for s in repo.list_sessions(conn, user["id"]) if s["status"] == "recording"),
                                     None), 30, "the session to start", poll=0.1)
        full = repo.get_session(conn, session["id"])
        wearer.follow_session(full["started_at"], full["intervals"])
        ui.text(re.compile(rf"repetition 1 of {REPS}"), timeout=20)
        time.sleep(3)
        ui.shot("capture-cue-running")
        total_s = full["plan"]["total_ms"] / 1000
        ui.text(re.compile(rf"Session #{session['id']} completed"), timeout=total_s + 60)
        ui.shot("capture-completed")
        done = repo.get_session(conn, session["id"])
        assert done["status"] == "completed"
        assert all(i["started_at"] and i["ended_at"] for i in done["intervals"])
        with conn.cursor() as cur:
            cur.execute("SELECT path, frame_count, bytes, started_at FROM videos WHERE session_id = %s",
                        (session["id"],))
            video = cur.fetchone()
        if webcam:
            assert video is not None and video[1] > 10 and (settings.video_dir / video[0]).stat().st_size > 0, video
            # the video starts in server time within the session (the cue is drawn on its frames)
            assert abs((video[3] - done["started_at"]).total_seconds()) < 5

        # 4. review it: signals, labels, spectra and the video under one cursor
        ui.goto("Sensor Data Review", "Sensor Data Review")
        expect(browser_page.locator(".js-plotly-plot").first).to_be_visible(timeout=30_000)
        if webcam:
            expect(browser_page.locator('[data-testid="stVideo"]').first).to_be_visible(timeout=30_000)
        ui.shot("sensor-data-review")

        # 5. kick off training
        ui.goto("Kickoff Training", "Kickoff Training")
        ui.text("Recorded sessions")
        ui.fill("Epochs", "15")
        ui.shot("kickoff-training")
        if why := stack.not_available("trainer"):
            ui.goto("Training Jobs Status", "Training Jobs Status")
            ui.shot("training-jobs-status")
            pytest.skip(f"training worker: {why}; the session was captured and reviewed, training and live "
                        "recognition were not run")
        assert stack.alive("trainer"), f"the training worker died:\n{stack.tail('trainer')}"
        browser_page.get_by_role("button", name=re.compile(r"Train on 1 session")).click()
        ui.text(re.compile(r"Training job #\d+ scheduled"))
        job = repo.list_jobs(conn, user["id"])[0]

        # 6. watch it complete
        ui.goto("Training Jobs Status", "Training Jobs Status")
        final = _wait(lambda: (j := repo.get_job(conn, job["id"]))["status"] in ("completed", "failed", "canceled")
                      and j, 900, f"job {job['id']} to finish", poll=2)
        assert final["status"] == "completed", f"{final['status']}: {final['error']}\n{stack.tail('trainer')}"
        ui.text("Held-out accuracy", timeout=30, exact=True)
        ui.shot("training-jobs-status")

        # 7. live decisions while the wearer keeps making the gestures
        if why := stack.not_available("inference"):
            pytest.skip(f"inference worker: {why}; the model was trained, live decisions were not checked")
        assert stack.alive("inference"), f"the inference worker died:\n{stack.tail('inference')}"
        cycling_from = datetime.now(UTC)
        wearer.cycle(GESTURES, hold_s=3.0, rest_s=2.0)
        ui.goto("Realtime Gesture Recognition", "Real-time Gesture Recognition")
        _wait(lambda: repo.recent_predictions(conn, user["id"], limit=5), 180, "live decisions", poll=1)
        cue = browser_page.locator('[data-testid="stHtml"]').filter(has_text="confidence").first
        expect(cue).to_be_visible(timeout=60_000)
        # a few gestures' worth of timeline for the picture: until each gesture was decided since the cycling
        # began (rest 2 s, fist 3 s, rest 2 s, open hand 3 s), or 8 s at most (the fixed wait this was)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not set(GESTURES) <= {
                p["gesture"] for p in repo.recent_predictions(conn, user["id"], limit=500, since=cycling_from)}:
            time.sleep(0.5)
        ui.shot("realtime-gesture-recognition")
        preds = repo.recent_predictions(conn, user["id"], limit=500)
        shown = {p["gesture"] for p in preds}
        agree = sum(p["gesture"] == wearer.label_at(p["sample_received"].timestamp()) for p in preds if
                    p["sample_received"]) / max(1, len(preds))
        print(f"\nlive: {len(preds)} decisions, classes {sorted(shown)}, agreement with the wearer {agree:.0%}")
        assert shown & set(GESTURES + ["REST"]), shown

        ui.goto("Main", "sEMG gesture platform")
        ui.shot("overview-end")
    finally:
        if wearer is not None:
            wearer.stop()
        conn.close()
        print("screenshots:", *[str(p) for p in ui.taken], sep="\n  ")
        for name in stack.procs:
            if not stack.alive(name):
                print(f"--- {name} exited; log tail:\n{stack.tail(name)}")
        with contextlib.suppress(Exception):
            browser_page.close()


def _sign_in_on(page, password: str, title: str) -> None:
    """Sign in on the page itself (a browser without a remembered sign-in is asked on any page)."""
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name=re.compile(re.escape(title))).first.wait_for(timeout=30_000)


def _on_capture_page(conn, browser_page, screenshots_dir, settings, name: str) -> tuple[dict, Ui]:
    """A new user with GESTURES and an armband, signed in on their Training Data Capture page."""
    user = repo.create_user(conn, name, f"{name.split()[-1].lower()}-{int(time.time())}@example.org")
    for g in GESTURES:
        repo.add_gesture(conn, user["id"], g)
    repo.register_device(conn, user["id"], CHANNELS, RATE)
    ui = Ui(browser_page, f"http://127.0.0.1:{settings.ui_port}", screenshots_dir)
    browser_page.goto(f"{ui.base_url}/Training_Data_Capture?user={user['id']}")
    _sign_in_on(browser_page, secrets.ui_password(), "Training Data Capture")
    ui.wait_idle()
    return user, ui


def test_a_capture_page_reloaded_mid_session_resumes_where_it_stopped(stack, browser_page, screenshots_dir,
                                                                     settings):
    """Someone reloads the capture page by mistake a few seconds into a session: the reloaded page offers to
    go on, the interrupted interval is left out and done again, and every planned repetition is recorded once,
    with the webcam video of both halves in one registered file."""
    conn = _conn()
    try:
        user, ui = _on_capture_page(conn, browser_page, screenshots_dir, settings, "Rita Reload")
        # the remembered sign-in is in this origin's localStorage, not in a cookie (which every port of the host
        # name would be sent and could read)
        token = _wait(lambda: browser_page.evaluate("() => localStorage.getItem('semg_session')"), 10,
                      "the sign-in's token in the browser")
        assert len(token) == 43 and all(token not in c["value"] for c in browser_page.context.cookies())
        webcam = ui.start_webcam()
        reps, hold, rest = 2, 2.5, 2.0
        ui.fill("Repetitions", str(reps))
        ui.fill("Hold (s)", str(hold))
        ui.fill("Rest (s)", str(rest))
        ui.click("Start session")
        session = _wait(lambda: next((s for s in repo.list_sessions(conn, user["id"]) if s["status"] == "recording"),
                                     None), 30, "the session to start", poll=0.1)
        ui.text(re.compile(r"repetition 1 of 2"), timeout=20)
        time.sleep(3)

        browser_page.reload()  # by mistake: the sign-in is remembered (semg.uisessions), no password asked
        browser_page.get_by_role("heading", name=re.compile("Training Data Capture")).first.wait_for(timeout=30_000)
        ui.text(re.compile(rf"Session #{session['id']} .* stopped showing its cue"), timeout=30)
        ui.shot("capture-reloaded-offer")
        ui.click("Resume", exact=True)
        ui.text(re.compile(rf"Session #{session['id']} resumed"), timeout=30)
        if webcam:
            assert ui.start_webcam(), "the webcam did not come back on after the reload"
        ui.shot("capture-resumed")
        ui.text(re.compile(rf"Session #{session['id']} completed"), timeout=120)
        ui.shot("capture-resumed-completed")

        done = repo.get_session(conn, session["id"])
        assert done["status"] == "completed"
        trained = sorted((i for i in done["intervals"] if i["started_at"] and not i["discarded"]),
                         key=lambda i: i["started_at"])
        gestures = sorted((i["label"], i["repetition"]) for i in trained if i["kind"] == "gesture")
        assert gestures == sorted((g, r) for g in GESTURES for r in range(reps)), gestures  # each once
        # one gap: the time away, with the interval under way at the reload (if it had begun) discarded in it
        [(away_from, away_to)] = [(a["ended_at"], b["started_at"]) for a, b in zip(trained, trained[1:])
                                  if a["ended_at"] != b["started_at"]]
        cut = [i for i in done["intervals"] if i["discarded"]]
        assert len(cut) <= 1 and all(away_from <= i["started_at"] < i["ended_at"] <= away_to for i in cut), cut
        after = [i for i in trained if i["started_at"] >= away_to]
        videos = repo.list_videos(conn, user["id"], session["id"])
        if webcam:
            [video] = videos
            assert video["frame_count"] > 10 and (settings.video_dir / video["path"]).stat().st_size > 0, video
            assert video["ended_at"] > after[0]["started_at"]  # it goes on after the resume

        browser_page.get_by_role("button", name="Sign out").click()
        browser_page.get_by_label("Password", exact=True).wait_for(timeout=30_000)
        _wait(lambda: browser_page.evaluate("() => localStorage.getItem('semg_session') === null"), 10,
              "the browser to forget the token")
        browser_page.reload()
        browser_page.get_by_label("Password", exact=True).wait_for(timeout=30_000)
    finally:
        conn.close()


def test_the_capture_is_paused_and_resumed_with_one_key(stack, browser_page, screenshots_dir, settings):
    """The hand with the armband is holding gestures and the other may be unsteady: P pauses the cue (the
    repetition under way is left out and done again) and P resumes it, with the keyboard focus wherever the
    click on Start left it; every planned repetition is then recorded once."""
    conn = _conn()
    try:
        user, ui = _on_capture_page(conn, browser_page, screenshots_dir, settings, "Paula Pause")
        reps = 1
        ui.fill("Repetitions", str(reps))
        ui.fill("Hold (s)", "2.5")
        ui.fill("Rest (s)", "1.5")
        ui.click("Start session")
        session = _wait(lambda: next((s for s in repo.list_sessions(conn, user["id"]) if s["status"] == "recording"),
                                     None), 30, "the session to start", poll=0.1)
        ui.text(re.compile(r"repetition 1 of 1"), timeout=20)
        time.sleep(1.0)
        browser_page.keyboard.press("p")
        ui.text(re.compile(r"take as long as you need"), timeout=20)
        ui.shot("capture-paused-by-key")
        # the grey cue (rest, pause) was #555555 on the dark theme: 2.5:1
        for scheme in ("light", "dark"):
            browser_page.emulate_media(color_scheme=scheme)

            def cue_in_theme(dark=scheme == "dark"):  # the page redraws in the preferred theme
                cue = browser_page.evaluate(_CUE_SEEN)
                return cue if (_luminance(cue["headline"]["background"]) < 0.1) == dark else None
            _assert_readable({scheme: _wait(cue_in_theme, 10, f"the {scheme} theme", poll=0.1)})
        browser_page.emulate_media(color_scheme="light")
        time.sleep(2.0)  # paused: nothing runs on
        cut = [i for i in repo.get_session(conn, session["id"])["intervals"] if i["discarded"]]
        assert len(cut) == 1, cut
        browser_page.keyboard.press("p")
        ui.text(re.compile(rf"Session #{session['id']} resumed"), timeout=20)
        ui.text(re.compile(rf"Session #{session['id']} completed"), timeout=120)
        done = repo.get_session(conn, session["id"])
        kept = sorted((i["label"], i["repetition"]) for i in done["intervals"]
                      if i["kind"] == "gesture" and i["started_at"] and not i["discarded"])
        assert kept == sorted((g, r) for g in GESTURES for r in range(reps)), kept  # each once
        assert [i["id"] for i in done["intervals"] if i["discarded"]] == [cut[0]["id"]]
    finally:
        conn.close()


def test_the_keyboard_focus_stays_on_add_selected(stack, browser_page, screenshots_dir, settings):
    """Keyboard only: gestures picked in the quick-add list and added with Enter on "Add selected". The rerun after
    adding empties the list, which disabled the button, and the browser dropped the focus to the top of the page
    (document.activeElement was the body): the next Tab started from nowhere a screen reader had said."""
    conn = _conn()
    try:
        user = repo.create_user(conn, "Kim Keys", f"keys-{int(time.time())}@example.org")
        ui = Ui(browser_page, f"http://127.0.0.1:{settings.ui_port}", screenshots_dir)
        browser_page.goto(f"{ui.base_url}/Gesture_Management?user={user['id']}")
        _sign_in_on(browser_page, secrets.ui_password(), "Gesture Management")
        ui.wait_idle()
        focused = "() => document.activeElement.tagName + ' ' + document.activeElement.innerText.trim()"
        browser_page.locator('[data-testid="stMultiSelect"]').filter(has_text="Quick-add").locator("input").focus()
        for name in GESTURES:
            browser_page.keyboard.type(name)
            browser_page.get_by_role("option", name=name, exact=True).wait_for()
            browser_page.keyboard.press("Enter")
            ui.wait_idle()
        browser_page.keyboard.press("Escape")
        for _ in range(4):  # past the list's "Clear all"
            browser_page.keyboard.press("Tab")
            if browser_page.evaluate(focused) == "BUTTON Add selected":
                break
        assert browser_page.evaluate(focused) == "BUTTON Add selected"
        browser_page.keyboard.press("Enter")
        _wait(lambda: len(repo.list_gestures(conn, user["id"])) == len(GESTURES), 30, "the gestures to be added",
              poll=0.2)
        browser_page.locator('[data-testid="stDataFrame"]').first.wait_for()  # the page shows them
        ui.wait_idle()
        assert browser_page.evaluate(focused) == "BUTTON Add selected"
    finally:
        conn.close()


def test_a_name_is_shown_as_typed(stack, browser_page, screenshots_dir, settings):
    """Streamlit renders markdown in messages and labels: a user named `*fist* $1$ :red[x]` was shown as an italic
    word, a formula and red text. Their name is shown character for character (in the expander's label, and in the
    delete button's), and nothing of it is styled."""
    name = "*fist* $1$ :red[x] ~~y~~"
    conn = _conn()
    try:
        email = f"md-{int(time.time())}@example.org"
        repo.create_user(conn, name, email)
        ui = Ui(browser_page, f"http://127.0.0.1:{settings.ui_port}", screenshots_dir)
        ui.login(secrets.ui_password())
        ui.goto("User Management", "User Management")
        ui.fill("Search by name or email", email)
        label = ui.text(f"API keys of {name}", exact=True)
        assert label.inner_text() == f"API keys of {name}"
        expect(browser_page.get_by_role("button", name=f"Delete {name}…", exact=True)).to_be_visible()
        styled = browser_page.locator('[data-testid="stMain"]').locator(
            ".katex, .stMarkdownColoredText, del, em").count()
        assert styled == 0, styled
    finally:
        conn.close()


# seen(el): the colour an element's text is seen in (its colour faded by every opacity above it) and its background
# (the first opaque one, with the translucent ones above it laid over), as axe-core's colour-contrast rule sees them.
_SEEN = """
  const rgba = s => { const v = s.match(/[\\d.]+/g).map(Number); return v.length < 4 ? [...v, 1] : v; };
  const seen = el => {
    let alpha = rgba(getComputedStyle(el).color)[3], bg = [255, 255, 255];
    for (let e = el; e; e = e.parentElement) alpha *= parseFloat(getComputedStyle(e).opacity);
    const tints = [];
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] === 1) { bg = c.slice(0, 3); break; }
      if (c[3] > 0) tints.unshift(c);
    }
    for (const c of tints) bg = bg.map((v, i) => c[3] * c[i] + (1 - c[3]) * v);
    return {colour: rgba(getComputedStyle(el).color).slice(0, 3).map((c, i) => alpha * c + (1 - alpha) * bg[i]),
            background: bg, text: el.innerText};
  };
"""
# A caption's text and link
_CAPTION_SEEN = "() => {" + _SEEN + """
  const caption = [...document.querySelectorAll('[data-testid=stMain] [data-testid=stCaptionContainer]')];
  const link = caption.map(c => c.querySelector('a')).find(Boolean);
  return {text: seen(caption[0].querySelector('p')), link: link ? seen(link) : null};
}"""
# uikit.big_cue's headline and sub-line
_CUE_SEEN = "() => {" + _SEEN + """
  const cue = document.querySelector('[data-testid=semg-cue]');
  return {headline: seen(cue), sub: seen(cue.nextElementSibling)};
}"""

# The theme's primary colour as text (a slider's value, drawn above its thumb: on the slider's background) and as the
# background of white text (a primary button)
_SLIDER_VALUE_SEEN = "() => {" + _SEEN + """
  const slider = document.querySelector('[data-testid=stMain] [data-testid=stSlider]');
  const value = seen(slider.querySelector('[data-testid=stSliderThumbValue]'));
  return {value: {...value, background: seen(slider).background}};
}"""
_PRIMARY_BUTTON_SEEN = "() => {" + _SEEN + """
  const button = document.querySelector('[data-testid=stMain] [data-testid=stBaseButton-primaryFormSubmit]');
  return {title: seen(document.querySelector('[data-testid=stMain] h1')), button: seen(button.querySelector('p') || button)};
}"""


def _luminance(rgb) -> float:
    c = [v / 255 for v in rgb]
    c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def _contrast(a, b) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _seen_in_both_themes(browser_page, shot, path: str, title: str, ready: str, seen_js: str) -> dict:
    """{"light"/"dark": what `seen_js` returns} on the page at `path`, signed in, once the element `ready` (a CSS
    selector) is there, in a browser (context) per preference, as a person has; the light/dark backgrounds checked."""
    seen = {}
    for scheme in ("light", "dark"):
        page = browser_page.context.browser.new_page(color_scheme=scheme, viewport={"width": 1400, "height": 1000})
        try:
            page.goto(path)
            _sign_in_on(page, secrets.ui_password(), title)
            page.locator(ready).first.wait_for()
            seen[scheme] = page.evaluate(seen_js)
            page.screenshot(path=str(shot.with_name(f"{shot.name}-{scheme}.png")))
        finally:
            page.close()
    light, dark = (next(iter(seen[s].values()))["background"] for s in ("light", "dark"))
    assert _luminance(light) > 0.8, seen["light"]
    assert _luminance(dark) < 0.1, seen["dark"]  # the browser's preference is kept
    return seen


def _assert_readable(seen: dict) -> None:
    """WCAG AA's 4.5:1 for every part, in both themes."""
    unreadable = [(scheme, part, round(_contrast(s["colour"], s["background"]), 2), s)
                  for scheme, parts in seen.items() for part, s in parts.items()
                  if _contrast(s["colour"], s["background"]) < 4.5]
    assert not unreadable, unreadable


def test_captions_are_readable_in_the_light_and_the_dark_theme(stack, browser_page, screenshots_dir, settings):
    """st.caption is drawn at 60% opacity: with Streamlit's default light theme its text was 3.9:1 on white and a
    link in it 3.0:1, under WCAG AA's 4.5:1 (axe-core's colour-contrast on every page). The launcher's theme
    darkens them; a browser that prefers dark still gets the dark theme (a top-level theme.* setting would give
    it the light one), where the caption's link was 3.9:1."""
    # the REST API's caption links its health URL (the API runs in this stack)
    _assert_readable(_seen_in_both_themes(
        browser_page, screenshots_dir / "captions", f"http://127.0.0.1:{settings.ui_port}/", "sEMG gesture platform",
        '[data-testid="stMain"] [data-testid="stCaptionContainer"] a', _CAPTION_SEEN))


def test_the_live_cue_is_readable_in_the_light_and_the_dark_theme(stack, browser_page, screenshots_dir, settings):
    """The live page's "no current decision" cue: its dash was #999999, 2.6:1 on its tint over white, and its
    sub-line (uikit.big_cue's, the capture cue's too) #444444 in either theme, 2.0:1 on the dark one."""
    conn = _conn()
    try:
        user = repo.create_user(conn, "Cue Contrast", f"cue-{int(time.time())}@example.org")
    finally:
        conn.close()
    seen = _seen_in_both_themes(
        browser_page, screenshots_dir / "live-cue",
        f"http://127.0.0.1:{settings.ui_port}/Realtime_Gesture_Recognition?user={user['id']}",
        "Real-time Gesture Recognition", '[data-testid="semg-cue"]', _CUE_SEEN)
    assert seen["light"]["sub"]["text"] == "no current decision", seen
    _assert_readable(seen)


def test_primary_coloured_text_is_readable_in_the_light_and_the_dark_theme(stack, browser_page, screenshots_dir,
                                                                           settings):
    """A slider's value is drawn in the theme's primary red: the dark theme's was 3.9:1 on its background (the live
    page's time window, the review's time cursor). Primary buttons draw white text on that red, 4.6:1: a lighter red
    would have made them unreadable instead, so the dark background is darker."""
    conn = _conn()
    try:
        user = repo.create_user(conn, "Primary Contrast", f"primary-{int(time.time())}@example.org")
    finally:
        conn.close()
    base = f"http://127.0.0.1:{settings.ui_port}"
    seen = _seen_in_both_themes(browser_page, screenshots_dir / "slider-value",
                                f"{base}/Realtime_Gesture_Recognition?user={user['id']}", "Real-time Gesture Recognition",
                                '[data-testid="stMain"] [data-testid="stSliderThumbValue"]', _SLIDER_VALUE_SEEN)
    assert seen["light"]["value"]["text"] == "10", seen  # the time window's
    _assert_readable(seen)
    seen = _seen_in_both_themes(browser_page, screenshots_dir / "primary-button",
                                f"{base}/User_Management?user={user['id']}", "User Management",
                                '[data-testid="stMain"] [data-testid="stBaseButton-primaryFormSubmit"]',
                                _PRIMARY_BUTTON_SEEN)
    assert seen["light"]["button"]["text"] == "Create user", seen
    _assert_readable(seen)
