"""Training jobs: live progress, logs, errors, training curves, confusion matrix, per-class accuracy, model size,
cancel, which model is served (serve an earlier one: roll back), model download (ONNX, int8 ONNX, TorchScript).
Refreshes itself while a job is scheduled or running."""

from datetime import UTC, datetime
from functools import partial

import charts
import data
import pandas as pd
import streamlit as st
import uikit as ui

ui.page_setup("Training jobs", ":material/monitoring:")
st.title(":material/monitoring: Training Jobs Status")

ACTIVE = ("scheduled", "in-progress")
STATUS_ICON = {"scheduled": ":material/hourglass_top:", "in-progress": ":material/model_training:",
               "completed": ":green[:material/check_circle:]", "failed": ":red[:material/error:]",
               "canceled": ":gray[:material/block:]"}
# The job whose "Cancel job…" question is open, and the question's buttons (the focus goes back to them)
CANCEL_ASK = "jobs_cancel_ask"
CANCEL_OPENER, CANCEL_KEEP = "Cancel job…", "No, keep the job"


ONE_REPETITION = (
    "With one repetition of each gesture there was none left to test on, so these figures come from the end of "
    "the same recordings the model learnt from: they overstate how well it will recognise your next attempts (in "
    "the calibration benchmark this figure said 100 % for a person whose next repetitions were recognised 73.5 %). "
    "Record each gesture once more (another short session on Training Data Capture) and train with that session "
    "too: one is then held out to measure the model honestly, and the model usually gets better too (in the same "
    "benchmark, a second repetition took fine-tuned models from 89.8 % to 95.6 %). Test this model on that session "
    "below to measure it as it is.")


def job_label(j: dict) -> str:
    # no status here: the label would go stale while the job runs (the heading below is live)
    return f"job #{j['id']} · {ui.fmt_time(j['created_at'])}"


def job_heading(j: dict, icon: bool = True) -> str:
    return f"Job #{j['id']} — {STATUS_ICON.get(j['status'], '') + ' ' if icon else ''}{j['status']}"


def jobs_table(jobs: list[dict]) -> None:
    served = data.served_model_ids({j["user_id"] for j in jobs})
    st.dataframe(pd.DataFrame([{
        "job": j["id"], "status": j["status"], "progress": float(j["progress"]),
        "sessions": ", ".join(f"#{i}" for i in j["session_ids"]), "epochs": (j["params"] or {}).get("epochs"),
        "created": ui.fmt_time(j["created_at"]), "finished": ui.fmt_time(j["finished_at"]),
        "model": (f"#{j['artifact_id']}" + (" · served" if served.get(j["user_id"]) == j["artifact_id"] else "")
                  if j["artifact_id"] else ""),
    } for j in jobs]), hide_index=True, width="stretch",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0, max_value=100,
                                                                   format="%.0f%%")})


def worker_hint(job: dict) -> None:
    now = datetime.now(UTC)
    if job["status"] == "scheduled":
        waited = (now - job["created_at"]).total_seconds()
        t = data.trainer_status()
        if waited > 30 and not t.get("running"):
            st.warning(f"Waiting for {waited:.0f} s and no job is running: is a training worker up? Start one with "
                       "`python ml_model/TrainMLJob.py worker` (./start_all.sh starts it).")
        else:
            st.info(f"Queued; {t.get('queued', 1)} job(s) waiting. A training worker will pick it up.")
    elif job["status"] == "in-progress" and job["heartbeat_at"]:
        silent = (now - job["heartbeat_at"]).total_seconds()
        if silent > 30:
            st.warning(f"No heartbeat from worker {ui.md(job['worker'] or '')} for {silent:.0f} s: it may have died; the job "
                       "is retried by the next worker once the heartbeat is stale.")


