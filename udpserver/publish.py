"""Publishing stored samples on NATS as `semg.messages.SamplesMessage` JSON (subject emg.samples.<userid>).

Consecutive records of one device (same boot, contiguous sequence numbers) become one message, so a
legacy stream of single-sample packets costs one message per commit, not one per packet.
A batch counts as published only after a NATS flush (PING/PONG) confirms the server has it and no
disconnect happened meanwhile; otherwise the whole batch is published again (at-least-once).
Every message carries the publish time in the Semg-Published header (semg.messages), on the clock of its
receive times: a consumer can tell a backlog (after an outage or a restart) from live samples without any
clock of its own. Not to a server without header support (it would close the connection): there, no header.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import orjson

from semg import natsio
from semg.config import Settings
from semg.messages import PUBLISHED_HEADER, published_headers, samples_subject
from udpserver.metrics import RateLimitedLog
from udpserver.spool import Chunk, iter_records, records_by_k

log = logging.getLogger("udpserver.publish")

MAX_SAMPLES_PER_MESSAGE = 2000
# The NATS server counts headers against max_payload (nats-py checks only the payload): the header block
# "NATS/1.0\r\nSemg-Published: <unix s, 6 decimals>\r\n\r\n" is 47 bytes until 2286.
HEADER_BYTES = len(b"NATS/1.0\r\n\r\n") + len(PUBLISHED_HEADER) + len(": \r\n") + len(f"{9e9:.6f}")
_DUMPS_OPT = orjson.OPT_SERIALIZE_NUMPY


def _takes_headers(nc) -> bool:
    """Whether the connected server takes message headers (NATS >= 2.2, unless configured off): one that does
    not closes the connection on a message with headers, so nothing would ever be published to it."""
    return bool((getattr(nc, "_server_info", None) or {}).get("headers"))


class _Run:
    __slots__ = ("user_id", "device_id", "boot", "seq0", "next_seq", "channels", "rate", "n", "millis0", "counts",
                 "server_ts", "values")

    def __init__(self, h: tuple, values: memoryview):
        user_id, device_id, boot, seq0, n, channels, rate, millis0, _time0, server_ts = h
        self.user_id, self.device_id, self.boot, self.seq0 = user_id, device_id, boot, seq0
        self.channels, self.rate = channels, rate
        self.next_seq = seq0 + n
        self.n = n
        self.millis0 = [millis0]
        self.counts = [n]
        self.server_ts = [server_ts]
        self.values = [values]

    def extends(self, h: tuple) -> bool:
        return (h[3] == self.next_seq and h[2] == self.boot and h[5] == self.channels and h[6] == self.rate
                and self.n + h[4] <= MAX_SAMPLES_PER_MESSAGE)

    def add(self, h: tuple, values: memoryview) -> None:
        n = h[4]
        self.next_seq += n
        self.n += n
        self.millis0.append(h[7])
        self.counts.append(n)
        self.server_ts.append(h[9])
        self.values.append(values)

    def messages(self) -> list[tuple[int, bytes]]:
        counts = np.asarray(self.counts)
        step = 1000.0 / self.rate
        if self.n == len(counts):  # one sample per record (legacy): the device clock of every sample is known
            millis = np.asarray(self.millis0, dtype=np.float64)
            recv = np.asarray(self.server_ts, dtype=np.float64)
        else:
            starts = np.repeat(np.cumsum(counts) - counts, counts)
            millis = np.repeat(np.asarray(self.millis0), counts) + (np.arange(self.n) - starts) * step
            recv = np.repeat(np.asarray(self.server_ts), counts)
        values = np.frombuffer(b"".join(self.values), dtype="<i2").reshape(self.n, self.channels)
        # only a run of one record can be longer than a message (extends() stops runs at the limit)
        return _dumps(self.user_id, self.device_id, self.boot, self.rate, self.channels, self.seq0, millis, recv,
                      values)


def _dump(user_id: int, device_id: int, boot: int, rate: float, channels: int, seq0: int,
          millis: np.ndarray | list[float], recv: np.ndarray | list[float],
          values: np.ndarray | list[list[int]]) -> tuple[int, bytes]:
    # the float32 rate as it was registered (333.3, not 333.29998779296875)
    body = {"v": 1, "userid": user_id, "device_id": device_id, "boot": boot, "sample_rate_hz": float(f"{rate:.7g}"),
            "channels": channels, "seq0": seq0, "device_millis": millis, "recv_time": recv, "values": values}
    return user_id, orjson.dumps(body, option=_DUMPS_OPT)


def _dumps(user_id: int, device_id: int, boot: int, rate: float, channels: int, seq0: int, millis: np.ndarray,
           recv: np.ndarray, values: np.ndarray) -> list[tuple[int, bytes]]:
    """``_dump`` in messages of at most MAX_SAMPLES_PER_MESSAGE samples: one record may hold more (a binary
    packet carries up to 4076); the pieces are numbered and timed as the samples of the whole record."""
    n = len(values)
    if n <= MAX_SAMPLES_PER_MESSAGE:
        return [_dump(user_id, device_id, boot, rate, channels, seq0, millis, recv, values)]
    return [_dump(user_id, device_id, boot, rate, channels, seq0 + o, millis[o:o + MAX_SAMPLES_PER_MESSAGE],
                  recv[o:o + MAX_SAMPLES_PER_MESSAGE], values[o:o + MAX_SAMPLES_PER_MESSAGE])
            for o in range(0, n, MAX_SAMPLES_PER_MESSAGE)]


def _messages_of_group(r: np.ndarray, k: int, out: list[tuple[int, bytes]]) -> None:
    """Messages for records of one size; per device in journal order (the sort is stable)."""
    r = r[np.argsort(r["dev"], kind="stable")]
    dev, boot, seq0, n, ch, rate = r["dev"], r["boot"], r["seq0"], r["n"].astype(np.int64), r["ch"], r["rate"]
    cut = np.ones(len(r), dtype=bool)  # a new message where the device, boot, format or sequence changes
    cut[1:] = ((dev[1:] != dev[:-1]) | (boot[1:] != boot[:-1]) | (ch[1:] != ch[:-1]) | (rate[1:] != rate[:-1])
               | (seq0[1:] != seq0[:-1] + n[:-1]))
    starts = np.flatnonzero(cut).tolist() + [len(r)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        per = int(n[a])
        step = max(1, MAX_SAMPLES_PER_MESSAGE // per)
        c, rt = int(ch[a]), float(rate[a])
        for i in range(a, b, step):
            j = min(b, i + step)
            part = r[i:j]
            values = np.ascontiguousarray(part["vals"]).reshape(-1, c)
            if per == 1:
                millis = np.ascontiguousarray(part["m0"])
                recv = np.ascontiguousarray(part["ts"])
            else:
                millis = (part["m0"][:, None] + np.arange(per) * (1000.0 / rt)).ravel()
                recv = np.repeat(part["ts"], per)
            out.extend(_dumps(int(part["user"][0]), int(dev[i]), int(boot[i]), rt, c, int(seq0[i]), millis, recv,
                              values))


def _messages_of_records(r: np.ndarray, out: list[tuple[int, bytes]]) -> None:
    """One message per record, built from Python scalars: for batches where every device has one record (the
    usual live case, a packet per device per commit) this is ~3x cheaper than the vectorised path, whose
    numpy calls cost more than they save on two-sample arrays. Same bytes as _messages_of_group."""
    for user, dev, boot, seq0, n, ch, rate, m0, _t0, ts, vals in r.tolist():
        step = 1000.0 / rate
        flat = vals.tolist()
        out.append(_dump(user, dev, boot, rate, ch, seq0, [m0 + i * step for i in range(n)],
                         [ts] * n, [flat[i * ch:(i + 1) * ch] for i in range(n)]))


def build_messages(payloads: list[bytes]) -> list[tuple[int, bytes]]:
    """(userid, JSON) messages for the records of chunk payloads, in journal order per device.

    Vectorised per record size; if one device has records of several sizes in the batch (a binary device
    that varies its batch size), the per-record path keeps that device's messages in order.
    """
    payload = b"".join(payloads)
    if not payload:
        return []
    groups = records_by_k(payload)
    devices = {k: np.unique(r["dev"]) for k, r in groups.items()}
    if len(groups) > 1:
        seen: set[int] = set()
        for devs in devices.values():
            if seen.intersection(devs.tolist()):
                return _build_messages_per_record(payload)
            seen.update(devs.tolist())
    out: list[tuple[int, bytes]] = []
    for k, r in groups.items():
        if len(devices[k]) == len(r) and int(r["n"].max()) <= MAX_SAMPLES_PER_MESSAGE:
            _messages_of_records(r, out)
        else:
            _messages_of_group(r, k, out)
    return out


def _build_messages_per_record(payload: bytes) -> list[tuple[int, bytes]]:
    runs: dict[int, _Run] = {}
    out: list[tuple[int, bytes]] = []
    mv = memoryview(payload)
    for h, voff, vlen in iter_records(payload):
        run = runs.get(h[1])
        if run is not None and run.extends(h):
            run.add(h, mv[voff:voff + vlen])
        else:
            if run is not None:
                out.extend(run.messages())
            runs[h[1]] = _Run(h, mv[voff:voff + vlen])
    for r in runs.values():
        out.extend(r.messages())
    return out


def _split_by_size(messages: list[tuple[int, bytes]], limit: int
                   ) -> tuple[list[tuple[int, bytes]], dict[int, int], int]:
    """-> (the messages of at most `limit` bytes, samples per device of the larger ones, the largest size)."""
    sendable = [m for m in messages if len(m[1]) <= limit]
    if len(sendable) == len(messages):
        return messages, {}, 0
    too_large: dict[int, int] = {}
    largest = 0
    for _, body in messages:
        if len(body) > limit:
            largest = max(largest, len(body))
            m = orjson.loads(body)
            too_large[m["device_id"]] = too_large.get(m["device_id"], 0) + len(m["values"])
    return sendable, too_large, largest


class Publisher:
    """Publishes committed batches in order; survives NATS being down or refusing what we publish while
    connected (batches wait, nothing is dropped unless the spool is about to overflow, see `should_shed`)."""

    SETTLE_S = 2.0  # after a reconnect, give subscribers time to re-subscribe before sending the backlog
    FLUSH_TIMEOUT_S = 5.0
    MERGE_MAX_CHUNKS = 4  # of at most RANGE_MAX_BYTES each: bounds the messages built for one batch

    def __init__(self, settings: Settings, read_chunk: Callable[[Chunk], bytes],
                 on_published: Callable[..., None], should_shed: Callable[[], bool],
                 before_publish: Callable[[list[Chunk]], bool] = lambda batch: True):
        self.settings = settings
        # may take records out of a batch (devices deleted meanwhile); False: not yet (device list not loaded)
        self.before_publish = before_publish
        self.read_chunk = read_chunk
        # (chunks, dropped, unstored, not_published={device: samples} of messages too large for the server)
        self.on_published = on_published
        self.should_shed = should_shed
        self.queue: deque[tuple[list[Chunk], bool]] = deque()
        self._event = asyncio.Event()
        self.nc = None
        self.disconnects = 0
        self._down_since: float | None = time.monotonic()
        self._up_since = 0.0
        self._stopping = False
        self.messages = 0
        self.failures = 0  # failed attempts to publish a batch (each is retried, or shed, see run())
        self.failing = False  # the last attempt failed although NATS is connected (it refuses our messages)
        self.last_error: str | None = None
        self._async_errors = 0  # errors the server reports asynchronously, e.g. a permissions violation
        self._async_error: Exception | None = None
        self._error_log = RateLimitedLog(log, 10.0)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def submit(self, batch: list[Chunk], skip: bool = False) -> int:
        """Queue a committed batch; `skip` passes a batch that could not be stored through in order
        (the spool positions must advance in journal order) without publishing it.

        While NATS is down, batches of spilled chunks are merged into the last queued one (never the first,
        which may be in flight), so the backlog costs a few ranges, not an object per commit. Returns how
        many chunks were merged away."""
        absorbed = 0
        if not skip and len(self.queue) > 1 and not self.queue[-1][1]:
            last = self.queue[-1][0]
            if len(last) + len(batch) <= self.MERGE_MAX_CHUNKS and all(c.data is None for c in last + batch):
                for c in batch:
                    if last[-1].absorb(c):
                        absorbed += 1
                    else:
                        last.append(c)
                self._event.set()
                return absorbed
        self.queue.append((batch, skip))
        self._event.set()
        return absorbed

    async def _disconnected(self) -> None:
        self.disconnects += 1
        if not self._stopping:
            log.warning("NATS disconnected; publishing paused (storage continues)")

    async def _reconnected(self) -> None:
        self._up_since = time.monotonic()
        self.failing = False  # a new connection gets a new chance
        log.info("NATS reconnected; publishing the backlog in %.1fs", self.SETTLE_S)

    async def _error(self, e: Exception) -> None:
        # called for every failed (re)connection attempt, twice a second while NATS is away, and for errors the
        # server answers a publish with (mostly before the flush's PONG, not always: see run())
        self._async_errors += 1
        self._async_error = e
        self._error_log.warning(type(e).__name__, "NATS at %s: %s (retrying)", self.settings.nats_url,
                                e or type(e).__name__)

    async def connect_forever(self) -> None:
        backoff = 0.5
        errors = self._async_errors  # _error counts every failed connection attempt
        log.info("connecting to NATS at %s", self.settings.nats_url)
        while self.nc is None and not self._stopping:
            try:  # nats-py itself retries the first connection until it succeeds (unlimited reconnects)
                self.nc = await natsio.connect("ingest", self.settings, disconnected_cb=self._disconnected,
                                               reconnected_cb=self._reconnected, error_cb=self._error)
                # SETTLE_S is for NATS coming back, when every subscriber re-subscribes at the same time; NATS
                # found up at the first attempt already has its subscribers: publish at once
                away = self._async_errors != errors
                self._up_since = time.monotonic() - (0.0 if away else self.SETTLE_S)
                log.info("connected to NATS at %s", self.settings.nats_url)
            except Exception as e:  # noqa: BLE001 - nats raises several unrelated types when unreachable
                errors = -1  # NATS was away: the settle applies to the connection that follows
                log.warning("NATS not reachable (%s); retrying in %.1fs", e or type(e).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _wait_ready(self) -> None:
        while not self.connected or time.monotonic() - self._up_since < self.SETTLE_S:
            if self.should_shed() and self.queue:
                return
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        while True:
            if not self.queue:
                if self._stopping:
                    return
                self._event.clear()
                await self._event.wait()
                continue
            batch, skip = self.queue[0]
            if skip:
                self.queue.popleft()
                self.on_published(batch, True, True)
                continue
            messages = None
            limit, stamped, hdr_bytes = 0, False, 0
            while True:
                await self._wait_ready()
                if (not self.connected or self.failing) and self.should_shed():
                    self.queue.popleft()
                    self.on_published(batch, True)
                    await asyncio.sleep(0)  # shedding a long backlog must not hold up the datagram path
                    break
                if messages is None:
                    if not self.before_publish(batch):
                        await asyncio.sleep(0.05)
                        continue
                    try:
                        messages = build_messages([c.data if c.data is not None else self.read_chunk(c)
                                                   for c in batch])
                    except Exception:  # noqa: BLE001 - stored but unpublishable: count it and go on
                        log.exception("cannot build messages for a stored batch; it is not published")
                        self.queue.popleft()
                        self.on_published(batch, True)
                        break
                # per server: a reconnect may reach another one
                server = (self.nc.max_payload, _takes_headers(self.nc))
                if (limit, stamped) != server:
                    limit, stamped = server
                    hdr_bytes = HEADER_BYTES if stamped else 0
                    sendable, too_large, largest = _split_by_size(messages, limit - hdr_bytes)
                try:
                    before = self.disconnects, self._async_errors
                    headers = published_headers(time.time()) if stamped else None  # the receive times' clock
                    for i, (userid, body) in enumerate(sendable):
                        await self.nc.publish(samples_subject(userid), body, headers=headers)
                        if i % 256 == 255:
                            await asyncio.sleep(0)  # let datagrams in while a large backlog goes out
                            headers = published_headers(time.time()) if stamped else None
                    await self.nc.flush(timeout=self.FLUSH_TIMEOUT_S)
                    if self.failing:
                        # The server's error for a refused message can come after the flush's PONG: while it is
                        # refusing, a batch counts as published only if a second round trip brings no error either.
                        # (So the first refused batch may be counted as published; the ones after it are not.)
                        await self.nc.flush(timeout=self.FLUSH_TIMEOUT_S)
                    if self.disconnects != before[0]:
                        raise ConnectionError("disconnected while publishing")
                    if self._async_errors != before[1]:
                        raise self._async_error
                except Exception as e:  # noqa: BLE001 - any failure means: publish the batch again
                    self.failures += 1
                    self.last_error = str(e) or type(e).__name__
                    self.failing = self.connected
                    self._error_log.warning("publish", "publishing %d messages failed (%s); will retry (stored samples "
                                            "wait in the spool; past 80 %% of it the oldest are not published)",
                                            len(sendable), self.last_error)
                    retry_at = time.monotonic() + 0.5
                    while time.monotonic() < retry_at and not (self.failing and self.should_shed()):
                        await asyncio.sleep(0.05)
                    continue
                if self.failing:
                    log.info("publishing works again")
                    self.failing = False
                self.messages += len(sendable)
                self.queue.popleft()
                if too_large:  # this server would never take them: retrying cannot help; the rest went out
                    self._error_log.warning("max_payload", "%d samples of a stored batch are not published: a "
                                            "message of %d bytes exceeds the NATS server's max_payload of %d",
                                            sum(too_large.values()), largest + hdr_bytes, limit)
                self.on_published(batch, False, not_published=too_large)
                break

    async def stop(self, timeout: float) -> None:
        """Publish what is queued (up to `timeout` s), then drain the connection."""
        self._stopping = True
        self._event.set()
        deadline = time.monotonic() + timeout
        while self.queue and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.queue:
            log.warning("stopping with %d batches unpublished: they are published at the next start", len(self.queue))
        if self.nc is not None and self.nc.is_connected:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception as e:  # noqa: BLE001
                log.warning("NATS drain failed: %s", e)
        elif self.nc is not None:
            await self.nc.close()
