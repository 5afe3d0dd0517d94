"""Plotly figures shared by the pages (no data access here: pages pass what data.py returned)."""

from __future__ import annotations

import html
import zlib
from collections.abc import Sequence
from datetime import datetime

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from semg.repo import GESTURE_LIBRARY

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


# Distinct, grey-free colours for gestures (grey is rest); library gestures take them in library order.
GESTURE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                  "#bcbd22", "#393b79", "#e7ba52", "#843c39"]
LIBRARY_ORDER = [g["name"] for g in GESTURE_LIBRARY]


def label_color(label: str, labels: Sequence[str] = ()) -> str:
    """The same colour for a gesture on every page (derived from its name, not from what else is shown)."""
    if label.upper() in ("REST", "UNKNOWN"):
        return "#bbbbbb" if label.upper() == "REST" else "#555555"
    if label in LIBRARY_ORDER:  # the common gestures never share a colour
        return GESTURE_COLORS[LIBRARY_ORDER.index(label) % len(GESTURE_COLORS)]
    return GESTURE_COLORS[zlib.crc32(label.encode()) % len(GESTURE_COLORS)]


def _text(name: str) -> str:
    """A gesture name as plotly text: plotly draws <b>, <br>, <a href=...> and entities in legends, ticks and hovers."""
    return html.escape(name, quote=False)


def _tight(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.08),
                      hovermode="x unified")
    return fig


def signal_figure(frame: pd.DataFrame, channels: Sequence[int] | None = None, *, stacked: bool = True,
                  intervals: Sequence[dict] = (), t0: datetime | None = None, cursor_s: float | None = None,
                  title: str = "", height_per_channel: int = 90, x_title: str = "seconds") -> go.Figure:
    """One trace per channel, stacked in rows (default) or overlaid; labelled intervals shaded behind.

    Built as one figure spec, and the shading as one filled trace per label on a hidden full-height axis
    under the (transparent) channel rows: make_subplots, per-row updates and one layout shape per interval
    cost plotly ~10-30x more (seconds for a long session)."""
    cols = [c for c in frame.columns if c.startswith("ch")]
    if channels is not None:
        cols = [f"ch{c}" for c in channels if f"ch{c}" in frame.columns]
    rows = len(cols) if stacked and cols else 1
    gap = 0.012
    h = (1 - gap * (rows - 1)) / rows
    ticks = 4 if height_per_channel >= 80 else 3  # short rows: more ticks would overlap
    layout: dict = {"xaxis": {"title": {"text": x_title}, "anchor": f"y{rows + 1}"},
                    "yaxis": {"domain": [0, 1], "range": [0, 1], "visible": False, "fixedrange": True},
                    "plot_bgcolor": "rgba(0,0,0,0)", "showlegend": True}
    if title:
        layout["title"] = {"text": title}
    data = _interval_traces(intervals, t0) if t0 is not None and intervals else []
    for i, col in enumerate(cols):
        axis = f"y{(i if rows > 1 else 0) + 2}"
        data.append({"type": "scattergl", "x": frame["t"].to_numpy(), "y": frame[col].to_numpy(), "mode": "lines",
                     "name": col, "line": {"width": 1, "color": PALETTE[i % len(PALETTE)]}, "xaxis": "x",
                     "yaxis": axis, "showlegend": not stacked})
    for row in range(rows):
        top = 1 - row * (h + gap)
        layout[f"yaxis{row + 2}"] = {"domain": [max(0.0, top - h), top], "anchor": "x", "nticks": ticks,
                                     "title": {"text": cols[row] if rows > 1 else "", "standoff": 2}}
    if cursor_s is not None:
        layout["shapes"] = [dict(type="line", xref="x", yref="paper", x0=cursor_s, x1=cursor_s, y0=0, y1=1,
                                 line=dict(color="red", width=2))]
    fig = go.Figure({"data": data, "layout": layout})
    return _tight(fig, max(220, height_per_channel * rows + 60) if stacked else 320)


