"""Myo bridge: notification decoding, packet building/batching/gaps (checked by the server's own parser), and
forwarding of a recorded notification stream through a real udpserver into PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridges import myo_bridge as mb
from udpserver import protocol

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))

# Two notifications as the armband sends them (raw int8 EMG): bytes and the samples they hold.
RECORDED = [
    bytes.fromhex("0102fd7f80ff0005" "f6f70a0b0c0d0e0f"),
    bytes.fromhex("00000000000000ff" "7f807f807f807f80"),
]
DECODED = [
    [[1, 2, -3, 127, -128, -1, 0, 5], [-10, -9, 10, 11, 12, 13, 14, 15]],
    [[0, 0, 0, 0, 0, 0, 0, -1], [127, -128, 127, -128, 127, -128, 127, -128]],
]


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _notifications(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [mb.encode_emg(rng.integers(-128, 128, size=(2, 8))) for _ in range(n)]


def _parse(packets: list[bytes]) -> list[protocol.BinaryPacket]:
    out = []
    for p in packets:
        pkt = protocol.parse(p)
        assert isinstance(pkt, protocol.BinaryPacket), pkt
        assert protocol.verify_tag(pkt, KEY)
        out.append(pkt)
    return out


def test_decode_recorded_notifications():
    for raw, expected in zip(RECORDED, DECODED, strict=True):
        samples = mb.decode_emg(raw)
        assert samples.dtype == np.int16 and samples.shape == (2, 8)
        assert samples.tolist() == expected
        assert mb.encode_emg(samples) == raw
    for bad in (b"", bytes(15), bytes(17), bytes(20)):
        with pytest.raises(ValueError):
            mb.decode_emg(bad)


def test_gatt_constants_and_commands():
    assert mb.myo_uuid(mb.EMG_SERVICE) == "d5060005-a904-deb9-4748-2c7f4a124842"
    assert [mb.myo_uuid(c) for c in mb.EMG_CHARS] == [
        f"d506{c}05-a904-deb9-4748-2c7f4a124842" for c in ("01", "02", "03", "04")]
    assert mb.myo_uuid(mb.COMMAND_CHAR) == "d5060401-a904-deb9-4748-2c7f4a124842"
    assert mb.set_mode_command(mb.EMG_MODE_RAW) == bytes([0x01, 0x03, 0x03, 0x00, 0x00])
    assert mb.set_mode_command(mb.EMG_MODE_FILTERED) == bytes([0x01, 0x03, 0x02, 0x00, 0x00])
    assert mb.sleep_mode_command() == bytes([0x09, 0x01, 0x01])


def test_batches_are_valid_contiguous_packets():
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=3, batch=10, send=sent.append, clock=clock)
    notes = _notifications(25)  # 50 samples
    for i, raw in enumerate(notes):
        clock.t += 0.010  # 2 samples every 10 ms = 200 Hz
        fwd.on_notification(raw, i % 4)
    assert len(sent) == 5 and fwd.stats["samples"] == 50
    pkts = _parse(sent)
    assert [p.seq0 for p in pkts] == [0, 10, 20, 30, 40]
    assert {(p.device_id, p.boot, p.channels, p.rate_hz, p.n) for p in pkts} == {(7, 3, 8, 200, 10)}
    values = np.concatenate([protocol.values_array(p.values, 8) for p in pkts])
    assert np.array_equal(values, np.concatenate([mb.decode_emg(r) for r in notes]))
    # millis0 = first sample time: 5 ms per sample, monotone, first packet's first sample at 5 ms after start
    assert [p.millis0 for p in pkts] == [5, 55, 105, 155, 205]
    assert len(sent[0]) == protocol.HEADER_SIZE + 2 * 10 * 8 + protocol.TAG_SIZE


def test_partial_batch_flushed_by_tick_and_close():
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=10, max_delay_ms=50, send=sent.append, clock=clock)
    for raw in RECORDED:
        clock.t += 0.01
        fwd.on_notification(raw, None)
    fwd.tick()
    assert sent == []
    clock.t += 0.06
    fwd.tick()
    (pkt,) = _parse(sent)
    assert pkt.n == 4 and protocol.values_array(pkt.values, 8).tolist() == DECODED[0] + DECODED[1]
    fwd.on_notification(RECORDED[0], None)
    fwd.close()
    assert [p.seq0 for p in _parse(sent)] == [0, 4]


def test_bad_notification_is_counted_not_sent():
    sent = []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=2, send=sent.append, clock=FakeClock())
    fwd.on_notification(b"\x00" * 10, 0)
    fwd.on_notification(RECORDED[0], 1)
    assert fwd.stats["bad_notifications"] == 1 and [p.seq0 for p in _parse(sent)] == [0]


def test_gap_detection_from_characteristic_order():
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=4, detect_gaps=True, send=sent.append, clock=clock)
    for char in (0, 1, 3, 0):  # characteristic 2's notification was lost
        clock.t += 0.01
        fwd.on_notification(RECORDED[0], char)
    fwd.flush()
    pkts = _parse(sent)
    assert [(p.seq0, p.n) for p in pkts] == [(0, 4), (6, 4)]
    assert fwd.stats["lost_samples"] == 2


def test_reconnect_jumps_sequence_by_the_outage():
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=4, send=sent.append, clock=clock)
    for _ in range(3):
        clock.t += 0.01
        fwd.on_notification(RECORDED[0], None)
    fwd.connection_lost()  # flushes the partial batch
    clock.t += 2.0  # 2 s without data: ~400 samples the armband produced meanwhile
    fwd.on_notification(RECORDED[1], None)
    fwd.flush()
    pkts = _parse(sent)
    assert [(p.seq0, p.n) for p in pkts] == [(0, 4), (4, 2), (6 + 398, 2)]
    assert fwd.stats["lost_samples"] == 398
    assert pkts[-1].millis0 - pkts[-2].millis0 > 1990


def test_replay_of_a_recorded_disconnect_loses_the_outage_as_live(tmp_path):
    """A recording spanning a Bluetooth outage used to replay as one contiguous stream: no sequence jump, no
    lost samples, so the server and training took the samples on both sides of the outage as adjacent."""
    notes = _notifications(200)
    live_clock, live_sent = FakeClock(10.0), []
    live = mb.UdpForwarder(7, KEY, boot=1, batch=10, send=live_sent.append, clock=live_clock)
    lines = []
    for i, data in enumerate(notes):
        if i == 100:  # the link drops, and comes back 3 s later
            lines.append({"t": live_clock.t, "event": "disconnected"})  # as run_ble records it
            live.connection_lost()
            live_clock.t += 3.0
        live_clock.t += 0.01
        lines.append({"t": live_clock.t, "char": i % 4, "data": data.hex()})
        live.on_notification(data, i % 4)
    live.flush()
    path = tmp_path / "rec.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    sent = []
    stats = mb.replay(mb.UdpForwarder(7, KEY, boot=1, batch=10, send=sent.append, clock=FakeClock(50.0)),
                      mb.read_recording(path), speed=0)
    seqs = [(p.seq0, p.n) for p in _parse(sent)]
    assert seqs == [(p.seq0, p.n) for p in _parse(live_sent)]
    assert stats["lost_samples"] == live.stats["lost_samples"] == 600
    assert seqs[20] == (200 + 600, 10)


def test_boot_counter_persists_and_increments(tmp_path):
    path = tmp_path / "sub" / "device-7.boot"
    first = mb.next_boot(path)
    assert mb.next_boot(path) == first + 1
    path.write_text("41\n")
    assert mb.next_boot(path) == 42


def test_bad_recording_is_named_and_uses_no_boot(tmp_path):
    good = json.dumps({"t": 1.0, "char": 0, "data": "00" * 16})
    cases = {"missing.jsonl": None, "notjson.jsonl": f"{good}\nnot json\n", "nohex.jsonl": '{"t": 1, "data": "zz"}\n',
             "nokey.jsonl": '{"t": 1}\n', "badchar.jsonl": '{"t": 1, "char": 7, "data": "00"}\n'}
    boot = tmp_path / "boot"
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=f"myo_bridge: --replay: .*{name}"):
            mb.main(["--device-id", "3", "--key", KEY.hex(), "--replay", str(tmp_path / name),
                     "--boot-file", str(boot)])
    assert not boot.exists(), "a refused recording took a boot number"
    (tmp_path / "ok.jsonl").write_text(good + "\n")
    assert mb.read_recording(tmp_path / "ok.jsonl") == [(1.0, 0, bytes(16))]
    with pytest.raises(ValueError, match="notjson.jsonl line 2"):
        mb.read_recording(tmp_path / "notjson.jsonl")


def test_bad_options_are_one_line_and_use_no_boot(tmp_path, capsys):
    """--batch 0, --device-id 0 or a negative --max-delay-ms used to end in a traceback ("batch 0 does not fit
    in one packet") after a boot number was taken (and a device-0.boot file written)."""
    (tmp_path / "ok.jsonl").write_text(json.dumps({"t": 1.0, "char": 0, "data": "00" * 16}) + "\n")
    boot = tmp_path / "boot"
    cases = [(["--batch", "0"], "--batch"), (["--batch", "600"], "--batch"), (["--device-id", "0"], "--device-id"),
             (["--device-id", "x"], "--device-id"), (["--max-delay-ms", "-5"], "--max-delay-ms"),
             (["--speed", "nan"], "--speed"), (["--speed", "-1"], "--speed")]  # not "as fast as possible"
    for extra, option in cases:
        args = ["--device-id", "3", "--key", KEY.hex(), "--replay", str(tmp_path / "ok.jsonl"),
                "--boot-file", str(boot), "--server", "127.0.0.1:9", *extra]
        with pytest.raises(SystemExit) as e:
            mb.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {option}" in err and "Traceback" not in err, (extra, err)
    assert not boot.exists(), "a refused option took a boot number"


@pytest.mark.parametrize("var, value", [("SEMG_UDP_SERVER", "myhost"), ("UDP_PORT", "abc")])
def test_a_bad_server_in_the_environment_is_one_line(tmp_path, capsys, monkeypatch, var, value):
    """The server comes from SEMG_UDP_SERVER or UDP_PORT when --server is not given: a bad value there ended in
    a traceback (argparse.ArgumentTypeError raised while the parser was built), even for --help."""
    monkeypatch.delenv("SEMG_UDP_SERVER", raising=False)
    monkeypatch.setenv(var, value)
    (tmp_path / "ok.jsonl").write_text(json.dumps({"t": 1.0, "char": 0, "data": "00" * 16}) + "\n")
    boot = tmp_path / "boot"
    with pytest.raises(SystemExit) as e:
        mb.main(["--device-id", "3", "--key", KEY.hex(), "--replay", str(tmp_path / "ok.jsonl"),
                 "--boot-file", str(boot)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --server: expected HOST:PORT" in err and value in err, err
    assert not boot.exists()


@pytest.mark.parametrize("server, expect", [
    ("127.0.0.1:99999", "argument --server: expected a port 1..65535"),
    ("127.0.0.1:0", "argument --server: expected a port 1..65535"),
    ("nosuchhost.invalid:8081", "--server: cannot resolve 'nosuchhost.invalid'"),
])
def test_a_server_that_cannot_be_sent_to_is_one_line_and_uses_no_boot(tmp_path, capsys, server, expect):
    """--server 127.0.0.1:99999 ended in a traceback (OverflowError from sendto) after a boot number was taken; a
    name that does not resolve logged a warning for every packet (20 a second, for ever), each after a DNS lookup
    in the event loop that receives the armband's notifications."""
    (tmp_path / "ok.jsonl").write_text(json.dumps({"t": 1.0, "char": 0, "data": "00" * 16}) + "\n")
    boot = tmp_path / "boot"
    with pytest.raises(SystemExit) as e:
        mb.main(["--device-id", "3", "--key", KEY.hex(), "--replay", str(tmp_path / "ok.jsonl"),
                 "--boot-file", str(boot), "--server", server])
    said = f"{e.value.code} {capsys.readouterr().err}"
    assert expect in said and "Traceback" not in said, said
    assert not boot.exists(), "a server nobody can send to took a boot number"
    # a name that resolves is sent to at its address
    assert mb.resolve_server(("localhost", 8081))[0] in ("127.0.0.1", "::1")


@pytest.mark.parametrize("key", ["00", KEY.hex()[:30], (KEY * 3).hex()])
def test_a_key_of_the_wrong_length_is_refused_and_uses_no_boot(tmp_path, key):
    """A key cut short when copied ("00", 30 of its 64 hex digits) was taken: every packet then went out signed
    with it and the server refused them all as bad_tag, while the bridge's summary counted them as sent."""
    (tmp_path / "ok.jsonl").write_text(json.dumps({"t": 1.0, "char": 0, "data": "00" * 16}) + "\n")
    boot = tmp_path / "boot"
    with pytest.raises(SystemExit) as e:
        mb.main(["--device-id", "3", "--key", key, "--replay", str(tmp_path / "ok.jsonl"), "--boot-file", str(boot),
                 "--server", "127.0.0.1:9"])
    assert f"--key has {len(key)} hex digits; a device key has 32..128" in str(e.value.code)
    assert not boot.exists(), "a refused key took a boot number"


def test_replay_recording_through_real_udpserver(clean_db, tmp_path):
    """A recorded notification stream goes through the bridge CLI into a real udpserver and PostgreSQL."""
    sys.path.insert(0, str(REPO / "tests" / "udpserver"))
    from udphelpers import UdpServer, add_device, add_user

    with clean_db.cursor() as cur:
        user = add_user(cur)
        device = add_device(cur, user, "binary", channels=8, rate=200, key=KEY)
    notes = _notifications(150, seed=5)  # 300 samples = 1.5 s
    rec = tmp_path / "myo.jsonl"
    rec.write_text("".join(json.dumps({"t": 10.0 + i * 0.01, "char": i % 4, "data": n.hex()}) + "\n"
                           for i, n in enumerate(notes)))
    srv = UdpServer(tmp_path / "spool", tmp_path / "udpserver.log", []).start()
    try:
        env = {**os.environ, "SEMG_MYO_DEVICE_ID": str(device), "SEMG_MYO_DEVICE_KEY": KEY.hex(),
               "SEMG_UDP_SERVER": f"127.0.0.1:{os.environ['UDP_PORT']}"}
        for run in range(2):  # a restarted bridge gets a new boot the server accepts
            out = subprocess.run(
                [sys.executable, "-m", "bridges.myo_bridge", "--replay", str(rec), "--speed", "0", "--batch", "25",
                 "--boot-file", str(tmp_path / "boot")],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            summary = json.loads(out.stdout.strip().splitlines()[-1])
            assert summary["samples"] == 300 and summary["packets"] == 12 and summary["device_id"] == device
            m = srv.wait_for(lambda m, r=run: m["samples"]["stored"] >= 300 * (r + 1), what="forwarded samples stored")
        assert m["packets"]["rejected"] == 0 and m["samples"]["lost"] == 0
        with clean_db.cursor() as cur:
            cur.execute("SELECT boot, seq0, n, channels, sample_rate_hz, values FROM sample_blocks "
                        "WHERE device_id = %s ORDER BY boot, seq0", (device,))
            rows = cur.fetchall()
        boots = sorted({r[0] for r in rows})
        assert len(boots) == 2 and boots[1] == boots[0] + 1
        expected = np.concatenate([mb.decode_emg(n) for n in notes])
        for boot in boots:
            blocks = [r for r in rows if r[0] == boot]
            assert [r[1] for r in blocks] == list(range(0, 300, 25))
            assert {(r[3], float(r[4])) for r in blocks} == {(8, 200.0)}
            stored = np.concatenate([np.asarray(r[5], dtype=np.int16).reshape(r[2], 8) for r in blocks])
            assert np.array_equal(stored, expected)
    finally:
        assert srv.stop() == 0


def _sample_times(pkts: list[protocol.BinaryPacket]) -> tuple[list[int], list[float]]:
    """(seq, device ms) of every sample the packets carry, as the server derives them (millis0 + i / rate)."""
    seqs, times = [], []
    for p in pkts:
        seqs += [p.seq0 + i for i in range(p.n)]
        times += [p.millis0 + i * 1000.0 / p.rate_hz for i in range(p.n)]
    return seqs, times


def test_device_time_follows_sample_count_through_delivery_bursts():
    """BLE delivers notifications late and several at once: device time still advances 5 ms per sample."""
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=10, send=sent.append, clock=clock)
    notes = _notifications(200, seed=2)
    start = clock.t
    # Produced every 10 ms; delivered in connection events of 3 notifications every 30 ms, with stalls of
    # 150 ms and 400 ms after which the queued notifications arrive at the same instant.
    arrivals = []
    for i in range(len(notes)):
        produced = start + 0.010 * (i + 1)
        due = start + 0.030 * (i // 3 + 1)
        if 40 <= i < 55:
            due = start + 0.56
        if 120 <= i < 160:
            due = start + 1.61
        arrivals.append(max(due, produced, arrivals[-1] if arrivals else 0.0))
    for i, (raw, t) in enumerate(zip(notes, arrivals, strict=True)):
        clock.t = t
        fwd.on_notification(raw, i % 4)
        fwd.tick()
    fwd.close()
    seqs, times = _sample_times(_parse(sent))
    assert seqs == list(range(400)) and fwd.stats["lost_samples"] == 0
    steps = np.diff(times)
    assert steps.min() > 0, f"device time steps backwards by {-steps.min():.0f} ms"
    assert np.allclose(steps, 5.0, atol=1.0), f"device time jumps: steps from {steps.min()} to {steps.max()} ms"
    assert fwd.stats["resyncs"] == 0, "a late burst moved the device clock"


def test_device_time_reanchored_forward_when_it_drifts_behind_the_host():
    """Notifications lost unnoticed (no --detect-gaps) leave the sample count short: the device time is moved
    forward to the host clock once it is more than max_drift_ms behind, and never backwards."""
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=10, max_drift_ms=100, resync_window_s=2.0, send=sent.append,
                          clock=clock)
    rng = np.random.default_rng(4)
    start, produced_ms = clock.t, []
    notes = _notifications(2000, seed=3)  # 20 s
    for i, raw in enumerate(notes):
        if i % 50 == 49:  # 2 % of the notifications never arrive: 20 ms/s of drift
            continue
        produced = start + 0.010 * (i + 1)
        clock.t = max(clock.t, produced + rng.uniform(0.0, 0.03))  # 0..30 ms of delivery delay
        fwd.on_notification(raw, None)
        produced_ms.append((produced - fwd.t0) * 1000.0)
    fwd.close()
    seqs, times = _sample_times(_parse(sent))
    assert seqs == list(range(len(seqs)))
    steps = np.diff(times)
    assert steps.min() > 0
    assert fwd.stats["resyncs"] >= 2 and np.count_nonzero(np.abs(steps - 5.0) > 1.0) == fwd.stats["resyncs"]
    # Without re-anchoring the last sample would be 40 notifications = 400 ms behind the time it was taken.
    assert abs(times[-1] - produced_ms[-1]) < 200


def test_device_time_after_reconnect_continues_forward():
    clock, sent = FakeClock(), []
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=4, send=sent.append, clock=clock)
    clock.t += 0.3  # the first notification arrived late, then the rest on time
    fwd.on_notification(RECORDED[0], None)
    for _ in range(40):
        clock.t = max(clock.t, 100.0 + 0.01 * (fwd.seq // 2 + 1))
        fwd.on_notification(RECORDED[0], None)
    fwd.connection_lost()
    clock.t += 0.5
    for _ in range(3):
        fwd.on_notification(RECORDED[1], None)  # a burst right after reconnecting
    fwd.close()
    seqs, times = _sample_times(_parse(sent))
    gap = seqs.index(81) + 1  # 41 notifications before the outage
    assert seqs[gap] > 82 and np.diff(times).min() > 0
    # The device time across the outage follows the sequence jump (both from the same host interval)
    assert abs((times[gap] - times[gap - 1]) - (seqs[gap] - seqs[gap - 1]) * 5.0) <= 5.0


def test_no_bluetooth_stack_is_named_with_what_to_install(caplog):
    """On a host without D-Bus/BlueZ bleak fails with a bare '[Errno 2] No such file or directory', repeated on
    every retry; the bridge's line now says what is missing."""
    import asyncio
    import logging

    if Path("/run/dbus/system_bus_socket").exists():
        pytest.skip("this host has a D-Bus system bus: the failure cannot be produced here")
    fwd = mb.UdpForwarder(7, KEY, boot=1, batch=4, send=lambda _p: None)

    async def one_attempt() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        await mb.run_ble(fwd, stop, scan_timeout=1.0)

    with caplog.at_level(logging.WARNING, logger=mb.log.name):
        asyncio.run(asyncio.wait_for(one_attempt(), 30))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Bluetooth:")]
    assert lines and "no D-Bus system bus" in lines[0] and "bluez" in lines[0], lines
    assert mb.ble_problem(RuntimeError("No Bluetooth adapters found.")).endswith("(plug one in; `rfkill unblock "
                                                                                 "bluetooth`)")
    assert mb.ble_problem(TimeoutError()) == "TimeoutError"


def test_sequence_numbers_used_up_go_on_under_a_new_boot_through_real_udpserver(clean_db, tmp_path):
    """Sequence numbers are 32-bit (2^32 samples: ~248 days at 200 Hz). They wrapped to 0 within the same boot,
    and the server rejected every later packet as a replay; the bridge now goes on from 0 under the next boot
    counter of its boot file, and the server stores everything."""
    sys.path.insert(0, str(REPO / "tests" / "udpserver"))
    from udphelpers import UdpServer, add_device, add_user

    with clean_db.cursor() as cur:
        device = add_device(cur, add_user(cur), "binary", channels=8, rate=200, key=KEY)
    boot_file = tmp_path / "boot"
    first = mb.next_boot(boot_file)
    srv = UdpServer(tmp_path / "spool", tmp_path / "udpserver.log", []).start()
    try:
        clock = FakeClock()
        fwd = mb.UdpForwarder(device, KEY, first, ("127.0.0.1", int(os.environ["UDP_PORT"])), batch=10,
                              clock=clock, new_boot=lambda: mb.next_boot(boot_file))
        fwd.seq = protocol.UINT32_MAX + 1 - 25  # 25 samples before the wrap
        for i, note in enumerate(_notifications(50, seed=9)):  # 100 samples
            clock.t += 0.01
            fwd.on_notification(note, i % 4)
        fwd.close()
        m = srv.wait_for(lambda m: m["samples"]["stored"] + m["packets"]["rejected"] * 10 >= 100, what="all handled")
        assert m["rejected"] == {} and m["samples"]["stored"] == 100 and m["samples"]["lost"] == 0
        assert fwd.boot == first + 1 and int(boot_file.read_text()) == first + 1
        with clean_db.cursor() as cur:
            cur.execute("SELECT boot, seq0, n, device_millis0 FROM sample_blocks WHERE device_id = %s "
                        "ORDER BY boot, seq0", (device,))
            rows = cur.fetchall()
        top = protocol.UINT32_MAX + 1
        assert [(b, s, n) for b, s, n, _ in rows] == [
            (first, top - 25, 10), (first, top - 15, 10), (first, top - 5, 5),
            *((first + 1, s, 10) for s in range(0, 70, 10)), (first + 1, 70, 5)]
        millis = [ms for *_, ms in rows]  # the device time goes on across the new boot, 5 ms per sample
        assert millis == [millis[0] + 5.0 * k for k in (0, 10, 20, 25, 35, 45, 55, 65, 75, 85, 95)]
    finally:
        assert srv.stop() == 0


def test_replay_speed_help_names_the_servers_sample_budget():
    """--replay --speed 0 (as fast as possible, the help's own suggestion) sends a recording at many times the
    200 Hz the armband is registered with: the UDP server keeps the first ~30 s and refuses the rest as too_fast
    (its per-device sample budget), while the bridge's summary says every packet was sent. udpsim's --speed help
    says so; the bridge's said nothing."""
    from udpserver.ingest import RATE_TOLERANCE
    text = " ".join(mb.build_parser().format_help().split())
    assert "too_fast" in text and "--rate-tolerance 0" in text and f"{RATE_TOLERANCE:g}" in text, text


def test_a_batch_too_big_for_one_network_frame_is_warned_about(tmp_path, caplog):
    """--batch took up to 509 samples (an 8 KB packet) without a word; above ONE_FRAME_BATCH a packet travels as
    IP fragments and Wi-Fi losing any one fragment loses it whole."""
    import logging
    (tmp_path / "ok.jsonl").write_text(json.dumps({"t": 1.0, "char": 0, "data": "00" * 16}) + "\n")
    base = ["--device-id", "3", "--key", KEY.hex(), "--replay", str(tmp_path / "ok.jsonl"), "--server", "127.0.0.1:9"]
    with caplog.at_level(logging.WARNING, logger=mb.log.name):
        mb.main([*base, "--boot-file", str(tmp_path / "a.boot"), "--batch", str(mb.ONE_FRAME_BATCH)])
        assert "IP fragments" not in caplog.text
        mb.main([*base, "--boot-file", str(tmp_path / "b.boot"), "--batch", str(mb.ONE_FRAME_BATCH + 1)])
    assert f"--batch {mb.ONE_FRAME_BATCH + 1}: each packet is sent in IP fragments" in caplog.text
    assert len(protocol.build_binary(3, 1, 0, 0, 200, np.zeros((mb.ONE_FRAME_BATCH, 8), int), KEY)) <= 1472
