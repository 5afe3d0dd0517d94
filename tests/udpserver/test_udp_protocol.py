"""Pure parsing, validation, clock and spool logic (no services)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udpserver import protocol
from udpserver.clock import WRAP, DeviceClock
from udpserver.ingest import DeviceInfo, Ingestor, Record, Resume
from udpserver.protocol import BinaryPacket, LegacyPacket, Reject
from udpserver.spool import CHUNK_HDR, ChunkBuilder, Spool, SpoolLocked, iter_records

KEY = bytes(range(32))


# ---- legacy text ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, expected", [
    (b"12,345,1,2,3", LegacyPacket(12, 345, (1, 2, 3))),
    (b"12,345,-32768,32767\n", LegacyPacket(12, 345, (-32768, 32767))),
    (b"1,4294967295,0\r\n", LegacyPacket(1, 4294967295, (0,))),
    (b"1,0," + b",".join(b"7" for _ in range(16)), LegacyPacket(1, 0, (7,) * 16)),
    # zero-padded fields are plain decimal digits too (PROTOCOL.md); their value decides the range
    (b"0012,000345,000001,-0032768,027668,-0\r\n", LegacyPacket(12, 345, (1, -32768, 27668, 0))),
])
def test_legacy_accepts(data, expected):
    assert protocol.parse(data) == expected


@pytest.mark.parametrize("data, reason", [
    (b"", Reject.EMPTY),
    (b"12,345", Reject.BAD_FIELD_COUNT),
    (b"1,0," + b",".join(b"7" for _ in range(17)), Reject.BAD_FIELD_COUNT),
    (b"12,345,1,x", Reject.NON_NUMERIC),
    (b"12,345,1, 2", Reject.NON_NUMERIC),
    (b"12,345,1,+2", Reject.NON_NUMERIC),
    (b"12,345,1,,2", Reject.NON_NUMERIC),
    (b"12,345,1.5", Reject.NON_NUMERIC),
    (b"12,345,1_0", Reject.NON_NUMERIC),
    (b"12,345,32768", Reject.OUT_OF_RANGE),
    (b"12,345,-32769", Reject.OUT_OF_RANGE),
    (b"12,345,1234567", Reject.OUT_OF_RANGE),
    (b"12,345,0032768", Reject.OUT_OF_RANGE),
    (b"12,345,-0032769", Reject.OUT_OF_RANGE),
    (b"000,345,1", Reject.OUT_OF_RANGE),
    (b"12,4294967296,1", Reject.OUT_OF_RANGE),
    (b"0,345,1", Reject.OUT_OF_RANGE),
    (b"12,-345,1", Reject.OUT_OF_RANGE),
    (b"99999999999999999999,1,1", Reject.OUT_OF_RANGE),
    (b"12,345,1,2,3\n\n", Reject.NON_NUMERIC),
    (b"1" * 300, Reject.OVERSIZE),
    (b"hello", Reject.MALFORMED),
])
def test_legacy_rejects(data, reason):
    assert protocol.parse(data) == reason


# ---- binary -------------------------------------------------------------------------------------------------
def _binary(dev=3, boot=1, seq0=0, millis0=1000, rate=500, n=5, channels=4, key=KEY, seed=0):
    vals = np.random.default_rng(seed).integers(-32768, 32767, size=(n, channels), endpoint=True)
    return protocol.build_binary(dev, boot, seq0, millis0, rate, vals, key), vals


def test_binary_round_trip():
    data, vals = _binary()
    p = protocol.parse(data)
    assert isinstance(p, BinaryPacket)
    assert (p.device_id, p.boot, p.seq0, p.millis0, p.rate_hz, p.channels, p.n) == (3, 1, 0, 1000, 500, 4, 5)
    assert np.array_equal(protocol.values_array(p.values, 4), vals)
    assert protocol.verify_tag(p, KEY) and not protocol.verify_tag(p, b"x" * 32)
    assert len(data) == protocol.HEADER_SIZE + 5 * 4 * 2 + protocol.TAG_SIZE


def test_binary_structural_rejects():
    data, _ = _binary()
    assert protocol.parse(data[:-1]) == Reject.TRUNCATED
    assert protocol.parse(data[:10]) == Reject.TRUNCATED
    assert protocol.parse(data + b"\0") == Reject.OVERSIZE
    assert protocol.parse(data[:2] + b"\x02" + data[3:]) == Reject.BAD_VERSION
    assert protocol.parse(data[:3] + b"\x00" + data[4:]) == Reject.BAD_HEADER  # 0 channels
    assert protocol.parse(data[:3] + b"\x11" + data[4:]) == Reject.BAD_HEADER  # 17 channels
    assert protocol.parse(b"\xe5" + b"\0" * 9000) == Reject.OVERSIZE


# ---- clock ----------------------------------------------------------------------------------------------------
def test_clock_unwraps_uint32_millis():
    c = DeviceClock()
    near = WRAP - 10
    c.observe(near, float(near), float(near), 100.0)
    assert c.unwrap(5) == WRAP + 5
    c.observe(5, WRAP + 5.0, WRAP + 5.0, 100.015)
    assert c.unwrap(20) == WRAP + 20
    assert c.unwrap(WRAP - 2) == WRAP - 2.0  # a small step back stays a step back


def test_clock_offset_is_robust_to_jitter():
    rng = np.random.default_rng(1)
    c = DeviceClock(window_s=10)
    true_offset = 1_700_000_000_000.0
    for i in range(2000):  # 20 s of packets every 10 ms with 0..80 ms of random delay
        dev_ms = 5000.0 + 10 * i
        server = (true_offset + dev_ms + 3 + rng.exponential(15)) / 1000
        off = c.observe(int(dev_ms), dev_ms, dev_ms, server)
    assert abs(off - true_offset - 3) < 2.0


# ---- ingestor ---------------------------------------------------------------------------------------------
def _ingestor(resume=None) -> Ingestor:
    ing = Ingestor()
    ing.set_devices({3: DeviceInfo(3, 30, "binary", 4, 500.0, KEY),
                     4: DeviceInfo(4, 40, "legacy", 2, 200.0, None)}, resume or {})
    return ing


def test_not_ready_until_devices_loaded():
    assert Ingestor().handle(b"40,1,1,2", 0.0) == Reject.NOT_READY


def test_binary_replay_gap_boot_and_key_checks():
    ing = _ingestor()
    now = 1000.0
    r = ing.handle(_binary(seq0=0)[0], now)
    assert isinstance(r, Record) and (r.user_id, r.device_id, r.seq0, r.n, r.lost) == (30, 3, 0, 5, 0)
    assert ing.handle(_binary(seq0=0)[0], now) == Reject.REPLAY
    assert ing.handle(_binary(seq0=4)[0], now) == Reject.REPLAY      # overlaps the last packet
    r = ing.handle(_binary(seq0=10)[0], now)
    assert r.lost == 5 and ing.states[3].lost_samples == 5
    assert ing.handle(_binary(boot=0, seq0=100)[0], now) == Reject.OLD_BOOT
    r = ing.handle(_binary(boot=2, seq0=0, millis0=50)[0], now)     # reboot: sequence restarts
    assert isinstance(r, Record) and r.boot == 2 and r.millis0 == 50
    assert ing.handle(_binary(key=b"z" * 32, boot=2, seq0=5)[0], now) == Reject.BAD_TAG
    assert ing.handle(_binary(channels=3, boot=2, seq0=5)[0], now) == Reject.CHANNEL_MISMATCH
    assert ing.handle(_binary(dev=9)[0], now) == Reject.UNKNOWN_DEVICE
    assert ing.handle(_binary(dev=4)[0], now) == Reject.PROTOCOL_MISMATCH
    assert ing.rejected["replay"] == 2 and ing.states[3].rejected["bad_tag"] == 1


def test_binary_resumes_after_restart():
    ing = _ingestor({3: Resume(boot=1, last_seq=99, last_millis=1198.0, last_server=999.0)})
    assert ing.handle(_binary(seq0=95)[0], 1000.0) == Reject.REPLAY
    r = ing.handle(_binary(seq0=100, millis0=1200)[0], 1000.0)
    assert isinstance(r, Record) and r.lost == 0


def test_legacy_sequence_reboot_and_stale():
    ing = _ingestor()
    t = 5000.0
    recs = [ing.handle(f"40,{9000 + 5 * i},1,2".encode(), t + i * 0.005) for i in range(3)]
    assert [(r.boot, r.seq0, r.millis0) for r in recs] == [(0, 0, 9000), (0, 1, 9005), (0, 2, 9010)]
    assert recs[0].rate_hz == 200.0 and recs[0].values == np.array([1, 2], "<i2").tobytes()
    assert ing.handle(b"40,9010,1,2", t + 0.02).seq0 == 3                 # equal millis: fine (fast sampling)
    assert ing.handle(b"40,8000,1,2", t + 0.02) == Reject.REPLAY           # stepped back a little
    r = ing.handle(b"40,20,1,2", t + 0.03)                                 # far back: the device rebooted
    assert (r.boot, r.seq0, r.millis0) == (1, 0, 20)
    assert ing.handle(b"40,30,1,2,3", t + 0.04) == Reject.CHANNEL_MISMATCH
    assert ing.handle(b"41,30,1,2", t + 0.04) == Reject.UNKNOWN_USER
    assert ing.handle(b"30,30,1,2,3,4", t + 0.04) == Reject.UNKNOWN_USER    # user 30 has a binary device only


def test_legacy_clock_jumps_beyond_jitter_are_lost_samples():
    ing = _ingestor()  # device 4: 200 Hz, one sample every 5 ms
    t = 5000.0
    millis = [9000, 9005, 9012, 9015, 9020, 9035, 9040, 9041, 9045, 9550]  # late by 2 ms; 2 lost; early; 100 lost
    recs = [ing.handle(f"40,{m},1,2".encode(), t + i * 0.005) for i, m in enumerate(millis)]
    assert [r.seq0 for r in recs] == [0, 1, 2, 3, 4, 7, 8, 9, 10, 111]
    assert [r.lost for r in recs] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 100]
    assert ing.states[4].lost_samples == 102


def test_a_legacy_device_sampling_slower_than_registered_is_not_one_long_run_of_gaps():
    """A legacy sketch sampling in loop() with delay() may run well below its registered rate: its usual step
    is then no gap (every window would be cut), while a real gap at its own pace still is one."""
    ing = _ingestor()  # device 4: registered at 200 Hz (5 ms) but sampling every 12-14 ms
    t = 5000.0
    millis = [9000 + 13 * i + i % 2 for i in range(40)] + [9000 + 13 * 50 + 1]  # then 10 samples lost
    recs = [ing.handle(f"40,{m},1,2".encode(), t + i * 0.013) for i, m in enumerate(millis)]
    assert sum(r.lost for r in recs[2:40]) == 0  # (the first step has nothing to compare it to yet)
    assert recs[-1].lost == 10 and recs[-1].seq0 == recs[-2].seq0 + 11


def test_legacy_millis_wrap_is_not_a_reboot():
    ing = _ingestor({4: Resume(0, 10, float(WRAP - 3), 100.0)})
    r = ing.handle(b"40,2,5,5", 100.005)
    assert (r.boot, r.seq0, r.millis0) == (0, 11, WRAP + 2)


@pytest.mark.parametrize("days", [1, 30, 60, 90])
def test_a_binary_device_back_after_weeks_offline_keeps_its_clock_going_forward(days):
    """A device left powered without WiFi for weeks comes back in the same boot: millis() moved on by more than
    half of its 2^32 ms range (24.8 days), or wrapped more than once, which its millis alone cannot tell, but its
    sequence numbers (one per sample at its rate) can. The clock was unwrapped backwards (-19.7 days after 30
    days away), and the live worker, which times samples by device millis per (device, boot), took every later
    window of that boot as taken weeks ago: no more decisions until the device rebooted."""
    ing = _ingestor()  # device 3: 500 Hz
    t0 = 1_700_000_000.0
    ing.handle(_binary(seq0=0, millis0=1000, n=5)[0], t0)
    away = days * 86_400_000  # ms
    seq = 5 + away // 2  # 2 ms per sample
    r = ing.handle(_binary(seq0=seq, millis0=(1000 + 2 * seq) % WRAP, n=5)[0], t0 + away / 1000)
    assert isinstance(r, Record) and r.lost == seq - 5
    assert r.millis0 == 1000 + 2 * seq
    assert r.time0 == pytest.approx(t0 + away / 1000 - 0.008, abs=0.01)
    # the next packets go on from there; a small step back of the clock stays a small step back
    r2 = ing.handle(_binary(seq0=seq + 5, millis0=(1000 + 2 * seq + 9) % WRAP, n=5)[0], t0 + away / 1000 + 0.01)
    assert r2.millis0 == 1000 + 2 * seq + 9
    r3 = ing.handle(_binary(seq0=seq + 10, millis0=(1000 + 2 * seq + 7) % WRAP, n=5)[0], t0 + away / 1000 + 0.02)
    assert r3.millis0 == 1000 + 2 * seq + 7


def test_device_time_follows_server_clock():
    ing = _ingestor()
    r = ing.handle(_binary(seq0=0, millis0=7000, n=50)[0], 1_700_000_000.0)
    # the packet's last sample (98 ms after its first) was taken at the receive time at the latest
    assert r.time0 == pytest.approx(1_700_000_000.0 - 0.098, abs=1e-6)


# ---- property tests ------------------------------------------------------------------------------------
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data):
    ing = _ingestor()
    r = ing.handle(data, 1000.0)
    assert isinstance(r, Reject) or (isinstance(r, Record) and r.device_id == 4)  # only legacy text can pass
    if isinstance(r, Record):
        assert r.channels == 2 and len(r.values) == 4


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(-70000, 70000).map(str), st.sampled_from(["", " 1", "+1", "1.5", "x", "0x1F",
                                                                                  "007", "-", "1e3", "\n"])),
                min_size=0, max_size=20))
def test_near_valid_legacy_text_is_parsed_exactly_or_rejected(fields):
    data = ",".join(["40", "1000", *fields]).encode()
    r = protocol.parse(data)
    ok = 1 <= len(fields) <= 16 and all(f.lstrip("-").isdigit() and f != "-" and -32768 <= int(f) <= 32767
                                        for f in fields)
    if ok:
        assert r == LegacyPacket(40, 1000, tuple(int(f) for f in fields))
    else:
        assert isinstance(r, Reject), (data, r)
        ing = _ingestor()
        assert isinstance(ing.handle(data, 1000.0), Reject)


_VALID = [_binary(seq0=10 * i, seed=i)[0] for i in range(4)]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "splice" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i:i + 4] = draw(st.binary(max_size=8))
    return bytes(data)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_binary_packets_are_never_accepted(data):
    ing = _ingestor()
    r = ing.handle(data, 1000.0)
    if isinstance(r, Record):  # only an intact packet can carry a valid tag
        assert data in _VALID
    else:
        assert isinstance(r, Reject)


# ---- spool ----------------------------------------------------------------------------------------------
def _record(seq0, dev=3, n=2):
    return Record(30, dev, 1, seq0, n, 2, 500.0, 1000.0 + seq0 * 2, 1.7e9, 1.7e9, bytes(range(4 * n)), 0)


def test_spool_recovers_chunks_and_truncates_a_torn_write(tmp_path):
    sp = Spool(tmp_path, max_bytes=1 << 20)
    for i in range(3):
        b = ChunkBuilder()
        b.add(_record(10 * i))
        b.add(_record(10 * i + 2, dev=4))
        assert sp.append(b, keep=True) is not None
    first_seg = sp.cur_seg
    sp.close()
    seg = tmp_path / f"seg-{first_seg:010d}.spool"
    with open(seg, "ab") as f:
        f.write(b"SPK1\xff\xff")  # a write interrupted by a kill
    sp = Spool(tmp_path, max_bytes=1 << 20)
    chunks, resume = sp.recover()
    # the three chunks, next to each other and read back from the file, come back as one range
    assert [(c.nrec, c.nsamples) for c in chunks] == [(6, 12)] and all(c.replayed for c in chunks)
    assert chunks[0].per_device == {3: [3, 6], 4: [3, 6]}
    assert resume[3].last_seq == 21 and resume[4].last_seq == 23
    assert seg.stat().st_size == chunks[-1].end
    recs = [h for c in chunks for h, _, _ in iter_records(sp.read(c))]
    assert [h[3] for h in recs] == [0, 2, 10, 12, 20, 22]
    # once committed and published, the segment goes away and the cursors remember it
    for c in chunks:
        sp.mark_committed(c)
        sp.mark_published(c)
    sp.release_published()
    assert not seg.exists()
    sp.close()
    sp = Spool(tmp_path, max_bytes=1 << 20)
    assert sp.recover() == ([], {})
    b = ChunkBuilder()
    b.add(_record(40))
    assert sp.append(b, keep=False).seg > first_seg  # new data sorts after the published cursor
    sp.close()


@pytest.mark.parametrize("where", [CHUNK_HDR.size + 20, 0], ids=["payload", "header"])
def test_spool_damage_costs_only_the_damaged_chunk(tmp_path, caplog, where):
    """A chunk that does not check out in the middle of a segment (a bad block, a power loss) was taken for an
    interrupted write: the segment was truncated there, silently losing every good chunk after it."""
    sp = Spool(tmp_path, max_bytes=1 << 20)
    offsets = []
    for i in range(5):
        b = ChunkBuilder()
        b.add(_record(10 * i))
        offsets.append(sp.append(b, keep=False).off)
    seg_no = sp.cur_seg
    sp.close()
    seg = tmp_path / f"seg-{seg_no:010d}.spool"
    data = bytearray(seg.read_bytes())
    data[offsets[1] + where] ^= 0xFF
    seg.write_bytes(bytes(data))
    sp = Spool(tmp_path, max_bytes=1 << 20)
    with caplog.at_level("ERROR", logger="udpserver.spool"):
        chunks, resume = sp.recover()
    recs = [h for c in chunks for h, _, _ in iter_records(sp.read(c))]
    assert [h[3] for h in recs] == [0, 20, 30, 40]
    assert resume[3].last_seq == 41
    assert seg.stat().st_size == len(data)
    assert f"{offsets[2] - offsets[1]} damaged bytes at offset {offsets[1]} skipped" in caplog.text
    sp.close()


def test_spool_recovery_survives_foreign_and_unreadable_segments(tmp_path, caplog):
    """A file named like a segment but not one (a copy) stopped every start with a ValueError traceback, and a
    segment that could not be read (a directory, another owner) with an OSError: the server never came up. Now
    the copy is ignored, the unreadable segment is set aside, and stored by the first start that can read it."""
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_age_s=0)  # one segment per chunk
    for i in range(3):
        b = ChunkBuilder()
        b.add(_record(10 * i))
        sp.append(b, keep=False)
    sp.close()
    (tmp_path / "seg-0000000001 (copy).spool").write_bytes(b"whatever")
    second = tmp_path / "seg-0000000002.spool"
    saved = second.read_bytes()
    second.unlink()
    second.mkdir()  # cannot be read as a file
    sp = Spool(tmp_path, max_bytes=1 << 20)
    with caplog.at_level("WARNING", logger="udpserver.spool"):
        chunks, _ = sp.recover()
    assert [h[3] for c in chunks for h, _, _ in iter_records(sp.read(c))] == [0, 20]
    assert "ignoring seg-0000000001 (copy).spool" in caplog.text
    assert "seg-0000000002.spool cannot be read (Is a directory): set aside as seg-0000000002.spool.unreadable" \
        in caplog.text
    for c in chunks:  # stored and published: the cursors pass the number of the segment set aside
        sp.mark_committed(c)
        sp.mark_published(c)
    sp.release_published()
    sp.close()
    aside = tmp_path / "seg-0000000002.spool.unreadable"
    aside.rmdir()
    aside.write_bytes(saved)  # readable again
    sp = Spool(tmp_path, max_bytes=1 << 20)
    chunks, resume = sp.recover()
    assert [h[3] for c in chunks for h, _, _ in iter_records(sp.read(c))] == [10]
    assert all(c.replayed for c in chunks) and resume[3].last_seq == 11
    assert not aside.exists() and (tmp_path / f"seg-{chunks[0].seg:010d}.spool").exists() and chunks[0].seg > 3
    sp.close()


def test_spool_bound_and_single_owner(tmp_path):
    sp = Spool(tmp_path, max_bytes=300)
    b = ChunkBuilder()
    b.add(_record(0, n=20))
    assert sp.append(b, keep=False) is not None
    assert sp.append(b, keep=False) is None  # over the bound: the caller counts a drop
    with pytest.raises(SpoolLocked):
        Spool(tmp_path, max_bytes=300)
    sp.close()
    assert os.listdir(tmp_path)


# ---- storage and publishing encoders ----------------------------------------------------------------------
def _mixed_payload(seed: int, n_records: int = 300) -> tuple[bytes, list[Record]]:
    import random
    rng = random.Random(seed)
    b, recs, seqs = ChunkBuilder(), [], {}
    for i in range(n_records):
        dev = rng.randint(1, 5)
        ch = {1: 1, 2: 4, 3: 8, 4: 16, 5: 3}[dev]
        n = 1 if dev in (1, 3) else rng.choice([10, 25]) if seed % 2 else 10
        s0 = seqs.get(dev, 0) + (5 if rng.random() < 0.1 else 0)
        seqs[dev] = s0 + n
        vals = np.array([rng.randint(-32768, 32767) for _ in range(n * ch)], "<i2").tobytes()
        r = Record(dev * 10, dev, 1, s0, n, ch, 500.0 if dev != 5 else 333.0, 1000.0 + s0 * 2,
                   1.7e9 + s0 / 500, 1.7e9 + i * 0.001, vals, 0)
        b.add(r)
        recs.append(r)
    return b"".join(b.parts), recs


def _decode_copy(data: bytes) -> list[tuple]:
    """A minimal reader of PostgreSQL's binary COPY format for sample_blocks rows."""
    import struct
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00")
    off, rows = 19, []
    while True:
        (nf,) = struct.unpack_from(">h", data, off)
        off += 2
        if nf == -1:
            return rows
        fields = []
        for _ in range(nf):
            (length,) = struct.unpack_from(">i", data, off)
            fields.append(data[off + 4:off + 4 + length])
            off += 4 + length
        u, d, b, s = (struct.unpack(">q", f)[0] for f in fields[:4])
        n, c = (struct.unpack(">h", f)[0] for f in fields[4:6])
        rate = struct.unpack(">f", fields[6])[0]
        m0 = struct.unpack(">d", fields[7])[0]
        t0, ts = (struct.unpack(">q", f)[0] / 1e6 + 946684800 for f in fields[8:10])
        ndim, _nulls, oid, dim, lb = struct.unpack_from(">iiiii", fields[10])
        vals = [struct.unpack_from(">ih", fields[10], 20 + 6 * i) for i in range(dim)]
        assert (ndim, oid, lb) == (1, 21, 1) and all(ln == 2 for ln, _ in vals)
        rows.append((u, d, b, s, n, c, rate, m0, round(t0, 6), round(ts, 6), tuple(v for _, v in vals)))


