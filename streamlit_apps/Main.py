"""Overview: services' health, users, devices streaming now, recent jobs and a first-five-minutes guide.

Run: python -m streamlit_apps (on SEMG_BIND_HOST:UI_PORT, as supervisord runs it)
"""

import data
import pandas as pd
import streamlit as st
import uikit as ui

ui.page_setup("Overview", health_sidebar=False)
st.title(":material/back_hand: sEMG gesture platform")
st.caption("Record your own muscle signals, train a personal gesture model, and watch it recognise you live.")


def linked(shown: str, url: str | None) -> str:
    """Markdown `shown` (uikit.md's) with `url`, where it shows, as a link to it."""
    return shown.replace(ui.md(url), f"[{ui.md(url)}](<{url}>)") if url else shown


def services() -> None:
    st.header("Services")
    h = data.health()
    labels = {"database": "Database", "api": "REST API", "udp": "UDP ingestion", "nats": "NATS"}
    cols = st.columns(len(labels) + 1)
    for col, (key, name) in zip(cols, labels.items(), strict=False):
        ok = h[key]["ok"]
        col.markdown(ui.badge(ok, name))
        # the detail may quote an error: shown as it is; a working API's health URL (ours) is a link
        link = f"{data.settings().api_url}/health" if key == "api" and ok else None
        col.caption(linked(ui.md(h[key]["detail"]), link))
    ui.disk_warning(h)
    if not h["database"]["ok"]:
        cols[-1].markdown(ui.badge(None, "Training worker"))
        cols[-1].caption("unknown while the database is down")
        return
    t = data.trainer_status()
    waiting = (t["now"] - t["oldest_queued"]).total_seconds() if t.get("oldest_queued") else 0
    if t.get("running"):
        cols[-1].markdown(ui.badge(True, "Training worker"))
        beat = ui.fmt_ago(t["last_heartbeat"], t["now"]) if t.get("last_heartbeat") else "not yet"
        cols[-1].caption(f"{t['running']} job(s) running, last heartbeat {beat}")
    elif t.get("queued") and waiting > 60:
        cols[-1].markdown(ui.badge(False, "Training worker"))
        cols[-1].caption(f"{t['queued']} job(s) waiting for {waiting:.0f} s: is `TrainMLJob.py worker` running?")
    elif t.get("workers"):
        cols[-1].markdown(ui.badge(True, "Training worker"))
        cols[-1].caption(f"idle, waiting for jobs; {t.get('queued', 0)} queued")
    else:
        cols[-1].markdown(ui.badge(False, "Training worker"))
        cols[-1].caption("none connected to the database: jobs wait until one runs (`./start_all.sh` starts it, "
                         "or `python ml_model/TrainMLJob.py worker`)")


def counts_and_devices() -> None:
    c = data.overview_counts()
    cols = st.columns(5)
    for col, (k, label) in zip(cols, [("users", "Users"), ("devices", "Devices"), ("sessions", "Recorded sessions"),
                                      ("models", "Trained models"), ("active_jobs", "Active jobs")], strict=True):
        col.metric(label, c.get(k, 0))
    users = data.list_users(limit=10)
    if users:
        st.header("Users")
        st.dataframe(pd.DataFrame([{"user": u["id"], "name": u["name"], "email": u["email"],
                                    "gestures": u["gestures"], "devices": u["devices"],
                                    "since": ui.fmt_time(u["created_at"])} for u in users]),
                     hide_index=True, width="stretch")
        if c.get("users", 0) > len(users):
            st.caption(f"The first {len(users)} of {c['users']}; all of them on **User Management**.")
    st.header("Devices streaming now")
    devices = data.device_activity()
    live = [d for d in devices if d["streaming"]]
    if not devices:
        st.info("No device registered yet: register one on **Gesture Management** (step 2 below).")
    elif not live:
        st.info(f"None of the {len(devices)} registered device(s) sent samples in the last "
                f"{data.STREAMING_WINDOW_S:.0f} s. Power the armband on and check its Wi-Fi and arduino_secrets.h.")
    else:
        st.dataframe(pd.DataFrame([{
            "user": d["user_name"], "device": f"#{d['id']} {d['name']}", "channels": d["channel_count"],
            "nominal Hz": float(d["sample_rate_hz"]), "measured Hz": round(d["measured_rate_hz"]),
            "last sample": ui.fmt_ago(d["last_sample_at"], d["now"]),
        } for d in live]), hide_index=True, width="stretch")


def recent_jobs() -> None:
    st.header("Recent training jobs")
    jobs = data.list_jobs(limit=8)
    if not jobs:
        st.info("No training job yet: record a session, then start one on **Kickoff Training**.")
        return
    names = {u["id"]: u["name"] for u in data.list_users(limit=1000)}
    st.dataframe(pd.DataFrame([{
        "job": j["id"], "user": names.get(j["user_id"], j["user_id"]), "status": j["status"],
        "progress": float(j["progress"]), "created": ui.fmt_time(j["created_at"]),
        "error": j["error"] or "",
    } for j in jobs]), hide_index=True, width="stretch",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0, max_value=100,
                                                                   format="%.0f%%")})


def guide() -> None:
    st.header("Your first five minutes")
    st.markdown(
        """
1. **User Management** – create your profile (name and email).
2. **Gesture Management** – quick-add a few gestures (e.g. *fist*, *open hand*), then register your armband:
   copy the generated `arduino_secrets.h` lines into the sketch and flash it. The device appears above as streaming.
3. **Training Data Capture** – pick the gestures, repetitions and hold/rest seconds, allow the webcam and follow
   the big cue. Made a mistake? *Redo last repetition*.
4. **Kickoff Training** – check the session's data quality (loss %, RMS per channel), select it, start training.
5. **Training Jobs Status** – watch the progress, curves and confusion matrix; then open
   **Real-time Gesture Recognition** and make the gestures.
"""
    )
    st.caption("Review any recording later on **Sensor Data Review** (signals, spectra, video, CSV export).")


with ui.guard():
    services()
with ui.guard():
    counts_and_devices()
with ui.guard():
    recent_jobs()
guide()
