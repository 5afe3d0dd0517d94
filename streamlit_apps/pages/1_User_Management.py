"""Users: search, create, edit, export all their data, delete (with confirmation; removes all their data)."""

import time

import data
import pandas as pd
import streamlit as st
import uikit as ui

ui.page_setup("Users", ":material/person:")
st.title(":material/person: User Management")

PENDING_DELETE = "users_pending_delete"
NEW_KEY_STATE = "users_new_api_key"  # (user id, key): shown once, until dismissed, only on that user's page
JUST_CREATED = "users_just_created"  # (user, time.monotonic()) of the last user created in this window
DOUBLE_CLICK_S = 3.0


def create_form() -> None:
    with st.form("create_user", clear_on_submit=True):
        st.markdown("**New user**")
        c1, c2 = st.columns(2)
        name = c1.text_input("Name", max_chars=200, key="new_user_name")
        email = c2.text_input("Email", max_chars=320, key="new_user_email")
        notes = st.text_area("Notes (optional)", height=68, key="new_user_notes")
        if st.form_submit_button("Create user", type="primary"):
            if not name.strip() or not email.strip():
                if user := first_click_user():
                    # A double click: the second click submits the form the first one cleared. The user was
                    # created; say so (not 'required'), and keep them picked.
                    created(user)
                    return
                st.error("Name and email are both required.")
                return
            # Streamlit starts the second click's run at once, beside this one: it waits for what this one creates
            st.session_state[JUST_CREATED] = (None, time.monotonic())
            try:
                user = data.create_user(name, email, notes)
            except data.RepoError as e:
                st.session_state.pop(JUST_CREATED, None)
                st.error(f"Not created: {ui.md(e)}")
                return
            st.session_state[JUST_CREATED] = (user, time.monotonic())
            created(user)


def first_click_user() -> dict | None:
    """The user a click of this window created just before (waiting while that click's run still creates it)."""
    while (just := st.session_state.get(JUST_CREATED)) and time.monotonic() - just[1] < DOUBLE_CLICK_S:
        if just[0] is not None:
            return just[0]
        time.sleep(0.05)
    return None


def created(user: dict) -> None:
    st.session_state[ui.USER_KEY] = user["id"]
    st.success(f"Created {ui.md(user['name'])} (#{user['id']}). Next: add gestures on **Gesture Management**.")


def user_table(users: list[dict]) -> None:
    st.dataframe(pd.DataFrame([{
        "id": u["id"], "name": u["name"], "email": u["email"], "gestures": u["gestures"], "devices": u["devices"],
        "created": ui.fmt_time(u["created_at"]), "notes": u["notes"],
    } for u in users]), hide_index=True, width="stretch")


def export_button(user: dict) -> None:
    """A copy of everything stored about the user; the zip is built only when the button is clicked."""
    uid = user["id"]
    size, at_least = data.export_size_estimate(uid)
    if size > data.MAX_UI_EXPORT_BYTES:
        # built in this process's memory it could take the web UI down; the API writes it to disk and streams it
        about = "more than" if at_least else "about"
        st.caption(f"{ui.md(user['name'])}'s data is {about} {size / 2**20:,.0f} MB zipped: too much to build in the web UI "
                   f"(limit {data.MAX_UI_EXPORT_BYTES / 2**20:,.0f} MB). Take it through the API, which streams it "
                   "to a file, with one of their API keys (below) or an admin key:")
        st.code(f'curl -fo semg-user-{uid}-export.zip -H "X-API-Key: $KEY" {data.settings().api_url}/users/{uid}/export',
                language="bash")
        return
    st.download_button(
        f"Export {ui.md(user['name'])}'s data (zip)", data=lambda: data.export_user(uid),
        file_name=f"semg-user-{uid}-export.zip", mime="application/zip", key=f"export_user_{uid}",
        on_click="ignore", icon=":material/download:",
        help="Every row stored about this user (JSON), their samples (CSV per device), trained models and videos.",
    )