@pytest.mark.parametrize("seed", [1, 2])
def test_copy_payload_encodes_every_record(seed):
    from udpserver.storage import copy_payload
    payload, recs = _mixed_payload(seed)
    half = len(payload) // 2
    cut = next(off for h, off, _ in iter_records(payload) if off > half) - 64  # split at a record boundary
    data, rows, samples = copy_payload([payload[:cut], payload[cut:]])
    assert rows == len(recs) and samples == sum(r.n for r in recs)
    expected = sorted((r.user_id, r.device_id, r.boot, r.seq0, r.n, r.channels, np.float32(r.rate_hz).item(),
                       r.millis0, round(r.time0, 6), round(r.server_ts, 6),
                       tuple(np.frombuffer(r.values, "<i2").tolist())) for r in recs)
    assert sorted(_decode_copy(data)) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from([1, 3, 4, 8, 16]),
                          st.sampled_from([200.0, 500.0, 333.3, 1000.0, 97.5]), st.integers(0, 2**32 - 1),
                          st.floats(0, 2**32, allow_nan=False), st.integers(0, 2**31)),
                min_size=1, max_size=60, unique_by=lambda t: t[5]))
def test_one_record_per_device_messages_match_the_vectorised_path(recs):
    """The scalar path (a record per device, the live case) writes exactly the bytes of the vectorised one."""
    from udpserver.publish import _messages_of_group, _messages_of_records, build_messages
    from udpserver.spool import records_by_k
    b = ChunkBuilder()
    rng = np.random.default_rng(len(recs))
    for n, ch, rate, seq0, m0, dev in recs:
        vals = rng.integers(-32768, 32767, n * ch, endpoint=True).astype("<i2").tobytes()
        b.add(Record(dev % 1000 + 1, dev + 1, 7, seq0, n, ch, rate, m0, 1.7e9, 1.7e9 + dev * 1e-3, vals, 0))
    payload = b"".join(b.parts)
    for k, r in records_by_k(payload).items():
        scalar, vector = [], []
        _messages_of_records(r, scalar)
        _messages_of_group(r, k, vector)
        assert sorted(scalar) == sorted(vector)
    assert sorted(build_messages([payload])) == sorted(
        m for k, r in records_by_k(payload).items() for m in _vector(r, k))


