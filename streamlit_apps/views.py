"""UI pieces used by more than one page (data comes from data.py, pictures from charts.py)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime

import charts
import data
import streamlit as st


def webvtt(intervals: Sequence[dict], video_start: datetime) -> str:
    """Subtitles naming each labelled interval, timed relative to the video's first frame."""
    def ts(sec: float) -> str:
        sec = max(0.0, sec)
        return f"{int(sec // 3600):02d}:{int(sec % 3600 // 60):02d}:{sec % 60:06.3f}"

    lines = ["WEBVTT", ""]
    for iv in intervals:
        if not iv.get("started_at") or not iv.get("ended_at"):
            continue
        a, b = (iv["started_at"] - video_start).total_seconds(), (iv["ended_at"] - video_start).total_seconds()
        if b <= 0:
            continue
        # cue text is markup (<b>, &amp;), and a line holding "-->" or a blank line would end the cue early
        label = html.escape(" ".join(iv["label"].splitlines()), quote=False)
        text = ("[discarded] " if iv.get("discarded") else "") + (
            "rest" if iv["label"].upper() == "REST" else f"{label} · rep {int(iv.get('repetition', 0)) + 1}")
        lines += [f"{ts(a)} --> {ts(b)}", text, ""]
    return "\n".join(lines)


def signal_review(device_id: int, t0: datetime, t1: datetime, *, intervals: Sequence[dict] = (),
                  video: dict | None = None, key: str, channels: Sequence[int] | None = None) -> None:
    """Signals of [t0, t1] with labels shaded, a time cursor, and the video at the cursor's moment."""
    duration = max(0.1, (t1 - t0).total_seconds())
    sig = data.signal(device_id, t0, t1)
    if sig.empty:
        st.info("No samples from this device in this time range: was the armband streaming? "
                "(Device status is on the Gesture Management page.)")
        return
    has_video = bool(video and video.get("file"))
    cursor = st.slider("Time cursor (s from start)", 0.0, float(round(duration, 1)), 0.0, step=0.1,
                       key=f"{key}_cursor", help="Moves the red line and starts the video at the same moment")
    plot_col, video_col = st.columns([3, 2]) if has_video else (st.container(), None)
    with plot_col:
        how = ("every sample" if sig.mode == "raw" else
               f"min/max envelope of {sig.samples:,} samples (downsampled in the database)")
        st.caption(f"{sig.samples:,} samples · {sig.channels} channels · {how}")
        fig = charts.signal_figure(sig.frame, channels, intervals=intervals, t0=t0, cursor_s=cursor,
                                   x_title="seconds from start", height_per_channel=90)
        st.plotly_chart(fig, key=f"{key}_plot")
    if has_video:
        with video_col:
            offset = (t0 - video["started_at"]).total_seconds() + cursor
            st.video(str(video["file"]), format=video.get("mime_type") or "video/webm",
                     start_time=max(0.0, round(offset, 1)), subtitles=webvtt(intervals, video["started_at"]))
            if offset < 0:  # the cursor is before the video began: it shows its first frame, not the red line's
                st.caption(f"The video starts {-offset:.1f} s after the red line: move the cursor to "
                           f"{cursor - offset:.1f} s or later to see the same moment. Labels are shown as subtitles.")
            else:
                st.caption(f"Video frame at {offset:.1f} s of the recording = the red line. "
                           "Labels are shown as subtitles.")
    elif video is not None:
        st.caption("The video file of this session is missing from the video folder.")
