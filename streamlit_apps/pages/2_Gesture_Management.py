"""A user's gesture bank (with channels and their purposes), quick-add from a library, and the user's devices
(registration with a key shown once as an arduino_secrets.h snippet, key rotation, deletion, and their live
status from the UDP server: receiving or not, and why their packets are rejected, with what to do)."""

import data
import pandas as pd
import streamlit as st
import uikit as ui

ui.page_setup("Gestures & devices", ":material/front_hand:")
st.title(":material/front_hand: Gesture Management")

# (user id, device id, snippet, what happened, the button that led to it): shown once, until dismissed, and only on
# that user's page
KEY_ONCE_STATE = "gestures_key_once"
# What a rename or deletion means for training and recognition: on the page after it, not in a toast gone in 4 s
NOTE_STATE = "gestures_note"
# A device deleted (and its samples, for good): said on the page after it, like a deleted user, not in a toast
DEVICE_NOTE_STATE = "devices_note"
# The buttons that ask to confirm a device action, by action: the focus goes back to them after the confirmation
ASK = {"rotate": "Rotate key…", "reset": "Reset boot counter…", "delete": "Delete device…"}


def channel_table(n_channels: int, used=(), purposes=None) -> pd.DataFrame:
    purposes = purposes or {}
    return pd.DataFrame({"channel": list(range(n_channels)),
                         "used": [c in set(used) for c in range(n_channels)],
                         "purpose": [purposes.get(str(c), "") for c in range(n_channels)]})


def from_channel_table(df: pd.DataFrame) -> tuple[list[int], dict[str, str]]:
    used = [int(r.channel) for r in df.itertuples() if bool(r.used)]
    purposes = {str(int(r.channel)): str(r.purpose).strip() for r in df.itertuples()
                if isinstance(r.purpose, str) and r.purpose.strip()}
    return used, purposes


CHANNEL_EDITOR = {
    "channel": st.column_config.NumberColumn("channel", disabled=True, width="small"),
    "used": st.column_config.CheckboxColumn("used", help="None ticked = the gesture uses every channel"),
    "purpose": st.column_config.TextColumn("purpose", help="What this electrode picks up, e.g. 'finger flexors'"),
}


def gesture_bank(user: dict, n_channels: int) -> None:
    st.header("Gesture bank")
    if note := st.session_state.pop(NOTE_STATE, None):
        st.info(note, icon=":material/info:")
    gestures = data.list_gestures(user["id"])
    if gestures:
        st.dataframe(pd.DataFrame([{
            "name": g["name"], "description": g["description"],
            "channels used": ", ".join(map(str, g["channels_used"])) or "all",
            "channel purposes": "; ".join(f"ch{k}: {v}" for k, v in sorted(g["channel_purposes"].items(),
                                                                           key=lambda kv: int(kv[0]))),
        } for g in gestures]), hide_index=True, width="stretch")
    else:
        st.info("No gestures yet. Quick-add a few common ones below, or define your own. "
                "The rest class (REST) is built in.")

    have = {g["name"] for g in gestures}
    library = [g for g in data.GESTURE_LIBRARY if g["name"] not in have]
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    picked = c1.multiselect("Quick-add from the library", [g["name"] for g in library], key="quick_add",
                            help="; ".join(f"{g['name']}: {g['description']}" for g in library))
    # never disabled: the rerun after adding empties the list, and a button disabled then drops the keyboard focus to
    # the top of the page (a disabled button is also no Tab stop, so nothing said what it needed)
    clicked = c2.button("Add selected", key="quick_add_btn")
    if clicked and not picked:
        st.warning("Pick one or more gestures in the list first.", icon=":material/arrow_back:")
    elif clicked:
        desc = {g["name"]: g["description"] for g in library}
        for name in picked:
            data.add_gesture(user["id"], name, desc[name])
        st.session_state.pop("quick_add", None)
        st.toast(f"Added {', '.join(picked)}")
        st.rerun()

    with st.expander("Define a custom gesture", expanded=not gestures):
        with st.form("add_gesture", clear_on_submit=True):
            name = st.text_input("Name", max_chars=80, key="new_gesture_name")
            desc = st.text_input("Description", key="new_gesture_desc")
            table = st.data_editor(channel_table(n_channels), hide_index=True, column_config=CHANNEL_EDITOR,
                                   key="new_gesture_channels", width="stretch")
            if st.form_submit_button("Add gesture", type="primary"):
                used, purposes = from_channel_table(table)
                try:
                    data.add_gesture(user["id"], name, desc, used, purposes)
                    st.toast(f"Added {ui.md(name)}")
                    st.rerun()
                except data.RepoError as e:
                    st.error(f"Not added: {ui.md(e)}")

    if gestures:
        with st.expander("Edit or delete a gesture"):
            by_id = {g["id"]: g for g in gestures}
            gid = st.selectbox("Gesture", list(by_id), format_func=lambda i: by_id[i]["name"], key="edit_gesture")
            g = by_id[gid]
            with st.form(f"edit_gesture_{gid}"):
                name = st.text_input("Name", value=g["name"], max_chars=80)
                desc = st.text_input("Description", value=g["description"])
                n = max(n_channels, 1 + max(g["channels_used"], default=-1))
                table = st.data_editor(channel_table(n, g["channels_used"], g["channel_purposes"]), hide_index=True,
                                       column_config=CHANNEL_EDITOR, key=f"edit_gesture_channels_{gid}",
                                       width="stretch")
                c1, c2 = st.columns(2)
                save = c1.form_submit_button("Save")
                delete = c2.form_submit_button("Delete this gesture")
            if save:
                used, purposes = from_channel_table(table)
                try:
                    saved = data.update_gesture(gid, name, desc, used, purposes)
                    served = data.latest_model(user["id"])
                    if saved["name"] != g["name"] and served and g["name"] in served["classes"] + served["answers"]:
                        # the API follows a rename on its next poll, where the model knows what it learnt from
                        # (older models do not: they answer the name they were trained under)
                        old, new = ui.md(g["name"]), ui.md(saved["name"])
                        st.session_state[NOTE_STATE] = f"Renamed {old} to {new}. " + (
                            f"Live recognition answers {new} within {data.MODELS_POLL_S:g} s, without retraining."
                            if saved["name"] in served["answers"]
                            else f"Live recognition still answers {old} until you train a new model.")
                    else:
                        st.toast(f"Saved {ui.md(saved['name'])}")
                    st.rerun()
                except data.RepoError as e:
                    st.error(f"Not saved: {ui.md(e)}")
            if delete:
                data.delete_gesture(gid)
                st.session_state[NOTE_STATE] = (
                    f"Deleted {ui.md(g['name'])}. Its recordings stay in their sessions but no longer train (adding a "
                    f"gesture named {ui.md(g['name'])} again brings them back); retrain to drop it from recognition.")
                st.rerun()