def api_keys(user: dict) -> None:
    """The user's API keys, for their own apps (the REST API, the live decision stream): create (shown once), list,
    revoke."""
    uid = user["id"]
    with st.expander(f"API keys of {ui.md(user['name'])}", icon=":material/key:",
                     expanded=st.session_state.get(NEW_KEY_STATE, (None,))[0] == uid):
        st.caption("A user key reaches only this user's data through the REST API, e.g. "
                   f"`GET /users/{uid}/predictions/live` for an app that acts on their gestures. One key per app "
                   "or device: a lost one is revoked alone.")
        shown = st.session_state.get(NEW_KEY_STATE)
        if shown and shown[0] == uid:
            st.success("Copy the key now: **it is shown only once** (the server keeps only its hash).")
            st.code(shown[1], language=None)
            if st.button("I have saved the key", key="dismiss_api_key"):
                st.session_state.pop(NEW_KEY_STATE, None)
                ui.focus_after_rerun("Create API key", f"API keys of {user['name']}")
                st.rerun()
        with st.form(f"new_api_key_{uid}", clear_on_submit=True):
            name = st.text_input("Name of the new key", max_chars=200, placeholder="e.g. prosthesis controller")
            read_only = st.checkbox("Read-only", help="The key may only read (follow the live decisions, list and "
                                    "export data), never change or delete anything: for an app that only acts on "
                                    "the gestures, so that a key copied off its device can do no harm.")
            if st.form_submit_button("Create API key"):
                try:
                    st.session_state[NEW_KEY_STATE] = (uid, data.create_user_key(uid, name, read_only)["key"])
                    st.rerun()
                except data.RepoError as e:
                    st.error(f"Not created: {ui.md(e)}")
        rows = data.list_user_keys(uid)
        if not rows:
            st.caption("No API keys yet.")
            return
        st.dataframe(pd.DataFrame([{
            "id": k["id"], "name": k["name"], "starts with": k["key_prefix"] + "…",
            "may": "read only" if k["read_only"] else "read and change",
            "created": ui.fmt_time(k["created_at"]),
            "last used": ui.fmt_time(k["last_used_at"]) if k["last_used_at"] else "never",
            "revoked": ui.fmt_time(k["revoked_at"]) if k["revoked_at"] else "",
        } for k in rows]), hide_index=True, width="stretch")
        live = {k["id"]: k for k in rows if not k["revoked_at"]}
        if live:
            c1, c2 = st.columns([3, 1])
            kid = c1.selectbox("Revoke", list(live), key=f"revoke_key_pick_{uid}",
                               format_func=lambda i: f"#{i} {live[i]['name'] or 'unnamed'} ({live[i]['key_prefix']}…)")
            if c2.button("Revoke key", key=f"revoke_key_{uid}"):
                data.revoke_user_key(uid, kid)
                st.toast(f"Revoked key #{kid}: the API refuses it from now on (within 10 s where it was just used).",
                         duration="long")
                ui.focus_after_rerun("Revoke key", "Create API key")  # the last one revoked, the button is gone
                st.rerun()


def edit_and_delete(users: list[dict]) -> None:
    by_id = {u["id"]: u for u in users}
    uid = ui.user_selectbox("Edit or delete", list(by_id), by_id, "edit_user_pick", st.session_state.get(ui.USER_KEY))
    st.session_state[ui.USER_KEY] = uid
    user = by_id[uid]
    with st.form(f"edit_user_{uid}"):
        c1, c2 = st.columns(2)
        name = c1.text_input("Name", value=user["name"], max_chars=200)
        email = c2.text_input("Email", value=user["email"], max_chars=320)
        notes = st.text_area("Notes", value=user["notes"], height=68)
        if st.form_submit_button("Save changes"):
            try:
                data.update_user(uid, name, email, notes)
                st.toast(f"Saved {ui.md(name)}.")
                st.rerun()
            except data.RepoError as e:
                st.error(f"Not saved: {ui.md(e)}")

    export_button(user)
    api_keys(user)
    if st.session_state.get(PENDING_DELETE) != uid:
        if st.button(f"Delete {ui.md(user['name'])}…", key="ask_delete"):
            st.session_state[PENDING_DELETE] = uid
            ui.focus_after_rerun("Cancel")  # the confirmation replaces this button; its warning is said (an alert)
            st.rerun()
        return
    counts = data.user_data_counts(uid)

    def more(what: str) -> str:  # counted up to a cap: a user streaming for months has hundreds of millions
        return "more than " if counts.get(f"{what}_more") else ""

    st.warning(
        f"Delete **{ui.md(user['name'])}** and ALL their data? This removes {counts.get('gestures', 0)} gesture(s), "
        f"{counts.get('devices', 0)} device(s), {counts.get('sessions', 0)} session(s), "
        f"{more('samples')}{int(counts.get('samples', 0)):,} samples, {counts.get('videos', 0)} video(s), "
        f"{counts.get('jobs', 0)} training job(s), {counts.get('models', 0)} model(s) and "
        f"{more('predictions')}{int(counts.get('predictions', 0)):,} prediction(s). It cannot be undone."
    )
    c1, c2 = st.columns(2)
    if c1.button("Yes, delete permanently", type="primary", key="confirm_delete"):
        deleted = data.delete_user(uid)
        st.session_state.pop(PENDING_DELETE, None)
        st.session_state.pop(ui.USER_KEY, None)
        st.session_state["users_flash"] = (f"Deleted {ui.md(deleted['name'])} and all their data "
                                           f"({deleted.get('videos_removed', 0)} video file(s) removed).")
        ui.focus_after_rerun("Edit", "User Management")  # the section, or the page when nobody is left
        st.rerun()
    if c2.button("Cancel", key="cancel_delete"):
        st.session_state.pop(PENDING_DELETE, None)
        ui.focus_after_rerun(f"Delete {user['name']}…")
        st.rerun()


with ui.guard():
    if msg := st.session_state.pop("users_flash", None):
        st.success(msg)
    create_form()
    st.divider()
    search = st.text_input("Search by name or email", key="user_search", placeholder="e.g. ada or @example.org")
    users = data.list_users(search=search or None, limit=1000)
    if not users:
        st.info("No matching users." if search else "No users yet: create the first one above.")
    else:
        st.caption(f"{len(users)} user(s)")
        user_table(users)
        st.header("Edit")
        edit_and_delete(users)
