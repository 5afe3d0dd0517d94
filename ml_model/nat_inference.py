"""Live inference worker: NATS samples -> per-user windows -> batched /predict -> decisions on NATS and in PostgreSQL.

    python -m ml_model.nat_inference [--votes 3] [--min-confidence 0.5] [--unsure-label UNKNOWN]

Flow. Each user's `emg.samples.<userid>` stream is appended to a per-user numpy buffer; as soon as a window
of the user's model is complete it is queued. One batcher task sends everything queued, for all users, in
one `/predict` call (the API runs all those models in one stacked forward pass) over a persistent HTTP
connection, while the NATS handlers keep appending; the answers are smoothed (majority vote + confidence
threshold, ml_model.postprocessing), published on `emg.predictions.<userid>` and stored in batches.

Windows. A window ends at every sample whose sequence number s satisfies (s + 1) % step == 0 and covers the
`window` samples up to it (window/step in samples from the model's metadata). The grid hangs on the
device's own sequence numbers, so the set of decisions is the same whichever worker sees the samples and
however the samples are split into messages. Samples already seen in the current run (same device, boot
and lower sequence number: the UDP server publishes at least once) are skipped, so no window is decided
twice. A short forward sequence gap (a lost packet: at most a quarter of a window, MAX_BRIDGE_FRACTION) is
bridged: windows across it hold the `window` received samples before their end, spanning at most a quarter
window of lost ones, so one lost packet does not silence recognition for a whole window; a longer gap or a new
device/boot resets that user's buffer and vote history: the next decision comes once a full window has arrived
again. Only consecutive windows vote together: after windows that got no decision (too old, /predict failed)
the votes start afresh.

Electrodes. Each stream judges the model's channels over the last second (ChannelWatch, pp.channel_faults): a
channel flat or railing there is read as its training level, named in the decisions (channel_faults) and logged
once when the spell starts and once when it ends; with more than a quarter of them failed (pp.too_many_faults)
the decisions are the unsure label.

Retention. Decisions older than SEMG_PREDICTION_RETENTION_DAYS are deleted shortly after start and then hourly, in
a thread on a connection of its own, in short batches, by one worker at a time (recordings are never pruned).

Several workers. Each user's stream must reach a single worker (a window needs all its samples), so users
are partitioned deterministically: every worker holds one PostgreSQL advisory lock "slot" (released when it
dies), sees the live slots, and owns the users that rendezvous hashing assigns to its slot. It subscribes to
`emg.samples.<userid>` of its own users only -- in the queue group `inference`, so that while ownership
moves (a worker joined or died; workers notice within MEMBERSHIP_POLL_S) a message still reaches exactly one
worker: at worst some windows across the hand-over are lost, never decided twice. Only users that have a
model are subscribed (re-checked on models.updated and every CATALOGUE_POLL_S).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import io
import itertools
import logging
import math
import os
import socket
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import numpy as np
import orjson
import psycopg2
from pydantic import ValidationError

from ml_model import postprocessing
from ml_model import preprocessing as pp
from ml_model.preprocessing import MAX_BRIDGE_FRACTION, max_bridged
from ml_model.rest.schemas import MAX_PREDICT_ITEMS
from semg import db, natsio, procs, repo, secrets, tls
from semg.config import Settings, settings_or_exit
from semg.messages import (
    MODELS_UPDATED,
    ChannelFault,
    ModelUpdated,
    PredictionMessage,
    SamplesMessage,
    predictions_subject,
    published_time,
    samples_subject,
)

log = logging.getLogger("semg.inference")

QUEUE_GROUP = "inference"
MEMBERSHIP_POLL_S = 1.0
CATALOGUE_POLL_S = 30.0
# PostgreSQL advisory-lock namespace of the worker slots (first key of the two-int form).
SLOT_LOCK_NS = 0x5E3C1F
MAX_SLOTS = 64
STORE_INTERVAL_S = 0.5
# A user's second device is ignored while the first streams (two interleaved streams would reset each other
# on every message and nothing would be decided); it takes over after this long without the first.
DEVICE_HANDOVER_S = 1.0
# How fast a device clock may fall behind the server's, or the UDP server host's clock behind this one's (s per s),
# for `UserStream.taken_times` and `HostClock`: far above a crystal's drift (~50 ppm) or NTP's slew
# (500 ppm), far below what a backlog looks like (a sensor that kept samples through a WiFi outage sends them
# seconds after they were taken, at once, with fresh receive times).
CLOCK_RISE = 1e-3
# Every delivery this long slower than the HostClock anchor by over CLOCK_STEP_MIN_S: the UDP server host's clock
# stepped back (NTP starting late), not a backlog (published in seconds, and live devices' deliveries interleave
# with it): re-anchor. Until then its windows look stale; without it, CLOCK_RISE would take an hour per 3.6 s.
CLOCK_STEP_BACK_S = 60.0
CLOCK_STEP_MIN_S = 1.0
MAX_STORE_BACKLOG = 200_000
STATS_INTERVAL_S = float(os.environ.get("SEMG_INFERENCE_STATS_S", "60"))
# Decisions older than SEMG_PREDICTION_RETENTION_DAYS are deleted shortly after start, then hourly (one worker at
# a time, semg.repo.prune_predictions), 10,000 per short transaction with a pause between them that leaves the
# database to ingestion and live storing (about 370,000 rows/s without it on the 2-core reference machine).
PRUNE_FIRST_S = float(os.environ.get("SEMG_INFERENCE_PRUNE_FIRST_S", "60"))
PRUNE_INTERVAL_S = 3600.0
PRUNE_PAUSE_S = 0.02
# Live electrode check (ChannelWatch): judged every FAULT_CHECK_S of samples over the last pp.FAULT_WINDOW_S; a
# spell ends after FAULT_CLEAR_S of the channel looking fine.
FAULT_CHECK_S = 0.25
FAULT_CLEAR_S = 1.0
# What a decision does while channels look failed. Measured on the Myo set (bench-like: train reps 0-2, test rep
# 3, Female0/Male3/Female4): one channel stuck at its rail (127) took accuracy from 90-99 % to 14-45 % (chance is
# 14 %), one at 0 (its training level) only to 75-99 %. So a failed channel's samples are replaced by its training
# level (the mean of `channel_reference`) before /predict: with one or two of 8 channels so replaced, accuracy is
# 80-91 %, with three 72-77 %, with four 48-51 % at an unchanged mean confidence of 0.7, which the confidence
# threshold cannot catch. Hence decisions go on, flagged (channel_faults), while at most a quarter of the checked
# channels failed (pp.too_many_faults), and are the unsure label beyond it: a prosthesis must not act on a coin toss.


def _copy_text(v: Any) -> str:
    """A value in PostgreSQL's COPY text format."""
    if v is None:
        return "\\N"
    return str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# ---- model metadata -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What the worker needs of a user's served model (from GET /models)."""

    artifact_id: int
    classes: tuple[str, ...]
    n_device_channels: int
    sample_rate_hz: float
    window: int
    step: int
    # the live electrode check (pp.channel_reference): device channels judged, their training level and spread
    check_channels: tuple[int, ...] = ()
    check_mean: tuple[float, ...] = ()
    check_std: tuple[float, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int, float]:
        """What the windows depend on (not the weights or classes)."""
        return self.n_device_channels, self.window, self.step, self.sample_rate_hz

    @classmethod
    def from_api(cls, d: dict[str, Any]) -> ModelSpec:
        ref = d.get("channel_reference") or {"channels": (), "mean": (), "std": ()}
        return cls(int(d["artifact_id"]), tuple(d["classes"]), int(d["n_device_channels"]),
                   float(d["sample_rate_hz"]), int(d["window"]), int(d["step"]), tuple(ref["channels"]),
                   tuple(ref["mean"]), tuple(ref["std"]))


