"""The devices' live status from a real UDP server on the Gesture Management page: why packets are rejected,
with the cause and remedy, on the device owner's page only."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
from ui_checks import assert_clean, texts

from semg import repo
from udpserver import protocol
from udpserver.protocol import Reject

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "udpserver"))
from udphelpers import Sender, UdpServer  # noqa: E402


def _pkt(dev: dict, key: bytes, boot: int, seq0: int = 0, channels: int = 4) -> bytes:
    return protocol.build_binary(dev["id"], boot, seq0, 1000 + 2 * seq0, 500, np.ones((5, channels), int), key)


def _hint(reason: str) -> str:
    import data
    return data.REJECT_HINTS[reason][1:]  # shown as a sentence: capitalised


def _section(shown: str, device_id: int) -> str:
    """The page text from a device's status line on (its line starts with its badge '#<id>')."""
    i = shown.find(f" #{device_id}]")
    assert i >= 0, shown
    return shown[i:]


def test_rejected_packets_are_explained_on_the_owners_page_only(page, clean_db, tmp_path):
    ann = repo.create_user(clean_db, "Ann", "ann@example.org")
    bob = repo.create_user(clean_db, "Bob", "bob@example.org")
    a_dev = repo.register_device(clean_db, ann["id"], 4, 500.0, name="ann band")
    b_dev = repo.register_device(clean_db, bob["id"], 4, 500.0, name="bob band")
    a_key, b_key = bytes.fromhex(a_dev["secret_key_hex"]), bytes.fromhex(b_dev["secret_key_hex"])
    srv = UdpServer(tmp_path / "spool", tmp_path / "udpserver.log", []).start()
    sender = Sender()
    try:
        sender.send([_pkt(a_dev, a_key, boot=7), _pkt(b_dev, b_key, boot=1)])
        srv.wait_for(lambda m: m["samples"]["stored"] == 10, what="first packets stored")
        # Ann's board: an old key, then (flash erased) its boot counter restarted at 1
        sender.send([_pkt(a_dev, b"wrong key " * 4, boot=7, seq0=5), _pkt(a_dev, a_key, boot=1),
                     _pkt(a_dev, a_key, boot=1, seq0=5)])
        # Bob's board sends 3 channels
        sender.send([_pkt(b_dev, b_key, boot=1, seq0=5, channels=3)])
        srv.wait_for(lambda m: m["rejected"] == {"bad_tag": 1, "old_boot": 2, "channel_mismatch": 1},
                     what="rejections counted")
        # (Bob's page below shows only his counters, whatever Ann's board sends meanwhile)

        at = page("gestures", user_id=ann["id"])
        at.run()
        assert_clean(at)
        shown = texts(at)
        mine = _section(shown, a_dev["id"])
        assert "`bad_tag`: 1, last" in mine and _hint("bad_tag") in mine
        assert "`old_boot`: 2, last" in mine and _hint("old_boot") in mine
        assert "The device sends boot 1, the server has already received boot 7." in mine
        assert "5 samples stored, 0 lost" in mine
        # nothing of Bob's device on Ann's page
        assert f"#{b_dev['id']}" not in shown and "channel_mismatch" not in shown

        # Ann re-flashed the board: she resets its boot counter, and the running server takes its boot 1
        at.button(key="reset_boot_ask").click()
        at.run()
        at.button(key="device_confirm_yes").click()
        at.run()
        assert_clean(at)
        assert f"Boot counter of device #{a_dev['id']} reset" in texts(at)
        shown_key = re.search(r'SEMG_DEVICE_KEY_HEX "([0-9a-f]{64})"', "\n".join(c.value for c in at.code))
        a_key = bytes.fromhex(shown_key.group(1))  # flashed with the re-flash: the old key is refused now
        deadline = time.monotonic() + 20  # the server reloads its device list every 2 s
        while srv.metrics()["samples"]["stored"] < 15 and time.monotonic() < deadline:
            sender.send([_pkt(a_dev, a_key, boot=1, seq0=10)])
            time.sleep(0.3)
        m = srv.wait_for(lambda m: m["samples"]["stored"] == 15, what="the re-flashed board's boot 1 stored")
        assert m["devices"][str(a_dev["id"])]["boot"] == 1

        at = page("gestures", user_id=bob["id"])
        at.run()
        assert_clean(at)
        shown = texts(at)
        assert "`channel_mismatch`: 1, last" in shown and _hint("channel_mismatch") in shown
        assert "The device sends 3 channel(s), registered with 4." in shown
        assert "bad_tag" not in shown and "old_boot" not in shown and f"#{a_dev['id']}" not in shown
    finally:
        sender.sock.close()
        srv.stop()

    # the server stopped: one line says so (the status is cached for 3 s: start from an empty cache)
    import streamlit as st
    st.cache_data.clear()
    at = page("gestures", user_id=ann["id"])
    at.run()
    assert_clean(at)
    assert "The UDP server's status is not available" in texts(at) and "is udpserver running?" in texts(at)
    assert "bad_tag" not in texts(at)


