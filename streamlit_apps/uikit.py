"""What every page shares: page setup with the login gate, error guard, user picker and formatting."""

from __future__ import annotations

import contextlib
import hmac
import html
import itertools
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import data
import streamlit as st
import streamlit.components.v1 as components

from semg import secrets
from semg.config import MIN_UI_PASSWORD_CHARS

log = logging.getLogger("semg.ui")

AUTH_KEY = "semg_authenticated"
USER_KEY = "semg_user_id"
SESSION_KEY = "semg_remembered_session"  # this browser session's remembered sign-in (semg.uisessions), for signing out
STORE_OP_KEY = "semg_session_store_op"  # ("store", token) or ("clear", None) for the browser, until it is done
ENDED_KEY = "semg_ended_sessions"  # tokens this browser session ended: never resumed, whatever the browser says
SIGNED_OUT_KEY = "semg_signed_out_elsewhere"  # the sign-in page says why it is back
CHECKED_KEY = "semg_session_checked_at"  # time.monotonic() of the last check that the sign-in lives
FOCUS_KEY = "semg_focus_next"  # the texts of where the next run puts the keyboard focus (focus_after_rerun)
RECHECK_S = 10.0


def page_setup(title: str, icon: str = ":material/back_hand:", *, health_sidebar: bool = True) -> None:
    """Page config, then the login gate (stops the page until signed in), then the sidebar status."""
    st.set_page_config(page_title=f"{title} · sEMG", page_icon=icon, layout="wide")
    # Last line of defence: an exception outside a guard() shows a message, never a traceback.
    st.set_option("client.showErrorDetails", "none")
    st.set_option("client.toolbarMode", "viewer")
    refuse_uploads()
    require_login()
    store_journaled_intervals()
    with st.sidebar:
        if health_sidebar:
            _sidebar_health()
        if st.button("Sign out", key="semg_sign_out"):
            sign_out()
        _move_focus()


def store_journaled_intervals() -> None:
    """Capture windows that closed while the database was down left their interval times in journals on this
    server: store them now (cheap when there are none; never stops the page)."""
    try:
        done = data.replay_interval_journals()
    except Exception:  # noqa: BLE001 - the journals stay and are tried again on the next page load
        log.exception("the capture journals could not be replayed")
        return
    if done["stored"]:
        st.toast(f"Stored {done['stored']} labelled-interval change(s) that a capture window which closed while "
                 "the database was down had kept.", icon=":material/task_alt:", duration="long")


def refuse_uploads() -> None:
    """No page takes files, yet Streamlit's upload endpoint (PUT /_stcore/upload_file/<session>/<id>) keeps in
    the server's memory every file any connected tab sends, until that tab is gone: also a tab that never
    signed in (the endpoint asks for no password), with no limit on the number of files. Make the server's
    upload store drop them (once per process; supervisord.conf also sets server.maxUploadSize to 0)."""
    from streamlit.runtime import Runtime

    if not Runtime.exists():
        return
    store = Runtime.instance().uploaded_file_mgr
    if getattr(store, "semg_refuses_uploads", False):
        return
    store.add_file = lambda session_id, file: None
    store.semg_refuses_uploads = True
    for session_id in list(getattr(store, "file_storage", {})):  # any sent before the first page ran
        store.remove_session_files(session_id)


