"""PostgreSQL side of ingestion: binary COPY of journaled chunks into sample_blocks, the writer thread, and
the device registry / stream positions the validator needs."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import psycopg2
import psycopg2.errors

from semg import db
from semg.config import Settings
from semg.db import first_line
from udpserver.ingest import DeviceInfo, Resume
from udpserver.spool import Chunk, records_by_k

log = logging.getLogger("udpserver.storage")

COLUMNS = ("user_id, device_id, boot, seq0, n, channels, sample_rate_hz, device_millis0, device_time0, "
           "server_ts, values")
_COPY_SQL = f"COPY {{table}} ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"
_STAGE_DDL = "CREATE TEMP TABLE IF NOT EXISTS sample_blocks_stage (LIKE sample_blocks) ON COMMIT DELETE ROWS"
# The batch's devices that still exist, locked until the commit: a device deleted meanwhile (its rows are
# skipped) cannot make the foreign key refuse the whole batch by being deleted between this and the insert.
_STAGE_LOCK_DEVICES = "SELECT id FROM devices WHERE id = ANY(%s) FOR KEY SHARE"
# Only the rows of those devices; rows already stored (spool replay, a retried commit whose outcome was
# unknown) are skipped by the primary key.
_STAGE_INSERT = (f"INSERT INTO sample_blocks ({COLUMNS}) SELECT {COLUMNS} FROM sample_blocks_stage "
                 "WHERE device_id = ANY(%s) ON CONFLICT DO NOTHING")

# ---- binary COPY encoding ----------------------------------------------------------------------------
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_PG_EPOCH = 946684800.0  # 2000-01-01 in unix seconds
_INT2_OID = 21
@functools.lru_cache(maxsize=64)
def _row_dtype(k: int) -> tuple[np.dtype, np.ndarray]:
    """For records of k values: the COPY row layout and a row holding its constant fields."""
    # a binary COPY row: field count, then (byte length, big-endian value) per column; int2[] as a
    # one-dimensional array header followed by (length 2, value) per element
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("user", ">i8"), ("l2", ">i4"), ("dev", ">i8"),
                    ("l3", ">i4"), ("boot", ">i8"), ("l4", ">i4"), ("seq0", ">i8"), ("l5", ">i4"), ("n", ">i2"),
                    ("l6", ">i4"), ("ch", ">i2"), ("l7", ">i4"), ("rate", ">f4"), ("l8", ">i4"), ("m0", ">f8"),
                    ("l9", ">i4"), ("t0", ">i8"), ("l10", ">i4"), ("ts", ">i8"), ("l11", ">i4"), ("ndim", ">i4"),
                    ("hasnull", ">i4"), ("oid", ">i4"), ("dim", ">i4"), ("lbound", ">i4"),
                    ("elen", ">i4", (k,)), ("vals", ">i2", (k,))])
    # numpy cannot interleave two sub-arrays, so elements are written through a (k, 2) view of 6-byte items
    const = np.zeros(1, row)
    for name, v in (("nf", 11), ("l1", 8), ("l2", 8), ("l3", 8), ("l4", 8), ("l5", 2), ("l6", 2), ("l7", 4),
                    ("l8", 8), ("l9", 8), ("l10", 8), ("l11", 20 + 6 * k), ("ndim", 1), ("oid", _INT2_OID),
                    ("dim", k), ("lbound", 1)):
        const[name] = v
    return row, const


_ELEM = np.dtype([("len", ">i4"), ("val", ">i2")])


def copy_payload(payloads: list[bytes]) -> tuple[bytes, int, int]:
    """Binary COPY stream for the records of several chunk payloads -> (data, rows, samples).

    Vectorised: records of equal size are converted column by column with numpy, no per-row Python work
    beyond finding where each record starts. Row order does not matter to COPY.
    """
    parts = [_COPY_HEADER]
    rows = samples = 0
    for k, r in records_by_k(b"".join(payloads)).items():
        row, const = _row_dtype(k)
        out = np.empty(len(r), row)
        out[:] = const[0]
        for name in ("user", "dev", "boot", "seq0", "n", "ch", "rate", "m0"):
            out[name] = r[name]
        out["t0"] = np.rint((r["t0"] - _PG_EPOCH) * 1e6)
        out["ts"] = np.rint((r["ts"] - _PG_EPOCH) * 1e6)
        # rewrite the trailing 6k bytes of each row as interleaved (length 2, value) pairs
        tail = out.view(np.uint8).reshape(len(r), row.itemsize)[:, row.itemsize - 6 * k:]
        elems = np.empty((len(r), k), _ELEM)
        elems["len"] = 2
        elems["val"] = r["vals"]
        tail[:] = elems.view(np.uint8).reshape(len(r), 6 * k)
        parts.append(out.tobytes())
        rows += len(r)
        samples += int(r["n"].sum())
    if rows == 0:
        return b"", 0, 0
    parts.append(_COPY_TRAILER)
    return b"".join(parts), rows, samples


def copy_into(cur, table: str, data: bytes) -> None:
    cur.copy_expert(_COPY_SQL.format(table=table), io.BytesIO(data), size=1 << 20)


# ---- registry -----------------------------------------------------------------------------------------
def load_devices(conn) -> dict[int, DeviceInfo]:
    with conn.cursor() as cur:
        cur.execute("SELECT id, user_id, protocol, channel_count, sample_rate_hz, secret_key, boot_offset FROM devices")
        rows = cur.fetchall()
    conn.rollback()  # end the read transaction: no snapshot held between refreshes
    return {r[0]: DeviceInfo(r[0], r[1], r[2], r[3], float(r[4]), bytes(r[5]) if r[5] is not None else None,
                             int(r[6])) for r in rows}


def load_resume(conn, device_ids: list[int]) -> dict[int, Resume]:
    """The last stored block of each device (its latest boot), read backwards along the primary key."""
    if not device_ids:
        return {}
    with conn.cursor() as cur:
        cur.execute(
            """SELECT d.id, b.boot, b.seq0 + b.n - 1, b.device_millis0 + (b.n - 1) * 1000.0 / b.sample_rate_hz,
                      extract(epoch FROM b.server_ts)
               FROM unnest(%s::bigint[]) AS d(id)
               CROSS JOIN LATERAL (SELECT boot, seq0, n, sample_rate_hz, device_millis0, server_ts
                                   FROM sample_blocks s WHERE s.device_id = d.id
                                   ORDER BY boot DESC, seq0 DESC LIMIT 1) b""",
            (list(device_ids),),
        )
        rows = cur.fetchall()
    conn.rollback()
    return {r[0]: Resume(int(r[1]), int(r[2]), float(r[3]), float(r[4])) for r in rows}


# ---- writer thread ------------------------------------------------------------------------------------
class DbWriter(threading.Thread):
    """Commits journaled chunks in journal order, in batches, on its own connection.

    A batch commits at most COMMIT_INTERVAL_S after its first chunk arrived (sooner under load, when the
    previous commit took that long). While PostgreSQL is unreachable the batch waits and is retried with
    backoff; nothing is taken off the queue until it is committed.
    """

    # Short: every received sample waits up to this long before it is stored and then published, which is
    # on the live-recognition path. Under load batches grow by themselves (the previous commit took longer).
    COMMIT_INTERVAL_S = 0.004
    PING_IDLE_S = 2.0
    MAX_BATCH_RECORDS = 50_000
    MAX_BATCH_BYTES = 32 << 20

    def __init__(self, settings: Settings, read_chunk: Callable[[Chunk], bytes],
                 on_committed: Callable[[list[Chunk], float, set[int]], None],
                 on_failed: Callable[[list[Chunk], str], None]):
        super().__init__(name="udpserver-db-writer", daemon=True)
        self.settings = settings
        self.read_chunk = read_chunk
        # called in this thread: (chunks, commit duration, devices of the batch deleted meanwhile: rows not stored)
        self.on_committed = on_committed
        self.on_failed = on_failed        # a batch PostgreSQL refuses for a reason other than being down
        self.queue: deque[Chunk] = deque()
        self._queue_lock = threading.Lock()  # submit() may extend the last queued chunk: never one being taken
        self._wake = threading.Event()
        self._stop_at: float | None = None
        self.connected = False
        self.commits = 0
        self.last_commit_ms = 0.0
        self.last_commit_rows = 0
        self.last_commit_at = 0.0
        self._conn = None
        self._next_log = 0.0
        self._last_ping = 0.0

    def submit(self, chunk: Chunk) -> bool:
        """Queue a chunk; True if it was merged into the spilled chunk queued before it (see Chunk.absorb)."""
        with self._queue_lock:
            merged = bool(self.queue) and self.queue[-1].absorb(chunk)
            if not merged:
                self.queue.append(chunk)
        self._wake.set()
        return merged

    def stop(self, timeout: float) -> None:
        """Finish what is queued, but give up after `timeout` s if PostgreSQL is unreachable (the chunks
        stay in the spool for the next start)."""
        self._stop_at = time.monotonic() + timeout
        self._wake.set()

    def _take(self) -> list[Chunk]:
        batch: list[Chunk] = []
        records = size = 0
        with self._queue_lock:
            while self.queue and records < self.MAX_BATCH_RECORDS and size < self.MAX_BATCH_BYTES:
                c = self.queue.popleft()
                batch.append(c)
                records += c.nrec
                size += c.size
        return batch

    def _connect(self):
        conn = db.connect(self.settings, application_name="semg-udpserver", connect_timeout=3)
        # A single COPY is atomic on its own: in autocommit mode a batch costs two round trips to PostgreSQL
        # instead of four (no BEGIN, no COMMIT), which under load is ~1 ms less on the live path per commit.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(_STAGE_DDL)
        return conn

    def _write(self, batch: list[Chunk]) -> tuple[int, set[int]]:
        """-> (rows sent, devices of the batch that no longer exist: their rows were not stored)."""
        payloads = [c.data if c.data is not None else self.read_chunk(c) for c in batch]
        data, rows, _ = copy_payload(payloads)
        conn = self._conn
        if any(c.replayed for c in batch):
            return rows, self._write_staged(conn, data, batch)
        try:
            with conn.cursor() as cur:
                copy_into(cur, "sample_blocks", data)  # autocommit: stored (and durable) when this returns
        except (psycopg2.errors.UniqueViolation, psycopg2.errors.ForeignKeyViolation) as e:
            # Already stored (an earlier commit whose outcome we never saw) or the device was deleted.
            log.info("batch needs the idempotent path: %s", first_line(e))
            return rows, self._write_staged(conn, data, batch)
        return rows, set()

    @staticmethod
    def _write_staged(conn, data: bytes, batch: list[Chunk]) -> set[int]:
        # one transaction: the stage table empties itself at commit
        devices = sorted({d for c in batch for d in c.per_device})
        conn.autocommit = False
        try:
            with conn, conn.cursor() as cur:
                copy_into(cur, "sample_blocks_stage", data)
                cur.execute(_STAGE_LOCK_DEVICES, (devices,))
                present = [r[0] for r in cur.fetchall()]
                cur.execute(_STAGE_INSERT, (present,))
        finally:
            conn.autocommit = True
        return set(devices).difference(present)

    def _log_down(self, err: BaseException, backoff: float) -> None:
        now = time.monotonic()
        if now >= self._next_log:
            log.warning("PostgreSQL unavailable (%s); %d chunks waiting, retrying every %.1fs",
                        first_line(err), len(self.queue), backoff)
            self._next_log = now + 10.0

    def run(self) -> None:
        batch: list[Chunk] = []
        backoff = 0.2      # between connection attempts
        retry_wait = 0.2   # between attempts to write a batch that failed on a live connection
        while True:
            if self._conn is None and not (self._stop_at is not None and not batch and not self.queue):
                # connect eagerly (health reports it), and keep trying while PostgreSQL is away
                try:
                    self._conn = self._connect()
                    log.info("connected to PostgreSQL")
                    self.connected = True
                    backoff = 0.2
                except psycopg2.Error as e:
                    self._log_down(e, backoff)
                    if self._stop_at is not None and time.monotonic() >= self._stop_at:
                        log.warning("stopping with %d chunks not stored: they stay in the spool for the next start",
                                    len(batch) + len(self.queue))
                        break
                    self._sleep_backoff(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            if not batch:
                if not self.queue:
                    if self._stop_at is not None:
                        break
                    self._wake.wait(0.5)
                    self._wake.clear()
                    self._ping_if_idle()
                    continue
                # let a burst accumulate, but never hold the first chunk longer than the commit interval
                wait = self.COMMIT_INTERVAL_S - (time.monotonic() - self.last_commit_at)
                if wait > 0 and self._stop_at is None:
                    time.sleep(wait)
                batch = self._take()
            try:
                t0 = time.monotonic()
                rows, gone = self._write(batch)
                self.last_commit_at = time.monotonic()
                self.last_commit_ms = (self.last_commit_at - t0) * 1000
                self.last_commit_rows = rows
                self.commits += 1
                self.on_committed(batch, self.last_commit_ms, gone)
                batch = []
                retry_wait = 0.2
            except (psycopg2.DataError, psycopg2.IntegrityError) as e:
                # PostgreSQL refuses these rows themselves: retrying would block everything behind them.
                log.error("PostgreSQL rejected a batch of %d chunks: %s", len(batch), first_line(e))
                with contextlib.suppress(psycopg2.Error):
                    self._conn.rollback()
                self.on_failed(batch, first_line(e))
                batch = []
            except psycopg2.Error as e:
                # unreachable, restarting, schema not created yet, permissions...: keep the batch and retry
                self._drop_connection()
                self._log_down(e, retry_wait)
                if self._stop_at is not None and time.monotonic() >= self._stop_at:
                    log.warning("stopping with %d chunks not stored: they stay in the spool for the next start",
                                len(batch) + len(self.queue))
                    break
                time.sleep(retry_wait)
                retry_wait = min(retry_wait * 2, 5.0)
            except Exception as e:  # noqa: BLE001 - e.g. a spool file gone: count it, keep the thread alive
                log.exception("storing a batch of %d chunks failed", len(batch))
                self._drop_connection()
                self.on_failed(batch, f"{type(e).__name__}: {e}")
                batch = []
        self._drop_connection()

    def _sleep_backoff(self, backoff: float) -> None:
        """Wait out a connection backoff. submit() sets _wake for every received burst, which must not cut
        the wait short (that was one connection attempt per burst); only stop() ends it early, for one last
        attempt, and the wait never runs past the stop deadline."""
        stopping = self._stop_at is not None
        deadline = time.monotonic() + backoff
        while True:
            if self._stop_at is not None:
                if not stopping:
                    return
                deadline = min(deadline, self._stop_at)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()

    def _ping_if_idle(self) -> None:
        """An idle connection only notices PostgreSQL going away when used: check it now and then, so
        health and metrics tell the truth between bursts."""
        now = time.monotonic()
        if self._conn is None or now - max(self.last_commit_at, self._last_ping) < self.PING_IDLE_S:
            return
        self._last_ping = now
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT 1")
        except psycopg2.Error as e:
            self._drop_connection()
            self._log_down(e, 0.2)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self.connected and self._stop_at is None:
            log.warning("lost the PostgreSQL connection")
        self.connected = False
