"""semg.tls: the HTTPS settings, the checks of the certificate and key, and the clients' pinned trust."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from semg import tls
from semg.config import Settings, SettingsError, get_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(ca, tmp_path) -> tuple[Path, Path]:
    """A certificate for a public name (not 127.0.0.1, where the platform's own clients reach the services)."""
    leaf = ca.issue_cert("semg.example.org")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def _with(monkeypatch, **env) -> Settings:
    for k in ("SEMG_TLS_CERT_FILE", "SEMG_TLS_KEY_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    get_settings.cache_clear()
    try:
        return get_settings()
    finally:
        get_settings.cache_clear()


def test_https_needs_both_files_and_every_local_url_follows(monkeypatch, pair):
    cert, key = pair
    s = _with(monkeypatch)
    assert s.tls_files is None and s.http_scheme == "http" and s.api_url.startswith("http://")
    s = _with(monkeypatch, SEMG_TLS_CERT_FILE="", SEMG_TLS_KEY_FILE=" ")  # compose passing unset variables
    assert s.tls_files is None
    s = _with(monkeypatch, SEMG_TLS_CERT_FILE=cert, SEMG_TLS_KEY_FILE=key)
    assert s.tls_files == (cert, key) and s.http_scheme == "https"
    assert s.api_url == f"https://127.0.0.1:{s.api_port}" and s.ui_url == f"https://127.0.0.1:{s.ui_port}"
    assert s.udp_metrics_url == f"https://127.0.0.1:{s.udp_metrics_port}/metrics"
    assert tls.problem(s) is None and isinstance(tls.server_context(s), ssl.SSLContext)
    for given, value, missing in (("SEMG_TLS_CERT_FILE", cert, "SEMG_TLS_KEY_FILE"),
                                  ("SEMG_TLS_KEY_FILE", key, "SEMG_TLS_CERT_FILE")):
        with pytest.raises(SettingsError) as e:
            _with(monkeypatch, **{given: value})
        assert f"{given} is set but {missing} is not" in str(e.value) and "\n" not in str(e.value)


def test_files_that_cannot_serve_are_named_in_one_line(monkeypatch, ca, pair, tmp_path):
    cert, key = pair
    other_key = tmp_path / "other.pem"
    ca.issue_cert("other.example.org").private_key_pem.write_to_path(str(other_key))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase")))
    cases = [
        (tmp_path / "missing.pem", key, "SEMG_TLS_CERT_FILE", "cannot be read"),
        (tmp_path, key, "SEMG_TLS_CERT_FILE", "cannot be read"),
        (junk, key, "SEMG_TLS_CERT_FILE", "no PEM certificate"),
        (cert, junk, "SEMG_TLS_KEY_FILE", "not a PEM private key"),
        (cert, other_key, "SEMG_TLS_KEY_FILE", "is not the key of"),
        (cert, encrypted, "SEMG_TLS_KEY_FILE", "encrypted"),
    ]
    for c, k, var, why in cases:
        s = _with(monkeypatch, SEMG_TLS_CERT_FILE=c, SEMG_TLS_KEY_FILE=k)
        problem = tls.problem(s)
        assert problem and problem.startswith(var) and why in problem and "\n" not in problem, (c, k, problem)
        with pytest.raises(tls.TlsError):
            tls.server_context(s)


def _tls_server(cert: Path, key: Path):
    """A TLS server on 127.0.0.1 that answers b'ok' once per connection; returns (port, close)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], listener.close


def _talk(ctx: ssl.SSLContext, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="semg.example.org") as s:
        return s.recv(2)


def test_the_platforms_clients_trust_exactly_the_configured_certificate(monkeypatch, ca, pair, tmp_path):
    """They reach the services at 127.0.0.1, which the certificate does not name; the pin stands for the name check.
    Another certificate, even one from the same CA for the same name, is refused."""
    cert, key = pair
    s = _with(monkeypatch, SEMG_TLS_CERT_FILE=cert, SEMG_TLS_KEY_FILE=key)
    assert tls.client_context(s).check_hostname is False
    port, close = _tls_server(cert, key)
    try:
        assert _talk(tls.client_context(s), port) == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):  # the default trust does not know this CA
            _talk(ssl.create_default_context(), port)
    finally:
        close()
    impostor = ca.issue_cert("semg.example.org")
    icert, ikey = tmp_path / "impostor.pem", tmp_path / "impostor-key.pem"
    impostor.cert_chain_pems[0].write_to_path(str(icert))
    impostor.private_key_pem.write_to_path(str(ikey))
    port, close = _tls_server(icert, ikey)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            _talk(tls.client_context(s), port)
    finally:
        close()
    assert tls.client_context(_with(monkeypatch)) is None and tls.httpx_verify(_with(monkeypatch)) is True


def test_every_http_service_refuses_unusable_files_in_one_line(ca, pair, tmp_path):
    """Before they listen: no traceback, no passphrase prompt, exit 2 (supervisord then reports the line)."""
    cert, _ = pair
    wrong_key = tmp_path / "wrong.pem"
    ca.issue_cert("other.example.org").private_key_pem.write_to_path(str(wrong_key))
    env = {**os.environ, "SEMG_TLS_CERT_FILE": str(cert), "SEMG_TLS_KEY_FILE": str(wrong_key)}
    commands = {"api": ["-m", "ml_model.api"], "udpserver": ["-m", "udpserver.udpserver"],
                "ui": ["-m", "streamlit_apps"], "inference": ["-m", "ml_model.nat_inference"],
                "preflight": ["-m", "semg.embedded", "preflight"]}
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        lines = [ln for ln in (err + out).splitlines() if ln.strip()]
        assert p.returncode in (1, 2) and "Traceback" not in err, (name, p.returncode, err[-2000:])
        assert any("SEMG_TLS_KEY_FILE" in ln and "is not the key of" in ln for ln in lines), (name, lines)
