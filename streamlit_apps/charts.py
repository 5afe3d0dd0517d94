"""Plotly figures shared by the pages (no data access here: pages pass what data.py returned)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def label_color(label: str, labels: Sequence[str]) -> str:
    if label.upper() == "REST":
        return "#bbbbbb"
    others = sorted({x for x in labels if x.upper() != "REST"})
    return PALETTE[others.index(label) % len(PALETTE)] if label in others else PALETTE[0]


def _tight(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.08),
                      hovermode="x unified")
    return fig


def signal_figure(frame: pd.DataFrame, channels: Sequence[int] | None = None, *, stacked: bool = True,
                  intervals: Sequence[dict] = (), t0: datetime | None = None, cursor_s: float | None = None,
                  title: str = "", height_per_channel: int = 90, x_title: str = "seconds") -> go.Figure:
    """One trace per channel, stacked in rows (default) or overlaid; labelled intervals shaded behind."""
    cols = [c for c in frame.columns if c.startswith("ch")]
    if channels is not None:
        cols = [f"ch{c}" for c in channels if f"ch{c}" in frame.columns]
    rows = len(cols) if stacked and cols else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.01) if rows > 1 else go.Figure()
    for i, col in enumerate(cols):
        trace = go.Scattergl(x=frame["t"], y=frame[col], mode="lines", name=col, line=dict(width=1),
                             marker=dict(color=PALETTE[i % len(PALETTE)]))
        if rows > 1:
            fig.add_trace(trace, row=i + 1, col=1)
            fig.update_yaxes(title_text=col, row=i + 1, col=1, title_standoff=2)
        else:
            fig.add_trace(trace)
    shapes, notes = _interval_shapes(intervals, t0) if t0 is not None and intervals else ([], [])
    if cursor_s is not None:
        shapes.append(dict(type="line", xref="x", yref="paper", x0=cursor_s, x1=cursor_s, y0=0, y1=1,
                           line=dict(color="red", width=2)))
    if shapes:
        # One layout update: plotly's add_vrect/add_vline per shape is quadratic (minutes for 200 intervals).
        fig.update_layout(shapes=shapes, annotations=list(fig.layout.annotations) + notes)
    fig.update_xaxes(title_text=x_title, row=rows, col=1) if rows > 1 else fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(nticks=4)  # stacked rows are short: more ticks would overlap
    fig.update_layout(title=title or None, showlegend=not stacked)
    return _tight(fig, max(220, height_per_channel * rows + 60) if stacked else 320)


def _interval_shapes(intervals: Sequence[dict], t0: datetime, max_notes: int = 60) -> tuple[list, list]:
    """Shaded gesture intervals (rest is the background) spanning all rows, with a label on each when few."""
    labels = [iv["label"] for iv in intervals]
    shown = [iv for iv in intervals if iv.get("started_at") and iv.get("ended_at")
             and (iv["label"].upper() != "REST" or iv.get("discarded"))]
    shapes, notes = [], []
    for iv in shown:
        a, b = (iv["started_at"] - t0).total_seconds(), (iv["ended_at"] - t0).total_seconds()
        discarded = bool(iv.get("discarded"))
        shapes.append(dict(type="rect", xref="x", yref="paper", x0=a, x1=b, y0=0, y1=1, line_width=0, layer="below",
                           fillcolor="#999999" if discarded else label_color(iv["label"], labels),
                           opacity=0.12 if discarded else 0.2))
        if len(shown) <= max_notes:
            notes.append(dict(x=a, y=1, xref="x", yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                              text=("redone " if discarded else "") + iv["label"], font=dict(size=10)))
    return shapes, notes


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
    """Loss and accuracy per epoch, training vs validation, from a job's epoch_metrics."""
    df = pd.DataFrame(list(epochs))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    if "epoch" not in df:
        df["epoch"] = range(1, len(df) + 1)
    for col, (r, c), dash in [("train_loss", (1, 1), None), ("val_loss", (1, 1), "dash"),
                              ("train_acc", (1, 2), None), ("val_acc", (1, 2), "dash")]:
        if col in df:
            fig.add_trace(go.Scatter(x=df["epoch"], y=df[col], name=col, mode="lines+markers",
                                     line=dict(dash=dash)), row=r, col=c)
    fig.update_xaxes(title_text="epoch")
    return _tight(fig, 300)


def confusion_figure(classes: Sequence[str], matrix: Sequence[Sequence[float]]) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix, x=list(classes), y=list(classes), colorscale="Blues", text=matrix,
                               texttemplate="%{text}", showscale=False))
    fig.update_layout(title="Confusion matrix (held-out windows)", xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed")
    return _tight(fig, 80 + 45 * max(3, len(classes)))


def per_class_figure(per_class: dict) -> go.Figure:
    names = list(per_class)
    vals = [per_class[n] if per_class[n] is not None else 0 for n in names]
    fig = go.Figure(go.Bar(x=names, y=vals, text=[f"{v:.0%}" for v in vals], textposition="auto"))
    fig.update_layout(title="Per-class accuracy", yaxis=dict(range=[0, 1], tickformat=".0%"))
    return _tight(fig, 280)


def timeline_figure(pred: pd.DataFrame, now: datetime, window_s: float) -> go.Figure:
    """Decisions over the last window: one marker per decision, coloured by gesture, height = confidence."""
    fig = go.Figure()
    labels = sorted(pred["gesture"].unique()) if not pred.empty else []
    for g in labels:
        d = pred[pred["gesture"] == g]
        x = [(t - now).total_seconds() for t in d["decided_at"]]
        fig.add_trace(go.Scatter(x=x, y=d["confidence"], mode="markers", name=g,
                                 marker=dict(size=9, color=label_color(g, labels))))
    fig.update_layout(xaxis=dict(range=[-window_s, 0], title="seconds ago"), yaxis=dict(range=[0, 1.05],
                      title="confidence"))
    return _tight(fig, 240)


def latency_figure(pred: pd.DataFrame, now: datetime) -> go.Figure:
    x = [(t - now).total_seconds() for t in pred["decided_at"]]
    fig = go.Figure(go.Scatter(x=x, y=pred["latency_ms"], mode="markers", marker=dict(size=5)))
    fig.update_layout(title="Latency: decision time - sample receive time", xaxis_title="seconds ago",
                      yaxis_title="ms")
    return _tight(fig, 220)
