"""Append-only journal of accepted packets, so nothing counted as accepted is lost, even by `kill -9`.

Layout under the spool directory:
    seg-0000000001.spool ...   segments; each a sequence of chunks
    cursors.json               {"committed": [seg, offset], "published": [seg, offset]}
    spool.lock                 flock: one server per spool directory

A chunk is what one receive burst accepted, written with one write() *before* its packets are counted:
    header  <4sIII  magic b"SPK1", payload length, crc32(payload), record count
    payload records, each  <qqqqHHfddd  user_id, device_id, boot, seq0, n, channels, rate_hz, millis0,
                                        time0 (unix s), server_ts (unix s)
            followed by n * channels int16 LE values.
A write that a kill interrupts leaves a chunk whose length or CRC does not check out; it was never counted,
and recovery truncates it. A chunk that does not check out before valid ones (damage, not an interrupted
write) is skipped, so only its own packets are lost. The page cache survives a process kill, so no fsync
per chunk is needed.

Chunks are committed to PostgreSQL and then published strictly in journal order, so two positions describe
the progress; a segment is deleted once everything in it is published. On start, chunks after `committed`
are inserted again (ON CONFLICT DO NOTHING makes that idempotent) and chunks after `published` published.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from udpserver.ingest import Record, Resume

log = logging.getLogger("udpserver.spool")

CHUNK_MAGIC = b"SPK1"
CHUNK_HDR = struct.Struct("<4sIII")
REC_HDR = struct.Struct("<qqqqHHfddd")
_SEG_PREFIX, _SEG_SUFFIX = "seg-", ".spool"
_SET_ASIDE = ".unreadable"  # appended to the name of a segment recovery cannot read
# Heap of a queued Chunk (object, per_device dict and lists), counted against --memory-max-mb: one per
# receive burst adds up to gigabytes for a full spool of small bursts, beyond the payload bytes.
CHUNK_OVERHEAD = 512
# Spilled chunks next to each other in a segment are merged into one range of at most this many bytes,
# so a backlog read back from the spool costs one object per range instead of one per burst.
RANGE_MAX_BYTES = 1 << 20


class Chunk:
    __slots__ = ("seg", "off", "end", "nrec", "nsamples", "per_device", "data", "replayed")

    def __init__(self, seg: int, off: int, end: int, nrec: int, nsamples: int, per_device: dict[int, list[int]],
                 data: bytes | None, replayed: bool = False):
        self.seg = seg
        self.off = off            # offset of the chunk header in the segment
        self.end = end            # offset just after the chunk
        self.nrec = nrec
        self.nsamples = nsamples
        self.per_device = per_device
        self.data = data          # the payload while it is kept in memory; None -> read back from the file
        self.replayed = replayed  # recovered at start: may already be in the database

    @property
    def size(self) -> int:
        return self.end - self.off - CHUNK_HDR.size

    def absorb(self, other: Chunk) -> bool:
        """Extend this spilled chunk by the spilled chunk that follows it in the segment (False if not)."""
        if (self.data is not None or other.data is not None or other.seg != self.seg or other.off != self.end
                or other.replayed != self.replayed or other.end - self.off > RANGE_MAX_BYTES):
            return False
        self.end = other.end
        self.nrec += other.nrec
        self.nsamples += other.nsamples
        for dev, (pk, n) in other.per_device.items():
            c = self.per_device.get(dev)
            if c is None:
                self.per_device[dev] = [pk, n]
            else:
                c[0] += pk
                c[1] += n
        return True


class ChunkBuilder:
    """Accumulates the records of one receive burst."""

    __slots__ = ("parts", "nrec", "nsamples", "per_device")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.nrec = 0
        self.nsamples = 0
        self.per_device: dict[int, list[int]] = {}  # device -> [packets, samples]

    def add(self, r: Record) -> None:
        self.parts.append(REC_HDR.pack(r.user_id, r.device_id, r.boot, r.seq0, r.n, r.channels, r.rate_hz,
                                       r.millis0, r.time0, r.server_ts) + r.values)
        self.nrec += 1
        self.nsamples += r.n
        c = self.per_device.get(r.device_id)
        if c is None:
            self.per_device[r.device_id] = [1, r.n]
        else:
            c[0] += 1
            c[1] += r.n


def iter_records(payload: bytes) -> Iterator[tuple[tuple, int, int]]:
    """(header fields, offset of the values, byte length of the values) for each record of a chunk."""
    off, end, hsize, unpack = 0, len(payload), REC_HDR.size, REC_HDR.unpack_from
    while off < end:
        h = unpack(payload, off)
        vlen = 2 * h[4] * h[5]
        yield h, off + hsize, vlen
        off += hsize + vlen


def without_devices(payload: bytes, devices: set[int]) -> bytes:
    """A chunk payload without the records of `devices`."""
    hsize = REC_HDR.size
    return b"".join(payload[voff - hsize:voff + vlen] for h, voff, vlen in iter_records(payload)
                    if h[1] not in devices)


_K_AT = struct.Struct("<HH")  # n, channels inside a record header
_K_OFFSET = 32


@functools.lru_cache(maxsize=64)
def record_dtype(k: int) -> np.dtype:
    """A record with k values as a numpy structured type (same bytes as REC_HDR + values)."""
    dt = np.dtype([("user", "<i8"), ("dev", "<i8"), ("boot", "<i8"), ("seq0", "<i8"), ("n", "<u2"), ("ch", "<u2"),
                   ("rate", "<f4"), ("m0", "<f8"), ("t0", "<f8"), ("ts", "<f8"), ("vals", "<i2", (k,))])
    assert dt.itemsize == REC_HDR.size + 2 * k
    return dt


def records_by_k(payload: bytes) -> dict[int, np.ndarray]:
    """The records of (concatenated) chunk payloads as structured arrays grouped by value count k, each
    in journal order. Only the record starts are found in Python; the fields are read by numpy."""
    offs: dict[int, list[int]] = {}
    hsize, unpack = REC_HDR.size, _K_AT.unpack_from
    off, end = 0, len(payload)
    while off < end:
        n, ch = unpack(payload, off + _K_OFFSET)
        k = n * ch
        offs.setdefault(k, []).append(off)
        off += hsize + 2 * k
    if len(offs) == 1:  # one record size: the payload is one array
        k = next(iter(offs))
        return {k: np.frombuffer(payload, dtype=record_dtype(k))}
    buf = np.frombuffer(payload, dtype=np.uint8)
    groups = {}
    for k, starts in offs.items():
        dt = record_dtype(k)
        groups[k] = buf[np.asarray(starts)[:, None] + np.arange(dt.itemsize)].view(dt).ravel()
    return groups


def _chunk_end(buf: bytes, off: int) -> int | None:
    """The end of the chunk starting at `off` if its header, length and CRC check out, else None."""
    if off + CHUNK_HDR.size > len(buf):
        return None
    magic, length, crc, _nrec = CHUNK_HDR.unpack_from(buf, off)
    start = off + CHUNK_HDR.size
    if magic != CHUNK_MAGIC or start + length > len(buf) or zlib.crc32(buf[start:start + length]) != crc:
        return None
    return start + length


def _next_chunk(buf: bytes, off: int) -> int | None:
    """The offset of the first chunk at or after `off` that checks out, or None."""
    off = buf.find(CHUNK_MAGIC, off)
    while off != -1:
        if _chunk_end(buf, off) is not None:
            return off
        off = buf.find(CHUNK_MAGIC, off + 1)
    return None


# While writes fail: how often to try a probe file, and its size (about a receive burst's chunk)
PROBE_INTERVAL_S = 2.0
PROBE_BYTES = 64 * 1024


class SpoolLocked(RuntimeError):
    pass


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 32 << 20, segment_age_s: float = 1.0):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segment_age_s = segment_age_s
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._lock_fd = os.open(self.dir / "spool.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool directory {self.dir} is in use by another udpserver") from None
        self.seg_sizes: dict[int, int] = {}   # live segments -> bytes
        self.sealed: set[int] = set()
        self.cur_seg = 0
        self._fd: int | None = None
        self._opened_at = 0.0
        self.committed = (0, 0)
        self.published = (0, 0)
        self._cursors_dirty = False
        self._saved_at = 0.0
        # why the last append could not be written (disk full, I/O error...), None once one is: health reports it
        self.write_error: str | None = None
        self._probed_at = 0.0

    # ---- recovery -------------------------------------------------------------------------------
    def _path(self, seg: int) -> Path:
        return self.dir / f"{_SEG_PREFIX}{seg:010d}{_SEG_SUFFIX}"

    def recover(self) -> tuple[list[Chunk], dict[int, Resume]]:
        """Scan the segments left by a previous run: their valid chunks (payload not kept in memory) and
        the furthest position of every device found in them. Torn tails are truncated. A segment that cannot
        be read is set aside (renamed *.unreadable) and comes back, after the others, once it can be read."""
        cur = self.dir / "cursors.json"
        if cur.exists():
            try:
                c = json.loads(cur.read_text())
                self.committed, self.published = tuple(c["committed"]), tuple(c["published"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("unreadable %s: replaying the whole spool (idempotent)", cur)
        chunks: list[Chunk] = []
        resume: dict[int, Resume] = {}
        segs = []
        for p in self.dir.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}"):
            number = p.name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)]
            if number.isdecimal() and p.name == self._path(int(number)).name:
                segs.append(int(number))
            else:
                log.warning("spool: ignoring %s, which is not a spool segment", p.name)
        segs.sort()
        aside = sorted(self.dir.glob(f"{_SEG_PREFIX}*{_SEG_SUFFIX}{_SET_ASIDE}"))
        for seg in segs:
            path = self._path(seg)
            try:
                buf = path.read_bytes()
            except OSError as e:  # a directory, another owner or mode, an I/O error: the rest must still come back
                self._set_aside(path, e)
                continue
            self._scan(seg, path, buf, chunks, resume)
        # New segments must sort after everything the cursors have seen, even if all files are gone.
        self.cur_seg = max([0, self.committed[0], self.published[0], *segs])
        # Set aside by an earlier start and readable now: the cursors have passed its number, so it is stored
        # under a new one, after everything else (re-inserting what may already be stored is idempotent).
        for path in aside:
            try:
                buf = path.read_bytes()
            except OSError as e:
                log.error("spool segment %s still cannot be read (%s): its packets wait there", path,
                          e.strerror or e)
                continue
            self.cur_seg += 1
            os.rename(path, self._path(self.cur_seg))
            log.warning("spool segment %s can be read again: its packets are stored (as %s)", path.name,
                        self._path(self.cur_seg).name)
            self._scan(self.cur_seg, self._path(self.cur_seg), buf, chunks, resume)
        self.release_published()
        return chunks, resume

    def _set_aside(self, path: Path, err: OSError) -> None:
        why = err.strerror or str(err)
        try:
            os.rename(path, path.with_name(path.name + _SET_ASIDE))
        except OSError as e:
            log.error("spool segment %s cannot be read (%s) nor set aside (%s): its packets are not stored",
                      path, why, e.strerror or e)
            return
        log.error("spool segment %s cannot be read (%s): set aside as %s%s; its packets are stored by the first "
                  "start after it can be read", path, why, path.name, _SET_ASIDE)

    def _scan(self, seg: int, path: Path, buf: bytes, chunks: list[Chunk], resume: dict[int, Resume]) -> None:
        """Add the valid chunks of segment `seg` (contents `buf`) not yet published to `chunks`, its devices'
        positions to `resume`; truncate a torn tail."""
        off = 0
        while off + CHUNK_HDR.size <= len(buf):
            if _chunk_end(buf, off) is None:
                # A torn tail (nothing valid after it) is cut off below; damage before valid chunks (a bad
                # disk block, a power loss) costs only the damaged bytes, not every chunk after them.
                nxt = _next_chunk(buf, off + 1)
                if nxt is None:
                    break
                log.error("spool %s: %d damaged bytes at offset %d skipped (the packets in them are lost); "
                          "the chunks after them are recovered", path.name, nxt - off, off)
                off = nxt
            _magic, length, _crc, nrec = CHUNK_HDR.unpack_from(buf, off)
            start = off + CHUNK_HDR.size
            payload = buf[start:start + length]
            per_device: dict[int, list[int]] = {}
            nsamples = 0
            for h, _voff, _vlen in iter_records(payload):
                dev, boot, seq0, n = h[1], h[2], h[3], h[4]
                c = per_device.setdefault(dev, [0, 0])
                c[0] += 1
                c[1] += n
                nsamples += n
                last = seq0 + n - 1
                r = resume.get(dev)
                if r is None or (boot, last) > (r.boot, r.last_seq):
                    resume[dev] = Resume(boot, last, h[7] + (n - 1) * 1000.0 / h[6], h[9])
            end = start + length
            if (seg, end) > self.published:
                c = Chunk(seg, off, end, nrec, nsamples, per_device, None, replayed=(seg, end) > self.committed)
                if not (chunks and chunks[-1].absorb(c)):
                    chunks.append(c)
            off = end
        if off < len(buf):
            log.warning("spool %s: discarding %d bytes of an interrupted write at offset %d",
                        path.name, len(buf) - off, off)
            os.truncate(path, off)
        self.seg_sizes[seg] = off
        self.sealed.add(seg)

    # ---- appending (event loop thread) ------------------------------------------------------------
    @property
    def bytes(self) -> int:
        return sum(self.seg_sizes.values())

    def _roll(self, now: float) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.sealed.add(self.cur_seg)
        fd = os.open(self._path(self.cur_seg + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.cur_seg += 1
        self._fd = fd
        self.seg_sizes[self.cur_seg] = 0
        self._opened_at = now

    def append(self, b: ChunkBuilder, keep: bool) -> Chunk | None:
        """Journal a burst. None when the spool is full or the write failed (the caller counts a drop)."""
        payload = b"".join(b.parts)
        size = CHUNK_HDR.size + len(payload)
        if self.bytes + size > self.max_bytes:
            return None
        now = time.monotonic()
        if self._fd is None or self.seg_sizes[self.cur_seg] >= self.segment_bytes \
                or now - self._opened_at >= self.segment_age_s:
            try:
                self._roll(now)
            except OSError as e:
                self._write_failed(f"cannot open a new spool segment: {e.strerror or e}")
                return None
        off = self.seg_sizes[self.cur_seg]
        data = CHUNK_HDR.pack(CHUNK_MAGIC, len(payload), zlib.crc32(payload), b.nrec) + payload
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            self._write_failed(f"spool write failed: {e.strerror or e}")
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, off)  # never leave half a chunk for recovery to misread
            return None
        self._writable_again()
        self.seg_sizes[self.cur_seg] = off + size
        return Chunk(self.cur_seg, off, off + size, b.nrec, b.nsamples, b.per_device, payload if keep else None)

    def _write_failed(self, why: str) -> None:
        # once per failure spell, not once per receive burst (hundreds a second, into logs on the same full disk)
        if self.write_error is None:
            log.error("%s (%s): packets are dropped until it can be written", why, self.dir)
        self.write_error = why

    def probe_writable(self) -> None:
        """While writes fail, try a small probe file now and then: with no packet arriving, nothing else would
        clear `write_error`, and health would say the spool cannot be written after space came back."""
        now = time.monotonic()
        if self.write_error is None or now - self._probed_at < PROBE_INTERVAL_S:
            return
        self._probed_at = now
        probe = self.dir / ".write-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        self._writable_again()

    def _writable_again(self) -> None:
        if self.write_error is not None:
            log.warning("spool %s is writable again: packets are accepted", self.dir)
            self.write_error = None

    def seal_idle(self) -> None:
        """Close the current segment when it is old enough, so it can be deleted once published."""
        if self._fd is not None and time.monotonic() - self._opened_at >= self.segment_age_s:
            os.close(self._fd)
            self._fd = None
            self.sealed.add(self.cur_seg)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.sealed.add(self.cur_seg)
        self.save_cursors()
        os.close(self._lock_fd)

    # ---- reading back (any thread) ----------------------------------------------------------------
    def read(self, chunk: Chunk) -> bytes:
        """The payload of a chunk, or the payloads of a merged range of chunks, concatenated."""
        hsize = CHUNK_HDR.size
        with open(self._path(chunk.seg), "rb") as f:
            f.seek(chunk.off)
            length = CHUNK_HDR.unpack(f.read(hsize))[1]
            if chunk.off + hsize + length == chunk.end:
                return f.read(length)
            buf = f.read(chunk.end - chunk.off - hsize)
        parts = [buf[:length]]
        off = length
        while off < len(buf):
            length = CHUNK_HDR.unpack_from(buf, off)[1]
            parts.append(buf[off + hsize:off + hsize + length])
            off += hsize + length
        return b"".join(parts)

    # ---- progress (event loop thread) -------------------------------------------------------------
    def mark_committed(self, chunk: Chunk) -> None:
        self.committed = max(self.committed, (chunk.seg, chunk.end))
        self._cursors_dirty = True

    def mark_published(self, chunk: Chunk) -> None:
        self.published = max(self.published, (chunk.seg, chunk.end))
        self._cursors_dirty = True

    def release_published(self) -> None:
        """Delete segments whose every chunk is published; persist the cursors."""
        pseg, poff = self.published
        for seg in sorted(self.seg_sizes):
            if seg not in self.sealed:
                break
            if seg < pseg or (seg == pseg and poff >= self.seg_sizes[seg]) or self.seg_sizes[seg] == 0:
                with contextlib.suppress(FileNotFoundError):
                    self._path(seg).unlink()
                del self.seg_sizes[seg]
                self.sealed.discard(seg)
            else:
                break
        # the cursors only spare a restart some idempotent re-inserts and re-publishes: once a second is plenty
        if self._cursors_dirty and time.monotonic() - self._saved_at >= 1.0:
            self.save_cursors()

    def save_cursors(self) -> None:
        tmp = self.dir / "cursors.json.tmp"
        tmp.write_text(json.dumps({"committed": list(self.committed), "published": list(self.published)}))
        os.replace(tmp, self.dir / "cursors.json")
        self._cursors_dirty = False
        self._saved_at = time.monotonic()
