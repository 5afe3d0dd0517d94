"""Review recorded signals: a session or any time range, channels (downsampled in the database for long
ranges), RMS and spectrum per channel, the session video under a shared time cursor, labels overlaid, CSV."""

from datetime import UTC, datetime, timedelta

import charts
import data
import pandas as pd
import streamlit as st
import uikit as ui
import views

ui.page_setup("Data review", ":material/search:")
st.title(":material/search: Sensor Data Review")


def choose_session(user: dict) -> tuple | None:
    sessions = [s for s in data.list_sessions(user["id"]) if s["started_at"] and s["device_id"]]
    if not sessions:
        st.info("This user has no recorded session yet (record one on **Training Data Capture**), or choose "
                "*Time range* above to look at any stretch of signal.")
        return None
    by_id = {s["id"]: s for s in sessions}
    sid = st.selectbox("Session", list(by_id), key="review_session",
                       format_func=lambda i: f"#{i} {by_id[i]['name'] or 'session'} · {by_id[i]['status']} · "
                                             f"{ui.fmt_time(by_id[i]['started_at'])}")
    s = data.get_session(sid)
    t1 = s["ended_at"] or datetime.now(UTC)
    intervals = data.with_label_ends(s["intervals"])  # the labels training uses, also for intervals without an end
    return s["device_id"], s["started_at"], t1, intervals, data.session_video(sid), f"session #{sid}"


def choose_range(user: dict) -> tuple | None:
    devices = data.list_devices(user["id"])
    if not devices:
        st.info("This user has no device: register one on **Gesture Management**.")
        return None
    by_id = {d["id"]: d for d in devices}
    c1, c2, c3, c4 = st.columns(4)
    did = c1.selectbox("Device", list(by_id), key="review_device", format_func=lambda i: f"#{i} {by_id[i]['name']}")
    span = data.device_data_span(did)
    if span is None:
        st.info(f"Device #{did} has never sent a sample.")
        return None
    default_start = max(span[0], span[1] - timedelta(minutes=5)).astimezone()
    day = c2.date_input("Start date", value=default_start.date(), key=f"review_day_{did}")
    clock = c3.time_input("Start time", value=default_start.time().replace(microsecond=0), step=60,
                          key=f"review_time_{did}")
    minutes = c4.number_input("Length (min)", 0.1, 24 * 60.0, 5.0, step=1.0, key="review_minutes")
    t0 = datetime.combine(day, clock).astimezone().astimezone(UTC)
    t1 = t0 + timedelta(minutes=float(minutes))
    st.caption(f"Device #{did} has data from {ui.fmt_time(span[0])} to {ui.fmt_time(span[1])}.")
    videos = [v for v in data.user_videos_between(user["id"], t0, t1) if v["file"]]
    return did, t0, t1, data.intervals_between(user["id"], t0, t1), (videos[0] if videos else None), "time range"


def analysis(device_id: int, t0: datetime, t1: datetime, intervals: list) -> None:
    left, right = st.columns(2)
    with left:
        rms = data.channel_rms(device_id, t0, t1)
        if rms:
            st.plotly_chart(charts.rms_figure(rms, "RMS per channel (DC removed)"), key="review_rms")
    with right:
        spec = data.spectrum(device_id, t0, t1)
        if not spec.empty:
            st.plotly_chart(charts.spectrum_figure(spec), key="review_spectrum")
        else:
            st.caption("Not enough contiguous samples for a spectrum.")
    if rms or not spec.empty:
        figures_as_table(rms, spec)


def figures_as_table(rms: list[float], spec: pd.DataFrame) -> None:
    """RMS and the spectrum's peak and median frequency per channel as an HTML table: a chart is a picture to a
    screen reader (the job page's figures have the same expander)."""
    columns: dict[str, dict[str, str]] = {}
    if rms:
        columns["RMS (ADC units)"] = {f"ch{i}": f"{v:.1f}" for i, v in enumerate(rms)}
    if not spec.empty:
        freq = spec["freq_hz"].to_numpy()
        power = 10 ** (spec.drop(columns="freq_hz") / 10)  # the chart's dB back to power
        half = power.cumsum() >= power.sum() / 2  # the median frequency halves a channel's power
        columns["spectrum peak (Hz)"] = {c: f"{freq[power[c].to_numpy().argmax()]:.0f}" for c in power}
        columns["median frequency (Hz)"] = {c: f"{freq[half[c].to_numpy().argmax()]:.0f}" for c in power}
    channels = list(dict.fromkeys(c for col in columns.values() for c in col))  # ch0, ch1, ..., ch10 in order
    with st.expander("These figures as a table"):
        st.table(pd.DataFrame({k: [v.get(c, "—") for c in channels] for k, v in columns.items()},
                              index=pd.Index(channels, name="channel")))


def export(device_id: int, t0: datetime, t1: datetime, intervals: list, what: str, n: int) -> None:
    if n > data.MAX_EXPORT_SAMPLES:
        st.caption(f"CSV export is limited to {data.MAX_EXPORT_SAMPLES:,} samples; this range has {n:,}. "
                   "Narrow the time range to export it.")
        return
    st.download_button(
        f"Download {n:,} samples as CSV", data=lambda: data.export_csv(device_id, t0, t1, intervals),
        file_name=f"semg-device{device_id}-{t0:%Y%m%dT%H%M%S}.csv", mime="text/csv", key="review_csv", icon=":material/download:",
        disabled=n == 0, help=f"Raw samples of the {what} with their label (empty outside labelled intervals)",
    )


def page() -> None:
    user = ui.pick_user()
    if not user:
        return
    mode = st.radio("Review", ["Session", "Time range"], horizontal=True, key="review_mode")
    chosen = choose_session(user) if mode == "Session" else choose_range(user)
    if not chosen:
        return
    device_id, t0, t1, intervals, video, what = chosen
    device = next((d for d in data.list_devices(user["id"]) if d["id"] == device_id), None)
    n_ch = device["channel_count"] if device else 8
    channels = st.multiselect("Channels", list(range(n_ch)), default=list(range(n_ch)), key=f"review_ch_{device_id}",
                              format_func=lambda c: f"ch{c}")
    views.signal_review(device_id, t0, t1, intervals=intervals, video=video, key=f"review_{what}",
                        channels=channels or None)
    if n := data.range_samples(device_id, t0, t1):
        analysis(device_id, t0, t1, intervals)
        export(device_id, t0, t1, intervals, what, n)


with ui.guard():
    page()