def results(job: dict) -> None:
    epochs = job["epoch_metrics"] or []
    if epochs:
        st.plotly_chart(charts.curves_figure(epochs), key=f"curves_{job['id']}")
    elif job["status"] in ACTIVE:
        st.caption("Training curves appear after the first epoch.")
    artifact = data.job_artifact(job["id"])
    if artifact is None:
        if job["status"] == "completed":
            st.info("This job stored no model.")
        return
    m = data.normalize_metrics(artifact["metrics"], artifact["classes"])
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Held-out accuracy", f"{m['accuracy']:.1%}" if m["accuracy"] is not None else "—")
    c2.metric("Model size", ui.fmt_bytes(artifact["size_bytes"]))
    c3.metric("Classes", len(artifact["classes"]))
    c4.metric("Window / step", f"{artifact['window_ms']:g} / {artifact['step_ms']:g} ms")
    left, right = st.columns(2)
    if m["matrix"]:
        left.plotly_chart(charts.confusion_figure(m["classes"], m["matrix"]), key=f"cm_{job['id']}")
    if m["per_class"]:
        right.plotly_chart(charts.per_class_figure(m["per_class"]), key=f"pc_{job['id']}")
    if not m["matrix"] and not m["per_class"]:
        st.caption("The model carries no per-class metrics.")
    else:
        figures_as_tables(m)
    if note := data.held_out_note(artifact["metrics"]):
        st.caption(note)
    if data.measured_on_its_own_recordings(artifact["metrics"]):
        st.warning(ONE_REPETITION, icon=":material/replay:")
    if job["status"] == "completed":
        serving(job, artifact)
        test_on_sessions(job)
        downloads(job, artifact)


SERVE_HELP = ("Live recognition (the Realtime page, the API and apps following this user's decisions) switches to "
              "this model now. It stays served until you start another training: the model that training stores "
              "replaces it.")
NEWEST_HELP = "Live recognition switches now to the model of the newest training job (the one started last)."


def serving(job: dict, artifact: dict) -> None:
    """Whether live recognition uses this job's model; a button to serve it (roll back to an earlier model, no
    retraining) or, when it was chosen, to serve the newest model again."""
    served = data.latest_model(job["user_id"])
    heading = job_heading(job, icon=False)
    if served is not None and served["id"] == artifact["id"]:
        if served["chosen_at"] is None:
            st.success("**Served**: live recognition uses this model, the model of the newest training.",
                       icon=":material/sensors:")
            return
        st.success(f"**Served**: live recognition uses this model: you chose it {ui.fmt_time(served['chosen_at'])}. "
                   "It stays served until you start another training.", icon=":material/sensors:")
        if st.button("Serve the newest model instead", key=f"serve_newest_{job['id']}", help=NEWEST_HELP,
                     icon=":material/update:"):
            if now := data.serve_newest_model(job["user_id"]):
                st.toast(f"Live recognition now uses model #{now['id']}, the newest.")
            ui.focus_after_rerun("Serve this model", heading)  # this one's button when it is not the newest
            st.rerun()
        return
    st.info("Not served: live recognition uses "
            + (f"model #{served['id']}" + (f" of job #{served['job_id']}" if served["job_id"] else "")
               + (f", chosen {ui.fmt_time(served['chosen_at'])}" if served["chosen_at"] else ", the newest")
               if served is not None else "no model")
            + ". Serve this model to switch live recognition to it now; the next training you start replaces it.",
            icon=":material/sensors_off:")
    if st.button("Serve this model", key=f"serve_{job['id']}", help=SERVE_HELP, icon=":material/restore:"):
        try:
            data.serve_model(job["user_id"], artifact["id"])
        except data.RepoError as e:  # e.g. deleted meanwhile
            st.error(f"Not served: {ui.md(e)}")
            return
        st.toast(f"Live recognition now uses model #{artifact['id']} of job #{job['id']}.")
        ui.focus_after_rerun("Serve the newest model instead", heading)
        st.rerun()


def figures_as_tables(m: dict) -> None:
    """The per-class accuracy and the confusion matrix as HTML tables: a chart is a picture to a screen reader."""
    with st.expander("These figures as tables"):
        if m["per_class"]:
            st.table(pd.DataFrame({"accuracy": [f"{v:.0%}" if v is not None else "—" for v in m["per_class"].values()]},
                                  index=pd.Index([ui.md(c) for c in m["per_class"]], name="gesture")))
        if m["matrix"]:
            st.caption("Confusion matrix: windows of each true gesture (rows) by the gesture predicted (columns).")
            st.table(pd.DataFrame(m["matrix"], index=pd.Index([ui.md(c) for c in m["classes"]], name="true"),
                                  columns=pd.Index([ui.md(c) for c in m["classes"]], name="predicted")))


