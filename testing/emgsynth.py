"""Synthetic surface-EMG that a model can learn from: used by the simulators and the demo data loader.

Each gesture activates the channels with its own amplitude pattern (per user: a different seed gives a
different "anatomy"); the signal is band-limited noise (20..450 Hz, capped below Nyquist) whose envelope
follows the pattern of the gesture being held, ramps in and out like a real contraction, fluctuates
in force, drifts slowly per channel (electrode contact, fatigue), and sits on electrode noise, a little mains hum and the ADC's mid-scale offset. Rest has
only a faint baseline activity. A `Schedule` says which gesture is held when; it uses the same interval
layout as the capture sessions (semg.repo.plan_intervals), so a capture plan can drive the simulator and
the simulator's labels can be checked against it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import signal

REST = "REST"
DEFAULT_GESTURES = ("fist", "open", "wrist_flexion", "wrist_extension")


@dataclass(frozen=True)
class Interval:
    kind: str          # 'rest' | 'gesture'
    label: str         # gesture name or 'REST'
    start_s: float     # from the start of the schedule
    end_s: float
    repetition: int = 0

    def to_plan(self, ordinal: int) -> dict:
        return {"ordinal": ordinal, "kind": self.kind, "label": self.label, "repetition": self.repetition,
                "planned_start_ms": round(self.start_s * 1000), "planned_end_ms": round(self.end_s * 1000)}


class Schedule:
    """Which gesture is held when, in seconds from the start; REST outside every interval."""

    def __init__(self, intervals: list[Interval]):
        self.intervals = sorted(intervals, key=lambda i: i.start_s)
        self._starts = np.array([i.start_s for i in self.intervals])
        self._ends = np.array([i.end_s for i in self.intervals])

    @classmethod
    def cycles(cls, gestures=DEFAULT_GESTURES, repetitions: int = 3, hold_s: float = 3.0, rest_s: float = 2.0
               ) -> Schedule:
        """The capture sessions' layout: per repetition, each gesture after a rest; a final rest."""
        from semg.repo import plan_intervals
        return cls.from_plan(plan_intervals(list(gestures), repetitions, hold_s, rest_s))

    @classmethod
    def from_plan(cls, plan: list[dict]) -> Schedule:
        """From session_intervals-like dicts (kind, label, repetition, planned_start_ms, planned_end_ms)."""
        return cls([Interval(p["kind"], p["label"] if p["kind"] == "gesture" else REST,
                             p["planned_start_ms"] / 1000.0, p["planned_end_ms"] / 1000.0, int(p.get("repetition", 0)))
                    for p in plan])

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        data = json.loads(Path(path).read_text())
        items = data["intervals"] if isinstance(data, dict) else data
        if items and "planned_start_ms" in items[0]:
            return cls.from_plan(items)
        return cls([Interval(i["kind"], i["label"], float(i["start_s"]), float(i["end_s"]), int(i.get("repetition", 0)))
                    for i in items])

    @property
    def duration_s(self) -> float:
        return float(self._ends.max()) if len(self._ends) else 0.0

    @property
    def gestures(self) -> list[str]:
        return sorted({i.label for i in self.intervals if i.kind == "gesture"})

    def labels_at(self, t_s: np.ndarray) -> np.ndarray:
        """Label of each time (s from the start): the interval containing it, REST elsewhere."""
        t = np.asarray(t_s, dtype=np.float64)
        out = np.full(t.shape, REST, dtype=object)
        if not len(self.intervals):
            return out
        idx = np.searchsorted(self._starts, t, side="right") - 1
        ok = (idx >= 0) & (t < self._ends[np.clip(idx, 0, None)])
        labels = np.array([i.label for i in self.intervals], dtype=object)
        out[ok] = labels[idx[ok]]
        return out

    def label_at(self, t_s: float) -> str:
        return str(self.labels_at(np.array([t_s]))[0])

    def to_plan(self) -> list[dict]:
        return [i.to_plan(k) for k, i in enumerate(self.intervals)]

    def to_json(self, t0_unix: float | None = None) -> dict:
        """Intervals with relative seconds, and absolute unix times when the start is known."""
        items = []
        for i in self.intervals:
            d = asdict(i)
            if t0_unix is not None:
                d["start_time"] = t0_unix + i.start_s
                d["end_time"] = t0_unix + i.end_s
            items.append(d)
        return {"t0_unix": t0_unix, "duration_s": self.duration_s, "intervals": items}


def _stable_seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


