"""A simulated person wearing the armband, for the end-to-end test.

It is testing/udpsim.py's synthetic binary device (signed packets to the real udpserver), run in a thread.
It rests until told to follow a capture session; then it holds each gesture exactly when the UI's cue shows
it (the session's started_at plus the planned offsets, which is how the capture page times its cues), so the
labels the UI stores match what the muscles "did". Afterwards it can keep cycling gestures for live tests.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

from testing.emgsynth import EmgSynth, Interval, Schedule
from testing.udpsim import SimDevice, Simulation, SynthSource


class SimulatedWearer:
    def __init__(self, device_id: int, key_hex: str, channels: int, rate_hz: float, port: int,
                 gestures: list[str], seed: int = 7, max_duration_s: float = 3600):
        self.source = SynthSource(EmgSynth(channels, rate_hz, seed=seed, gestures=gestures), Schedule([]))
        self.device = SimDevice("binary", channels, rate_hz, self.source, self.source.schedule, device_id=device_id,
                                key=bytes.fromhex(key_hex), boot=int(time.time()) & 0xFFFFFFFF, millis_start=1500.0)
        self.sim = Simulation([self.device], "127.0.0.1", port, batch=25)
        self.summary: dict | None = None
        self._thread = threading.Thread(target=self._run, args=(max_duration_s,), daemon=True, name="wearer")

    def _run(self, duration: float) -> None:
        self.summary = self.sim.run(duration)

    def start(self) -> SimulatedWearer:
        self._thread.start()
        while self.sim.t0_unix is None:
            time.sleep(0.01)
        return self

    def _set(self, intervals: list[Interval]) -> None:
        schedule = Schedule(intervals)
        self.source.schedule = schedule  # read at every take(): takes effect with the next samples
        self.device.schedule = schedule

    def follow_session(self, started_at: datetime, intervals: list[dict]) -> None:
        """Hold each planned interval from the session's start (seconds on the simulator's own clock)."""
        offset = started_at.timestamp() - self.sim.t0_unix
        self._set([Interval(i["kind"], i["label"], offset + i["planned_start_ms"] / 1000,
                            offset + i["planned_end_ms"] / 1000, int(i["repetition"])) for i in intervals])

    def cycle(self, gestures: list[str], hold_s: float = 3.0, rest_s: float = 2.0, repetitions: int = 50) -> None:
        """From now on: rest, gesture, rest, next gesture, ... (for watching live decisions)."""
        offset = time.time() - self.sim.t0_unix
        plan = Schedule.cycles(gestures, repetitions, hold_s, rest_s).intervals
        self._set([Interval(i.kind, i.label, offset + i.start_s, offset + i.end_s, i.repetition) for i in plan])

    def label_at(self, unix_time: float) -> str:
        return self.device.schedule.label_at(unix_time - self.sim.t0_unix)

    def stop(self) -> dict | None:
        self.device.done = True  # the simulation loop ends once every device is done
        self._thread.join(10)
        return self.summary
