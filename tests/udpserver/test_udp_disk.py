"""The UDP server, which runs unattended and whose spool is the last place a recording waits, says in its log
when a disk it writes to is nearly full (semg.diskspace, below SEMG_MIN_FREE_DISK_MB)."""

from __future__ import annotations

import time


def test_the_udp_server_logs_a_nearly_full_disk(udp_server, settings, monkeypatch):
    monkeypatch.setenv("SEMG_MIN_FREE_DISK_MB", str(10**12))  # more than any disk has
    srv = udp_server()  # stats (and the disk check) every 2 s
    deadline = time.monotonic() + 20
    while "low disk space:" not in srv.log_tail(200) and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = [line for line in srv.log_tail(400).splitlines() if "low disk space:" in line]
    assert lines, srv.log_tail(40)  # (said again only every 10 minutes: tests/semg/test_diskspace.py)
    assert "WARNING" in lines[0] and str(settings.state_dir) in lines[0] and "SEMG_MIN_FREE_DISK_MB" in lines[0], lines
    assert srv.health()["status"] == "ok"  # a warning, not a fault: it stores and publishes as before
