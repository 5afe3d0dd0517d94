"""Choose recorded sessions by their data quality, preview them (signals + video at the same moment), set the
options and schedule a training job (the training worker runs it; this page never trains)."""

import data
import pandas as pd
import streamlit as st
import uikit as ui
import views

ui.page_setup("Kickoff training", ":material/rocket_launch:")
st.title(":material/rocket_launch: Kickoff Training")


def quality_table(user_id: int, sessions: list[dict]) -> list[int]:
    """Editable table of completed sessions with a 'train' tick box; returns the ticked session ids. The ticks
    are the user's own (keyed by user id, never another user's) and kept while other users are looked at."""
    editor_version, default_selection = f"kickoff_editor_version_{user_id}", f"kickoff_default_selection_{user_id}"
    ticks_key = f"kickoff_ticks_{user_id}"  # session id -> ticked, as last left in this user's editor
    default = st.session_state.get(default_selection, True)
    ticks = st.session_state.get(ticks_key, {})
    rows, by_id = [], {s["id"]: s for s in sessions}
    bank = {g["name"] for g in data.list_gestures(user_id)}  # a gesture deleted since does not train
    for s in sessions:
        q = s["quality"]
        plan = s.get("plan") or {}
        rows.append({
            "train": ticks.get(s["id"], default) and q["samples"] > 0,
            "session": s["id"],
            "name": s["name"],
            "recorded": ui.fmt_time(s["started_at"]),
            "gestures": ", ".join(g if g in bank else f"{g} (deleted, not trained)" for g in plan.get("gestures", [])),
            "reps": q["gesture_reps"],
            "discarded": q["discarded"],
            "samples": q["samples"],
            "loss %": round(q["loss_pct"], 2) if q["loss_pct"] is not None else None,
            "length (s)": round(q["duration_s"] or 0, 1),
            "RMS per channel": [round(v, 1) for v in q["rms"]],
        })
    c1, c2, _ = st.columns([1, 1, 6])
    if c1.button("Select all", key="select_all"):
        st.session_state[default_selection] = True
        st.session_state.pop(ticks_key, None)
        st.session_state[editor_version] = st.session_state.get(editor_version, 0) + 1
        st.rerun()
    if c2.button("Select none", key="select_none"):
        st.session_state[default_selection] = False
        st.session_state.pop(ticks_key, None)
        st.session_state[editor_version] = st.session_state.get(editor_version, 0) + 1
        st.rerun()
    edited = st.data_editor(
        pd.DataFrame(rows), hide_index=True, width="stretch",
        key=f"sessions_editor_{user_id}_{st.session_state.get(editor_version, 0)}",
        disabled=[c for c in rows[0] if c != "train"],
        column_config={
            "train": st.column_config.CheckboxColumn("train", help="Use this session for training"),
            "samples": st.column_config.NumberColumn("samples", format="%d"),
            "loss %": st.column_config.NumberColumn("loss %", format="%.2f", help="Samples missing: packets lost, "
                                                    "or the device sending nothing for part of the session"),
            "RMS per channel": st.column_config.BarChartColumn("RMS per channel", y_min=0),
            "discarded": st.column_config.NumberColumn("discarded", help="Intervals left out of training: repetitions "
                                                       "redone, and the one under way when a capture was left"),
        },
    )
    for r in rows:
        if problem := ui.signal_problem(r["session"], by_id[r["session"]]["quality"]):
            st.warning(problem)
    st.session_state[ticks_key] = {int(i): bool(t) for i, t in zip(edited["session"], edited["train"], strict=True)}
    return [int(x) for x in edited.loc[edited["train"], "session"]]


def preview(sessions: list[dict]) -> None:
    by_id = {s["id"]: s for s in sessions}
    sid = st.selectbox("Preview a session", list(by_id), key="preview_session",
                       format_func=lambda i: f"#{i} {by_id[i]['name']} ({ui.fmt_time(by_id[i]['started_at'])})")
    s = by_id[sid]
    if not s.get("device_id") or not s.get("started_at"):
        st.info("This session has no device or was never started.")
        return
    views.signal_review(s["device_id"], s["started_at"], s["ended_at"] or s["started_at"],
                        intervals=s["intervals"], video=data.session_video(sid), key=f"kick_{sid}")