def _vector(r, k):
    from udpserver.publish import _messages_of_group
    out = []
    _messages_of_group(r, k, out)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_messages_are_valid_complete_and_in_order(seed):
    from semg.messages import SamplesMessage
    from udpserver.publish import _build_messages_per_record, build_messages
    payload, recs = _mixed_payload(seed)

    def samples(msgs):
        out = []
        for userid, body in msgs:
            m = SamplesMessage.model_validate_json(body)
            assert m.userid == userid and len(m.values) <= 2000
            out += [(m.device_id, m.seq0 + i, round(dm, 6), tuple(v)) for i, (dm, v) in
                    enumerate(zip(m.device_millis, m.values, strict=True))]
        return out

    fast, slow = samples(build_messages([payload])), samples(_build_messages_per_record(payload))
    assert sorted(fast) == sorted(slow)
    expected = [(r.device_id, r.seq0 + i, round(r.millis0 + i * (1000.0 / float(np.float32(r.rate_hz))), 6),
                 tuple(np.frombuffer(r.values, "<i2").reshape(r.n, r.channels)[i].tolist()))
                for r in recs for i in range(r.n)]
    assert sorted(fast) == sorted(expected)
    for dev in range(1, 6):  # each device's samples arrive in sequence order
        seqs = [s for d, s, _, _ in fast if d == dev]
        assert seqs == sorted(seqs)


def test_records_longer_than_a_message_are_split_on_both_paths():
    """Both message builders (one device with records of several sizes takes the per-record one) split a
    record beyond MAX_SAMPLES_PER_MESSAGE, keeping sequence numbers and device times."""
    from semg.messages import SamplesMessage
    from udpserver.publish import MAX_SAMPLES_PER_MESSAGE, _build_messages_per_record, build_messages
    b, seq = ChunkBuilder(), 0
    for n in (10, 4076, 10, 2038):
        vals = (np.arange(seq, seq + n) % 30000).astype("<i2").tobytes()
        b.add(Record(30, 3, 1, seq, n, 1, 1000.0, 5000.0 + seq, 1.7e9, 1.7e9, vals, 0))
        seq += n
    payload = b"".join(b.parts)
    for msgs in (build_messages([payload]), _build_messages_per_record(payload)):
        ms = [SamplesMessage.model_validate_json(body) for _, body in msgs]
        assert all(len(m.values) <= MAX_SAMPLES_PER_MESSAGE for m in ms)
        got = sorted((m.seq0 + i, t, v[0]) for m in ms for i, (t, v) in enumerate(zip(m.device_millis, m.values)))
        assert got == [(s, 5000.0 + s, s % 30000) for s in range(seq)]
