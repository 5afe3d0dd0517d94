"""Nothing answers without credentials: NATS (per-service users with least-privilege subject permissions),
PostgreSQL (SCRAM passwords, no trust), the web UI (login form only); secrets are generated private files
that never enter the repository. (The API's 401s: tests/api/test_auth.py, tests/fuzz and tests/faults.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import subprocess
from pathlib import Path

import nats
import psycopg2
import pytest

from semg import db, natsio, secrets
from semg.embedded import nats_config_path

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "inference", "api", "trainer", "ui")
# NATS's shared reply inbox and every identity's own one: a service may read only its own replies.
INBOXES = ["_INBOX.7"] + [f"_INBOX_{service}.7" for service in SERVICES]
SUBJECTS = ["emg.samples.7", "emg.predictions.7", "models.updated", "some.other.subject", *INBOXES]

# What each service identity must be able to do, written out here on purpose (not read from
# semg.embedded.NATS_PERMISSIONS): widening a permission there makes this test fail.
MAY_PUBLISH = {
    "ingest": {"emg.samples.7"},
    "inference": {"emg.predictions.7"},
    "api": {"models.updated"},  # a user's choice of the model served (PUT /users/{id}/served-model)
    "trainer": {"models.updated"},
    "ui": {"models.updated"},  # the same choice made on the Training Jobs page
}
MAY_SUBSCRIBE = {
    "ingest": {"_INBOX_ingest.7"},
    "inference": {"emg.samples.7", "models.updated", "_INBOX_inference.7"},
    "api": {"models.updated", "emg.predictions.7", "_INBOX_api.7"},
    "trainer": {"_INBOX_trainer.7"},
    "ui": {"emg.samples.7", "emg.predictions.7", "_INBOX_ui.7"},
}


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _try_connect(settings, **auth) -> Exception | None:
    errors: list[Exception] = []

    async def error_cb(e):
        errors.append(e)

    try:
        nc = await nats.connect(settings.nats_url, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=3, error_cb=error_cb, **auth)
    except Exception as e:  # noqa: BLE001 - any refusal is what we want to see
        return e
    try:
        await nc.flush(timeout=3)
        return None
    except Exception as e:  # noqa: BLE001
        return e
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


# ---- NATS ----------------------------------------------------------------------------------------
def test_nats_refuses_connections_without_or_with_wrong_credentials(settings):
    admin_user, admin_pw = secrets.nats_credentials("admin", settings)
    attempts = {
        "no credentials": {},
        "wrong password": {"user": "ingest", "password": "not-the-password"},
        "unknown user": {"user": "mallory", "password": admin_pw},
        "admin's user, ingest's password": {"user": admin_user,
                                            "password": secrets.nats_credentials("ingest", settings)[1]},
        "token instead of user": {"token": admin_pw},
    }
    for what, auth in attempts.items():
        err = _run(_try_connect(settings, **auth))
        assert err is not None, f"NATS accepted a connection with {what}"
        assert "uthorization" in repr(err) or isinstance(err, (nats.errors.NoServersError,)), (what, repr(err))
    for service in MAY_PUBLISH:  # and each service's real credentials work
        user, pw = secrets.nats_credentials(service, settings)
        assert _run(_try_connect(settings, user=user, password=pw)) is None, service


async def _permission_matrix(settings) -> tuple[dict, dict, dict]:
    """(published, received, errors): what each identity could publish to / receive from, what it was told."""
    admin = await natsio.connect("admin", settings)
    got_by_admin: list[tuple[str, bytes]] = []

    async def on_admin(msg):
        got_by_admin.append((msg.subject, msg.data))

    for subj in SUBJECTS:
        await admin.subscribe(subj, cb=on_admin)
    await admin.flush()

    published: dict[str, set[str]] = {}
    received: dict[str, set[str]] = {}
    violations: dict[str, list[str]] = {}
    for service in MAY_PUBLISH:
        errs: list[str] = []

        async def error_cb(e, errs=errs):
            errs.append(str(e))

        nc = await natsio.connect(service, settings, error_cb=error_cb, allow_reconnect=False)
        got: list[str] = []

        async def on_msg(msg, got=got):
            got.append(msg.subject)

        for subj in SUBJECTS:
            await nc.subscribe(subj, cb=on_msg)
        await nc.flush()
        await asyncio.sleep(0.3)  # subscription violations arrive asynchronously
        # publish as the service: what reaches the admin's subscription was allowed
        for subj in SUBJECTS:
            await nc.publish(subj, f"from {service}".encode())
        await nc.flush()
        # publish as admin: what reaches the service's subscription was allowed
        for subj in SUBJECTS:
            await admin.publish(subj, b"from admin")
        await admin.flush()
        await nc.flush()
        await asyncio.sleep(0.5)  # both sides flushed: deliveries on loopback are long done by then
        published[service] = {s for s, d in got_by_admin if d == f"from {service}".encode()}
        received[service] = set(got)
        violations[service] = errs
        assert nc.is_connected, f"{service} was disconnected by a permission violation"
        await nc.close()
    await admin.close()
    return published, received, violations


def test_nats_subject_permissions_are_least_privilege(settings):
    published, received, violations = _run(_permission_matrix(settings))
    assert published == MAY_PUBLISH, "publish permissions differ from the intended ones"
    assert received == MAY_SUBSCRIBE, "subscribe permissions differ from the intended ones"

    # a denied publish/subscription is reported to the client as a permissions violation
    for service, errs in violations.items():
        told = " ".join(errs).lower()
        for subj in set(SUBJECTS) - MAY_PUBLISH[service]:
            assert f'permissions violation for publish to "{subj.lower()}"' in told, (service, subj, errs)
        for subj in set(SUBJECTS) - MAY_SUBSCRIBE[service]:
            assert f'permissions violation for subscription to "{subj.lower()}"' in told, (service, subj, errs)
    # e.g. the ingest identity cannot publish decisions nor read samples
    assert "emg.predictions.7" not in published["ingest"] and "emg.samples.7" not in received["ingest"]


def test_a_services_requests_get_their_replies_in_its_own_inbox(settings):
    """Request/reply works through the identity's own inbox prefix (the one its permissions allow)."""

    async def go() -> tuple[bytes, str]:
        admin = await natsio.connect("admin", settings)
        reply_to: list[str] = []

        async def answer(msg):
            reply_to.append(msg.reply)
            await admin.publish(msg.reply, b"pong:" + msg.data)

        await admin.subscribe("models.updated", cb=answer)
        await admin.flush()
        trainer = await natsio.connect("trainer", settings, allow_reconnect=False)
        try:
            resp = await trainer.request("models.updated", b"ping", timeout=5)
        finally:
            await trainer.close()
            await admin.close()
        return resp.data, reply_to[0]

    data, reply_to = _run(go())
    assert data == b"pong:ping"
    assert reply_to.startswith("_INBOX_trainer."), reply_to


