"""What the server tells a device's owner about it: per-device times and details of rejections, one device's
counters on their own (GET /metrics?device=ID), and a hint for every rejection reason."""

from __future__ import annotations

import re
import time

import numpy as np
from udphelpers import REPO, add_device, add_user

from udpserver import protocol
from udpserver.ingest import DeviceInfo, Ingestor, Record, Resume
from udpserver.protocol import Reject
from udpserver.troubleshooting import (
    DEVICE_REASONS,
    INTERNAL_ERROR,
    RATE_HINT,
    REJECT_HINTS,
    SILENT_HINT,
    STOPPED_HINT,
)

KEY = bytes(range(32))


def _pkt(dev: int, key: bytes = KEY, seq0: int = 0, boot: int = 5, channels: int = 4, n: int = 5) -> bytes:
    return protocol.build_binary(dev, boot, seq0, 1000 + seq0 * 2, 500, np.ones((n, channels), int), key)


def test_every_rejection_reason_has_a_hint_and_the_readme_lists_them():
    assert set(REJECT_HINTS) == {r.value for r in Reject} | {INTERNAL_ERROR}
    assert all(isinstance(k, str) and type(k) is str for k in REJECT_HINTS)  # plain str keys, as in /metrics
    assert all(h and ":" in h and "\n" not in h for h in REJECT_HINTS.values())  # "cause: remedy", one line
    readme = re.sub(r"\s+", " ", (REPO / "README.md").read_text())
    section = readme.split("## Troubleshooting a device", 1)[1].split(" ## ", 1)[0]
    for reason, hint in [*REJECT_HINTS.items(), ("nothing arrives", SILENT_HINT),
                         ("it stopped", STOPPED_HINT), ("another rate", RATE_HINT)]:
        assert hint in section, f"README 'Troubleshooting a device' lacks the hint of {reason}: {hint}"
    assert set(DEVICE_REASONS) <= set(REJECT_HINTS)


