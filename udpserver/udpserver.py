"""UDP ingestion server: validate sensor packets, journal, store in PostgreSQL, then publish on NATS.

    python -m udpserver.udpserver [--spool-dir DIR] [--spool-max-mb N] [--memory-max-mb N]

Listens on SEMG_UDP_BIND_HOST:UDP_PORT (default SEMG_BIND_HOST; wire format: udpserver/PROTOCOL.md) and serves
GET /metrics and GET /health on SEMG_BIND_HOST:UDP_METRICS_PORT. Path of an accepted packet:

    datagram -> Ingestor (parse, device, HMAC, replay, clock) -> spool chunk (one write per receive burst;
    only now counted as accepted) -> DbWriter thread (binary COPY, commit <= 20 ms after arrival)
    -> Publisher (NATS, after commit) -> spool segment deleted.

Starts without PostgreSQL or NATS (retries with backoff); packets are rejected as `not_ready` until the
device list has been loaded once. SIGTERM/SIGINT: stop receiving, commit, publish, drain, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from semg import db, diskspace, procs, secrets, tls
from semg.config import Settings, settings_or_exit
from udpserver.ingest import BURST_MIN_SAMPLES, BURST_S, RATE_TOLERANCE, Ingestor, Record, Resume
from udpserver.metrics import MetricsServer, RateLimitedLog
from udpserver.protocol import Reject
from udpserver.publish import Publisher
from udpserver.spool import CHUNK_OVERHEAD, Chunk, ChunkBuilder, Spool, SpoolLocked, without_devices
from udpserver.storage import DbWriter, first_line, load_devices, load_resume
from udpserver.troubleshooting import hint

log = logging.getLogger("udpserver")
QUIET_STATS_S = 300.0  # the counter line of a server whose counters did not change comes this often

# Rejections that may mean the registry changed (new device, rotated key): reload it (rate-limited).
_REFRESH_ON = {Reject.UNKNOWN_DEVICE, Reject.UNKNOWN_USER, Reject.BAD_TAG, Reject.PROTOCOL_MISMATCH,
               Reject.CHANNEL_MISMATCH}


def _device_ids(values: list[str], limit: int = 1000) -> list[int] | None:
    """Device ids of `?device=7,8&device=9` (None: not asked); what is not a decimal id is ignored."""
    if not values:
        return None
    ids = [int(t) for v in values for t in v.split(",") if t.strip().isdecimal()]
    return list(dict.fromkeys(ids))[:limit]


def _kernel_drops(inode: int) -> int | None:
    """Datagrams the kernel dropped on our socket (receive buffer full), from /proc/net/udp."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if len(cols) >= 13 and cols[9] == str(inode):
                    return int(cols[12])
    return None