# ---- per-user stream buffer -------------------------------------------------------------------------
class HostClock:
    """This worker's monotonic clock minus the UDP server host's clock, plus the fastest publication seen.

    A message that arrived here at `arrival` (this worker's clock) and whose newest sample the server received
    at `recv` (its clock): the smallest difference seen (allowed to rise by CLOCK_RISE) is the offset between the
    two hosts' clocks plus the fastest path from receiving to delivering here. So windows age on one clock
    whether or not the hosts' clocks agree (a worker on another host, no NTP), and a backlog the server
    publishes late (after a NATS/PostgreSQL outage) still shows its age by its receive times. One per worker:
    any live device anchors it, also for a device whose first messages here are a backlog.

    A message with the UDP server's publish time (Semg-Published header) is seen at that time instead: it is on
    the same clock and later than the receive times, so a backlog the server held shows its age even when it is
    all a fresh worker has seen (a restart after a power loss), whatever this host's clock says.
    """

    def __init__(self) -> None:
        self.lifted: float | None = None  # running min of arrival - recv - CLOCK_RISE * arrival
        self._slow_since: float | None = None  # arrival since which every delivery was slower than the anchor
        self._slow_min = 0.0  # the smallest `lifted` of those deliveries

    def see(self, arrival: float, recv: float) -> None:
        lifted = arrival - recv - CLOCK_RISE * arrival
        if self.lifted is None or lifted < self.lifted + CLOCK_STEP_MIN_S:
            if self.lifted is None or lifted < self.lifted:
                self.lifted = lifted
            self._slow_since = None
        elif self._slow_since is None:
            self._slow_since, self._slow_min = arrival, lifted
        else:
            self._slow_min = min(self._slow_min, lifted)
            if arrival - self._slow_since >= CLOCK_STEP_BACK_S:  # the server's clock stepped back
                log.warning("the UDP server host's clock went back by %.1f s: windows are aged by its new time",
                            self._slow_min - self.lifted)
                self.lifted, self._slow_since = self._slow_min, None

    def offset(self, now: float) -> float:
        """Add to a server time to get this worker's monotonic time (as of `now`, this worker's clock)."""
        return self.lifted + CLOCK_RISE * now


@dataclass(frozen=True)
class Fault:
    """A spell of one failed channel: since `start_seq` (the first sample of the second that showed it)."""

    channel: int  # device channel (0-based, as the UI labels them)
    kind: str  # 'flat' | 'saturated' (pp.FAULT_NAMES)
    start_seq: int


