"""Live view: multi-channel signal, the current gesture with its confidence, a timeline of decisions and the
measured latency (decision time - sample receive time). Polls the database (sample_blocks, predictions)."""

from datetime import UTC, datetime, timedelta

import charts
import data
import streamlit as st
import uikit as ui

ui.page_setup("Live recognition", ":material/bolt:")
st.title(":material/bolt: Real-time Gesture Recognition")

PAUSED_AT = "live_paused_at"
FRESH_S = 3.0  # a decision older than this is not "current"


def electrode_warnings(faults: list[dict] | None, model: dict | None) -> None:
    """The channels the inference worker found failed at the current decision, named as in the signal chart."""
    if not faults:
        return
    # With too many failed (on a 1- to 3-channel sensor: any one) nothing is recognised at all, so the warnings
    # must not promise that recognition goes on without the channel.
    unsure = data.too_many_failed(model, len(faults))
    for f in faults:
        secs = f["seconds"]
        what = "looks disconnected (flat" if f["fault"] == "flat" else "is saturated (at its limits"
        st.warning(f"**Channel {f['channel']}** (ch{f['channel']} below) {what} for "
                   f"{secs:{'.0f' if secs >= 10 else '.1f'}} s): check its electrode's skin contact and cable."
                   + ("" if unsure else " Until it is back, recognition leaves it out and may be less accurate."),
                   icon=":material/sensors_off:")
    if unsure:
        failed = "1 channel" if len(faults) == 1 else f"{len(faults)} channels"
        st.error(f"{failed} failed: too many to recognise anything, the decisions are 'unsure' until "
                 f"{'it is' if len(faults) == 1 else 'they are'} back.", icon=":material/block:")


def current_gesture(pred, now: datetime, model: dict | None, streaming: bool) -> None:
    latest = pred.iloc[0] if not pred.empty else None
    if latest is not None and (now - latest["decided_at"]).total_seconds() <= FRESH_S:
        g = latest["gesture"]
        color = "#777777" if g.upper() in ("REST", "UNKNOWN") else "#2ca02c"
        ui.big_cue(g, f"confidence {latest['confidence']:.0%}", color=color, size_rem=5.0)
        ui.announce(g)  # said as the decision changes (not its confidence, which changes at every refresh)
        electrode_warnings(latest["channel_faults"], model)
        return
    # no grey reads at 4.5:1 on both the light and the dark theme (#999999 was 2.6:1 on white): the theme's text colour
    ui.big_cue("—", "no current decision", color="#999999", size_rem=5.0, text_color="inherit")
    ui.announce("No current decision")
    if model is None:
        st.info("No trained model for this user yet: record a session, then train on **Kickoff Training**.")
    elif not streaming:
        st.warning("The device is not streaming, so there is nothing to recognise. Power the armband on.")
    else:
        st.warning("Samples arrive but no decisions: is the inference worker running "
                   "(`python -m ml_model.nat_inference`) and the API up? (See the service status in the sidebar.)")


def live(user: dict, device: dict | None, window_s: float, model: dict | None) -> None:
    paused_at = st.session_state.get(PAUSED_AT)
    now = paused_at or datetime.now(UTC)
    t0 = now - timedelta(seconds=window_s)
    pred = data.predictions_between(user["id"], t0, now)
    activity = next((d for d in data.device_activity(user["id"]) if device and d["id"] == device["id"]), None)
    streaming = bool(activity and activity["streaming"])

    top_left, top_right = st.columns([1, 1])
    with top_left:
        current_gesture(pred, now, model, streaming or paused_at is not None)
    with top_right:
        if pred.empty:
            st.metric("Latency (median)", "—")
        else:
            lat = pred["latency_ms"].dropna()
            c1, c2, c3 = st.columns(3)
            c1.metric("Latency median", f"{lat.median():.0f} ms" if len(lat) else "—",
                      help="decision time - server receive time of the window's last sample")
            c2.metric("Latency p95", f"{lat.quantile(0.95):.0f} ms" if len(lat) else "—")
            c3.metric("Decisions/s", f"{len(pred) / window_s:.1f}")
        if model:
            st.caption(f"Model #{model['id']} · classes {', '.join(map(ui.md, model['answers']))} · trained "
                       f"{ui.fmt_time(model['created_at'])}"
                       + ("; renamed since: " + ", ".join(f"{ui.md(old)} → {ui.md(new)}"
                                                         for old, new in model["renamed"].items())
                          if model["renamed"] else ""))
        days = data.settings().semg_prediction_retention_days
        st.caption(f"Decisions are kept {days} days (SEMG_PREDICTION_RETENTION_DAYS), then deleted; recordings are "
                   "kept." if days else "Decisions are kept forever (SEMG_PREDICTION_RETENTION_DAYS=0).")
        st.caption(f"An app can act on these decisions as they come: `GET {data.settings().api_url}/users/"
                   f"{user['id']}/predictions/live` with a read-only API key of this user (User Management; Server-Sent "
                   "Events; README, Live decisions).")

    if device is None:
        st.info("This user has no device: register one on **Gesture Management**.")
    else:
        sig = data.signal(device["id"], t0, now, max_points=1200)
        if sig.empty:
            st.info(f"No samples from device #{device['id']} in the last {window_s:.0f} s.")
        else:
            sig.frame["t"] = sig.frame["t"] - window_s
            fig = charts.signal_figure(sig.frame, x_title="seconds ago", height_per_channel=70)
            fig.update_xaxes(range=[-window_s, 0])
            st.plotly_chart(fig, key="live_signal", config={"displayModeBar": False})
    left, right = st.columns(2)
    with left:
        st.plotly_chart(charts.timeline_figure(pred, now, window_s), key="live_timeline",
                        config={"displayModeBar": False})
    with right:
        if not pred.empty:
            st.plotly_chart(charts.latency_figure(pred, now), key="live_latency", config={"displayModeBar": False})


def page() -> None:
    user = ui.pick_user()
    if not user:
        return
    model = data.latest_model(user["id"])
    devices = data.device_activity(user["id"])
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
    device = None
    if devices:
        by_id = {d["id"]: d for d in devices}
        ids = sorted(by_id, key=lambda i: (not by_id[i]["streaming"], i))  # a streaming device first
        device = by_id[c1.selectbox("Device", ids, key="live_device",
                                    format_func=lambda i: f"#{i} {by_id[i]['name']}"
                                                          + (" (streaming)" if by_id[i]["streaming"] else ""))]
    window_s = c2.select_slider("Time window (s)", [5, 10, 20, 30, 60], value=10, key="live_window")
    refresh = c3.selectbox("Refresh (s)", [0.5, 1.0, 2.0], index=1, key="live_refresh")
    paused = c4.toggle("Pause", key="live_pause")
    if paused and PAUSED_AT not in st.session_state:
        st.session_state[PAUSED_AT] = datetime.now(UTC)
    elif not paused:
        st.session_state.pop(PAUSED_AT, None)
    if model is None:
        st.info("No trained model for this user yet: the signals below are live, decisions start once a model "
                "is trained (**Kickoff Training**).")

    @st.fragment(run_every=None if paused else float(refresh))
    def refresh_view() -> None:
        with ui.guard():
            live(user, device, float(window_s), model)

    refresh_view()


with ui.guard():
    page()