class Server(asyncio.DatagramProtocol):
    def __init__(self, settings: Settings, args: argparse.Namespace):
        self.settings = settings
        self.args = args
        self.tls = tls.server_context(settings)  # the metrics endpoint's HTTPS, or None
        self.loop = asyncio.get_running_loop()
        self.started = time.time()
        self.ingestor = Ingestor(args.rate_tolerance, args.burst_s)
        self.spool = Spool(args.spool_dir, max_bytes=args.spool_max_mb << 20)
        self.memory_max = args.memory_max_mb << 20
        # chunk payloads held in memory (the rest is read back from the spool) plus CHUNK_OVERHEAD per queued
        # chunk object: what --memory-max-mb bounds
        self.hot_bytes = 0
        self.writer = DbWriter(settings, self.spool.read, self._committed_from_thread, self._failed_from_thread)
        self.writer.COMMIT_INTERVAL_S = args.commit_interval_ms / 1000.0
        self.publisher = Publisher(settings, self.spool.read, self._published, self._should_shed,
                                   self._before_publish)
        self.control = ThreadPoolExecutor(1, thread_name_prefix="udpserver-registry")
        self._control_conn = None
        self.bad_log = RateLimitedLog(logging.getLogger("udpserver.packets"))
        self._builder: ChunkBuilder | None = None
        self._spool_resume: dict[int, Resume] = {}
        self._refresh_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None
        self.sock: socket.socket | None = None
        # of the UDP socket, read when it is opened: the transport closes it at shutdown, /metrics still answers
        self.sock_rcvbuf = 0
        self.sock_inode: int | None = None
        self.db_ready = False
        # counters (samples unless named packets)
        self.received_packets = 0
        self.received_bytes = 0
        self.accepted_packets = 0
        self.accepted_samples = 0
        self.stored_samples = 0
        self.published_samples = 0
        self.published_dropped_samples = 0
        self.lost_samples = 0
        self.dropped_samples = 0
        self.failed_samples = 0
        self.replayed_samples = 0
        self.unstored_samples = 0
        self.unpublished_samples = 0
        self.unpublished_bytes = 0  # spool bytes of chunks not yet published or shed (decides shedding)

    # ---- receive path (hot) -----------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr) -> None:
        self.received_packets += 1
        self.received_bytes += len(data)
        try:
            r = self.ingestor.handle(data, time.time())
        except Exception:  # a bug must cost one packet, not the socket (asyncio closes it on errors)
            self.ingestor.rejected["internal_error"] += 1
            log.exception("packet handling failed (packet dropped)")
            return
        if type(r) is Record:
            b = self._builder
            if b is None:
                b = self._builder = ChunkBuilder()
                self.loop.call_soon(self._journal)
            b.add(r)
            if r.lost:
                self.lost_samples += r.lost
        else:
            self._rejected(r, addr)

    def _rejected(self, reason: Reject, addr) -> None:
        if reason in _REFRESH_ON:
            self._refresh_wanted.set()
        if reason is not Reject.NOT_READY:
            # one line per reason and registered device every few seconds (any number of ids nobody registered
            # share one), naming the device and what to check
            device = self.ingestor.rejected_device
            key = reason.value if device is None or reason is Reject.UNKNOWN_DEVICE else f"{reason.value}/{device}"
            self.bad_log.warning(key, "rejected packet from %s:%s%s: %s: %s", addr[0], addr[1],
                                 "" if device is None else f" for device {device}", reason.value, hint(reason.value))

    def _journal(self) -> None:
        """Write the burst's records to the spool; only then do they count as accepted."""
        b, self._builder = self._builder, None
        if b is None:
            return
        keep = self.hot_bytes < self.memory_max
        chunk = self.spool.append(b, keep)
        states = self.ingestor.states
        if chunk is None:
            self.dropped_samples += b.nsamples
            for dev, (_pk, n) in b.per_device.items():
                if dev in states:
                    states[dev].dropped_samples += n
            self.bad_log.warning("spool", "spool full or unwritable: %d samples dropped", b.nsamples)
            return
        self.accepted_packets += b.nrec
        self.accepted_samples += b.nsamples
        for dev, (pk, n) in b.per_device.items():
            st = states.get(dev)
            if st is not None:
                st.accepted_packets += pk
                st.accepted_samples += n
        if keep:
            self.hot_bytes += chunk.size
        self.unstored_samples += chunk.nsamples
        self.unpublished_samples += chunk.nsamples
        self.unpublished_bytes += chunk.end - chunk.off
        if not self.writer.submit(chunk):
            self.hot_bytes += CHUNK_OVERHEAD

    def error_received(self, exc: Exception) -> None:
        self.bad_log.warning("socket", "UDP socket error: %s", exc)

    # ---- progress callbacks -----------------------------------------------------------------------
    def _committed_from_thread(self, batch: list[Chunk], _ms: float, gone: set[int]) -> None:
        self.loop.call_soon_threadsafe(self._committed, batch, gone)

    def _committed(self, batch: list[Chunk], gone: set[int]) -> None:
        if gone:
            self._drop_deleted(batch, gone)
        states = self.ingestor.states
        for c in batch:
            self.stored_samples += c.nsamples
            self.unstored_samples -= c.nsamples
            for dev, (_pk, n) in c.per_device.items():
                st = states.get(dev)
                if st is not None:
                    st.stored_samples += n
        self.spool.mark_committed(batch[-1])
        self.hot_bytes -= CHUNK_OVERHEAD * self.publisher.submit(batch)

    def _take_out(self, batch: list[Chunk], gone: set[int]) -> dict[int, int]:
        """Take the records of `gone` devices out of the chunks (so they are not published): their samples per
        device."""
        taken: dict[int, int] = {}
        for c in batch:
            hit = gone.intersection(c.per_device)
            if not hit:
                continue
            if c.data is None:  # spilled: the filtered payload is held in memory until published
                self.hot_bytes += c.size
            c.data = without_devices(c.data if c.data is not None else self.spool.read(c), hit)
            for dev in hit:
                pk, k = c.per_device.pop(dev)
                c.nrec -= pk
                c.nsamples -= k
                taken[dev] = taken.get(dev, 0) + k
        return taken

    def _drop_deleted(self, batch: list[Chunk], gone: set[int]) -> None:
        """The writer skipped the rows of devices deleted while their packets were in flight: count their
        samples as dropped, not stored, and take their records out of the chunks, so they are not published."""
        states = self.ingestor.states
        taken = self._take_out(batch, gone)
        for dev, k in taken.items():
            st = states.get(dev)
            if st is not None:
                st.dropped_samples += k
        n = sum(taken.values())
        self.failed_samples += n
        self.unstored_samples -= n
        self.unpublished_samples -= n
        log.warning("%d samples of deleted device(s) %s not stored (deleted while in flight); counted as dropped",
                    n, ", ".join(map(str, sorted(gone))))

    def _before_publish(self, batch: list[Chunk]) -> bool:
        """False while the device list is not loaded (batches recovered from the spool wait for it). Records of
        devices no longer registered (deleted after their samples were stored, e.g. while the server was down
        between the commit and the publish) are taken out: counted as not published."""
        if not self.ingestor.ready:
            return False
        devices = self.ingestor.devices
        gone = {d for c in batch for d in c.per_device if d not in devices}
        if gone:
            n = sum(self._take_out(batch, gone).values())
            self.published_dropped_samples += n
            self.unpublished_samples -= n
            log.warning("%d stored samples of deleted device(s) %s not published", n,
                        ", ".join(map(str, sorted(gone))))
        return True

    def _failed_from_thread(self, batch: list[Chunk], why: str) -> None:
        self.loop.call_soon_threadsafe(self._failed, batch, why)

    def _failed(self, batch: list[Chunk], why: str) -> None:
        n = sum(c.nsamples for c in batch)
        self.failed_samples += n
        self.unstored_samples -= n
        log.error("%d samples could not be stored (%s); counted as dropped", n, why)
        self.spool.mark_committed(batch[-1])
        self.publisher.submit(batch, skip=True)

    def _published(self, batch: list[Chunk], dropped: bool, unstored: bool = False,
                   not_published: dict[int, int] | None = None) -> None:
        """`not_published`: samples per device of the messages NATS cannot take (max_payload); the rest went out."""
        states = self.ingestor.states
        for c in batch:
            self.unpublished_samples -= c.nsamples
            self.unpublished_bytes -= c.end - c.off
            if dropped:
                if not unstored:  # samples that could not be stored are already counted as dropped
                    self.published_dropped_samples += c.nsamples
            else:
                self.published_samples += c.nsamples
                for dev, (_pk, n) in c.per_device.items():
                    st = states.get(dev)
                    if st is not None:
                        st.published_samples += n
            self.hot_bytes -= CHUNK_OVERHEAD
            if c.data is not None:
                self.hot_bytes -= c.size
                c.data = None
        for dev, n in (not_published or {}).items():
            self.published_samples -= n
            self.published_dropped_samples += n
            st = states.get(dev)
            if st is not None:
                st.published_samples -= n
        if dropped and not unstored:
            self.bad_log.warning("shed", "%d stored samples not published (spool nearly full while NATS is down or "
                                 "refuses them, too large for NATS, or unreadable)", sum(c.nsamples for c in batch))
        self.spool.mark_published(batch[-1])

    def _should_shed(self) -> bool:
        # Not spool.bytes: that only falls when housekeeping deletes a sealed segment, so every batch queued
        # meanwhile would be shed, not just the oldest ones needed to get back under the mark.
        return self.unpublished_bytes > 0.8 * self.spool.max_bytes

    # ---- registry ---------------------------------------------------------------------------------
    def _load_registry(self, known: set[int]):
        """In the control thread: the device list and where new devices' streams stand."""
        try:
            if self._control_conn is None or self._control_conn.closed:
                self._control_conn = db.connect(self.settings, application_name="semg-udpserver-registry",
                                                connect_timeout=3)
            devices = load_devices(self._control_conn)
            resume = load_resume(self._control_conn, [d for d in devices if d not in known])
            return devices, resume
        except Exception:
            if self._control_conn is not None:
                with contextlib.suppress(Exception):
                    self._control_conn.close()
                self._control_conn = None
            raise

    async def registry_loop(self) -> None:
        backoff = 0.5
        last = 0.0
        self._refresh_wanted.set()  # load at once at start
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_wanted.wait(), self.args.refresh_interval)
            # unknown ids can arrive at line rate: reload at most 4 times a second for them
            wait = last + 0.25 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._refresh_wanted.clear()
            last = time.monotonic()
            try:
                devices, resume = await self.loop.run_in_executor(
                    self.control, self._load_registry, set(self.ingestor.devices))
            except Exception as e:  # noqa: BLE001 - psycopg2 errors and connection failures alike
                if not self.db_ready:
                    log.warning("waiting for PostgreSQL to load the device list (%s); retrying in %.1fs",
                                first_line(e), backoff)
                else:
                    self.bad_log.warning("registry", "device list refresh failed: %s", first_line(e))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._refresh_wanted.set()
                continue
            backoff = 0.5
            for dev, r in self._spool_resume.items():  # the spool may be ahead of the database
                stored = resume.get(dev)
                if dev in devices and (stored is None or (r.boot, r.last_seq) > (stored.boot, stored.last_seq)):
                    resume[dev] = r
            new = self.ingestor.set_devices(devices, resume)
            if not self.db_ready:
                log.info("device list loaded: %d devices; accepting packets", len(devices))
                self.db_ready = True
            elif new:
                log.info("devices added: %s", ", ".join(map(str, sorted(new))))

    # ---- maintenance ------------------------------------------------------------------------------
    async def housekeeping_loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.2)
            try:
                self.spool.seal_idle()
                self.spool.release_published()
                self.spool.probe_writable()
            except OSError as e:
                self.bad_log.warning("housekeeping", "spool housekeeping failed: %s", e)

    async def stats_loop(self) -> None:
        prev = (time.monotonic(), 0, 0, 0)
        last_seen, last_line = None, 0.0
        disk_log = diskspace.LowSpaceLog(log)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.args.stats_interval)
            # in a thread: a stat of a hung disk must not stop the receive loop
            disk_log.update(*await asyncio.to_thread(diskspace.check, self.settings, [Path(self.args.spool_dir)]))
            now = time.monotonic()
            dt = max(now - prev[0], 1e-9)
            rej = dict(self.ingestor.rejected)
            db_state = "up" if self.writer.connected else "DOWN"
            nats_state = "DOWN" if not self.publisher.connected else "REFUSING" if self.publisher.failing else "up"
            # an idle server wrote the same line every 5 s (17,000 a day): a line when something changed, and at
            # least every QUIET_STATS_S as a sign of life
            seen = (self.received_packets, self.accepted_samples, self.stored_samples, self.published_samples,
                    self.lost_samples, self.dropped_samples + self.failed_samples, self.unstored_samples,
                    self.unpublished_samples, sorted(rej.items()), db_state, nats_state)
            if seen == last_seen and now - last_line < QUIET_STATS_S:
                prev = (now, self.received_packets, self.accepted_samples, self.stored_samples)
                continue
            last_seen, last_line = seen, now
            log.info("packets %.0f/s, accepted %.0f samples/s, stored %.0f samples/s | totals: accepted %d, "
                     "stored %d, published %d, lost %d, dropped %d, unstored %d, unpublished %d, rejected %s | "
                     "db %s, nats %s",
                     (self.received_packets - prev[1]) / dt, (self.accepted_samples - prev[2]) / dt,
                     (self.stored_samples - prev[3]) / dt, self.accepted_samples, self.stored_samples,
                     self.published_samples, self.lost_samples, self.dropped_samples + self.failed_samples,
                     self.unstored_samples, self.unpublished_samples, rej or "none", db_state, nats_state)
            prev = (now, self.received_packets, self.accepted_samples, self.stored_samples)

    # ---- metrics ----------------------------------------------------------------------------------
    def metrics(self, query: str = "") -> dict:
        rej = dict(self.ingestor.rejected)
        m = {
            "uptime_s": round(time.time() - self.started, 3),
            "ready": self.ingestor.ready,
            "db_connected": self.writer.connected,
            "nats_connected": self.publisher.connected,
            "spool_error": self.spool.write_error,
            "packets": {"received": self.received_packets, "received_bytes": self.received_bytes,
                        "accepted": self.accepted_packets, "rejected": sum(rej.values())},
            "samples": {"accepted": self.accepted_samples, "stored": self.stored_samples,
                        "published": self.published_samples, "lost": self.lost_samples,
                        "dropped": self.dropped_samples + self.failed_samples,
                        "publish_dropped": self.published_dropped_samples, "replayed": self.replayed_samples},
            "buffered": {"unstored_samples": self.unstored_samples, "unpublished_samples": self.unpublished_samples,
                         "spool_bytes": self.spool.bytes, "spool_max_bytes": self.spool.max_bytes,
                         "memory_bytes": self.hot_bytes, "memory_max_bytes": self.memory_max},
            "rejected": rej,
            "db": {"commits": self.writer.commits, "last_commit_rows": self.writer.last_commit_rows,
                   "last_commit_ms": round(self.writer.last_commit_ms, 2), "queued_chunks": len(self.writer.queue)},
            "nats": {"messages": self.publisher.messages, "queued_batches": len(self.publisher.queue),
                     "failures": self.publisher.failures, "failing": self.publisher.failing,
                     "last_error": self.publisher.last_error},
            "socket": {"rcvbuf_bytes": self.sock_rcvbuf,
                       "kernel_drops": _kernel_drops(self.sock_inode) if self.sock_inode is not None else None},
        }
        q = urllib.parse.parse_qs(query)
        wanted = _device_ids(q.get("device", []))  # ?device=7 (or 7,8 / repeated): those devices only
        if wanted is not None or q.get("devices") != ["0"]:
            now, states = time.time(), self.ingestor.states
            ids = states if wanted is None else [d for d in wanted if d in states]
            devices = self.ingestor.devices
            m["devices"] = {str(d): states[d].as_dict(now, devices[d].boot_offset if d in devices else 0)
                            for d in ids}
        return m

    def health(self) -> tuple[int, dict]:
        spool_error = self.spool.write_error
        body = {"status": "ok" if self.ingestor.ready and self.writer.connected and self.publisher.connected
                and spool_error is None else "degraded" if self.ingestor.ready else "starting",
                "ready": self.ingestor.ready, "db_connected": self.writer.connected,
                "nats_connected": self.publisher.connected, "spool_error": spool_error,
                "unstored_samples": self.unstored_samples, "unpublished_samples": self.unpublished_samples}
        return (200 if self.ingestor.ready else 503), body

    # ---- lifecycle --------------------------------------------------------------------------------
    def _open_socket(self) -> socket.socket:
        host = self.settings.udp_bind_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        want = self.args.rcvbuf_mb << 20
        # SO_RCVBUFFORCE goes beyond net.core.rmem_max when we may (CAP_NET_ADMIN); bursts wait there.
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), want)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if got < want:
            log.warning("UDP receive buffer is %d KiB (asked for %d KiB): raise net.core.rmem_max for bursts",
                        got >> 10, want >> 10)
        sock.bind((host, self.settings.udp_port))
        sock.setblocking(False)
        return sock

    def recover(self) -> None:
        chunks, self._spool_resume = self.spool.recover()
        if not chunks:
            return
        uncommitted = [c for c in chunks if c.replayed]
        committed = [c for c in chunks if not c.replayed]
        n_unc = sum(c.nsamples for c in uncommitted)
        log.info("spool: replaying %d uncommitted samples and publishing %d committed ones from the last run",
                 n_unc, sum(c.nsamples for c in committed))
        self.replayed_samples = sum(c.nsamples for c in chunks)
        self.unpublished_samples += self.replayed_samples
        self.unpublished_bytes += sum(c.end - c.off for c in chunks)
        self.unstored_samples += n_unc
        # ranges of spilled chunks (Spool.recover merges them), each counted against the memory bound
        if committed:
            self.hot_bytes += CHUNK_OVERHEAD * (len(committed) - self.publisher.submit(committed))
        for c in uncommitted:
            if not self.writer.submit(c):
                self.hot_bytes += CHUNK_OVERHEAD

    async def run(self) -> int:
        self.recover()
        self.sock = self._open_socket()
        self.sock_rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.sock_inode = os.fstat(self.sock.fileno()).st_ino
        self.transport, _ = await self.loop.create_datagram_endpoint(lambda: self, sock=self.sock)
        metrics = MetricsServer(self.settings.semg_bind_host or "127.0.0.1", self.settings.udp_metrics_port,
                                self.metrics, self.health, lambda: secrets.service_api_key(self.settings),
                                tls=self.tls)
        await metrics.start()
        log.info("listening on udp %s:%d, metrics on %s://%s:%d/metrics, spool %s",
                 self.settings.udp_bind_host, self.settings.udp_port, self.settings.http_scheme,
                 self.settings.semg_bind_host, self.settings.udp_metrics_port, self.spool.dir)
        self.writer.start()
        tasks = [asyncio.create_task(coro) for coro in (
            self.publisher.connect_forever(), self.publisher.run(), self.registry_loop(),
            self.housekeeping_loop(), self.stats_loop())]
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        log.info("stopping: no longer receiving; committing and publishing what is buffered")
        self.transport.close()
        self._journal()
        self.writer.stop(timeout=self.args.shutdown_timeout)
        await self.loop.run_in_executor(None, self.writer.join)
        # callbacks the writer queued before it exited must run before we publish the rest
        await asyncio.sleep(0)
        await self.publisher.stop(timeout=self.args.shutdown_timeout / 2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.spool.release_published()
        self.spool.close()
        await metrics.close()
        self.control.shutdown(wait=False)
        log.info("stopped: accepted %d, stored %d, published %d samples; %d unstored and %d unpublished stay "
                 "in the spool", self.accepted_samples, self.stored_samples, self.published_samples,
                 self.unstored_samples, self.unpublished_samples)
        return 0


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m udpserver.udpserver", description=__doc__.splitlines()[0])
    p.add_argument("--spool-dir", default=str(settings.state_dir / "spool"),
                   help="journal of accepted packets (default $SEMG_STATE_DIR/spool)")
    p.add_argument("--spool-max-mb", type=int, default=2048,
                   help="journal bound: while PostgreSQL is down, packets beyond it are counted as dropped")
    p.add_argument("--memory-max-mb", type=int, default=256,
                   help="journaled data also kept in memory; beyond it, it is read back from the spool")
    p.add_argument("--rcvbuf-mb", type=int, default=32, help="UDP socket receive buffer")
    p.add_argument("--commit-interval-ms", type=float, default=DbWriter.COMMIT_INTERVAL_S * 1000,
                   help="longest a received packet waits for its batch commit (default %(default)g ms)")
    p.add_argument("--refresh-interval", type=float, default=2.0, help="seconds between device list reloads")
    p.add_argument("--stats-interval", type=float, default=5.0, help="seconds between counter log lines")
    p.add_argument("--rate-tolerance", type=_non_negative, default=RATE_TOLERANCE,
                   help="a binary device may send its registered rate times this, in the long run; beyond it, its "
                        "packets are rejected as too_fast (default %(default)g; 0 = no limit, e.g. for replaying "
                        "recordings faster than real time)")
    p.add_argument("--burst-s", type=_non_negative, default=BURST_S,
                   help="seconds of samples at the registered rate a device may send at once on top of it (an "
                        f"outage backlog; at least {BURST_MIN_SAMPLES} samples; default %(default)g)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, how long to wait for an unreachable PostgreSQL/NATS")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    settings = settings_or_exit("udpserver")
    args = parse_args(argv, settings)
    if problem := tls.problem(settings):
        print(f"udpserver: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up of the datagram path
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    procs.tune_live_process()

    async def _main() -> int:
        try:
            server = Server(settings, args)
        except SpoolLocked as e:
            log.error("%s", e)
            return 2
        try:
            return await server.run()
        except OSError as e:
            log.error("cannot listen: %s (UDP_PORT=%d, UDP_METRICS_PORT=%d)", e, settings.udp_port,
                      settings.udp_metrics_port)
            return 2

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