def test_services_cannot_use_jetstream(settings):
    async def attempt(service):
        nc = await natsio.connect(service, settings, allow_reconnect=False, error_cb=_ignore)
        try:
            await nc.jetstream(timeout=1).account_info()
            return True
        except Exception:  # noqa: BLE001 - denied shows up as a timeout / no responders / error
            return False
        finally:
            await nc.close()

    assert _run(attempt("admin")) is True  # JetStream is on: the services are denied, not served nothing
    for service in MAY_PUBLISH:
        assert _run(attempt(service)) is False, f"{service} may use the JetStream API"


async def _ignore(_e):
    return None


# ---- PostgreSQL --------------------------------------------------------------------------------------
def test_postgres_needs_the_password_over_tcp(settings):
    base = {"host": "127.0.0.1", "port": settings.postgres_port, "dbname": settings.postgres_db,
            "user": settings.postgres_user, "connect_timeout": 5}
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(**base)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(**base, password="wrong-password")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(**{**base, "user": "postgres"}, password="postgres")
    with contextlib.closing(db.connect(settings)) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolpassword LIKE 'SCRAM-SHA-256$%%' FROM pg_authid WHERE rolname = %s",
                    (settings.postgres_user,))
        assert cur.fetchone()[0] is True, "the role's password is not stored as SCRAM"
        cur.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE error IS NULL")
        assert {r[0] for r in cur.fetchall()} == {"scram-sha-256"}