def show_secret_once(user: dict) -> None:
    shown = st.session_state.get(KEY_ONCE_STATE)
    if not shown or shown[0] != user["id"]:  # another user picked meanwhile: never show them this device's key
        return
    _, device_id, snippet, what, opener = shown
    st.success(f"{what} Copy the key now: **it is shown only once** (the server keeps it, but never shows it again).")
    st.markdown("Save these lines as `arduino/arduino_secrets.h` (the whole file: in place of a copy of the "
                "example, not below it), fill in your Wi-Fi and check the server address, then build and flash "
                "the sketch:")
    st.code(snippet, language="c", wrap_lines=True)
    if data.unreachable_from_boards():
        st.warning("The sensor port (UDP) listens on 127.0.0.1 only (the default), which a board on Wi-Fi "
                   "cannot reach: restart the platform with `SEMG_UDP_BIND_HOST=0.0.0.0 ./start_all.sh` (that "
                   "opens the UDP port alone; the web UI and the API stay on this computer).",
                   icon=":material/wifi_off:")
    if st.button("I have saved the key", key="dismiss_secret"):
        st.session_state.pop(KEY_ONCE_STATE, None)
        ui.focus_after_rerun(opener, "Devices")
        st.rerun()


def live_status(devs: list[dict]) -> None:
    """Each device's status as the UDP server sees it: receiving or not, and why its packets are rejected."""
    status = data.udp_device_status(tuple(d["id"] for d in devs))
    if not status["ok"]:
        st.markdown("**Live status**")
        st.info(ui.md(status["detail"]), icon=":material/cloud_off:")
        return
    st.markdown(f"**Live status** (from the UDP server, counted since it started "
                f"{ui.fmt_age_s(status['uptime_s'])})")
    if not status["ready"]:
        st.warning("The UDP server has not loaded the device list yet (the database is not reachable from it): "
                   "every packet is rejected until it has.")
    silent = False
    for d in devs:
        v = data.explain_device_status(d, status["devices"].get(d["id"]))
        ok = {"receiving": True, "rejected": False}.get(v["state"])
        with st.container(border=True, key=f"device_status_{d['id']}"):
            st.markdown(f"{ui.badge(ok, '#' + str(d['id']))} **{ui.md(d['name'] or 'device')}**: {v['summary']}")
            if v["totals"]:
                st.caption(f"Last accepted packet: {ui.fmt_age_s(v['last_accepted_age_s'])}. {v['totals']}.")
            if v["rate_note"]:
                st.warning(v["rate_note"], icon=":material/speed:")
            if v["reasons"]:
                st.markdown("Rejected packets:\n" + "\n".join(
                    f"- `{r['reason']}`: {r['count']:,}, last {ui.fmt_age_s(r['age_s'])}. {r['text']}"
                    for r in v["reasons"]))
            if v["state"] in ("silent", "unknown"):
                silent = True
                if v["hint"]:
                    st.caption(v["hint"])
    if silent and status["unattributed"]:
        st.caption("Packets the UDP server could not tie to any device since it started: " + "; ".join(
            f"`{k}` {n:,} ({data.reject_hint(k)})" for k, n in sorted(status["unattributed"].items())))


