"""Names, notes and messages people typed are shown as typed: Streamlit renders markdown (CommonMark, GFM, and its
own :color[...], :material/...:, emoji shortcodes, $LaTeX$, arrows, bare links) in messages, captions, toasts and
labels, so a gesture named `*fist* $1$ :red[x]` showed as an italic word, a formula and red text. uikit.md()
escapes such text; selectbox options are plain text and stay unescaped."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from psycopg2.extras import Json
from ui_checks import assert_clean, texts

from semg import repo

NASTY = "*fist* $1$ :red[x] :material/home: a -> b"
WJ = "\u2060"


def md(text: str) -> str:
    import uikit
    return uikit.md(text)


def button(at, label: str):
    matches = [b for b in at.button if b.label == label]
    assert matches, f"no button {label!r}; have {[b.label for b in at.button]}"
    return matches[0]


# ---- the escaping itself -------------------------------------------------------------------------------------
_MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])  # GFM's block and inline extras


def plain_text(source: str, allow: tuple[str, ...] = ()) -> str:
    """The text a CommonMark renderer shows for `source`; fails on any element but one paragraph of text (and the
    inline elements `allow`ed)."""
    text = []
    for tok in _MARKDOWN.parse(source):
        if tok.type == "inline":
            for child in tok.children or ():
                if child.type in ("text", "text_special"):
                    text.append(child.content)
                elif child.type in ("softbreak", "hardbreak"):
                    text.append("\n")
                elif child.type not in allow:
                    raise AssertionError(f"{source!r} rendered a {child.type}")
        else:
            assert tok.type in ("paragraph_open", "paragraph_close"), f"{source!r} rendered a {tok.type}"
    return "".join(text)


# What Streamlit's own markdown component (frontend StreamlitMarkdown, 1.67) matches, on the source or on the text
# CommonMark leaves (escapes resolved): each turns the text into something else. JavaScript's \w is ASCII.
_ON_SOURCE = {
    "material icon (source rewritten to :material_)": re.compile(r":material/"),
    "emoji plugin switched on": re.compile(r":(?!material/|streamlit:)[\w+-][\w+-]*:", re.ASCII),
    "directive (:color[...], :small, ...)": re.compile(r"(?<!\\):[A-Za-z]"),
}
_ON_TEXT = {
    "material icon": re.compile(r":material_\w+:", re.ASCII),
    "streamlit logo": re.compile(r":streamlit:"),
    "emoji shortcode": re.compile(r":\+1:|:-1:|:[A-Za-z0-9_-]+:"),
    "typographic symbol": re.compile(r"(?:^|(?<=\s))(?:<->|->|<-|--|>=|<=|~=)(?=\s|$)"),
    "bare link": re.compile(r"(?i)https?://|www(?=\.)"),
    "bare email": re.compile(r"[-.\w+]+@[-\w]+(?:\.[-\w]+)+", re.ASCII),
}


def streamlit_math(source: str) -> bool:
    """Streamlit's test whether a markdown source holds LaTeX (frontend bm(): escaped \\$ and code do not count)."""
    if "$" not in source:
        return False
    s = re.sub(r"(?:^|(?<=\n)) {0,3}(`{3,}|~{3,})[\s\S]*?(?:\n[ \t]*\1|$)|(?<!`)(`+)[^`\n]+\2(?!`)|\\[\\$`]", "_",
               source)
    return bool(re.search(r"(?<!\$)\$\$+(?!\$)[\s\S]*?\$\$", s)
                or re.search(r"(?<!\$)\$(?![\s$])[^$\n]*?[^\s$]\$(?!\d)", s))


# No NUL (PostgreSQL text cannot hold it: repo refuses it), no surrogates (not text), no other C0/C1 control
# characters: markdown-it strips some of them at the ends of a paragraph as whitespace, where Streamlit's micromark
# keeps them, and both decode their character references to U+FFFD.
_CONTROL = "".join(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\r")
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=_CONTROL), max_size=60)
PUNCTUATION_HEAVY = st.lists(st.sampled_from([*"*_`$:[](){}<>!#~|\\&;/-+=.@^ \n\ta1", "http", "www", "material",
                                               "smile", "+1", "streamlit", "12"]), max_size=30).map("".join)