class ChannelWatch:
    """Which of the model's channels look failed (an electrode off, stuck or railing) in the live stream.

    Keeps the last FAULT_WINDOW_S of received samples of the checked channels (a ring: pp.channel_faults
    reads their distribution, not their order) and judges them every FAULT_CHECK_S of samples. A spell starts at
    the first check that finds a channel failed and ends after FAULT_CLEAR_S of checks finding it fine (an
    electrode that touches now and then is one spell, not a warning every quarter second). `events` collects
    the spells' starts and ends for the worker's log: one line each.
    """

    def __init__(self, spec: ModelSpec):
        self.channels = np.asarray(spec.check_channels, dtype=np.intp)
        # a slice when every device channel is checked (the usual case): a view, no gather per message
        self._cols = slice(None) if self.channels.tolist() == list(range(spec.n_device_channels)) else self.channels
        self.mean = np.asarray(spec.check_mean, dtype=np.float64)
        self.std = np.asarray(spec.check_std, dtype=np.float64)
        self.size = max(2, round(pp.FAULT_WINDOW_S * spec.sample_rate_hz))
        self.every = max(1, round(FAULT_CHECK_S * spec.sample_rate_hz))
        self.clear_checks = max(1, math.ceil(FAULT_CLEAR_S / FAULT_CHECK_S))
        self.ring = np.zeros((self.size, len(self.channels)), dtype=np.float32)
        self.faults: dict[int, Fault] = {}  # device channel -> its current spell
        # (spell, None) when it starts; (spell, the last sample of the last second that showed it) when it ends
        self.events: list[tuple[Fault, int | None]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the samples and the spells (another device: its electrodes are others)."""
        self.filled = self.pos = self.unchecked = 0
        self.faults.clear()
        self._fine: dict[int, int] = {}  # device channel -> consecutive checks that found it fine
        self._last_bad: dict[int, int] = {}  # device channel -> last sample of the last check that found it failed

    def carry(self, old: ChannelWatch, last_seq: int | None) -> None:
        """Go on from `old`, the same stream's check against another model's reference (a model update): its
        samples and spells are kept and judged against this reference at once, so a channel failed at the update
        stays read as its training level (and one spell) instead of going to /predict as it is until a second of
        samples came in. Starts afresh when `old` did not keep every channel this one judges."""
        where = {c: i for i, c in enumerate(old.channels.tolist())}
        mine = self.channels.tolist()
        if old.size != self.size or not mine or any(c not in where for c in mine):
            return
        self.ring[:] = old.ring[:, [where[c] for c in mine]]
        self.filled, self.pos, self.unchecked = old.filled, old.pos, old.unchecked
        self.faults.update((c, f) for c, f in old.faults.items() if c in mine)
        self._fine.update((c, n) for c, n in old._fine.items() if c in mine)
        self._last_bad.update((c, n) for c, n in old._last_bad.items() if c in mine)
        if self.filled == self.size and last_seq is not None:
            self.unchecked = 0
            self._judge(pp.channel_faults(self.ring, self.mean, self.std), last_seq)

    def add(self, values: np.ndarray, last_seq: int) -> None:
        """values: (k, n_device_channels) newly received samples, the last one numbered `last_seq`."""
        if not len(self.channels):
            return
        k, cols = len(values), self._cols
        if k >= self.size:
            self.ring[:] = values[-self.size:, cols]
            self.pos = 0
        else:
            end = self.pos + k
            if end <= self.size:
                self.ring[self.pos:end] = values[:, cols]
            else:
                first = self.size - self.pos
                self.ring[self.pos:] = values[:first, cols]
                self.ring[:end - self.size] = values[first:, cols]
            self.pos = end % self.size
        self.filled = min(self.size, self.filled + k)
        self.unchecked += k
        if self.filled == self.size and self.unchecked >= self.every:
            self.unchecked = 0
            self._judge(pp.channel_faults(self.ring, self.mean, self.std), last_seq)

    def _judge(self, codes: np.ndarray, last_seq: int) -> None:
        for ch, code in zip(self.channels.tolist(), codes.tolist(), strict=True):
            spell = self.faults.get(ch)
            if code != pp.CHANNEL_OK:
                self._fine[ch] = 0
                self._last_bad[ch] = last_seq
                kind = pp.FAULT_NAMES[code]
                if spell is None:
                    spell = self.faults[ch] = Fault(ch, kind, last_seq - self.size + 1)
                    self.events.append((spell, None))
                elif spell.kind != kind:  # e.g. railing, then stuck: the same spell
                    self.faults[ch] = Fault(ch, kind, spell.start_seq)
            elif spell is not None:
                self._fine[ch] = self._fine.get(ch, 0) + 1
                if self._fine[ch] >= self.clear_checks:
                    del self.faults[ch]
                    self.events.append((spell, self._last_bad[ch]))

    def take_events(self) -> list[tuple[Fault, int | None]]:
        events, self.events = self.events, []
        return events


@dataclass
class Ready:
    """Windows of one user cut from one contiguous run, waiting for /predict."""

    user_id: int
    spec: ModelSpec
    device_id: int
    boot: int  # the device's boot the windows' samples come from (their sequence numbers count in it)
    windows: np.ndarray  # (n, channels, window) float32
    end_seq: np.ndarray  # (n,) sequence number of each window's last sample
    end_millis: np.ndarray  # (n,) its device clock
    end_recv: np.ndarray  # (n,) its server receive time
    end_taken: np.ndarray  # (n,) when it was taken, on the server's clock (UserStream.taken_times)
    host: HostClock  # the server's clock -> this worker's (aged when taken for /predict, by the newest estimate)
    queued_at: float  # monotonic
    epoch: int = 0  # the stream's vote epoch when cut (see UserStream.new_votes)
    faults: tuple[Fault, ...] = ()  # channels that looked failed when cut (their samples replaced, see _neutralise)
    unsure: bool = False  # too many of the checked channels failed (pp.too_many_faults): decide the unsure label

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the windows where `mask` is true."""
        self.windows, self.end_seq = self.windows[mask], self.end_seq[mask]
        self.end_millis, self.end_recv = self.end_millis[mask], self.end_recv[mask]
        self.end_taken = self.end_taken[mask]

    def merge(self, other: Ready) -> None:
        """Append the next windows of the same run (same user, model, device and epoch)."""
        self.windows = np.concatenate([self.windows, other.windows])
        self.end_seq = np.concatenate([self.end_seq, other.end_seq])
        self.end_millis = np.concatenate([self.end_millis, other.end_millis])
        self.end_recv = np.concatenate([self.end_recv, other.end_recv])
        self.end_taken = np.concatenate([self.end_taken, other.end_taken])

    def ages(self, now: float) -> np.ndarray:
        """(n,) how long ago each window's last sample was taken, at `now` (this worker's monotonic clock)."""
        return now - (self.end_taken + self.host.offset(now))


_EPOCHS = itertools.count(1)  # process-wide, so a replaced stream never reuses an epoch number


class UserStream:
    """A user's recent samples, cut into the model's windows on the absolute sequence grid."""

    def __init__(self, user_id: int, spec: ModelSpec, votes: int, host: HostClock | None = None,
                 bridge_fraction: float = MAX_BRIDGE_FRACTION):
        self.user_id = user_id
        self.bridge_fraction = bridge_fraction
        self.host = HostClock() if host is None else host
        self.spec = spec
        self.history: deque[np.ndarray] = deque(maxlen=votes)
        self.history_model: int | None = None  # the model whose probabilities are in `history`
        self.history_end: int | None = None  # sequence number of the newest window in `history`
        self.epoch = next(_EPOCHS)
        self.device_id: int | None = None
        self.boot: int | None = None
        self.next_seq: int | None = None
        self.start_seq = 0
        self.n = 0
        cap = max(4 * spec.window, 256)
        self.values = np.zeros((cap, spec.n_device_channels), dtype=np.float32)
        self.millis = np.zeros(cap, dtype=np.float64)
        self.recv = np.zeros(cap, dtype=np.float64)
        self.taken = np.zeros(cap, dtype=np.float64)
        self.lost = np.zeros(cap, dtype=bool)  # the slot of a lost sample in a bridged gap (values unused)
        self.resets = 0
        self.bridged = 0  # lost samples bridged (see MAX_BRIDGE_FRACTION)
        self.too_lossy = 0  # windows not cut because they would span too many lost samples
        self.duplicates = 0  # samples received again (at-least-once delivery) and ignored
        self.other_device = 0  # samples of another device of the user, ignored while this one streams
        self.last_message = 0.0  # monotonic time of the last accepted message
        # (device, boot, running min of the lifted clock offset) for taken_times; kept across gaps in a boot
        self.clock: tuple[int, int, float] | None = None
        self.watch = ChannelWatch(spec)

    def use_model(self, spec: ModelSpec) -> None:
        """A new model reading the same windows: keep the samples, not the votes; the electrode check goes on
        against the new model's reference (ChannelWatch.carry)."""
        if (spec.check_channels, spec.check_mean, spec.check_std) != \
                (self.spec.check_channels, self.spec.check_mean, self.spec.check_std):
            watch = ChannelWatch(spec)
            watch.carry(self.watch, None if self.next_seq is None else self.next_seq - 1)
            self.watch = watch
        self.spec = spec
        self.new_votes()

    def reset(self) -> None:
        self.n = 0
        self.next_seq = None

    def new_votes(self) -> None:
        """Forget the vote history; windows cut before this (maybe still at /predict) no longer join it."""
        self.history.clear()
        self.history_model = None
        self.history_end = None
        self.epoch = next(_EPOCHS)

    def votes_for(self, epoch: int, model_id: int | None) -> deque:
        """The vote history that results of windows cut in `epoch`, predicted by `model_id`, join.

        Only windows of the current epoch vote together, and only with results of the same model (a retrained
        model may have other classes); older windows still coming back from /predict get a history of their own.
        """
        if epoch != self.epoch:
            return deque(maxlen=self.history.maxlen)
        if self.history_model != model_id:
            self.history.clear()
            self.history_model = model_id
        return self.history

    def taken_times(self, device_id: int, boot: int, millis: np.ndarray, recv: np.ndarray) -> np.ndarray:
        """When samples were taken, on the server's clock: (k,) device millis and receive times -> (k,) seconds.

        A sample's receive time minus its device time is its delivery delay plus a constant clock offset; the
        smallest such difference seen for this device and boot (allowed to rise by CLOCK_RISE, for clock drift)
        is the offset plus the fastest delivery. So a sample a sensor kept through a WiFi outage and sent late
        shows its true age, which its fresh receive time hides.
        """
        slope = (1.0 + CLOCK_RISE) * millis / 1000.0
        # receive - device time, less CLOCK_RISE per device second: its running min rises CLOCK_RISE per second
        lifted = np.minimum.accumulate(recv - slope)
        if self.clock is not None and self.clock[:2] == (device_id, boot):
            lifted = np.minimum(lifted, self.clock[2])
        self.clock = (device_id, boot, float(lifted[-1]))
        return np.minimum(recv, lifted + slope)

    def _make_room(self, k: int) -> None:
        keep = min(self.n, self.spec.window - 1 + self._max_bridge())  # all a future window can still need
        if self.n + k > len(self.values):
            drop = self.n - keep
            for arr in (self.values, self.millis, self.recv, self.taken, self.lost):
                arr[:keep] = arr[drop:self.n]
            self.start_seq += drop
            self.n = keep
            if keep + k > len(self.values):  # a message bigger than the buffer: grow once
                cap = 2 * (keep + k)
                for name in ("values", "millis", "recv", "taken", "lost"):
                    old = getattr(self, name)
                    new = np.zeros((cap, *old.shape[1:]), dtype=old.dtype)
                    new[:keep] = old[:keep]
                    setattr(self, name, new)

    def append(self, msg: SamplesMessage, arrival: float | None = None, published: float | None = None
               ) -> Ready | None:
        """Add a message's samples (arrived at `arrival`, this worker's monotonic clock; default now; published by
        the UDP server at `published`, its clock, if known); returns the windows they complete (None if none).

        A sample is (device, boot, seq): samples of the current run seen before (the UDP server publishes at
        least once and re-sends a batch after a timeout) are skipped, so no window is decided twice. A short
        forward gap is bridged (MAX_BRIDGE_FRACTION); a longer one, or another device or boot, starts a new run.
        """
        seq0, k = msg.seq0, len(msg.values)
        now = time.monotonic()
        if arrival is None:
            arrival = now
        if (self.next_seq is not None and msg.device_id != self.device_id
                and now - self.last_message < DEVICE_HANDOVER_S):
            self.other_device += k
            return None
        self.last_message = now
        # the latest server time known to precede this delivery (the publish time, unless that clock stepped back)
        sent = max(msg.recv_time)
        self.host.see(arrival, sent if published is None or published < sent else published)
        values, millis, recv = msg.values, msg.device_millis, msg.recv_time
        same_run = self.next_seq is not None and msg.device_id == self.device_id and msg.boot == self.boot
        if same_run and seq0 < self.next_seq:
            seen = self.next_seq - seq0
            late = self._repair(seq0, values[:seen])
            self.duplicates += min(seen, k) - late
            if seen >= k:
                return None
            values, millis, recv = values[seen:], millis[seen:], recv[seen:]
            seq0, k = self.next_seq, k - seen
        elif same_run and 0 < seq0 - self.next_seq <= self._max_bridge():
            self._mark_lost(seq0 - self.next_seq, k)
        elif not same_run or seq0 != self.next_seq:
            if self.next_seq is not None:
                self.resets += 1
                self.new_votes()  # votes from before the gap say nothing about what follows
                log.debug("user %s: stream reset (device %s boot %s seq %s, expected device %s boot %s seq %s)",
                          self.user_id, msg.device_id, msg.boot, msg.seq0, self.device_id, self.boot, self.next_seq)
            if msg.device_id != self.device_id:
                self.watch.reset()  # another device's electrodes
            self.device_id, self.boot = msg.device_id, msg.boot
            self.n = 0
            self.start_seq = seq0
        self._make_room(k)
        a = self.n
        self.values[a:a + k] = values
        self.millis[a:a + k] = millis
        self.recv[a:a + k] = recv
        self.taken[a:a + k] = self.taken_times(msg.device_id, msg.boot, np.asarray(millis, dtype=np.float64),
                                               np.asarray(recv, dtype=np.float64))
        self.lost[a:a + k] = False
        self.n += k
        self.next_seq = seq0 + k
        self.watch.add(self.values[a:a + k], seq0 + k - 1)

        win, step = self.spec.window, self.spec.step
        first_end = max(seq0, self.start_seq + win - 1)
        last_end = seq0 + k - 1
        # smallest e >= first_end with (e + 1) % step == 0
        e0 = first_end + (-(first_end + 1)) % step
        if e0 > last_end:
            return None
        ends = np.arange(e0, last_end + 1, step)
        idx = ends - self.start_seq  # buffer index of each window's last sample
        if self.lost[:self.n].any():  # a bridged gap in the buffer: each window takes the last `win` received samples
            received = np.flatnonzero(~self.lost[:self.n])
            pos = np.searchsorted(received, idx)  # idx are received samples: received[pos] == idx
            fit = pos >= win - 1  # else not enough received yet (a new run's first windows)
            spans = idx[fit] - received[pos[fit] - win + 1] + 1  # sample periods each window covers
            self.too_lossy += int((spans - win > self._max_bridge()).sum())
            fit[fit] = spans - win <= self._max_bridge()
            if not fit.any():
                return None
            ends, idx, pos = ends[fit], idx[fit], pos[fit]
            rows = [received[p - win + 1:p + 1] for p in pos]
        else:
            rows = [slice(i - win + 1, i + 1) for i in idx]
        # (n, win, C) -> (n, C, win): the API takes channels first
        windows = np.ascontiguousarray(np.stack([self.values[r] for r in rows]).transpose(0, 2, 1))
        faults, unsure = self._neutralise(windows)
        return Ready(self.user_id, self.spec, msg.device_id, msg.boot, windows, ends,
                     self.millis[idx].copy(), self.recv[idx].copy(), self.taken[idx].copy(), self.host,
                     time.monotonic(), self.epoch, faults, unsure)

    def _neutralise(self, windows: np.ndarray) -> tuple[tuple[Fault, ...], bool]:
        """Replace the samples of the channels that look failed by their training level, in place (why: see
        FAULT_CHECK_S); returns those spells and whether too many channels failed to decide."""
        if not self.watch.faults:
            return (), False
        faults = tuple(self.watch.faults.values())
        level = dict(zip(self.spec.check_channels, self.spec.check_mean, strict=True))
        for f in faults:
            windows[:, f.channel, :] = round(level[f.channel])  # whole counts: the windows stay int16 on the wire
        return faults, pp.too_many_faults(len(faults), len(self.spec.check_channels))

    def _max_bridge(self) -> int:
        return max_bridged(self.spec.window, self.bridge_fraction)

    def _mark_lost(self, gap: int, k: int) -> None:
        """Keep slots for `gap` lost samples before the next `k` (windows skip them; a late arrival fills them)."""
        self._make_room(gap + k)
        a = self.n
        self.values[a:a + gap] = 0
        for arr in (self.millis, self.recv, self.taken):  # no window ends on a lost slot: never read
            arr[a:a + gap] = arr[a - 1] if a else 0.0
        self.lost[a:a + gap] = True
        self.n += gap
        self.next_seq += gap
        self.bridged += gap

    def _repair(self, seq0: int, values: list) -> int:
        """Samples from seq0 on arriving after later ones (UDP reordering): put any whose slot is marked lost in it,
        for the windows still to be cut. Returns how many."""
        idx = np.arange(seq0, seq0 + len(values)) - self.start_seq
        inside = (idx >= 0) & (idx < self.n)
        late = np.flatnonzero(inside)[self.lost[idx[inside]]]
        if len(late):
            self.values[idx[late]] = np.asarray(values, dtype=np.float32)[late]
            self.lost[idx[late]] = False
        return len(late)


# ---- worker membership (which users are mine) ------------------------------------------------------
def _rank(slot: int, user_id: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{slot}:{user_id}".encode(), digest_size=8).digest(), "big")


def owner_slot(user_id: int, slots: set[int] | frozenset[int]) -> int | None:
    """Rendezvous hashing: every worker computes the same owner, and a change of workers moves few users."""
    return max(slots, key=lambda s: _rank(s, user_id)) if slots else None


class Membership:
    """This worker's advisory-lock slot and the set of live slots (one per running worker)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.conn = None
        self.slot: int | None = None
        self.slots: frozenset[int] = frozenset()

    def _acquire(self) -> None:
        """Take the lowest free slot (until then the last known slot keeps serving, e.g. during an outage)."""
        self.conn = db.connect(self.settings, connect_timeout=3, application_name="semg-inference")
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            for slot in range(MAX_SLOTS):
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (SLOT_LOCK_NS, slot))
                if cur.fetchone()[0]:
                    self.slot = slot
                    log.info("worker slot %d", slot)
                    return
        raise RuntimeError(f"all {MAX_SLOTS} inference worker slots are taken")

    def poll(self) -> frozenset[int]:
        """Refresh the live slots (blocking). Keeps the last known set while the database is away."""
        try:
            if self.conn is None or self.conn.closed:
                self._acquire()
            with self.conn.cursor() as cur:
                cur.execute(
                    """SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s
                       AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
                    (SLOT_LOCK_NS,),
                )
                self.slots = frozenset(int(r[0]) for r in cur.fetchall())
        except psycopg2.Error as e:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()
            self.conn = None
            if self.slot is None and not self.slots:
                self.slots = frozenset({-1})  # no database yet: act alone until it answers
                self.slot = -1
            log.warning("worker membership unknown (%s); keeping slots %s", str(e).strip().splitlines()[0],
                        sorted(self.slots))
        return self.slots

    def owns(self, user_id: int) -> bool:
        return self.slot is not None and owner_slot(user_id, self.slots) == self.slot

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


# ---- the worker -----------------------------------------------------------------------------------------
@dataclass
class Options:
    api_url: str
    votes: int = 3
    min_confidence: float = 0.5
    unsure_label: str = postprocessing.UNKNOWN
    max_inflight: int = 1
    max_batch_windows: int = 1024
    # windows older than this when their turn comes are dropped (stale for live use): queued this long ago, or
    # their last sample taken this long ago (a backlog after a NATS/PostgreSQL or sensor WiFi outage)
    max_age_s: float = 2.0
    http_timeout_s: float = 10.0


@dataclass
class Stats:
    messages: int = 0
    invalid: int = 0
    windows: int = 0
    decisions: int = 0
    dropped: int = 0
    api_errors: int = 0
    skipped: int = 0
    failed: int = 0  # windows whose /predict answer could not be handled (a bug or a closed connection)
    stored: int = 0
    batches: int = 0
    predict_ms: float = 0.0  # summed /predict round trips

    def line(self) -> str:
        per = f" windows/batch={self.windows / max(self.batches, 1):.1f} " \
              f"predict_ms/batch={self.predict_ms / max(self.batches, 1):.2f}"
        return " ".join(f"{k}={v}" for k, v in self.__dict__.items() if k != "predict_ms") + per


class ApiUnreachable(Exception):
    """The API could not be reached or did not answer in time."""


# Idle pooled connections to the API are closed after this, before the API closes them (KEEP_ALIVE_S in
# ml_model/rest/connections.py): a request sent on a connection the server is closing at that moment fails, and its
# windows are dropped.
POOL_IDLE_S = 4.0


class ApiClient:
    """Keep-alive HTTP/1.1 connection(s) to the API, answering (status, body bytes).

    aiohttp rather than httpx: measured against the same API, 275-335 us of client CPU per /predict call
    against 1200-1250 us, which at ~150 calls/s is a tenth of a core on the live path.
    """

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int,
                 tls_context: ssl.SSLContext | None = None):
        # tls_context: semg.tls.client_context (the API's pinned certificate) when the API serves HTTPS
        self._session = aiohttp.ClientSession(
            base_url=base_url.rstrip("/") + "/", headers={"X-API-Key": api_key},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=POOL_IDLE_S,
                                           ssl=tls_context if tls_context is not None else True))

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with self._session.request(method, path.lstrip("/"), data=body, headers=headers) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ApiUnreachable(f"{type(e).__name__}: {e}") from None

    async def close(self) -> None:
        await self._session.close()