def compatible_bases(selected: list[int]) -> list[dict]:
    """The shared bases recorded at the chosen sessions' sample rate; says why the others are not offered."""
    bases = data.pretrained_bases()
    if not bases or not selected:
        return []
    rates = data.session_sample_rates(selected)
    if len(rates) != 1:  # options_and_schedule says why these sessions cannot be trained on together
        return []
    fitting = [b for b in bases if data.base_fits_rate(b, rates[0])]
    others = [b for b in bases if b not in fitting]
    if others:
        st.caption("Not offered: base model(s) " + ", ".join(
            f"#{b['id']} {ui.md(b['name'] or 'base')} ({float(b['sample_rate_hz']):g} Hz)" for b in others)
            + f", trained at another sample rate than these sessions' {rates[0]:g} Hz.")
    return fitting


def options_and_schedule(user: dict, selected: list[int]) -> None:
    st.header("Options")
    bases = compatible_bases(selected)
    c1, c2 = st.columns(2)
    with c1:
        if bases:
            start = st.radio("Start from", ["scratch", "pretrained base"], horizontal=True, key="kick_start",
                             help="A base trained on many people usually needs fewer of your repetitions")
            base = None
            if start == "pretrained base":
                by_id = {b["id"]: b for b in bases}
                base = st.selectbox("Base model", list(by_id), key="kick_base",
                                    format_func=lambda i: f"#{i} {by_id[i]['name'] or 'base'} "
                                                          f"({len(by_id[i]['classes'])} classes)")
        else:
            base = None
            st.caption("No pretrained base model fits these sessions, so training starts from scratch.")
    epochs = c2.number_input("Epochs", min_value=1, max_value=1000, value=30, step=5, key="kick_epochs")
    params = {"epochs": int(epochs)}
    with st.expander("Advanced"):
        if st.checkbox("Choose the analysis window myself (otherwise the trainer's default)", key="kick_custom_win"):
            a1, a2 = st.columns(2)
            params["window_ms"] = int(a1.number_input("Window (ms)", 50, 2000, 200, step=25, key="kick_window"))
            params["step_ms"] = int(a2.number_input("Step (ms)", 10, 1000, 50, step=10, key="kick_step"))
        # the same data and seed train the same model (README: Reproducing a result); another seed shows the spread
        seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="kick_seed",
                               help="Training is repeatable for a seed: the same sessions, settings and seed give "
                                    "the same model. Train again with other seeds to see how much the accuracy "
                                    "varies by chance.")
        if seed:
            params["seed"] = int(seed)
    if base is not None:
        params["base_artifact_id"] = int(base)
    single = data.single_repetition(user["id"], selected)
    if single:
        if base is None:
            what = ("This session holds one repetition of each gesture" if len(selected) == 1 else
                    "These sessions hold one repetition each, and each holds a gesture no other one does")
            st.warning(f"{what}: training from scratch needs a second one to hold out, so it cannot train. "
                       "Record each gesture once more (another short session) and tick "
                       + ("both" if len(selected) == 1 else "it too")
                       + (", or start from a pretrained base." if bases else "."), icon=":material/replay:")
        else:
            st.info("One repetition of each gesture is enough to fine-tune a base, but nothing is left to measure "
                    "the model on; a second short session, ticked too, measures it honestly and usually makes it "
                    "better.", icon=":material/replay:")
    problem = data.training_sessions_problem(user["id"], selected)
    if problem:
        hint = " Tick only sessions recorded with one device setup." if "one sensor setup" in problem else ""
        st.error(f"Cannot train on these sessions: {ui.md(problem)}.{hint}",
                 icon=":material/block:")
    if st.button(f"Train on {len(selected)} session(s)", type="primary", disabled=not selected or bool(problem) or (single and base is None),
                 key="kick_schedule", icon=":material/rocket_launch:"):
        job = data.schedule_job(user["id"], selected, params)  # refuses the same (guard() shows why)
        st.session_state["kick_flash"] = job["id"]
        st.rerun()
    if not selected:
        st.caption("Tick at least one session above.")


def page() -> None:
    user = ui.pick_user()
    if not user:
        return
    if job_id := st.session_state.pop("kick_flash", None):
        st.success(f"Training job #{job_id} scheduled: a training worker picks it up. Follow it on "
                   "**Training Jobs Status**.")
    sessions = [s for s in data.sessions_overview(user["id"]) if s["status"] == "completed"]
    if not sessions:
        st.info("No completed recording yet: record one on **Training Data Capture** first.")
        return
    st.header("Recorded sessions")
    selected = quality_table(user["id"], sessions)
    st.divider()
    options_and_schedule(user, selected)
    st.divider()
    st.header("Preview")
    preview(sessions)


with ui.guard():
    page()