def test_on_sessions(job: dict) -> None:
    """The model tested on sessions it did not train on (another day's; a second repetition after a one-repetition
    calibration): the honest figure of the model served, where the held-out one above is an estimate."""
    sessions = [s for s in data.list_sessions(job["user_id"]) if s["status"] == "completed"]
    trained = set(job["session_ids"])
    if not [s for s in sessions if s["id"] not in trained]:
        return
    by_id = {s["id"]: s for s in sessions}
    with st.expander("Test this model on other sessions"):
        picked = st.multiselect(
            "Sessions", list(by_id), key=f"score_sessions_{job['id']}",
            default=[next(i for i in by_id if i not in trained)],  # the newest it did not train on
            format_func=lambda i: f"#{i} {by_id[i]['name']} ({ui.fmt_time(by_id[i]['started_at'])})"
                                  + (" · trained on" if i in trained else ""))
        result_key = f"score_result_{job['id']}"
        if st.button("Test", key=f"score_go_{job['id']}", disabled=not picked, icon=":material/fact_check:"):
            st.session_state.pop(result_key, None)  # an earlier result is not one of these sessions
            with st.spinner("Running the model on the windows of these sessions"):
                try:
                    st.session_state[result_key] = data.score_job_model(job["id"], picked)
                except data.RepoError as e:  # said here: the rest of the page (the downloads) stays
                    st.error(ui.md(e))
        r = st.session_state.get(result_key)
        if not r:
            return
        st.metric(f"Accuracy on session(s) {', '.join(f'#{i}' for i in r['sessions'])}", f"{r['accuracy']:.1%}")
        apart = r.get("stride_ms", r["step_ms"])  # more than the step when they were thinned (data.score_job_model)
        note = (f"{r['n_windows']:,} windows ({r['window_ms']:g} ms, one every {apart:g} ms"
                + ("; they overlap)" if apart < r["window_ms"] else ")")
                + ("; left out, not gestures of this model: "
                   + ", ".join(f"{ui.md(c)} ({n:,} windows)" for c, n in r["not_in_model"].items())
                   if r["not_in_model"] else "")
                + ("; renamed since the model was trained: "
                   + ", ".join(f"{ui.md(old)} → {ui.md(new)}" for old, new in r["renamed"].items()) if r.get("renamed") else ""))
        st.caption(note + ".")
        if r["trained_on"]:
            st.warning(f"The model trained on session(s) {', '.join(f'#{i}' for i in r['trained_on'])}: "
                       "figures including them are not a test of it.")
        cm = r["confusion_matrix"]
        st.plotly_chart(charts.confusion_figure(cm["classes"], cm["matrix"], "Confusion matrix (tested windows)"),
                        key=f"score_cm_{job['id']}")
        figures_as_tables(data.normalize_metrics(r))


def downloads(job: dict, artifact: dict) -> None:
    """The job's model as files that run off the platform (ONNX, int8 ONNX, TorchScript); each is exported
    only when its button is clicked (int8 quantisation takes seconds), then cached."""
    st.markdown("**Download the model** · raw device windows in, class probabilities out (the filter, scaling "
                "and channel selection are inside the file)")
    cols = st.columns(len(data.EXPORT_FORMATS))
    for col, (fmt, label) in zip(cols, data.EXPORT_FORMATS.items(), strict=True):
        col.download_button(
            label, data=partial(export_file, artifact["id"], fmt), key=f"download_{fmt}_{job['id']}",
            file_name=data.export_file_name(job["id"], artifact["id"], fmt), mime="application/octet-stream",
            on_click="ignore", icon=":material/download:",
            help=f"Model #{artifact['id']} exported as {label} (see ml_model/export.py for the input format)")


def export_file(artifact_id: int, fmt: str) -> bytes:
    return data.export_model(artifact_id, fmt)[0]