def test_old_boot_rejections_from_before_a_reset_name_no_boot_the_server_never_received():
    """After 'reset boot counter' (before the re-flashed device sends) the UDP server has no boot of the device's
    own count: the page said 'the server has already received boot -1' (or 'None')."""
    import data
    device = {"id": 3, "channel_count": 4}
    counters = {"boot": None, "rejected_boot": 1, "rejected": {"old_boot": 2}, "rejected_age_s": {"old_boot": 4.0},
                "last_accepted_age_s": 30.0}
    text = data.explain_device_status(device, counters)["reasons"][0]["text"]
    assert "before its boot counter was reset" in text and "None" not in text and "-1" not in text, text
    counters["boot"] = 7
    text = data.explain_device_status(device, counters)["reasons"][0]["text"]
    assert "The device sends boot 1, the server has already received boot 7." in text


def test_every_rejection_reason_has_a_hint_in_the_ui():
    import data
    for reason in Reject:
        assert data.REJECT_HINTS.get(reason.value), f"no hint for {reason.value}"
    assert data.REJECT_HINTS.get("internal_error")


def test_a_device_the_server_never_heard_from_gets_the_nothing_arrives_hint():
    import data
    quiet = {"rejected": {}, "rejected_age_s": {}, "last_accepted_age_s": None, "stored_samples": 0}
    v = data.explain_device_status({"id": 1, "channel_count": 4}, quiet)
    assert v["state"] == "silent" and not v["reasons"] and "since the UDP server started" in v["summary"]
    assert v["hint"] == data.SILENT_HINT
    assert data.explain_device_status({"id": 1}, None)["state"] == "unknown"
    # old rejections with packets arriving now: receiving, the history still listed
    healed = {"rejected": {"old_boot": 3}, "rejected_age_s": {"old_boot": 3600.0}, "last_accepted_age_s": 0.5}
    v = data.explain_device_status({"id": 1}, healed)
    assert v["state"] == "receiving" and [r["reason"] for r in v["reasons"]] == ["old_boot"]
    assert v["summary"] == "receiving"
    stuck = {"rejected": {"old_boot": 300}, "rejected_age_s": {"old_boot": 0.1}, "last_accepted_age_s": 900.0}
    v = data.explain_device_status({"id": 1}, stuck)
    assert v["state"] == "rejected" and "old_boot" in v["summary"]


def test_a_device_that_stopped_sending_is_not_told_its_setup_is_wrong():
    """A device that streamed (65,000 samples stored) and was then switched off got the never-heard-from hint:
    'no packet reaches the server under this device's id: check ... SECRET_SERVER_IP ...', which sends its owner
    to re-check settings that were right minutes ago."""
    import data
    stopped = {"rejected": {}, "rejected_age_s": {}, "last_accepted_age_s": 600.0, "stored_samples": 65_000}
    v = data.explain_device_status({"id": 1, "channel_count": 4}, stopped)
    assert v["state"] == "silent" and v["summary"] == "not receiving: it stopped sending"
    assert "SECRET_SERVER_IP" not in v["hint"] and "stopped" in v["hint"] and "powered" in v["hint"]
    assert data.explain_device_status({"id": 1}, {**stopped, "last_accepted_age_s": 0.5})["hint"] is None


def test_a_device_sending_another_rate_than_registered_is_told_so(page, clean_db, tmp_path):
    """A board built at the sketch's 500 Hz but registered at the page's suggested 1000 Hz (or a Myo bridge, 200 Hz)
    had every packet accepted and nothing said: its recordings were trained and recognised as 1000 Hz ones. The
    UDP server now reports the rate the packets carry and the page warns; a registered 333.3 Hz, sent as 333, is
    no mismatch."""
    user = repo.create_user(clean_db, "Rate", "rate@example.org")
    fast = repo.register_device(clean_db, user["id"], 4, 1000.0, name="registered fast")
    frac = repo.register_device(clean_db, user["id"], 4, 333.3, name="fractional")
    srv = UdpServer(tmp_path / "spool", tmp_path / "udpserver.log", []).start()
    sender = Sender()
    try:
        sender.send([protocol.build_binary(fast["id"], 1, 0, 1000, 500, np.ones((5, 4), int),
                                           bytes.fromhex(fast["secret_key_hex"])),
                     protocol.build_binary(frac["id"], 1, 0, 1000, 333, np.ones((5, 4), int),
                                           bytes.fromhex(frac["secret_key_hex"]))])
        m = srv.wait_for(lambda m: m["samples"]["stored"] == 10, what="both devices' packets stored")
        assert m["devices"][str(fast["id"])]["rate_hz"] == 500 and m["devices"][str(frac["id"])]["rate_hz"] == 333
        at = page("gestures", user_id=user["id"])
        at.run()
        assert_clean(at)
        shown = texts(at)
        fast_part = _section(shown, fast["id"]).split(f" #{frac['id']}]")[0]
        assert "receiving, but at 500 Hz, not the registered 1000 Hz" in fast_part
        assert "The device sends 500 Hz, registered with 1000 Hz: Its samples are stored" in shown
        assert shown.count("registered with") == 1, shown  # none for the 333.3 Hz device sending 333
        frac_part = _section(shown, frac["id"]).split(f" #{fast['id']}]")[0]
        assert "receiving" in frac_part and "not the registered" not in frac_part
    finally:
        sender.sock.close()
        srv.stop()