@dataclass
class Worker:
    settings: Settings
    opts: Options
    nc: Any = None
    http: ApiClient | None = None
    membership: Membership | None = None
    specs: dict[int, ModelSpec] = field(default_factory=dict)
    streams: dict[int, UserStream] = field(default_factory=dict)
    subs: dict[int, Any] = field(default_factory=dict)
    pending: deque[Ready] = field(default_factory=deque)
    to_store: list[tuple] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    host_clock: HostClock = field(default_factory=HostClock)  # shared by all streams (one UDP server)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    _drained: bool = False  # no more samples will arrive (subscriptions drained)
    _warned: set[tuple] = field(default_factory=set)
    _inflight: deque[tuple[asyncio.Task, list[Ready]]] = field(default_factory=deque)
    _refreshing: set[int] = field(default_factory=set)
    _announced: frozenset[int] = frozenset()
    _store_conn: Any = None
    _next_warn: dict[str, float] = field(default_factory=dict)

    # ---- message handling (never awaits I/O) ------------------------------------------------------
    async def on_samples(self, msg) -> None:
        self.stats.messages += 1
        try:
            samples = SamplesMessage.model_validate_json(msg.data)
        except ValidationError as e:
            self.stats.invalid += 1
            self._warn_once(("invalid", msg.subject), "ignoring invalid samples message on %s: %s", msg.subject,
                            e.errors()[0].get("msg"))
            return
        uid = samples.userid
        if msg.subject.rsplit(".", 1)[-1] != str(uid):
            self.stats.invalid += 1
            self._warn_once(("subject", msg.subject), "ignoring samples of user %s published on %s", uid, msg.subject)
            return
        spec = self.specs.get(uid)
        if spec is None:
            self.stats.skipped += 1
            return
        if samples.channels != spec.n_device_channels or abs(samples.sample_rate_hz - spec.sample_rate_hz) > \
                0.01 * spec.sample_rate_hz:
            self.stats.skipped += 1
            self._warn_once(("shape", uid, samples.device_id, spec.artifact_id),
                            "user %s device %s sends %d ch at %g Hz but model %s reads %d ch at %g Hz; skipped",
                            uid, samples.device_id, samples.channels, samples.sample_rate_hz, spec.artifact_id,
                            spec.n_device_channels, spec.sample_rate_hz)
            return
        stream = self.streams.get(uid)
        if stream is None or stream.spec.shape != spec.shape:
            stream = self.streams[uid] = UserStream(uid, spec, self.opts.votes, self.host_clock)
        elif stream.spec != spec:
            stream.use_model(spec)
        ignored = stream.other_device
        ready = stream.append(samples, published=published_time(msg.headers))
        if stream.other_device != ignored:
            self._warn_once(("device", uid, samples.device_id, stream.device_id),
                            "user %s: device %s streams while device %s does; recognising device %s only (the "
                            "other takes over %g s after it stops)", uid, samples.device_id, stream.device_id,
                            stream.device_id, DEVICE_HANDOVER_S)
        for fault, ended in stream.watch.take_events():
            self._log_fault(uid, stream, fault, ended)
        if ready is not None:
            self.pending.append(ready)
            self.stats.windows += len(ready.windows)
            self._wake.set()

    def _log_fault(self, uid: int, stream: UserStream, fault: Fault, ended: int | None) -> None:
        """One line when a channel's spell starts, one when it ends."""
        watch, rate = stream.watch, stream.spec.sample_rate_hz
        if ended is None:
            what = "looks disconnected (flat" if fault.kind == "flat" else "is saturated (at its limits"
            many = pp.too_many_faults(len(watch.faults), len(watch.channels))
            log.warning("user %s device %s: channel %d %s for %.1f s): %s", uid, stream.device_id, fault.channel,
                        what, watch.size / rate,
                        f"{len(watch.faults)} of {len(watch.channels)} channels failed, decisions are "
                        f"{self.opts.unsure_label} until they are back" if many else "it is read as its training level until it is back")
        else:
            log.info("user %s device %s: channel %d is back (it was %s for %.1f s)", uid, stream.device_id,
                     fault.channel, fault.kind, (ended - fault.start_seq + 1) / rate)

    def _warn_every(self, key: str, fmt: str, *args: Any, interval: float = 10.0) -> None:
        """At most one line per `interval` s for a recurring problem (an API outage must not flood the log)."""
        now = time.monotonic()
        if now >= self._next_warn.get(key, 0.0):
            self._next_warn[key] = now + interval
            log.warning(fmt, *args)

    def _warn_once(self, key: tuple, fmt: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(fmt, *args)

    # ---- batching to /predict ---------------------------------------------------------------------
    def _take_batch(self) -> list[Ready]:
        """Up to max_batch_windows windows in at most MAX_PREDICT_ITEMS items: a user's consecutive windows of
        one run travel as one item (many users sending small packets would otherwise make one item each)."""
        batch: list[Ready] = []
        last_of: dict[int, Ready] = {}  # user -> that user's last item in this batch
        n = 0
        now = time.monotonic()
        while self.pending and n < self.opts.max_batch_windows:
            r = self.pending[0]
            ages = r.ages(now)
            newest_age = ages[-1]
            if now - r.queued_at > self.opts.max_age_s or newest_age > self.opts.max_age_s:
                self.pending.popleft()
                self.stats.dropped += len(r.windows)
                if newest_age > self.opts.max_age_s:
                    self._warn_every("stale", "dropping windows of samples taken %.1f s ago (older than --max-age "
                                     "%g s: a backlog after an outage of NATS/PostgreSQL or of the sensor's WiFi)",
                                     newest_age, self.opts.max_age_s)
                continue
            if ages[0] > self.opts.max_age_s:  # the run resumed live after a backlog: keep the fresh
                fresh = ages <= self.opts.max_age_s
                self.stats.dropped += int(np.count_nonzero(~fresh))
                r.keep(fresh)
            prev = last_of.get(r.user_id)
            if (prev is not None and prev.spec == r.spec and prev.device_id == r.device_id and prev.boot == r.boot
                    and prev.epoch == r.epoch and prev.faults == r.faults and prev.unsure == r.unsure
                    and prev.end_seq[-1] < r.end_seq[0]):
                prev.merge(self.pending.popleft())
            elif len(batch) < MAX_PREDICT_ITEMS:
                batch.append(self.pending.popleft())
                last_of[r.user_id] = r
            else:
                break
            n += len(r.windows)
        return batch

    @staticmethod
    def _encode(r: Ready) -> dict[str, Any]:
        w = r.windows
        if np.all(np.abs(w) <= 32767) and np.array_equal(w, np.round(w)):
            data, dtype = w.astype("<i2").tobytes(), "int16"
        else:
            data, dtype = w.astype("<f4").tobytes(), "float32"
        return {"user_id": r.user_id, "data_b64": base64.b64encode(data).decode("ascii"), "shape": list(w.shape),
                "dtype": dtype}

    async def _call_predict(self, batch: list[Ready]) -> dict[str, Any] | None:
        body = orjson.dumps({"items": [self._encode(r) for r in batch], "include_probabilities": True})
        t0 = time.perf_counter()
        try:
            status, content = await self.http.request("POST", "/predict", body)
            self.stats.batches += 1
            self.stats.predict_ms += (time.perf_counter() - t0) * 1000
        except ApiUnreachable as e:
            self.stats.api_errors += 1
            self.stats.dropped += sum(len(r.windows) for r in batch)
            self._warn_every("predict", "/predict failed: %s: %s (windows dropped)", type(e).__name__, e)
            await asyncio.sleep(0.2)
            return None
        if status != 200:
            self.stats.api_errors += 1
            self.stats.dropped += sum(len(r.windows) for r in batch)
            self._warn_every("predict", "/predict answered %s: %s (windows dropped)", status,
                             content[:300].decode("utf-8", "replace"))
            await asyncio.sleep(0.2)
            return None
        return orjson.loads(content)

    async def batcher(self) -> None:
        """Send whatever is pending as soon as a request slot is free; results are handled in send order."""
        while True:
            if self.pending and len(self._inflight) < self.opts.max_inflight:
                batch = self._take_batch()
                if batch:
                    task = asyncio.create_task(self._call_predict(batch))
                    self._inflight.append((task, batch))
                continue
            if self._inflight:
                oldest = self._inflight[0][0]
                if self.pending or len(self._inflight) >= self.opts.max_inflight:
                    await asyncio.wait([oldest])
                else:  # a slot is free: go on as soon as new windows arrive or the call returns
                    self._wake.clear()
                    waker = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait([oldest, waker], return_when=asyncio.FIRST_COMPLETED)
                    waker.cancel()
                if oldest.done():
                    await self._finish_oldest()
                continue
            if self._drained:
                return
            self._wake.clear()
            if not self.pending:
                await self._wake.wait()

    async def _finish_oldest(self) -> None:
        task, batch = self._inflight.popleft()
        try:
            result = await task
            if result is not None:
                await self._handle_results(batch, result)
        except Exception as e:  # noqa: BLE001 - one bad answer must not stop live recognition for everyone
            n = sum(len(r.windows) for r in batch)
            self.stats.failed += n
            key = ("results", type(e).__name__)
            if key not in self._warned:
                self._warned.add(key)
                log.exception("cannot handle a /predict answer; %d windows dropped", n)
            else:
                self._warn_every("results", "cannot handle a /predict answer (%s: %s); %d windows dropped",
                                 type(e).__name__, e, n)

    async def _handle_results(self, batch: list[Ready], result: dict[str, Any]) -> None:
        for r, res in zip(batch, result["results"], strict=True):
            err = res.get("error")
            if err:
                self.stats.dropped += len(r.windows)
                self._warn_once(("api", r.user_id, err.get("status"), r.spec.artifact_id),
                                "/predict for user %s: %s %s", r.user_id, err.get("status"), err.get("detail"))
                self._refresh_soon(r.user_id)
                continue
            stream = self.streams.get(r.user_id)
            classes = res["classes"]
            model_id = res.get("model_id")
            if model_id != r.spec.artifact_id:
                # The API already serves a newer model: results are valid for it; learn its metadata.
                self._refresh_soon(r.user_id)
            history = (stream.votes_for(r.epoch, model_id) if stream is not None
                       else deque(maxlen=self.opts.votes))
            preds = res["predictions"]
            current = stream is not None and history is stream.history
            last_end = stream.history_end if current else None
            for i, p in enumerate(preds):
                end = int(r.end_seq[i])
                if last_end is not None and end - last_end != r.spec.step:
                    history.clear()  # windows in between got no decision (dropped): only neighbours vote together
                last_end = end
                if current:
                    stream.history_end = end
                history.append(p["probabilities"])
                d = postprocessing.decide(classes, history, self.opts.min_confidence,
                                          unsure_label=self.opts.unsure_label)
                faults = [ChannelFault(channel=f.channel, fault=f.kind,
                                       seconds=max(0, end - f.start_seq + 1) / r.spec.sample_rate_hz)
                          for f in r.faults] or None
                decided = time.time()
                pm = PredictionMessage(
                    userid=r.user_id, gesture=self.opts.unsure_label if r.unsure else d.gesture,
                    confidence=min(1.0, max(0.0, d.confidence)), raw_gesture=d.raw_gesture,
                    model_id=res.get("model_id"), device_id=r.device_id, boot=r.boot, seq=end,
                    device_millis=float(r.end_millis[i]),
                    sample_recv_time=float(r.end_recv[i]), sample_taken_time=float(r.end_taken[i]),
                    decided_time=decided, channel_faults=faults,
                )
                await self.nc.publish(predictions_subject(pm.userid), pm.model_dump_json().encode())
                self.to_store.append((r.user_id, pm.model_id, pm.gesture, pm.confidence, pm.device_id,
                                      pm.device_millis, pm.sample_recv_time, decided,
                                      (decided - pm.sample_recv_time) * 1000.0,
                                      None if faults is None else orjson.dumps([f.model_dump() for f in faults])))
            self.stats.decisions += len(preds)
        if len(self.to_store) > MAX_STORE_BACKLOG:
            drop = len(self.to_store) - MAX_STORE_BACKLOG
            del self.to_store[:drop]
            log.warning("prediction store backlog full: %d decisions not stored", drop)

    def _refresh_soon(self, user_id: int) -> None:
        if user_id not in self._refreshing:
            self._refreshing.add(user_id)
            task = asyncio.get_running_loop().create_task(self.refresh_user(user_id))
            task.add_done_callback(lambda _: self._refreshing.discard(user_id))

    # ---- model catalogue and subscriptions ----------------------------------------------------------
    async def refresh_catalogue(self) -> None:
        """All served models (GET /models); then (un)subscribe to match ownership."""
        try:
            status, content = await self.http.request("GET", "/models")
            if status != 200:
                raise ValueError(f"GET /models answered {status}")
            specs = {int(d["user_id"]): ModelSpec.from_api(d) for d in orjson.loads(content)}
        except (ApiUnreachable, KeyError, ValueError) as e:
            log.warning("cannot list models from the API (%s); keeping %d known", e, len(self.specs))
            return
        self.specs = specs
        await self.sync_subscriptions()

    async def refresh_user(self, user_id: int) -> None:
        try:
            status, content = await self.http.request("GET", f"/models/{user_id}")
        except ApiUnreachable as e:
            log.warning("cannot fetch the model of user %s (%s)", user_id, e)
            return
        if status == 404:
            self.specs.pop(user_id, None)
        elif status == 200:
            spec = ModelSpec.from_api(orjson.loads(content))
            if self.specs.get(user_id) != spec:
                log.info("user %s: model %s (window %d, step %d)", user_id, spec.artifact_id, spec.window, spec.step)
            self.specs[user_id] = spec
        else:
            log.warning("GET /models/%s answered %s", user_id, status)
            return
        await self.sync_subscriptions()

    async def sync_subscriptions(self) -> None:
        if self._stopping or self.nc is None:
            return
        wanted = {u for u in self.specs if self.membership.owns(u)}
        for uid in sorted(wanted - set(self.subs)):
            self.subs[uid] = await self.nc.subscribe(samples_subject(uid), queue=QUEUE_GROUP, cb=self.on_samples,
                                                     pending_msgs_limit=100_000, pending_bytes_limit=256 * 2**20)
        for uid in sorted(set(self.subs) - wanted):
            sub = self.subs.pop(uid)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.streams.pop(uid, None)
        if wanted != self._announced:
            # The SUBs go out with the next flush: only once the server has them are the users handled (a
            # sample published before would go to no one), so the line below is true when it is read.
            with contextlib.suppress(Exception):  # disconnected: the client re-sends its SUBs on reconnect
                await self.nc.flush(timeout=2)
            self._announced = frozenset(wanted)
            log.info("handling users %s", sorted(wanted))

    async def on_models_updated(self, msg) -> None:
        try:
            update = ModelUpdated.model_validate_json(msg.data)
        except ValidationError:
            return
        # The API reloads on the same message; ask it until it serves this artifact (or a newer one).
        for _ in range(20):
            await self.refresh_user(update.userid)
            spec = self.specs.get(update.userid)
            if spec is not None and spec.artifact_id >= update.artifact_id:
                return
            await asyncio.sleep(0.1)

    async def membership_loop(self) -> None:
        last: frozenset[int] | None = None
        while not self._stopping:
            slots = await asyncio.to_thread(self.membership.poll)
            if slots != last:
                log.info("inference workers: slots %s (mine %s)", sorted(slots), self.membership.slot)
                last = slots
                await self.sync_subscriptions()
            await asyncio.sleep(MEMBERSHIP_POLL_S)

    async def catalogue_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(CATALOGUE_POLL_S)
            await self.refresh_catalogue()

    # ---- storage ------------------------------------------------------------------------------------
    def _store(self, rows: list[tuple]) -> int:
        """Store decisions; returns how many were dropped as unstorable (0 normally).

        One COPY for all. If a row breaks a constraint (a user or model deleted meanwhile), the rows are
        stored per user instead, a deleted model's rows without their model id, and only a deleted user's
        rows are dropped, so nobody else's decisions are lost.
        """
        if self._store_conn is None or self._store_conn.closed:
            self._store_conn = db.connect(self.settings, connect_timeout=3, application_name="semg-inference")
        conn = self._store_conn
        try:
            try:
                self._insert(conn, rows)
                return 0
            except psycopg2.IntegrityError:
                pass
            groups: dict[tuple, list[tuple]] = {}  # (user, model) -> rows
            for row in rows:
                groups.setdefault(row[:2], []).append(row)
            dropped = 0
            for (user_id, model_id), group in groups.items():
                try:
                    self._insert(conn, group)
                except psycopg2.IntegrityError as e:
                    try:
                        if model_id is None:
                            raise
                        self._insert(conn, [(r[0], None, *r[2:]) for r in group])
                    except psycopg2.IntegrityError:
                        dropped += len(group)
                        log.warning("dropping %d decisions of user %s that cannot be stored: %s", len(group),
                                    user_id, str(e).splitlines()[0])
            return dropped
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            with contextlib.suppress(Exception):
                conn.close()
            self._store_conn = None
            raise

    @staticmethod
    def _insert(conn, rows: list[tuple]) -> None:
        """COPY: several thousand decisions per second cost PostgreSQL (shared with ingestion) little."""
        buf = io.StringIO()
        for u, m, g, c, d, dm, sr, dt, lat, faults in rows:
            buf.write(f"{u}\t{_copy_text(m)}\t{_copy_text(g)}\t{c!r}\t{_copy_text(d)}\t{dm!r}\t"
                      f"{_iso(sr)}\t{_iso(dt)}\t{lat!r}\t{_copy_text(faults and faults.decode())}\n")
        buf.seek(0)
        with conn, conn.cursor() as cur:
            # decisions were already published live; a crash may lose the last half second of the log, and
            # not waiting for the WAL flush keeps the shared disk free for the sample ingestion
            cur.execute("SET LOCAL synchronous_commit TO OFF")
            cur.copy_expert("""COPY predictions (user_id, model_id, gesture, confidence, device_id, device_millis,
                                   sample_received, decided_at, latency_ms, channel_faults) FROM STDIN""", buf)

    async def store_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(STORE_INTERVAL_S)
            await self.store_now()

    async def store_now(self) -> None:
        if not self.to_store:
            return
        rows, self.to_store = self.to_store, []
        try:
            dropped = await asyncio.to_thread(self._store, rows)
            self.stats.stored += len(rows) - dropped
        except psycopg2.Error as e:
            self.to_store[:0] = rows  # keep them (bounded in _handle_results) and retry
            log.warning("cannot store decisions (%s); will retry", str(e).strip().splitlines()[0])

    # ---- retention ----------------------------------------------------------------------------------
    def prune_once(self) -> dict | None:
        """One pruning pass (blocking: runs in a thread, on a connection of its own). A database error is logged
        and the next pass tries again; it never reaches the live path."""
        started = time.monotonic()
        try:
            with contextlib.closing(db.connect(self.settings, connect_timeout=3,
                                               application_name="semg-inference-prune")) as conn:
                out = repo.prune_predictions(conn, self.settings.semg_prediction_retention_days,
                                             stop=lambda: self._stopping, pause_s=PRUNE_PAUSE_S)
        except psycopg2.Error as e:
            log.warning("cannot prune old decisions (%s); will retry in %.0f s",
                        (str(e).strip() or type(e).__name__).splitlines()[0], PRUNE_INTERVAL_S)
            return None
        if out["removed"]:
            log.info("pruned %d decisions older than %s (%d days) in %.1f s", out["removed"],
                     out["older_than"].isoformat(timespec="seconds"), self.settings.semg_prediction_retention_days,
                     time.monotonic() - started)
        return out

    async def prune_loop(self) -> None:
        if not self.settings.semg_prediction_retention_days:
            log.info("decisions are kept forever (SEMG_PREDICTION_RETENTION_DAYS=0)")
            return
        delay = PRUNE_FIRST_S
        while not self._stopping:
            await asyncio.sleep(delay)
            delay = PRUNE_INTERVAL_S
            if self._stopping:
                break
            try:
                await asyncio.to_thread(self.prune_once)
            except Exception:  # a bug here must not end the worker's other tasks, nor pruning for good
                log.exception("pruning old decisions failed; will retry in %.0f s", PRUNE_INTERVAL_S)

    async def stats_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(STATS_INTERVAL_S)
            log.info("stats: %s users=%d stream_resets=%d bridged_samples=%d", self.stats.line(), len(self.subs),
                     sum(s.resets for s in self.streams.values()), sum(s.bridged for s in self.streams.values()))

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        done = natsio.install_shutdown(loop, self.stop)
        stop_requested = asyncio.create_task(done.wait())
        # NATS not reachable yet: connecting retries forever, and a SIGTERM meanwhile must still end the worker
        # (supervisord and stop_all.sh wait for it), not only once it is connected
        connecting = asyncio.create_task(self._connect())
        await asyncio.wait([connecting, stop_requested], return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            # asked again until it ends: Python 3.11's asyncio.wait_for (nats-py's connect attempt) loses a cancel
            # that comes as the refused attempt fails (gh-86296), and the retries then went on for ever (a CI run)
            while not connecting.done():
                connecting.cancel()
                await asyncio.wait({connecting}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            await stop_requested
            if self.http is not None:
                await self.http.close()
            if self.membership is not None:
                self.membership.close()
            log.info("inference worker stopped before it was connected")
            return
        connecting.result()
        store_task = asyncio.create_task(self.store_loop())
        tasks = [asyncio.create_task(self.stats_loop()), asyncio.create_task(self.prune_loop())]
        batcher = asyncio.create_task(self.batcher())
        while not self._stopping:  # the API may still be starting
            await self.refresh_catalogue()
            if self.specs or self._stopping:
                break
            try:
                if (await self.http.request("GET", "/models"))[0] == 200:
                    break  # reachable, just no models yet
                await asyncio.sleep(1)
            except ApiUnreachable:
                await asyncio.sleep(1)
        tasks += [asyncio.create_task(c) for c in (self.membership_loop(), self.catalogue_loop())]
        gc.freeze()  # startup objects leave the collector's scans: shorter pauses while streaming
        log.info("inference worker running: %d users with models, api %s", len(self.specs), self.opts.api_url)
        await asyncio.wait([stop_requested, batcher], return_when=asyncio.FIRST_COMPLETED)
        failed = None
        if batcher.done() and not self._stopping:  # cannot happen by design; never keep running deaf
            failed = batcher.exception() or RuntimeError("the batcher returned")
            log.critical("the /predict batcher stopped (%r); stopping so the supervisor restarts the worker",
                         failed)
            stop_requested.cancel()
            await self.stop()
        else:
            await stop_requested
        self._wake.set()
        with contextlib.suppress(Exception):
            await batcher
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await store_task  # ends after its current store (it checks _stopping), never cut off mid-COPY
        await self.store_now()  # the last decisions
        await self.http.close()
        self.membership.close()
        if self._store_conn is not None:
            self._store_conn.close()
        log.info("inference worker stopped: %s", self.stats.line())
        if failed is not None:
            raise SystemExit(1)

    async def _connect(self) -> None:
        self.membership = Membership(self.settings)
        await asyncio.to_thread(self.membership.poll)
        self.http = ApiClient(self.opts.api_url, secrets.service_api_key(self.settings), self.opts.http_timeout_s,
                              self.opts.max_inflight + 2, tls.client_context(self.settings))
        self.nc = await natsio.connect("inference", self.settings)
        await self.nc.subscribe(MODELS_UPDATED, cb=self.on_models_updated)

    async def stop(self) -> None:
        """SIGTERM: stop taking samples, finish the queued windows, publish and store their decisions."""
        log.info("draining")
        self._stopping = True
        for sub in list(self.subs.values()):
            with contextlib.suppress(Exception):
                await sub.drain()
        self._drained = True
        self._wake.set()
        deadline = time.monotonic() + 10
        while (self.pending or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await self.nc.drain()


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def main(argv: list[str] | None = None) -> int:
    s = settings_or_exit("inference")
    p = argparse.ArgumentParser(prog="python -m ml_model.nat_inference", description=__doc__.splitlines()[0])
    p.add_argument("--api-url", default=s.api_url)
    p.add_argument("--votes", type=int, default=int(_env_float("SEMG_INFERENCE_VOTES", 3)),
                   help="majority vote over this many windows (1 = no smoothing)")
    p.add_argument("--min-confidence", type=float, default=_env_float("SEMG_INFERENCE_MIN_CONFIDENCE", 0.5),
                   help="below this mean probability the decision is the unsure label")
    p.add_argument("--unsure-label", default=os.environ.get("SEMG_INFERENCE_UNSURE_LABEL", postprocessing.UNKNOWN),
                   help="answer when unsure: UNKNOWN (default) or REST")
    p.add_argument("--max-age", type=float, default=_env_float("SEMG_INFERENCE_MAX_AGE_S", 2.0),
                   help="drop windows that waited longer than this many seconds, or whose samples were taken "
                        "longer ago (overload, or a backlog after an outage: stale for live use)")
    p.add_argument("--max-inflight", type=int, default=int(_env_float("SEMG_INFERENCE_MAX_INFLIGHT", 1)),
                   help="concurrent /predict calls (default 1: the next batch goes out when the answer is in)")
    args = p.parse_args(argv)
    if args.votes < 1 or not 0 <= args.min_confidence <= 1:
        p.error("--votes must be >= 1 and --min-confidence in [0, 1]")
    if not 1 <= len(args.unsure_label) <= 80 or args.unsure_label != args.unsure_label.strip():
        p.error("--unsure-label (SEMG_INFERENCE_UNSURE_LABEL) must be 1-80 characters without surrounding spaces")
    if problem := tls.problem(s):  # it trusts the API's certificate from SEMG_TLS_CERT_FILE
        print(f"inference: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    opts = Options(api_url=args.api_url, votes=args.votes, min_confidence=args.min_confidence,
                   unsure_label=args.unsure_label, max_inflight=max(1, args.max_inflight),
                   max_age_s=max(0.05, args.max_age))
    log.info("starting on %s pid %d", socket.gethostname(), os.getpid())
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    procs.tune_live_process()
    asyncio.run(Worker(s, opts).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