def shown(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace(WJ, "")


@settings(max_examples=400, deadline=None)
@given(st.one_of(TEXT, PUNCTUATION_HEAVY))
def test_md_shows_any_text_as_typed(text):
    out = md(text)
    assert plain_text(out).replace(WJ, "") == shown(text)
    assert plain_text(f"Got {out}: end").replace(WJ, "") == shown(f"Got {text}: end")  # inside a page's sentence
    if text:  # in bold, as a page's message puts a name
        assert plain_text(f"**{out}**", allow=("strong_open", "strong_close")).replace(WJ, "") == shown(text)
    for where in (out, f"Got {out}: end"):
        assert_no_streamlit_markup(where)


def assert_no_streamlit_markup(source: str, allow: tuple[str, ...] = ()) -> str:
    """Nothing of markdown `source` is turned into something else by Streamlit (an icon, an emoji, a directive, a
    formula, a symbol, a link) nor by CommonMark (but the inline elements `allow`ed); the text it shows."""
    for what, pattern in _ON_SOURCE.items():
        assert not pattern.search(source), (what, source)
    assert not streamlit_math(source), source
    rendered = plain_text(source, allow)
    for what, pattern in _ON_TEXT.items():
        assert not pattern.search(rendered), (what, rendered)
    return rendered.replace(WJ, "")


@pytest.mark.parametrize("typed", [
    "*fist* open", "2 $ grip $", ":red[x]", "[reset](https://example.org)", "# big", "~~a~~", "<b>", "a\\b",
    ":material/home:", ":smile:", "1. first", "    indented", "x -> y", "a\n\nb\n",
])
def test_md_examples(typed):
    assert plain_text(md(typed)).replace(WJ, "") == typed
    assert md("fist") == "fist" and md("open hand 2") == "open hand 2"  # plain names stay as they are


# ---- the pages -------------------------------------------------------------------------------------------------
def nasty_user(conn, **kw):
    import ui_seed
    return ui_seed.seed_user(conn, name=NASTY, email="nasty@example.org", gestures=(NASTY, "open hand"), **kw)


def test_user_management_shows_a_name_as_typed(page, clean_db):
    uid = nasty_user(clean_db)["user"]["id"]
    at = page("users", user_id=uid)
    at.run()
    assert_clean(at)
    assert f"API keys of {md(NASTY)}" in [e.label for e in at.expander]
    assert f"Export {md(NASTY)}'s data (zip)" in [b.label for b in at.get("download_button")]
    assert at.selectbox(key="edit_user_pick").options[0].startswith(f"{NASTY} <")  # options: plain text
    button(at, f"Delete {md(NASTY)}…").click()
    at.run()
    assert any(w.value.startswith(f"Delete **{md(NASTY)}** and ALL their data?") for w in at.warning), at.warning
    button(at, "Yes, delete permanently").click()
    at.run()
    assert any(s.value.startswith(f"Deleted {md(NASTY)} and all their data") for s in at.success), at.success


def test_creating_a_user_says_their_name_and_a_refused_email_as_typed(page, clean_db):
    at = page("users")
    at.run()
    at.text_input(key="new_user_name").input(NASTY)
    at.text_input(key="new_user_email").input("**not** an email")
    button(at, "Create user").click()
    at.run()
    assert_clean(at)
    assert [e.value for e in at.error] == [f"Not created: {md(repr('**not** an email') + ' is not a valid email address')}"]
    at.text_input(key="new_user_name").input(NASTY)
    at.text_input(key="new_user_email").input("nasty@example.org")
    button(at, "Create user").click()
    at.run()
    assert any(s.value.startswith(f"Created {md(NASTY)} (#") for s in at.success), at.success


def test_gesture_management_names_a_deleted_gesture_as_typed(page, clean_db):
    base = nasty_user(clean_db)
    uid = base["user"]["id"]
    nasty = next(g for g in repo.list_gestures(clean_db, uid) if g["name"] == NASTY)
    at = page("gestures", user_id=uid)
    at.run()
    assert NASTY in at.selectbox(key="edit_gesture").options  # options: plain text
    at.selectbox(key="edit_gesture").set_value(nasty["id"]).run()
    button(at, "Delete this gesture").click()
    at.run()
    assert_clean(at)
    said = " ".join(i.value for i in at.info)
    assert f"Deleted {md(NASTY)}. Its recordings" in said and f"gesture named {md(NASTY)} again" in said, said


def test_capture_names_a_left_session_as_typed(page, clean_db):
    base = nasty_user(clean_db)
    uid, did = base["user"]["id"], base["device"]["id"]
    s = repo.create_session(clean_db, uid, did, [NASTY], 1, 1.0, 1.0, name=NASTY)  # planned, never started
    at = page("capture", user_id=uid)
    at.run()
    assert_clean(at)
    assert f"Session #{s['id']} '{md(NASTY)}' was left planned" in " ".join(c.value for c in at.caption), at.caption


def _guarded_failures(nasty: str) -> None:
    import data
    import uikit
    with uikit.guard():
        raise data.RepoError(f"not in this user's gesture bank: {nasty}")
    with uikit.guard():
        raise KeyError(nasty)


def test_the_page_guard_says_a_refusal_quoting_what_was_typed_as_typed(settings):
    """guard() shows a RepoError's message, and the first line of any other exception: either may quote what
    someone typed (a gesture name, an email)."""
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_function(_guarded_failures, args=(NASTY,), default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    refusal, other = (e.value for e in at.error)
    assert refusal == md(f"not in this user's gesture bank: {NASTY}")
    assert other.startswith(f"Something went wrong (KeyError: {md(repr(NASTY))}). Reload the page")


def _nasty_model(conn, uid: int, status: str = "completed", error: str | None = None) -> dict:
    """A session and a job whose model knows the nasty gesture (ui_seed.seed_job's, with these class names)."""
    import ui_seed
    did = repo.list_devices(conn, uid)[0]["id"]
    session = ui_seed.seed_session(conn, uid, did, datetime.now(UTC) - timedelta(seconds=30),
                                   gestures=(NASTY, "open hand"), repetitions=2)
    job = ui_seed.seed_job(conn, uid, [session["id"]], status=status)
    classes = ["REST", NASTY, "open hand"]
    metrics = {"accuracy": 0.91, "per_class_accuracy": {"REST": 0.95, NASTY: 0.9, "open hand": 0.88},
               "confusion_matrix": {"classes": classes, "matrix": [[19, 1, 0], [1, 18, 1], [0, 2, 18]]}}
    with conn.cursor() as cur:
        cur.execute("UPDATE model_artifacts SET classes = %s, metrics = %s WHERE job_id = %s",
                    (Json(classes), Json(metrics), job["id"]))
        cur.execute("UPDATE training_jobs SET error = %s WHERE id = %s", (error, job["id"]))
    conn.commit()
    return job


def test_job_status_shows_an_error_and_class_names_as_typed(page, clean_db):
    uid = nasty_user(clean_db)["user"]["id"]
    failed = _nasty_model(clean_db, uid, status="failed", error=f"gesture {NASTY} has no windows")
    at = page("jobs", user_id=uid)
    at.run()
    assert_clean(at)
    assert f"Error: {md(f'gesture {NASTY} has no windows')}" in [e.value for e in at.error], at.error
    done = _nasty_model(clean_db, uid)
    at = page("jobs", user_id=uid)
    at.run()
    at.selectbox(key="jobs_pick").set_value(done["id"]).run()
    assert_clean(at)
    per_class, confusion = (t.value for t in at.table)  # st.table renders markdown in every cell and header
    assert sorted(per_class.index) == sorted(["REST", md(NASTY), "open hand"])
    assert list(confusion.index) == list(confusion.columns) and sorted(confusion.index) == sorted(per_class.index)
    assert failed["id"] != done["id"]


def test_live_recognition_names_the_model_classes_as_typed(page, clean_db):
    uid = nasty_user(clean_db)["user"]["id"]
    _nasty_model(clean_db, uid)
    at = page("live", user_id=uid)
    at.run()
    assert_clean(at)
    assert any(f"classes REST, {md(NASTY)}, open hand · trained" in c.value for c in at.caption), at.caption


def test_kickoff_says_a_refusal_naming_a_gesture_as_typed(page, clean_db):
    base = nasty_user(clean_db, channels=2)  # the seeded gestures use channels 0 and 1
    uid, did = base["user"]["id"], base["device"]["id"]
    import ui_seed
    start = datetime.now(UTC) - timedelta(seconds=30)
    ui_seed.seed_samples(clean_db, uid, did, start, 20_000, channels=2)  # a session without samples is not ticked
    ui_seed.seed_session(clean_db, uid, did, start, gestures=(NASTY,), repetitions=2)
    repo.update_gesture(clean_db, next(g["id"] for g in repo.list_gestures(clean_db, uid) if g["name"] == NASTY),
                        channels_used=[5])  # a channel this 2-channel device does not have
    at = page("kickoff", user_id=uid)
    at.run()
    assert_clean(at)
    errors = " ".join(e.value for e in at.error)
    assert f"Cannot train on these sessions: {md(f'gesture {NASTY!r} of the bank uses channel 5')}" in errors, errors


def test_review_subtitles_show_a_label_as_typed():
    """The review's video subtitles are WebVTT, whose cue text is markup: a label `<b>x</b> &amp;` showed bold and
    as '&', and one holding '-->' ended its cue."""
    import views
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ivs = [{"label": "<b>x</b> &amp; a --> b\n\nc", "repetition": 0, "started_at": t0,
            "ended_at": t0 + timedelta(seconds=2)}]
    vtt = views.webvtt(ivs, t0)
    assert vtt.split("\n")[2:5] == ["00:00:00.000 --> 00:00:02.000",
                                    "&lt;b&gt;x&lt;/b&gt; &amp;amp; a --&gt; b  c · rep 1", ""], vtt


def test_review_session_picker_shows_the_name_unescaped(page, clean_db):
    """Selectbox options are plain text: an escaped name would show its backslashes."""
    base = nasty_user(clean_db)
    uid, did = base["user"]["id"], base["device"]["id"]
    s = repo.create_session(clean_db, uid, did, [NASTY], 1, 1.0, 1.0, name=NASTY)
    repo.start_session(clean_db, s["id"], at=datetime.now(UTC) - timedelta(seconds=5))
    at = page("review", user_id=uid)
    at.run()
    assert_clean(at)
    assert at.selectbox(key="review_session").options[0].startswith(f"#{s['id']} {NASTY} · recording")


def test_charts_name_gestures_as_typed():
    """Plotly draws <b>, <br> and <a href> in legends, axis ticks and hovers: a gesture named
    "<a href='https://example.org'>x</a>" was a link in the confusion matrix (checked in Chromium: the escaped name
    shows as typed)."""
    import charts
    typed = "<a href='https://example.org'>x</a> & <b>y</b>"
    drawn = "&lt;a href='https://example.org'&gt;x&lt;/a&gt; &amp; &lt;b&gt;y&lt;/b&gt;"
    assert charts.per_class_figure({typed: 0.5, "REST": 1.0}).data[0].x == (drawn, "REST")
    cm = charts.confusion_figure([typed, "REST"], [[1, 0], [0, 1]]).data[0]
    assert cm.x == cm.y == (drawn, "REST")
    now = datetime.now(UTC)
    pred = pd.DataFrame({"gesture": [typed], "confidence": [0.9], "decided_at": [now]})
    assert [t.name for t in charts.timeline_figure(pred, now, 10.0).data] == [drawn]
    t0 = now - timedelta(seconds=5)
    shaded = charts._interval_traces([{"label": typed, "started_at": t0, "ended_at": now}], t0)
    assert [t["name"] for t in shaded] == [drawn]
    assert shaded[0]["fillcolor"] == charts._rgba(charts.label_color(typed), 0.2)  # its colour: of the name typed


# ---- system messages (errors of the OS, the database, the settings, the health checks) --------------------------
def test_invalid_settings_are_quoted_as_typed(page, clean_db, monkeypatch):
    """An error's text was put into the page's markdown as it was: a setting typed with `*`, `$`, `:x:` or a
    `[..](..)` in it showed in italics, as a formula, an emoji and a link in the message that quotes it."""
    from semg.config import get_settings
    typed = "*85* $01$ :smile: [x](y) 8_5"
    monkeypatch.setenv("UI_PORT", typed)
    get_settings.cache_clear()
    try:
        for name in ("main", "users"):
            at = page(name)
            at.run()
            assert_clean(at)
            assert at.error, texts(at)
            for e in at.error:  # the page's and the sidebar's
                assert f"invalid setting: UI_PORT={typed!r}: " in assert_no_streamlit_markup(e.value), e.value
        at = page("users", login=False)
        at.run()
        [error] = [e.value for e in at.error]
        shown = assert_no_streamlit_markup(error)
        assert shown.startswith("The UI password cannot be read: The platform settings are invalid: ") and typed in shown
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def markdown_state_dir(settings, monkeypatch, tmp_path):
    """SEMG_STATE_DIR set to a new directory whose path holds markdown (the same database and NATS: the secrets are
    copied); the caller undoes it (monkeypatch.undo(), then get_settings.cache_clear())."""
    import shutil

    from semg.config import get_settings
    state = tmp_path / "st*ate*_dir_ $1$ :smile: [here](x)"
    shutil.copytree(settings.secrets_dir, state / "secrets")
    monkeypatch.setenv("SEMG_STATE_DIR", str(state))
    get_settings.cache_clear()
    return state


def test_a_service_that_is_down_is_described_as_it_is(page, clean_db):
    """The health checks' details (the overview's service captions, a device's live status) quote addresses and
    errors: the REST API's and the UDP server's URLs (neither runs in these tests) were shown as links."""
    at = page("main")
    at.run()
    assert_clean(at)
    details = [c.value for c in at.caption if "not reachable at " in c.value]
    assert len(details) == 2, at.caption  # the API's and the UDP server's
    for d in details:
        assert "://127.0.0.1:" in assert_no_streamlit_markup(d), d
    uid = nasty_user(clean_db)["user"]["id"]
    at = page("gestures", user_id=uid)
    at.run()
    assert_clean(at)
    [status] = [i.value for i in at.info if "UDP server's status is not available" in i.value]
    assert "://127.0.0.1:" in assert_no_streamlit_markup(status), status


def test_a_journal_that_cannot_be_written_is_named_as_typed(page, seeded, settings, monkeypatch, tmp_path):
    """The capture page says why interval times cannot be kept on the server, quoting the OS's error, which names
    the journal's path under the state directory (here: a file where its directory belongs)."""
    from test_capture_store import start_on_page

    from semg.config import get_settings
    state = markdown_state_dir(settings, monkeypatch, tmp_path)
    (state / "capture-journal").write_text("not a directory")
    try:
        at, run = start_on_page(page, seeded["user"]["id"])  # REST 0-0.5 s, fist 0.5-20.5 s
        time.sleep(1.0)  # into the fist: the rest's times are journalled, or would be
        at.run()
        assert_clean(at)
        [error] = [e.value for e in at.error if e.value.startswith("Interval times cannot be saved on the server")]
        shown = assert_no_streamlit_markup(error)
        assert f"(FileExistsError: [Errno 17] File exists: '{state / 'capture-journal'}'): keep this window" in shown
        at.button(key="abort").click()
        at.run()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