class EmgSynth:
    """Streaming generator for one device: call `generate(n)` repeatedly; filter state carries over."""

    def __init__(self, channels: int = 4, rate_hz: float = 500.0, seed: int = 0, gestures=DEFAULT_GESTURES,
                 offset: int = 2048, full_scale: int = 4095, gain: float = 350.0, noise: float = 12.0,
                 hum: float = 4.0, ramp_s: float = 0.12):
        self.channels, self.rate = channels, float(rate_hz)
        self.seed = seed
        self.offset, self.full_scale = offset, full_scale
        self.gain, self.noise, self.hum = gain, noise, hum
        self.rng = np.random.default_rng(seed)
        self._patterns: dict[str, np.ndarray] = {}
        self._mains: dict[str, tuple] = {}  # gesture -> the channels it drives (in the order they were drawn)
        for g in gestures:
            self.pattern(g)
        nyq = self.rate / 2
        lo, hi = min(20.0, 0.2 * nyq), min(450.0, 0.9 * nyq)
        self._sos = signal.butter(4, [lo / nyq, hi / nyq], btype="bandpass", output="sos")
        self._zi = np.zeros((self._sos.shape[0], 2, channels))
        self._env = np.zeros(channels)              # current contraction envelope per channel
        self._alpha = 1.0 - np.exp(-1.0 / (ramp_s * self.rate))
        self._force_phase = self.rng.uniform(0, 2 * np.pi, channels)
        # electrode contact and fatigue drift slowly: per-channel gain wanders +-15 % over 20..60 s
        self._drift_period = self.rng.uniform(20.0, 60.0, channels)
        self._drift_phase = self.rng.uniform(0, 2 * np.pi, channels)
        self._n = 0

    def pattern(self, label: str) -> np.ndarray:
        """Per-channel activation (0..1) of a gesture for this user; REST is a faint baseline."""
        if label == REST:
            return np.full(self.channels, 0.03)
        p = self._patterns.get(label)
        if p is None:
            # Redraw while another gesture already drives the same main channels (when there are enough
            # channels to tell them apart), so gestures stay separable like distinct muscle groups.
            used = list(self._mains.values())
            for attempt in range(50):
                rng = np.random.default_rng(_stable_seed(self.seed, label, attempt))
                p = rng.uniform(0.05, 0.3, self.channels)
                k = int(rng.integers(1, max(2, self.channels // 2) + 1))
                main = np.sort(rng.choice(self.channels, size=min(k, self.channels), replace=False))
                p[main] = rng.uniform(0.6, 1.0, len(main))
                if tuple(main) not in used:
                    break
            else:
                # Too few channels for a muscle group of its own (a single sensor): told apart by force, as a
                # one-channel user does it (half the level of the last gesture on these channels), not by levels
                # within one another's force fluctuation.
                same = [g for g, m in self._mains.items() if m == tuple(main)]
                p[main] = self._patterns[same[-1]][main] * 0.5
            self._patterns[label] = p
            self._mains[label] = tuple(main)
        return p

    def generate(self, n: int, labels) -> np.ndarray:
        """Next n samples (n, channels) int16 while the given label(s) are held (a str or n labels)."""
        if isinstance(labels, str):
            target = np.broadcast_to(self.pattern(labels), (n, self.channels))
        else:
            uniq = {lab: self.pattern(lab) for lab in set(labels)}
            target = np.stack([uniq[lab] for lab in labels]) if n else np.zeros((0, self.channels))
        # first-order ramp towards the target activation: contractions build up and relax over ~ramp_s
        a = self._alpha
        env, zf = signal.lfilter([a], [1.0, a - 1.0], target, axis=0, zi=((1.0 - a) * self._env)[None, :])
        self._env = env[-1] if n else self._env
        t = (self._n + np.arange(n)) / self.rate
        force = 1.0 + 0.2 * np.sin(2 * np.pi * 1.3 * t[:, None] + self._force_phase)  # slow force fluctuation
        force *= 1.0 + 0.15 * np.sin(2 * np.pi * t[:, None] / self._drift_period + self._drift_phase)
        white = self.rng.standard_normal((n, self.channels))
        band, self._zi = signal.sosfilt(self._sos, white, axis=0, zi=self._zi)
        x = band * env * force * self.gain
        x += self.rng.standard_normal((n, self.channels)) * self.noise
        x += self.hum * np.sin(2 * np.pi * 50.0 * t)[:, None]
        self._n += n
        return np.clip(np.rint(x + self.offset), 0 if self.offset else -32768,
                       self.full_scale if self.offset else 32767).astype(np.int16)

    def generate_schedule(self, schedule: Schedule, t0_s: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n samples starting t0_s seconds into the schedule -> (values, labels)."""
        labels = schedule.labels_at(t0_s + np.arange(n) / self.rate)
        return self.generate(n, labels), labels