def devices(user: dict) -> None:
    st.header("Devices")
    if note := st.session_state.pop(DEVICE_NOTE_STATE, None):
        st.success(note, icon=":material/delete:")
    show_secret_once(user)
    devs = data.device_activity(user["id"])
    if devs:
        st.dataframe(pd.DataFrame([{
            "device": d["id"], "name": d["name"],
            "status": f"streaming ~{d['measured_rate_hz']:.0f} Hz" if d["streaming"] else "not streaming",
            "last sample": ui.fmt_ago(d["last_sample_at"], d["now"]), "channels": d["channel_count"],
            "sample rate (Hz)": float(d["sample_rate_hz"]), "protocol": d["protocol"],
            "key rotated": ui.fmt_time(d.get("key_rotated_at")),
        } for d in devs]), hide_index=True, width="stretch")
        live_status(devs)
    else:
        st.info("No device yet: register the armband below to get its secret key.")

    with st.form("register_device"):
        st.markdown("**Register a device**")
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Name", value="armband", max_chars=80, key="new_device_name")
        channels = c2.number_input("Channels", min_value=1, max_value=16, value=8, step=1, key="new_device_channels")
        rate = c3.number_input("Sample rate (Hz)", min_value=1.0, max_value=10000.0, value=1000.0, step=50.0,
                               key="new_device_rate")
        if st.form_submit_button("Register device", type="primary"):
            try:
                dev = data.register_device(user["id"], int(channels), float(rate), name)
            except data.RepoError as e:
                st.error(f"Not registered: {ui.md(e)}")
            else:
                st.session_state[KEY_ONCE_STATE] = (user["id"], dev["id"], data.arduino_secrets_snippet(dev),
                                                f"Registered device #{dev['id']}.", "Register device")
                st.rerun()

    if devs:
        by_id = {d["id"]: d for d in devs}
        c1, c2, c4, c3 = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
        did = c1.selectbox("Manage device", list(by_id), key="manage_device",
                           format_func=lambda i: f"#{i} {by_id[i]['name']} ({by_id[i]['channel_count']} ch)")
        confirm = st.session_state.get("device_confirm")
        if err := st.session_state.pop("device_reset_error", None):
            st.error(err)
        if c2.button(ASK["rotate"], key="rotate_ask", width="stretch"):
            st.session_state["device_confirm"] = ("rotate", did)
            st.rerun()
        if c4.button(ASK["reset"], key="reset_boot_ask", width="stretch",
                     help="After re-flashing the device (its boot counter starts again at 0)"):
            st.session_state["device_confirm"] = ("reset", did)
            st.rerun()
        if c3.button(ASK["delete"], key="delete_device_ask", width="stretch"):
            st.session_state["device_confirm"] = ("delete", did)
            st.rerun()
        if confirm and confirm[1] in by_id:
            action, target = confirm
            if action == "rotate":
                st.warning(f"Rotate the key of device #{target}? The armband stops being accepted until you flash "
                           "the new key.")
            elif action == "reset":
                st.warning(f"Reset the boot counter of device #{target}? Do this when re-flashing it: its next boot "
                           "is accepted even though its counter started again (its packets are rejected as "
                           "'old_boot' until then). It also gets a new key, to flash with the sketch: with the old "
                           "one, a packet captured before could be replayed as a newer boot.")
            else:
                st.warning(f"Delete device #{target} and all its samples? Sessions recorded with it lose their "
                           "signals. This cannot be undone.")
            k1, k2 = st.columns(2)
            if k1.button(f"Yes, {action}", type="primary", key="device_confirm_yes"):
                st.session_state.pop("device_confirm", None)
                if action == "rotate":
                    dev = data.rotate_device_key(target)
                    st.session_state[KEY_ONCE_STATE] = (user["id"], target, data.arduino_secrets_snippet(dev),
                                                    f"New key for device #{target}.", ASK["rotate"])
                elif action == "reset":
                    try:
                        dev = data.reset_device_boot(target)
                    except data.RepoError as e:
                        st.session_state["device_reset_error"] = f"Not reset: {ui.md(e)}"
                    else:
                        st.session_state[KEY_ONCE_STATE] = (
                            user["id"], target, data.arduino_secrets_snippet(dev),
                            f"Boot counter of device #{target} reset: its next boot with this new key is accepted.",
                            ASK["reset"])
                else:
                    data.delete_device(target)
                    st.session_state[DEVICE_NOTE_STATE] = f"Deleted device #{target} and all its samples."
                    if (st.session_state.get(KEY_ONCE_STATE) or (None, None))[1] == target:
                        st.session_state.pop(KEY_ONCE_STATE)  # its key, still shown, is no device's any more
                ui.focus_after_rerun(ASK[action], "Devices")  # Yes is gone: back to the button that asked
                st.rerun()
            if k2.button("Cancel", key="device_confirm_no"):
                st.session_state.pop("device_confirm", None)
                ui.focus_after_rerun(ASK[action], "Devices")
                st.rerun()


with ui.guard():
    user = ui.pick_user()
    if user:
        devs = data.list_devices(user["id"])
        n_channels = max([d["channel_count"] for d in devs], default=8)
        gesture_bank(user, n_channels)
        st.divider()
        devices(user)
