"""What every page shares: page setup with the login gate, error guard, user picker and formatting."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import data
import streamlit as st

from semg import secrets

log = logging.getLogger("semg.ui")

AUTH_KEY = "semg_authenticated"
USER_KEY = "semg_user_id"


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
            st.session_state.pop(AUTH_KEY, None)
            st.rerun()


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
                 "the database was down had kept.", icon=":material/task_alt:")


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


def require_login() -> None:
    """Ask for the UI password (semg.secrets.ui_password) once per browser session; st.stop() until given."""
    if st.session_state.get(AUTH_KEY):
        return
    try:
        expected = secrets.ui_password(data.settings())
    except data.Unavailable as e:
        st.error(f"The UI password cannot be read: {e}")
        st.stop()
    except OSError:  # its message names a path on the server: the log has it, not the page anyone can open
        log.exception("the UI password cannot be read")
        st.error("The UI password cannot be read (a file access error); the UI server's log says which file.")
        st.stop()
    st.title(":material/back_hand: sEMG gesture platform")
    with st.form("semg_login"):
        password = st.text_input("Password", type="password", key="semg_login_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    # No server path before sign-in: the administrator knows the state directory.
    st.caption("The password is in the file `secrets/ui_password` of the server's state directory (or set "
               "SEMG_UI_PASSWORD).")
    if submitted:
        if expected and hmac.compare_digest(password.encode(), expected.encode()):  # never an empty password
            st.session_state[AUTH_KEY] = True
            st.rerun()
        time.sleep(0.5)  # slows down guessing
        st.error("Wrong password.")
    st.stop()


def _sidebar_health() -> None:
    try:
        h = data.health()
    except data.Unavailable as e:
        st.error(str(e))
        return
    names = {"database": "Database", "api": "API", "udp": "UDP ingest", "nats": "NATS"}
    st.caption("Services: " + " ".join(badge(h[k]["ok"], v) for k, v in names.items()))


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Show failures as a sentence with what to do, never as a traceback."""
    try:
        yield
    except data.Unavailable as e:
        st.error(str(e), icon=":material/power_off:")
    except data.RepoError as e:
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 - the last line of defence; details go to the server log
        log.exception("page failed")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        st.error(f"Something went wrong ({type(e).__name__}{': ' + first if first else ''}). "
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
    icon = ":material/help:" if ok is None else ":material/check:" if ok else ":material/close:"
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


def big_cue(text: str, sub: str = "", color: str = "#1f77b4", size_rem: float = 4.0) -> None:
    """A large centred text block (the capture cue, the live gesture)."""
    st.html(
        f"""<div style="text-align:center;padding:0.6rem;border-radius:12px;background:{color}18;
                        border:2px solid {color}">
              <div style="font-size:{size_rem}rem;font-weight:700;color:{color};line-height:1.1"
                   data-testid="semg-cue">{_esc(text)}</div>
              <div style="font-size:1.3rem;color:#444">{_esc(sub)}</div></div>"""
    )


def _esc(s: str) -> str:
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))
