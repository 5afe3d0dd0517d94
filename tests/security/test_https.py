"""HTTPS (SEMG_TLS_CERT_FILE / SEMG_TLS_KEY_FILE) through the real services, started as supervisord starts them:
each HTTP service presents the given certificate and answers nothing in plain text; the platform's own clients
(the inference worker's /predict calls, `semg.health`, the UI's status checks) work over it although the
certificate names a public host, not 127.0.0.1; a browser signs in over it and gets a secure context (which the
capture page's webcam needs); a connection that never starts its TLS handshake is closed."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from semg import tls
from tests.processes import stop_group, supervisor_command, wait_until_answers

REPO = Path(__file__).resolve().parents[2]
HOST_NAME = "semg.example.org"  # the certificate's only name: the services are reached at 127.0.0.1


@dataclass
class HttpsStack:
    env: dict[str, str]
    cert: Path
    ports: dict[str, int]  # api, ui, metrics
    pinned: ssl.SSLContext
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    idle: list[IdleConnection] = field(default_factory=list)


class IdleConnection:
    """A TCP connection to `port` that never starts its TLS handshake; `held` is how long the server kept it."""

    def __init__(self, name: str, port: int):
        self.name, self.sock = name, socket.create_connection(("127.0.0.1", port))
        self.opened, self.held = time.monotonic(), None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        self.sock.settimeout(120)
        try:
            if self.sock.recv(1) == b"":
                self.held = time.monotonic() - self.opened
        except ConnectionResetError:
            self.held = time.monotonic() - self.opened
        except OSError:  # timed out, or closed by the fixture
            pass


@pytest.fixture(scope="module")
def https_stack(settings, tmp_path_factory):
    from semg.embedded import free_port
    d = tmp_path_factory.mktemp("tls")
    leaf = trustme.CA().issue_cert(HOST_NAME)
    cert, key = d / "fullchain.pem", d / "privkey.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ports = {"api": free_port(), "ui": free_port(), "metrics": free_port()}
    env = {**os.environ, "SEMG_PYTHON": sys.executable, "SEMG_BIND_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "SEMG_TLS_CERT_FILE": str(cert), "SEMG_TLS_KEY_FILE": str(key), "API_PORT": str(ports["api"]),
           "UI_PORT": str(ports["ui"]), "UDP_METRICS_PORT": str(ports["metrics"]),
           "UDP_PORT": str(free_port(udp=True))}
    stack = HttpsStack(env, cert, ports, tls.client_context(_settings(env)))
    try:
        for program in ("api", "udpserver", "ui"):
            _start(stack, program, env, settings.log_dir)
        for program, url in (("api", f"https://127.0.0.1:{ports['api']}/health"),
                             ("udpserver", f"https://127.0.0.1:{ports['metrics']}/health"),
                             ("ui", f"https://127.0.0.1:{ports['ui']}/_stcore/health")):
            wait_until_answers(stack.procs[program], url, f"{program} over HTTPS (see {stack.logs[program]})",
                               verify=stack.pinned)
        # connections that never start a handshake, checked by the last test (meanwhile the others run)
        stack.idle = [IdleConnection(name, ports[name]) for name in ("api", "ui", "metrics")]
        yield stack
    finally:
        for conn in stack.idle:
            conn.sock.close()
        for proc in stack.procs.values():
            stop_group(proc, grace=20)


def _start(stack: HttpsStack, program: str, env: dict[str, str], log_dir: Path, name: str | None = None) -> None:
    name = name or program
    stack.logs[name] = log_dir / f"test-https-{name}.log"
    with open(stack.logs[name], "ab") as log:
        stack.procs[name] = subprocess.Popen(supervisor_command(program, env), cwd=REPO, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)


def _settings(env: dict[str, str]):
    from semg.config import Settings
    return Settings(_env_file=None, **{k.lower(): v for k, v in env.items()
                                       if k in ("SEMG_TLS_CERT_FILE", "SEMG_TLS_KEY_FILE", "API_PORT", "UI_PORT",
                                                "UDP_METRICS_PORT", "UDP_PORT", "SEMG_BIND_HOST")})


def test_every_http_service_presents_the_certificate_and_answers_nothing_in_plain_text(https_stack):
    want = x509.load_pem_x509_certificate(https_stack.cert.read_bytes())
    for name, port in https_stack.ports.items():
        shown = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
        assert shown == want, f"{name} presents another certificate"
        path = {"api": "/health", "ui": "/_stcore/health", "metrics": "/health"}[name]
        try:
            r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
        except httpx.HTTPError:
            pass  # the TLS server hung up on a plain request
        else:
            assert r.status_code == 400 and "ok" not in r.text.lower(), (name, r.status_code, r.text[:200])
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # really TLS, with our key
            httpx.get(f"https://127.0.0.1:{port}{path}", timeout=5)


def test_health_and_the_uis_status_checks_go_over_https(https_stack):
    r = subprocess.run([sys.executable, "-m", "semg.health", "--json"], env=https_stack.env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    health = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("api", "udpserver", "ui"):
        assert health[name]["ok"] and health[name]["detail"].startswith("https://"), (name, health[name])
    assert r.returncode == 0, health

    import data  # the UI's data module (tests/security/conftest puts streamlit_apps/ on the path)
    s = _settings(https_stack.env)
    api, udp = data._check_api(s), data._check_udp(s)
    assert api["ok"] and "https://" in api["detail"], api
    assert udp["ok"], udp


def test_live_decisions_flow_through_the_workers_https_calls(https_stack, clean_db, settings):
    """The inference worker reaches /predict over HTTPS with the pinned certificate: samples in, decisions out.
    Its own API, started on the clean database (both cache models by artifact id, which a clean database reuses,
    and the API registers the service key in it when it starts)."""
    from ml_model.rest.demo_models import insert_artifact, random_artifact
    from semg import natsio, repo
    from semg.embedded import free_port
    from semg.messages import MODELS_UPDATED, ModelUpdated
    from tests.inference.helpers import Collector, samples_message

    env = {**https_stack.env, "API_PORT": str(free_port())}
    _start(https_stack, "api", env, settings.log_dir, name="live-api")
    wait_until_answers(https_stack.procs["live-api"], f"https://127.0.0.1:{env['API_PORT']}/health",
                       "the live test's API", verify=https_stack.pinned)
    _start(https_stack, "inference", env, settings.log_dir)
    user = repo.create_user(clean_db, "Over TLS", "tls@example.org")
    dev = repo.register_device(clean_db, user["id"], 8, 200.0)
    weights, meta = random_artifact(8, 200.0, seed=0)
    artifact = insert_artifact(clean_db, user["id"], weights, meta)
    values = np.random.default_rng(0).normal(0, 300, size=(400, 8))

    async def scenario() -> Collector:
        nc = await natsio.connect("admin")
        coll = Collector()
        await coll.start(nc)
        await nc.publish(MODELS_UPDATED, ModelUpdated(userid=user["id"], artifact_id=artifact).model_dump_json().encode())
        deadline = time.monotonic() + 60
        seq = 0
        while time.monotonic() < deadline and not coll.decisions:  # the worker may still be loading the model
            await nc.publish(f"emg.samples.{user['id']}",
                             samples_message(user["id"], dev["id"], seq, values[seq % 400:seq % 400 + 40], 200.0))
            seq += 40
            await asyncio.sleep(0.2)
        await nc.close()
        return coll

    coll = asyncio.run(scenario())
    log = https_stack.logs["inference"].read_text()
    assert coll.decisions, f"no decision over HTTPS within 60 s; worker log: {log[-2000:]}"
    assert {d.userid for d in coll.decisions} == {user["id"]}
    assert f"api https://127.0.0.1:{env['API_PORT']}" in log


def test_a_browser_signs_in_over_https_and_gets_a_secure_context(https_stack, settings):
    """At the certificate's own name (mapped to 127.0.0.1), not at localhost, where any page is a secure context."""
    from playwright.sync_api import sync_playwright

    from semg import secrets
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    from ui_driver import CHROMIUM, CHROMIUM_ARGS
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    spki = x509.load_pem_x509_certificate(https_stack.cert.read_bytes()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    import base64
    import hashlib
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    url = f"https://{HOST_NAME}:{https_stack.ports['ui']}/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, f"--host-resolver-rules=MAP {HOST_NAME} 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={pin}"])  # trusts this one key only, like the platform's clients
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.get_by_label("Password", exact=True).fill(secrets.ui_password(settings))
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Your first five minutes").first.wait_for()  # the app's websocket runs over TLS
            assert page.evaluate("() => window.isSecureContext && !!navigator.mediaDevices?.getUserMedia")
            # the remembered sign-in is kept per origin (scheme, host and port): never in a cookie
            deadline = time.monotonic() + 10
            while not (token := page.evaluate("() => localStorage.getItem('semg_session')")):
                assert time.monotonic() < deadline, "no remembered sign-in"
                time.sleep(0.2)
            assert all(token not in c["value"] for c in page.context.cookies())
        finally:
            browser.close()


def test_a_connection_that_never_starts_its_handshake_is_closed(https_stack):
    """The HTTP guards of the API, the UI and the metrics endpoint see a TLS connection only after its handshake:
    one that sends nothing is closed after semg.tls.HANDSHAKE_TIMEOUT_S (asyncio's default would hold it 60 s)."""
    assert https_stack.idle, "the fixture opens them"
    for conn in https_stack.idle:
        conn.thread.join(max(0.0, conn.opened + tls.HANDSHAKE_TIMEOUT_S + 8 - time.monotonic()))
        assert conn.held is not None, f"{conn.name}: still open {time.monotonic() - conn.opened:.1f} s after it connected"
        assert tls.HANDSHAKE_TIMEOUT_S - 1 <= conn.held <= tls.HANDSHAKE_TIMEOUT_S + 8, (conn.name, conn.held)