def test_every_setting_a_hint_names_is_one_the_maker_has():
    """The hints told the maker to check SEMG_DEVICE_ID, a name neither the sketch nor arduino_secrets.h.example
    has (the sketch reads SECRET_DEVICE_ID); a device that never arrived was not told that the platform listens on
    127.0.0.1 (the default), out of an ESP32's reach, and a Myo bridge's channel mismatch was sent to
    the sketch's ANALOG_PINS."""
    arduino = REPO / "arduino"
    sketch = (arduino / "arduino_secrets.h.example").read_text() + (arduino / "arduinocode.ino").read_text()
    known = set(re.findall(r"#define\s+(\w+)", sketch)) | set(re.findall(r"static const \w+ (\w+)", sketch))
    readme = (REPO / "README.md").read_text()
    settings = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    known |= set(re.findall(r"^\| `(\w+)`", settings, re.M))
    hints = [*REJECT_HINTS.values(), SILENT_HINT, STOPPED_HINT, RATE_HINT]
    named = {n for h in hints for n in re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", h)}
    assert named and named <= known, f"hints name settings the maker cannot find: {sorted(named - known)}"
    assert "SEMG_UDP_BIND_HOST=0.0.0.0" in SILENT_HINT
    assert "Myo bridge always sends 8" in REJECT_HINTS["channel_mismatch"]


def test_device_state_records_when_and_what_was_rejected():
    ing = Ingestor()
    ing.set_devices({3: DeviceInfo(3, 30, "binary", 4, 500.0, KEY), 4: DeviceInfo(4, 40, "legacy", 2, 200.0, None)},
                    {4: Resume(boot=0, last_seq=9, last_millis=100.0, last_server=900.0)})
    assert ing.states[3].as_dict(1000.0)["last_accepted_age_s"] is None       # nothing yet
    assert ing.states[4].as_dict(1000.0)["last_accepted_age_s"] == 100.0      # stored before a restart
    assert isinstance(ing.handle(_pkt(3, boot=5), 1000.0), Record)
    assert ing.handle(_pkt(3, key=b"z" * 32, seq0=10), 1001.0) == Reject.BAD_TAG
    assert ing.handle(_pkt(3, boot=1, seq0=0), 1002.0) == Reject.OLD_BOOT     # the board lost its boot counter
    assert ing.handle(_pkt(3, channels=3, seq0=20), 1003.0) == Reject.CHANNEL_MISMATCH
    assert ing.handle(b"40,5,1,2,3", 1004.0) == Reject.CHANNEL_MISMATCH
    d = ing.states[3].as_dict(1010.0)
    assert d["last_accepted_age_s"] == 10.0
    assert d["rejected"] == {"bad_tag": 1, "old_boot": 1, "channel_mismatch": 1}
    assert d["rejected_age_s"] == {"bad_tag": 9.0, "old_boot": 8.0, "channel_mismatch": 7.0}
    assert (d["boot"], d["rejected_boot"], d["rejected_channels"]) == (5, 1, 3)
    assert ing.states[4].as_dict(1010.0)["rejected_channels"] == 3


def test_metrics_of_one_device(clean_db, udp_server, sender):
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=KEY)
        other = add_device(cur, add_user(cur), "binary", channels=4, key=KEY)
    srv = udp_server()
    sender.send([_pkt(dev, boot=5)])
    srv.wait_for(lambda m: m["devices"][str(dev)]["accepted_packets"] == 1, what="packet accepted")
    sender.send([_pkt(dev, key=b"z" * 32, seq0=10), _pkt(dev, boot=1), _pkt(other, key=b"z" * 32),
                 _pkt(999999)])
    srv.wait_for(lambda m: m["packets"]["rejected"] == 4, what="rejections counted")
    # the log names the device and what to check: one line per reason and device (the second device's bad_tag
    # is not suppressed as "similar" to the first's)
    expected = [f"for device {dev}: bad_tag: {REJECT_HINTS['bad_tag']}",
                f"for device {dev}: old_boot: {REJECT_HINTS['old_boot']}",
                f"for device {other}: bad_tag: {REJECT_HINTS['bad_tag']}",
                f"for device 999999: unknown_device: {REJECT_HINTS['unknown_device']}"]
    deadline = time.monotonic() + 10
    while not all(e in srv.log_path.read_text() for e in expected):
        assert time.monotonic() < deadline, srv.log_tail()
        time.sleep(0.1)

    one = srv._get(f"/metrics?device={dev}")
    assert list(one["devices"]) == [str(dev)]
    d = one["devices"][str(dev)]
    assert d["rejected"] == {"bad_tag": 1, "old_boot": 1} and d["rejected_boot"] == 1 and d["boot"] == 5
    assert d["last_accepted_age_s"] >= 0 and set(d["rejected_age_s"]) == {"bad_tag", "old_boot"}
    assert one["rejected"] == {"bad_tag": 2, "old_boot": 1, "unknown_device": 1}  # the server-wide part
    # several ids (comma-separated or repeated); unknown ids and junk are left out
    both = srv._get(f"/metrics?device={dev},999999,x&device={other}")
    assert set(both["devices"]) == {str(dev), str(other)}
    assert srv._get("/metrics?device=abc")["devices"] == {}
    assert "devices" not in srv._get("/metrics?devices=0")
    assert set(srv.metrics()["devices"]) == {str(dev), str(other)}


def test_a_device_reflashed_to_the_boot_the_server_has_is_pointed_to_the_boot_counter_reset():
    """A board whose flash was erased restarts its boot counter at 1: when the server's last boot of it is 1 as
    well (it never restarted since, or it is the first boot after a reset), its packets repeat sequence numbers
    already received and are rejected as `replay`, whose hint spoke only of two boards sharing secrets, so the
    owner never learnt that resetting the boot counter is what lets the board in again."""
    new_key = bytes(range(1, 33))
    ing = Ingestor()
    ing.set_devices({3: DeviceInfo(3, 30, "binary", 4, 500.0, KEY)}, {})
    assert isinstance(ing.handle(_pkt(3, boot=1, seq0=0, n=100), 1000.0), Record)
    reason = ing.handle(_pkt(3, boot=1, seq0=0), 1001.0)  # re-flashed (flash erased): boot 1, seq 0 again
    assert not isinstance(reason, Record)
    hint = REJECT_HINTS[reason.value]
    assert "re-flash" in hint and "reset its boot counter" in hint, hint
    # what the hint says to do works: the reset's offset (past boot 1) and key take the board's boot 1
    ing.set_devices({3: DeviceInfo(3, 30, "binary", 4, 500.0, new_key, boot_offset=2)}, {})
    r = ing.handle(_pkt(3, key=new_key, boot=1, seq0=0), 1002.0)
    assert isinstance(r, Record) and r.boot == 3