class SignInGuard:
    """Wrong UI passwords per client address: after `max_failures` within `window_s`, that address's sign-ins are
    refused without checking the password until its oldest failure is out of the window. Every session of the
    UI process shares one guard, so many tabs guess no faster than one. The address is the TCP peer (Streamlit
    reads no forwarding header, so it cannot be forged); all local clients -- and everyone behind a reverse proxy
    on this host -- share one ("local"). At most `max_addresses` are remembered (the least recently failed go)."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures, self.window_s, self.max_addresses, self.clock = max_failures, window_s, max_addresses, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._failures.get(address, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def wait_s(self, address: str) -> float:
        """Seconds until `address` may try a password again (0: now)."""
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if len(times) < self.max_failures:
                return 0.0
            return times[-self.max_failures] + self.window_s - now

    def failed(self, address: str) -> bool:
        """Count a wrong password from `address`; True when this one locks it out."""
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            times.append(now)
            self._failures[address] = times
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
            return len(times) == self.max_failures

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()


SIGN_IN = SignInGuard()


# The browser side of a remembered sign-in: a component whose page keeps the token in this origin's localStorage.
# Not a cookie: cookies go to (and can be read by pages of) every port of a host name, so any other web server on
# the same machine (a Jupyter, a `python -m http.server`) could have taken the token, or opened this UI's websocket
# with it from its own page.
_session_store = components.declare_component("semg_session_store", path=str(Path(__file__).parent / "session_store"))


def _browser_store(op: str, token: str | None) -> str | None:
    """Render the store with `op` ("get", "store" a token, "clear"); the token the browser holds after the last op
    it ran ("" none; None: it has not answered yet, e.g. on the first run of a page load)."""
    with st.sidebar:
        return _session_store(op=op, token=token, key="semg_session_store", default=None)


def _stored_token() -> str | None:
    """Runs a pending store/clear in the browser (kept pending until the browser says it is done) and returns the
    token the browser holds, unless this browser session ended it (the browser's answer may be a run behind)."""
    op, token = st.session_state.get(STORE_OP_KEY) or ("get", None)
    held = _browser_store(op, token)
    if op != "get" and held == (token or ""):
        st.session_state.pop(STORE_OP_KEY, None)
    if not held or held in st.session_state.get(ENDED_KEY, ()):
        return None
    return held


def _forget_in_browser(token: str | None) -> None:
    """This browser session will never resume `token`, and the browser is told to forget what it holds."""
    if token:
        st.session_state[ENDED_KEY] = {*st.session_state.get(ENDED_KEY, ()), token}
    st.session_state[STORE_OP_KEY] = ("clear", None)


def _remember_sign_in(password: str) -> None:
    days = data.settings().semg_ui_session_days
    if days <= 0:
        return
    try:
        token = data.create_ui_session(password, days)
    except data.Unavailable as e:  # signed in for this page load only; the password works as ever
        log.warning("the sign-in is not remembered across page loads: %s", e)
        return
    st.session_state[SESSION_KEY] = token
    st.session_state[STORE_OP_KEY] = ("store", token)


def _resume_sign_in(expected: str) -> bool:
    """Signs this browser session in with the token of an earlier sign-in the browser holds, while it is valid."""
    token = _stored_token()
    if not token:
        return False
    days = data.settings().semg_ui_session_days
    try:
        valid = data.resume_ui_session(token, expected, days)
    except data.Unavailable as e:  # the password still signs in; the token is kept for the next page load
        log.warning("a remembered sign-in could not be checked: %s", e)
        return False
    if valid:
        st.session_state[AUTH_KEY] = True
        st.session_state[SESSION_KEY] = token
        return True
    _forget_in_browser(token)  # expired, signed out or another password
    st.rerun()  # the store was rendered in this run already: the next one tells the browser


def sign_out() -> None:
    """Sign this browser out: its remembered sign-in is ended on the server and forgotten by the browser."""
    token = st.session_state.pop(SESSION_KEY, None)
    if token:
        try:
            data.end_ui_session(token)
        except data.Unavailable as e:  # the browser forgets it anyway, and this tab never resumes it
            log.warning("a signed-out session could not be ended in the database: %s", e)
    st.session_state.pop(AUTH_KEY, None)
    _forget_in_browser(token)
    st.rerun()


def require_login() -> None:
    """Ask for the UI password (semg.secrets.ui_password) unless this browser session is signed in, or the browser
    holds a remembered sign-in (semg.uisessions) issued under the current password; st.stop() until then."""
    if st.session_state.get(AUTH_KEY):
        _check_still_signed_in()
    if not st.session_state.get(AUTH_KEY):
        _require_login()
    elif STORE_OP_KEY in st.session_state:  # just signed in: the browser is to keep the token
        _stored_token()


def _check_still_signed_in() -> None:
    """A browser session signed in with a remembered sign-in stays signed in only while that lives: "Sign out" in
    another tab, or a changed UI password, signs it out at its next run (checked at most every RECHECK_S, so a
    database outage costs a page one connection attempt per interval, not per click). An outage signs nobody
    out."""
    token = st.session_state.get(SESSION_KEY)
    now = time.monotonic()
    if not token or now < st.session_state.get(CHECKED_KEY, 0.0) + RECHECK_S:
        return
    st.session_state[CHECKED_KEY] = now
    try:
        s = data.settings()
        live = data.resume_ui_session(token, secrets.ui_password(s), s.semg_ui_session_days)
    except (data.Unavailable, OSError) as e:
        log.warning("a remembered sign-in could not be checked: %s", e)
        return
    if not live:
        st.session_state.pop(AUTH_KEY, None)
        st.session_state.pop(SESSION_KEY, None)
        _forget_in_browser(token)
        st.session_state[SIGNED_OUT_KEY] = True


def _require_login() -> None:
    try:
        expected = secrets.ui_password(data.settings())
    except data.Unavailable as e:
        st.error(f"The UI password cannot be read: {md(e)}")
        st.stop()
    except OSError:  # its message names a path on the server: the log has it, not the page anyone can open
        log.exception("the UI password cannot be read")
        st.error("The UI password cannot be read (a file access error); the UI server's log says which file.")
        st.stop()
    if len(expected.strip()) < MIN_UI_PASSWORD_CHARS:  # someone wrote a short one into the file
        st.error(f"The UI password (the file `secrets/ui_password` of the server's state directory) is shorter "
                 f"than {MIN_UI_PASSWORD_CHARS} characters, so nobody is signed in with it: write a longer one "
                 "there, or run `python -m semg.secrets rotate ui-password`.")
        st.stop()
    if _resume_sign_in(expected):
        return
    st.title(":material/back_hand: sEMG gesture platform")
    if st.session_state.pop(SIGNED_OUT_KEY, False):
        st.info("You were signed out: this browser signed out in another tab, or the UI password was changed.",
                icon=":material/logout:")
    with st.form("semg_login"):
        password = st.text_input("Password", type="password", key="semg_login_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    # No server path before sign-in: the administrator knows the state directory.
    st.caption("The password is in the file `secrets/ui_password` of the server's state directory (or set "
               "SEMG_UI_PASSWORD).")
    if submitted:
        ip = st.context.ip_address  # None for a local client (a mock object under streamlit.testing)
        address = ip if isinstance(ip, str) and ip else "local"
        wait = SIGN_IN.wait_s(address)
        if wait > 0:  # refused unchecked: guessing on gains nothing
            st.error(f"Too many wrong passwords from your address: try again in {math.ceil(wait)} s.")
            st.stop()
        if expected and hmac.compare_digest(password.encode(), expected.encode()):  # never an empty password
            SIGN_IN.succeeded(address)
            st.session_state[AUTH_KEY] = True
            _remember_sign_in(expected)
            st.rerun()
        if SIGN_IN.failed(address):
            log.warning("%d wrong UI passwords from %s within %.0f s: its sign-ins are refused for a while",
                        SIGN_IN.max_failures, address, SIGN_IN.window_s)
        time.sleep(0.5)  # slows down guessing
        st.error("Wrong password.")
    st.stop()


def _sidebar_health() -> None:
    try:
        h = data.health()
    except data.Unavailable as e:
        st.error(md(e))
        return
    names = {"database": "Database", "api": "API", "udp": "UDP ingest", "nats": "NATS"}
    # not st.caption: its faded text made the badges 3:1 against their background (axe color-contrast)
    st.markdown("Services: " + " ".join(badge(h[k]["ok"], v) for k, v in names.items()))
    disk_warning(h)


def disk_warning(h: dict) -> None:
    """A warning while a disk the platform writes to is nearly full (data.health()'s "disk")."""
    if not h["disk"]["ok"]:
        st.warning(f"Disk space: {md(h['disk']['detail'])}.", icon=":material/hard_drive:")  # low, or unreadable


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Show failures as a sentence with what to do, never as a traceback."""
    try:
        yield
    except data.Unavailable as e:  # its message quotes the database's or the OS's error, and addresses
        st.error(md(e), icon=":material/power_off:")
    except data.RepoError as e:  # its message may quote what someone typed
        st.error(md(e))
    except Exception as e:  # noqa: BLE001 - the last line of defence; details go to the server log
        log.exception("page failed")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        st.error(f"Something went wrong ({type(e).__name__}{': ' + md(first) if first else ''}). "
                 "Reload the page; if it persists, the UI server's log has the details.")


def pick_user(key: str = "semg_user_pick", label: str = "User") -> dict | None:
    """Select the user the page works on (remembered across pages and in the URL as ?user=ID)."""
    users = data.list_users(limit=1000)
    if not users:
        st.info("No users yet. Create one on the **User Management** page first.")
        return None
    by_id = {u["id"]: u for u in users}
    current = st.session_state.get(USER_KEY)
    if current is not None and current not in by_id:
        # Deleted in another window while this one worked on them: what was clicked or typed here was meant for
        # them, so this run must not go on as someone else (the picker would fall back to the first user).
        st.session_state.pop(USER_KEY, None)
        st.warning(f"User #{current} no longer exists (deleted in another window), so nothing was done. Choose "
                   "the user to work on.", icon=":material/person_off:")
        st.session_state[USER_KEY] = user_selectbox(label, list(by_id), by_id, key, None)
        st.button("Continue", key=f"{key}_continue")
        return None
    if current is None:
        with contextlib.suppress(TypeError, ValueError):
            current = int(st.query_params.get("user", ""))
    chosen = user_selectbox(label, list(by_id), by_id, key, current)
    st.session_state[USER_KEY] = chosen
    if st.query_params.get("user") != str(chosen):
        st.query_params["user"] = str(chosen)
    return by_id[chosen]


def signal_problem(session_id: int, quality: dict) -> str | None:
    """What is wrong with a session's signal (data.session_quality), in a line; None when nothing is."""
    if not quality.get("samples"):
        return f"Session #{session_id} has no samples (the device was not streaming); it cannot be trained on."
    loss, missing = quality.get("loss_pct"), quality.get("missing_s")
    if loss is not None and loss > 5:
        return (f"Session #{session_id} lost {loss:.1f}% of its samples"
                + (f" ({missing:.0f} s of signal)" if missing is not None and missing >= 1 else "")
                + ": check the armband's power and Wi-Fi signal.")
    return None


def badge(ok: bool | None, text: str) -> str:
    """A coloured markdown badge (renders without emoji fonts): green = up, red = down, grey = unknown."""
    color = "gray" if ok is None else "green" if ok else "red"
    # a screen reader says the icon's name: "error", not "close" (a button's word), for a service that is down
    icon = ":material/help:" if ok is None else ":material/check:" if ok else ":material/error:"
    return f":{color}-badge[{icon} {text}]"


def user_selectbox(label: str, ids: list[int], by_id: dict, key: str, current: int | None) -> int:
    """A user selectbox that follows USER_KEY even when another page (or a form) changed it."""
    # Widget state wins over `index`, so align the state before the widget exists in this run; a change
    # made in the widget itself reaches USER_KEY first through on_change.
    st.session_state[key] = current if current in by_id else ids[0]

    def remember() -> None:
        st.session_state[USER_KEY] = st.session_state[key]

    return st.selectbox(label, ids, key=key, on_change=remember,
                        format_func=lambda i: f"{by_id[i]['name']} <{by_id[i]['email']}> · #{i}")


# Streamlit's markdown turns some text into something else after the backslash escapes are resolved (they only
# stop CommonMark syntax): its plugins search the plain text for :material_x: / :streamlit: / emoji shortcodes,
# the arrows and dashes of "a -> b" / "a -- b", and bare links (https://, www., a@b.c). An invisible word joiner
# (U+2060, no line break either) inside each such spot keeps the text as typed on the screen.
WJ = "\u2060"
# The characters that start markdown anywhere in a line ("$" LaTeX, "|" tables, ":x" Streamlit's directives and
# shortcodes, "&x" a character reference; the "/" of ":material/" is replaced before parsing), and those that do only
# where a line starts (headings, lists, quotes, setext underlines). The rest ("!(" need a "[", "." a list number, ": "
# nothing) stay as typed, as in "Dr. B. (left): 3".
_MD_INLINE = re.compile(r"([\\`*_~\[\]<$|]|[:&](?=[A-Za-z0-9_+#-]|$)|(?<=:material)/)")
_MD_LINE_START = re.compile(r"^([#+=>-]|\d+(?=[.)]))", re.MULTILINE)
_MD_BREAKS = (
    (re.compile(r":(?=[A-Za-z0-9_+-]+(?::|$))"), ":" + WJ),  # a value may end where a page's text puts a ':'
    (re.compile(r"(?:(?<=\s)|^)(<|-|>|~)(?=(?:->|[-=>])(?:\s|$))"), r"\1" + WJ),  # <-> -> <- -- >= <= ~=
    (re.compile(r"(?i)(http)(?=s?://)"), r"\1" + WJ),
    (re.compile(r"(?i)(www)(?=\.)"), r"\1" + WJ),
    (re.compile(r"@(?=[-\w]+\.[-\w])"), "@" + WJ),
)
_MD_EDGE_SPACE = re.compile(r"^[ \t\f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+|"
                            r"[ \t\f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+$", re.MULTILINE)


def md(text: object) -> str:
    """`text` (a name or note someone typed, anything from the database) as Streamlit markdown that shows it as
    typed: for st.markdown/caption/info/warning/error/success/toast, widget, expander, tab and metric labels and
    st.table cells; never for selectbox/multiselect options (format_func output is plain text), st.dataframe cells,
    st.code/st.text, nor st.html (_esc). Line breaks stay line breaks."""
    s = str(text).replace("\r\n", "\n").replace("\r", "\n")
    for pattern, repl in _MD_BREAKS:
        s = pattern.sub(repl, s)
    s = _MD_INLINE.sub(r"\\\1", s)
    s = _MD_LINE_START.sub(lambda m: m.group() + "\\" if m.group()[0].isdigit() else "\\" + m.group(), s)
    # spaces and tabs starting a line would indent it into a code block, and a paragraph drops white space at either
    # end: as character references they are text
    s = _MD_EDGE_SPACE.sub(lambda m: "".join(f"&#{ord(c)};" for c in m.group()), s)
    body = s.rstrip("\n")
    # a backslash before a line ending is a hard line break; at the very end it would show as a backslash
    return body.replace("\n", "\\\n") + "&#10;" * (len(s) - len(body))


def fmt_time(t: datetime | None) -> str:
    if t is None:
        return "—"
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(t: datetime | None, now: datetime | None = None) -> str:
    if t is None:
        return "never"
    return fmt_age_s(((now or datetime.now(UTC)) - t).total_seconds())


def fmt_age_s(s: float | None) -> str:
    """An age in seconds as '3 s ago', '5 min ago', ... ('never' for None)."""
    if s is None:
        return "never"
    if s < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def big_cue(text: str, sub: str = "", color: str = "#1f77b4", size_rem: float = 4.0,
            text_color: str | None = None) -> None:
    """A large centred text block (the capture cue, the live gesture), framed and tinted in `color` (#rrggbb), its
    text in `text_color` ("inherit": the theme's, for a colour too light to read on the light theme or too dark on
    the dark one; default `color`). The sub-line is in the theme's text colour (readable on both)."""
    st.html(
        f"""<div style="text-align:center;padding:0.6rem;border-radius:12px;background:{color}18;
                        border:2px solid {color}">
              <div style="font-size:{size_rem}rem;font-weight:700;color:{text_color or color};line-height:1.1"
                   data-testid="semg-cue">{_esc(text)}</div>
              <div style="font-size:1.3rem;color:inherit">{_esc(sub)}</div></div>"""
    )


def focus_after_rerun(*targets: str) -> None:
    """Put the keyboard focus, in the next run, on the first of `targets` (a button's, link's or heading's text as
    shown, icons left out) found on the page. For a click whose rerun removes the focused button (a confirmation's
    Yes or Cancel, a dismissed note): the browser drops the focus to the top of the page otherwise, and a keyboard
    or screen reader user starts again from there. Name the button that opened what is gone first, then the
    section's heading for when that button is gone too."""
    st.session_state[FOCUS_KEY] = targets


# Waits (up to 5 s: a loaded server draws a page slowly) for a target to render -- the script runs when the sidebar
# is drawn, before the page -- and until then puts the focus back if a redraw takes it away; never once the person
# moved it elsewhere. The run number makes each script new: the browser runs one again only in a changed element.
_FOCUS_JS = r"""(() => {  // run RUN
  const targets = TARGETS, deadline = Date.now() + 5000;
  const norm = s => s.replace(/\u2060/g, "").replace(/\s+/g, " ").trim();
  const name = el => {
    if (el.getAttribute("aria-label")) return norm(el.getAttribute("aria-label"));
    const copy = el.cloneNode(true);  // the shown text without icons (their ligature's name is aria-hidden or an img)
    copy.querySelectorAll('[aria-hidden="true"], [role="img"]').forEach(e => e.remove());
    return norm(copy.textContent);
  };
  const find = () => {
    const page = document.querySelector('[data-testid="stMain"]') || document;  // not the sidebar's page links
    const all = [...page.querySelectorAll("button, a[href], summary, h1, h2, h3, h4, h5, h6")]
      .filter(el => !el.disabled && !el.closest("[inert]") && el.getClientRects().length);  // inert: a closed expander
    for (const t of targets) {
      const el = all.find(e => name(e) === norm(t));
      if (el) return el;
    }
    return null;
  };
  const left = document.activeElement;  // the clicked button, gone once this run has drawn the page
  let placed = null;
  // A newer run's script takes over: this one, still waiting, would otherwise take the focus to its own (later)
  // target when the newer click's button is removed, and the newer one would take that for the person's move.
  const me = {};
  window.semgFocusMover = me;
  const tick = () => {
    if (window.semgFocusMover !== me) return;
    const now = document.activeElement;
    if (now && now !== document.body && now !== left && now !== placed && now.isConnected) return;
    const el = find();  // an earlier target drawn after a later one takes the focus over from it
    if (el && el !== now) {
      if (!el.matches("button, a[href], summary")) el.setAttribute("tabindex", "-1");  // a heading
      el.focus({focusVisible: true});
      placed = el;
    }
    if (Date.now() < deadline) setTimeout(tick, 100);
  };
  tick();
})();"""


_FOCUS_RUNS = itertools.count(1)


def _focus_script(targets: tuple[str, ...], run: int) -> str:
    """The focus script for `targets`, which stay data: JSON with "<", ">" and "&" escaped, so that no text (a
    name with "</script>" in it) ends the script or starts markup."""
    as_js = json.dumps(list(targets)).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    # the targets go in last, so that no text of theirs is taken for a placeholder
    return "<script>" + _FOCUS_JS.replace("RUN", str(run)).replace("TARGETS", as_js) + "</script>"


def _move_focus() -> None:
    """Runs the focus move focus_after_rerun asked for (once)."""
    if targets := st.session_state.pop(FOCUS_KEY, None):
        st.html(_focus_script(targets, next(_FOCUS_RUNS)), unsafe_allow_javascript=True)


def announce(text: str) -> None:
    """Text a screen reader says as soon as it changes (an ARIA alert, visually hidden). The same text rendered
    again is not said again, so it must not carry a countdown."""
    st.html(f'<div role="alert" data-testid="semg-announce" style="position:absolute;width:1px;height:1px;'
            f'margin:-1px;padding:0;border:0;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap">{_esc(text)}</div>')


def _esc(s: str) -> str:
    return html.escape(str(s))