def cancel(j: dict) -> None:
    """Cancel job… asks first: a mis-click would throw away a training that may have run for many minutes. The
    question is kept in the session state, so the fragment's refreshes keep it open; it goes away, and nothing is
    canceled, when the job ends before the answer. Each answer reruns the whole app: the focus is moved there."""
    asked = st.session_state.get(CANCEL_ASK) == j["id"]
    if j["status"] not in ACTIVE or j["cancel_requested"]:  # nothing left to ask (ended, or a cancel is under way)
        if asked:
            st.session_state.pop(CANCEL_ASK, None)
            if j["cancel_requested"]:  # in another window, or through the API
                st.info(f"Job #{j['id']} was canceled elsewhere before you confirmed.")
            else:
                st.info(f"Job #{j['id']} ended ({j['status']}) before the cancel was confirmed: nothing was "
                        "canceled.")
        return
    heading = job_heading(j, icon=False)
    if not asked:
        if st.button(CANCEL_OPENER, key=f"cancel_{j['id']}"):
            st.session_state[CANCEL_ASK] = j["id"]
            ui.focus_after_rerun(CANCEL_KEEP)  # the safe answer; the question is said (an alert)
            st.rerun(scope="app")
        return
    if j["status"] == "scheduled":
        st.warning(f"Cancel job #{j['id']}? It has not started: it leaves the queue and no model is trained "
                   "(schedule it again on **Kickoff Training**).")
    else:
        st.warning(f"Cancel job #{j['id']}? Training stops at the end of the current epoch and no model is "
                   "stored: the epochs trained so far are lost. This cannot be undone.")
        # not in the warning: an alert is said again whenever its text changes, here at every epoch
        total = (j["params"] or {}).get("epochs")
        st.caption(f"Epochs trained so far: {len(j['epoch_metrics'] or [])}" + (f" of {total}." if total else "."))
    k1, k2 = st.columns(2)
    if k1.button("Yes, cancel the job", type="primary", key=f"cancel_yes_{j['id']}"):
        try:
            j = data.cancel_job(j["id"])
        except data.RepoError:  # it ended since this run read it: the next run says so (above)
            st.rerun(scope="app")
        st.session_state.pop(CANCEL_ASK, None)
        # the opener is gone (a job not started is canceled, a running one asked to stop): its heading has the focus
        ui.focus_after_rerun(job_heading(j, icon=False))
        st.rerun(scope="app")
    if k2.button(CANCEL_KEEP, key=f"cancel_no_{j['id']}"):
        st.session_state.pop(CANCEL_ASK, None)
        ui.focus_after_rerun(CANCEL_OPENER, heading)
        st.rerun(scope="app")


def details(job_id: int) -> None:
    job = data.get_job(job_id)
    active = job["status"] in ACTIVE

    @st.fragment(run_every=2.0 if active else None)
    def live() -> None:
        with ui.guard():
            j = data.get_job(job_id)
            if (j["status"] in ACTIVE) != active:
                st.rerun(scope="app")  # it just finished (or started): redraw everything once
            st.markdown(f"## {job_heading(j)}")
            st.progress(min(1.0, float(j["progress"]) / 100), text=f"{float(j['progress']):.0f}%")
            params = ", ".join(f"{k}={v}" for k, v in (j["params"] or {}).items()) or "defaults"
            st.caption(f"sessions {', '.join(f'#{i}' for i in j['session_ids'])} · {params} · created "
                       f"{ui.fmt_time(j['created_at'])} · started {ui.fmt_time(j['started_at'])} · finished "
                       f"{ui.fmt_time(j['finished_at'])}" + (f" · worker {ui.md(j['worker'])}" if j["worker"] else ""))
            if j["error"]:
                st.error(f"Error: {ui.md(j['error'])}")
            if j["cancel_requested"] and j["status"] == "in-progress":
                st.info("Cancel requested: the worker stops at the end of the current epoch.")
            worker_hint(j)
            cancel(j)
            logs = data.job_logs(job_id)
            with st.expander(f"Log ({len(logs)} lines)", expanded=j["status"] in ("failed",) or active):
                st.code("\n".join(f"{r['ts'].astimezone():%H:%M:%S} {r['level']:<7} {r['message']}"
                                  for r in logs[-300:]) or "(empty)", language=None)
            if active:
                results(j)

    live()
    if not active:
        results(job)


def page() -> None:
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    with c1:
        user = ui.pick_user()
    all_users = c2.toggle("All users", key="jobs_all_users")
    if not user and not all_users:
        return
    jobs = data.list_jobs(None if all_users else user["id"], limit=100)
    if not jobs:
        st.info("No training job yet: schedule one on **Kickoff Training**.")
        return
    jobs_table(jobs)
    by_id = {j["id"]: j for j in jobs}
    wanted = st.session_state.pop("jobs_focus", None)
    ids = list(by_id)
    job_id = st.selectbox("Job", ids, index=ids.index(wanted) if wanted in by_id else 0, key="jobs_pick",
                          format_func=lambda i: job_label(by_id[i]))
    details(job_id)


with ui.guard():
    page()