def test_an_idle_server_does_not_repeat_its_counter_line(clean_db, udp_server, sender):
    """The counter line came every 5 s whether anything happened or not (17,000 identical lines a day); it now
    comes when a counter changed (and every 5 minutes as a sign of life)."""
    with clean_db.cursor() as cur:
        dev = add_device(cur, add_user(cur), "binary", channels=4, key=KEY)
    srv = udp_server("--stats-interval", "0.1")

    def lines() -> int:
        return srv.log_path.read_text().count("samples/s | totals:")

    deadline = time.monotonic() + 10
    while lines() < 1:
        assert time.monotonic() < deadline, srv.log_tail()
        time.sleep(0.1)
    time.sleep(1.5)  # 15 intervals with nothing received
    assert lines() <= 2, srv.log_tail()  # the first, and one more if the device list loaded after it
    before = lines()
    sender.send([_pkt(dev)])
    srv.wait_for(lambda m: m["devices"][str(dev)]["accepted_packets"] == 1, what="packet accepted")
    while lines() == before:
        assert time.monotonic() < deadline + 20, srv.log_tail()
        time.sleep(0.1)


def test_the_address_a_board_sends_to_follows_the_bind_host():
    """The arduino_secrets.h snippet and start_all.sh named no address a board could use when the platform
    listened on every interface (SEMG_BIND_HOST=0.0.0.0, the README's set-up): YOUR.SERVER.IP and 127.0.0.1."""
    import ipaddress

    from udpserver.troubleshooting import listens_on_loopback_only, sensor_address
    assert sensor_address("192.168.1.20") == "192.168.1.20"
    assert sensor_address("127.0.0.1") is None and sensor_address("::1") is None
    assert sensor_address("emg.lab.example") is None  # a name: the maker knows it
    found = sensor_address("0.0.0.0")  # noqa: S104 - this machine's address on its default route, if it has one
    assert found is None or not ipaddress.ip_address(found).is_loopback, found
    assert listens_on_loopback_only("127.0.0.1") and listens_on_loopback_only("localhost")
    assert not listens_on_loopback_only("0.0.0.0") and not listens_on_loopback_only("192.168.1.20")  # noqa: S104


def test_the_sensor_port_opens_to_boards_without_the_web_ui_and_the_api(monkeypatch):
    """An ESP32 on Wi-Fi needs only the UDP port, but the README's set-up (SEMG_BIND_HOST=0.0.0.0) also put the web
    UI and the API on the network. SEMG_UDP_BIND_HOST moves the UDP port alone; the snippet, start_all.sh and the
    Gesture Management warning follow it."""
    from semg.config import Settings
    from streamlit_apps import data
    s = Settings(semg_bind_host="127.0.0.1", semg_udp_bind_host="192.0.2.7")
    assert s.udp_bind_host == "192.0.2.7" and s.api_url.startswith("http://127.0.0.1:")
    assert Settings(semg_bind_host="192.0.2.8").udp_bind_host == "192.0.2.8"  # unset: with SEMG_BIND_HOST
    assert Settings(semg_bind_host="192.0.2.8", semg_udp_bind_host=" ").udp_bind_host == "192.0.2.8"
    monkeypatch.setattr(data, "settings", lambda: s)
    device = {"id": 3, "user_id": 1, "sample_rate_hz": 500.0, "channel_count": 4, "secret_key_hex": "00" * 32}
    assert '#define SECRET_SERVER_IP "192.0.2.7"' in data.arduino_secrets_snippet(device)
    assert not data.unreachable_from_boards()