def _interval_traces(intervals: Sequence[dict], t0: datetime) -> list[dict]:
    """Gesture intervals (rest is the background) as one filled trace per label; discarded ones (redone, or cut
    off when a capture was left) in grey."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for iv in intervals:
        if not iv.get("started_at") or not iv.get("ended_at"):
            continue
        discarded = bool(iv.get("discarded"))
        if iv["label"].upper() == "REST" and not discarded:
            continue
        name = "discarded (not trained on)" if discarded else iv["label"]
        spans.setdefault(name, []).append(((iv["started_at"] - t0).total_seconds(),
                                           (iv["ended_at"] - t0).total_seconds()))
    traces = []
    for name, items in spans.items():
        xs: list = []
        ys: list = []
        for a, b in items:
            xs += [a, a, b, b, None]
            ys += [0, 1, 1, 0, None]
        color = "#999999" if name.startswith("discarded") else label_color(name)
        traces.append({"type": "scatter", "x": xs, "y": ys, "fill": "toself", "mode": "none", "name": _text(name),
                       "fillcolor": _rgba(color, 0.2), "xaxis": "x", "yaxis": "y", "hoverinfo": "skip"})
    return traces


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def rms_figure(rms: Sequence[float], title: str = "RMS per channel") -> go.Figure:
    fig = go.Figure(go.Bar(x=[f"ch{i}" for i in range(len(rms))], y=list(rms),
                           marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(rms))]))
    fig.update_layout(title=title, yaxis_title="RMS (ADC units)")
    return _tight(fig, 260)


def spectrum_figure(frame: pd.DataFrame, title: str = "Power spectrum per channel") -> go.Figure:
    fig = go.Figure()
    for i, col in enumerate(c for c in frame.columns if c.startswith("ch")):
        fig.add_trace(go.Scatter(x=frame["freq_hz"], y=frame[col], mode="lines", name=col,
                                 line=dict(width=1.2, color=PALETTE[i % len(PALETTE)])))
    fig.update_layout(title=title, xaxis_title="Hz", yaxis_title="dB")
    return _tight(fig, 300)


def curves_figure(epochs: Sequence[dict]) -> go.Figure:
    """Loss and accuracy per epoch from a job's epoch_metrics: training vs validation while the epoch count is
    chosen, then (val_* empty) the final retraining on all data, drawn as its own grey curves."""
    df = pd.DataFrame(list(epochs))
    if "epoch" not in df:
        df["epoch"] = range(1, len(df) + 1)
    has_val = df["val_loss"].notna() if "val_loss" in df else pd.Series(False, index=df.index)
    # the retraining phase: epochs after the last validated one
    last_val = df.index[has_val].max() if has_val.any() else -1
    select, full = df[df.index <= last_val], df[df.index > last_val]
    if not has_val.any():
        select, full = df, df.iloc[0:0]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    traces = [(select, "train_loss", "train", (1, 1), PALETTE[0], None),
              (select, "val_loss", "validation", (1, 1), PALETTE[1], "dash"),
              (select, "train_acc", "train", (1, 2), PALETTE[0], None),
              (select, "val_acc", "validation", (1, 2), PALETTE[1], "dash"),
              (full, "train_loss", "retrain on all data", (1, 1), "#888888", "dot"),
              (full, "train_acc", "retrain on all data", (1, 2), "#888888", "dot")]
    shown = set()
    for frame, col, name, (r, c), color, dash in traces:
        if col in frame and frame[col].notna().any():
            fig.add_trace(go.Scatter(x=frame["epoch"], y=frame[col], name=name, mode="lines+markers",
                                     legendgroup=name, showlegend=name not in shown,
                                     line=dict(dash=dash, color=color), marker=dict(size=5)), row=r, col=c)
            shown.add(name)
    fig.update_xaxes(title_text="epoch")
    fig = _tight(fig, 320)
    fig.update_layout(legend=dict(orientation="h", y=-0.3), margin=dict(t=40, b=40))
    return fig


def confusion_figure(classes: Sequence[str], matrix: Sequence[Sequence[float]],
                     title: str = "Confusion matrix (held-out windows)") -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix, x=[_text(c) for c in classes], y=[_text(c) for c in classes], colorscale="Blues", text=matrix,
                               texttemplate="%{text}", showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed")
    return _tight(fig, 80 + 45 * max(3, len(classes)))


def per_class_figure(per_class: dict) -> go.Figure:
    names = list(per_class)
    vals = [per_class[n] if per_class[n] is not None else 0 for n in names]
    fig = go.Figure(go.Bar(x=[_text(n) for n in names], y=vals, text=[f"{v:.0%}" for v in vals], textposition="auto"))
    fig.update_layout(title="Per-class accuracy", yaxis=dict(range=[0, 1], tickformat=".0%"))
    return _tight(fig, 280)


def timeline_figure(pred: pd.DataFrame, now: datetime, window_s: float) -> go.Figure:
    """Decisions over the last window: one marker per decision, coloured by gesture, height = confidence."""
    fig = go.Figure()
    labels = sorted(pred["gesture"].unique()) if not pred.empty else []
    for g in labels:
        d = pred[pred["gesture"] == g]
        x = [(t - now).total_seconds() for t in d["decided_at"]]
        fig.add_trace(go.Scatter(x=x, y=d["confidence"], mode="markers", name=_text(g),
                                 marker=dict(size=9, color=label_color(g, labels))))
    fig.update_layout(xaxis=dict(range=[-window_s, 0], title="seconds ago"), yaxis=dict(range=[0, 1.05],
                      title="confidence"))
    fig = _tight(fig, 260)
    fig.update_layout(title="Decisions (colour = gesture)", legend=dict(orientation="h", y=-0.35),
                      margin=dict(t=40, b=30))
    return fig


def latency_figure(pred: pd.DataFrame, now: datetime) -> go.Figure:
    x = [(t - now).total_seconds() for t in pred["decided_at"]]
    fig = go.Figure(go.Scatter(x=x, y=pred["latency_ms"], mode="markers", marker=dict(size=5)))
    fig.update_layout(title="Latency: decision time - sample receive time", xaxis_title="seconds ago",
                      yaxis_title="ms")
    return _tight(fig, 220)