def test_embedded_postgres_files_have_no_trust_and_are_private(settings):
    hba = (settings.pg_data_dir / "pg_hba.conf").read_text()
    rules = [ln.split() for ln in hba.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert rules and all(r[-1] == "scram-sha-256" for r in rules), hba
    assert "trust" not in hba and "password" not in [r[-1] for r in rules] and "md5" not in hba
    assert stat.S_IMODE(settings.pg_data_dir.stat().st_mode) == 0o700


# ---- secrets -------------------------------------------------------------------------------------------
def test_generated_secrets_are_private_files_and_never_in_the_repository(settings):
    secrets.service_api_key(settings)
    secrets.ui_password(settings)
    d = settings.secrets_dir
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = sorted(p for p in d.iterdir())
    names = {p.name for p in files}
    assert {"postgres_password", "nats_users.json", "service_api_key", "ui_password"} <= names, names
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, f"{p} is {oct(p.stat().st_mode)}"
        assert p.stat().st_size >= 16
    conf = nats_config_path(settings)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600, "nats.conf holds passwords"

    values = [secrets.postgres_password(settings), secrets.service_api_key(settings),
              secrets.ui_password(settings), *json.loads((d / "nats_users.json").read_text()).values()]
    assert all(len(v) >= 16 for v in values)
    assert len(set(values)) == len(values), "two secrets are the same"
    # nothing tracked by git holds a generated secret, and no state dir is tracked
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert not [p for p in tracked.splitlines() if p.startswith(".state") or "/secrets/" in p]
    args = ["git", "grep", "-I", "-l", "-F"]
    for v in values:
        args += ["-e", v]
    found = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 1 and not found.stdout, f"a generated secret is in the repository: {found.stdout}"


def test_secrets_are_generated_once_and_kept(settings, tmp_path, monkeypatch):
    from semg.config import Settings
    s = Settings(semg_state_dir=tmp_path / "state")
    first = (secrets.postgres_password(s), secrets.nats_credentials("ingest", s), secrets.service_api_key(s),
             secrets.ui_password(s))
    again = (secrets.postgres_password(s), secrets.nats_credentials("ingest", s), secrets.service_api_key(s),
             secrets.ui_password(s))
    assert first == again
    other = Settings(semg_state_dir=tmp_path / "other")
    assert secrets.postgres_password(other) != first[0]  # random per installation, no default
    for p in s.secrets_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


# ---- web UI ----------------------------------------------------------------------------------------------
UI_PAGES = ["Main.py", "pages/1_User_Management.py", "pages/2_Gesture_Management.py",
            "pages/3_Training_Data_Capture.py", "pages/4_Kickoff_Training.py", "pages/5_Training_Jobs_Status.py",
            "pages/6_Realtime_Gesture_Recognition.py", "pages/7_Sensor_Data_Review.py"]


@pytest.mark.parametrize("path", UI_PAGES)
def test_every_ui_page_shows_only_the_login_form_without_the_password(page, clean_db, settings, path):
    from streamlit.proto.TextInput_pb2 import TextInput

    from semg import repo
    from tests.streamlit_apps.ui_checks import texts
    user = repo.create_user(clean_db, "Confidential Person", "confidential@example.org", notes="private notes")
    at = page(path, login=False, user_id=user["id"])
    at.run()
    assert not at.exception
    shown = texts(at)
    everything = shown + " ".join(str(e.proto) for e in at.get("dataframe"))
    assert at.text_input(key="semg_login_password").proto.type == TextInput.PASSWORD  # masked
    assert [b.label for b in at.button] == ["Sign in"]
    for leak in ("Confidential Person", "confidential@example.org", "private notes", secrets.ui_password(settings)):
        assert leak not in everything, f"{path} shows {leak!r} before sign-in"
    assert not at.get("dataframe") and not at.selectbox and not at.get("download_button")
