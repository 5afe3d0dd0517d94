"""`python -m semg.health`: one line per service, NATS included (a real server, and one that is not there)."""

from __future__ import annotations

import socket

from semg.config import Settings
from semg.health import check_nats


def test_nats_line_answers_for_the_server_itself(settings, monkeypatch):
    ok, detail = check_nats(settings)
    assert ok, detail
    assert f"nats://127.0.0.1:{settings.nats_port}" in detail and "round trip" in detail

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    monkeypatch.setenv("NATS_PORT", str(free))
    ok, detail = check_nats(Settings())
    assert not ok and detail.startswith(f"nats://127.0.0.1:{free}: "), detail
    # refused at once and said so: the probe used to retry until its own 5 s timeout ("TimeoutError: no answer")
    assert "NoServersError" in detail, detail

    # an external NATS with credentials in the URL: the line names the host, never the password
    monkeypatch.setenv("NATS_SERVER", f"nats://semg:s3cret@127.0.0.1:{free}")
    ok, detail = check_nats(Settings())
    assert not ok and "s3cret" not in detail and f"127.0.0.1:{free}" in detail, detail


def test_nats_addresses_never_carry_credentials(monkeypatch):
    monkeypatch.setenv("NATS_SERVER", "nats://semg:s3cret@a.example:4333,b.example:4222,tls://u:p@c.example")
    monkeypatch.setenv("NATS_USER", "semg")
    monkeypatch.setenv("NATS_PASSWORD", "x")
    assert Settings().nats_addresses == "a.example:4333,b.example:4222,c.example:4222"


def test_wait_stops_when_supervisord_gave_up_on_a_service(tmp_path, monkeypatch, capsys):
    """A program supervisord has put in FATAL (too many quick exits) is never started again by it: --wait (what
    start_all.sh runs, 180 s by default) used to go on checking until its deadline, so a start whose NATS could
    not run kept the user waiting minutes for nothing."""
    from semg import health

    monkeypatch.setenv("SEMG_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(health, "get_settings", Settings)
    calls = []

    def check_all(s):
        calls.append(1)
        assert len(calls) <= 3, "kept waiting for a service supervisord gave up on"
        return {"postgres": (True, "up"), "nats": (False, "supervisor: FATAL; nats://127.0.0.1:1: refused"),
                "api": (True, "ok")}

    monkeypatch.setattr(health, "check_all", check_all)
    monkeypatch.setattr(health.time, "sleep", lambda s: None)
    assert health.main(["--wait", "600"]) == 1
    assert len(calls) == 1
    assert "DOWN nats" in capsys.readouterr().out


def test_a_nats_server_refusing_the_credentials_is_named_and_not_waited_for(settings, monkeypatch, capsys):
    """After `semg.secrets rotate nats` a ./start_all.sh run without stopping first checked health with the new
    password against the NATS still running with the old one: 'Authorization Violation', and it waited its whole
    180 s for something waiting cannot mend. The line now says what to do and --wait gives up at once."""
    from semg import health

    monkeypatch.setenv("NATS_SERVER", f"nats://127.0.0.1:{settings.nats_port}")  # the same server, as external
    monkeypatch.setenv("NATS_USER", "ui")
    monkeypatch.setenv("NATS_PASSWORD", "not-the-password")
    ok, detail = check_nats(Settings())
    assert not ok and "refuses this install's NATS credentials" in detail and "NATS_PASSWORD" in detail, detail

    calls = []
    real = health.check_all

    def check_all(s):
        calls.append(1)
        return real(s)

    monkeypatch.setattr(health, "check_all", check_all)
    monkeypatch.setattr(health, "get_settings", Settings)
    assert health.main(["--wait", "60"]) == 1
    assert len(calls) == 1, "waited for a NATS server that refuses the credentials"
    assert "refuses this install's NATS credentials" in capsys.readouterr().out
