"""Settings: defaults, one-line errors naming the variable, external credentials required."""

import subprocess
import sys
from pathlib import Path

import pytest

from semg.config import Settings, SettingsError, get_settings


def _settings(monkeypatch, **env):
    for k in ["POSTGRES_HOST", "POSTGRES_PASSWORD", "NATS_SERVER", "NATS_USER", "NATS_PASSWORD", "API_PORT"]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    try:
        return get_settings()
    finally:
        get_settings.cache_clear()


def test_defaults_use_embedded_services(monkeypatch):
    for k in ["API_PORT", "UI_PORT", "UDP_PORT", "NATS_PORT", "POSTGRES_PORT", "SEMG_STATE_DIR"]:
        monkeypatch.delenv(k, raising=False)
    s = Settings()
    assert str(s.semg_state_dir) == ".state" and s.postgres_port == 5432
    assert s.api_port == 8000 and s.ui_port == 8501 and s.udp_port == 8081 and s.nats_port == 4222
    s = _settings(monkeypatch)
    assert s.embedded_postgres and s.embedded_nats


def test_external_services_chosen_by_environment(monkeypatch):
    s = _settings(monkeypatch, POSTGRES_HOST="db.example", POSTGRES_PASSWORD="x" * 12, NATS_SERVER="nats://n:4222")
    assert not s.embedded_postgres and not s.embedded_nats
    assert s.nats_url == "nats://n:4222"


@pytest.mark.parametrize("bind,url_host", [("::1", "[::1]"), ("::", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")])
def test_clients_reach_an_ipv6_bind_host_through_valid_urls(monkeypatch, bind, url_host):
    """The services listen on an IPv6 SEMG_BIND_HOST (or SEMG_INTERNAL_BIND_HOST); the URLs the clients use put it in brackets (an address
    without them, http://::1:8000, is not a URL: every health check and API call raised)."""
    import httpx
    s = _settings(monkeypatch, SEMG_BIND_HOST=bind, API_PORT="8000", NATS_PORT="4222", UDP_METRICS_PORT="8082")
    assert s.api_url == f"http://{url_host}:8000"
    assert s.udp_metrics_url == f"http://{url_host}:8082/metrics"
    assert httpx.URL(s.api_url).port == 8000 and httpx.URL(s.udp_metrics_url).port == 8082
    # the embedded PostgreSQL and NATS listen on SEMG_INTERNAL_BIND_HOST (127.0.0.1 unless set)
    assert s.nats_url == "nats://127.0.0.1:4222" and s.postgres_address == "127.0.0.1"
    s = _settings(monkeypatch, SEMG_INTERNAL_BIND_HOST=bind, NATS_PORT="4222")
    url_host = "[::1]" if bind == "::" else url_host  # PostgreSQL on '::' answers IPv6 only
    assert s.nats_url == f"nats://{url_host}:4222"
    assert s.postgres_address == url_host.strip("[]")  # libpq takes the bare address


@pytest.mark.parametrize("env,var", [
    ({"API_PORT": "abc"}, "API_PORT"),
    ({"API_PORT": "70000"}, "API_PORT"),
    ({"UDP_PORT": "-1"}, "UDP_PORT"),
    ({"POSTGRES_HOST": "db.example"}, "POSTGRES_PASSWORD"),
    ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    ({"SEMG_TRAIN_NICE": "25"}, "SEMG_TRAIN_NICE"),
    ({"SEMG_PREDICTION_RETENTION_DAYS": "-1"}, "SEMG_PREDICTION_RETENTION_DAYS"),
    ({"SEMG_PREDICTION_RETENTION_DAYS": "1.5"}, "SEMG_PREDICTION_RETENTION_DAYS"),
    ({"SEMG_PREDICTION_RETENTION_DAYS": "ninety"}, "SEMG_PREDICTION_RETENTION_DAYS"),
    ({"SEMG_PREDICTION_RETENTION_DAYS": "100000"}, "SEMG_PREDICTION_RETENTION_DAYS"),
    ({"SEMG_UI_PASSWORD": "hunter2hunt"}, "SEMG_UI_PASSWORD"),  # 11 characters
    ({"SEMG_SERVICE_KEY": "k" * 23}, "SEMG_SERVICE_KEY"),
])
def test_invalid_setting_names_the_variable(monkeypatch, env, var):
    with pytest.raises(SettingsError) as e:
        _settings(monkeypatch, **env)
    assert var in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value,days", [(None, 90), ("30", 30), ("0", 0), (" ", 90)])
def test_prediction_retention_days(monkeypatch, value, days):
    """Decisions are kept 90 days unless told otherwise; 0 keeps them forever; blank (compose passing an unset
    variable) is the default."""
    monkeypatch.delenv("SEMG_PREDICTION_RETENTION_DAYS", raising=False)
    env = {} if value is None else {"SEMG_PREDICTION_RETENTION_DAYS": value}
    assert _settings(monkeypatch, **env).semg_prediction_retention_days == days


def test_a_bad_retention_stops_the_worker_in_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SEMG_STATE_DIR": str(tmp_path), "SEMG_PREDICTION_RETENTION_DAYS": "-3"}
    r = subprocess.run([sys.executable, "-m", "ml_model.nat_inference"], env=env, capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr
    assert "SEMG_PREDICTION_RETENTION_DAYS='-3'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_printed_settings_are_the_effective_ones(tmp_path):
    """`python -m semg.config` prints what the services use: the bind hosts left unset are the addresses they
    fall back to (README.md's defaults), not None."""
    env = {"PATH": "/usr/bin:/bin", "SEMG_STATE_DIR": str(tmp_path), "SEMG_BIND_HOST": "0.0.0.0"}
    r = subprocess.run([sys.executable, "-m", "semg.config"], env=env, capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "SEMG_UDP_BIND_HOST=0.0.0.0" in lines and "SEMG_INTERNAL_BIND_HOST=127.0.0.1" in lines, r.stdout


def test_service_entry_point_prints_one_line_not_a_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SEMG_STATE_DIR": str(tmp_path), "NATS_PORT": "notaport"}
    r = subprocess.run([sys.executable, "-m", "semg.db", "status"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert "NATS_PORT" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_secrets_are_private_and_stable(monkeypatch, tmp_path):
    from semg import secrets
    s = _settings(monkeypatch, SEMG_STATE_DIR=str(tmp_path))
    a = secrets.postgres_password(s)
    assert a == secrets.postgres_password(s) and len(a) >= 24
    assert (tmp_path / "secrets" / "postgres_password").stat().st_mode & 0o777 == 0o600
    user, pw = secrets.nats_credentials("ingest", s)
    assert user == "ingest" and pw and secrets.nats_credentials("ingest", s)[1] == pw


def test_training_yields_to_the_live_path():
    """The training commands lower their own priority to SEMG_TRAIN_NICE (never raise it)."""
    code = ("import os; from ml_model.TrainMLJob import _yield_to_live_path as y; y(7); a = os.nice(0); "
            "y(3); print(a, os.nice(0))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["7", "7"]


def test_a_chosen_secret_too_short_to_face_the_network_is_refused_without_showing_it(monkeypatch):
    """The UI's sign-in and the API answer whoever reaches them: a password or key a person sets must be long
    enough that guessing it online is hopeless; the one-line error never shows the value."""
    for var, least in [("SEMG_UI_PASSWORD", 12), ("SEMG_SERVICE_KEY", 24)]:
        short = "Xq7" * 8
        with pytest.raises(SettingsError) as e:
            _settings(monkeypatch, **{var: short[:least - 1]})
        assert var in str(e.value) and f"at least {least} characters" in str(e.value)
        assert short[:least - 1] not in str(e.value)
        monkeypatch.delenv(var)
    s = _settings(monkeypatch, SEMG_UI_PASSWORD="x" * 12, SEMG_SERVICE_KEY="k" * 24)
    assert s.semg_ui_password.get_secret_value() == "x" * 12 and s.semg_service_key.get_secret_value() == "k" * 24


def test_a_blank_or_empty_secret_is_never_used(monkeypatch, tmp_path):
    """SEMG_UI_PASSWORD set but empty (docker run -e SEMG_UI_PASSWORD) or an empty secret file would make the
    empty string the password: it counts as unset, and the generated secret is used instead."""
    from semg import secrets
    s = _settings(monkeypatch, SEMG_STATE_DIR=str(tmp_path), SEMG_UI_PASSWORD="  ", SEMG_SERVICE_KEY="")
    assert s.semg_ui_password is None and s.semg_service_key is None
    pw = secrets.ui_password(s)
    assert len(pw) >= 12 and secrets.ui_password(s) == pw
    (tmp_path / "secrets" / "ui_password").write_text("\n")
    again = secrets.ui_password(s)
    assert again and again.strip() == again
    assert (tmp_path / "secrets" / "ui_password").read_text() == again


def _first_start(state_dirs: list[str], barrier, out) -> None:
    """One service's first start in each of `state_dirs` in turn, all processes at the same moment in each."""
    import os

    from semg import secrets
    from semg.config import Settings
    for state_dir in state_dirs:
        os.environ["SEMG_STATE_DIR"] = state_dir
        s = Settings()
        barrier.wait()
        try:
            out.put((state_dir, secrets.service_api_key(s), secrets.nats_credentials("api", s)[1]))
        except Exception as e:  # noqa: BLE001 - reported to the test
            out.put((state_dir, repr(e)))


def test_services_creating_a_secret_at_the_same_moment_agree_on_it(tmp_path):
    """First start: api, worker and UI all create the service key (and NATS identities) concurrently. Four
    processes race in five fresh state folders (spawning them per folder cost 20 s)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    dirs = [str(tmp_path / f"state{trial}") for trial in range(5)]
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_first_start, args=(dirs, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(4 * len(dirs))]
    for p in procs:
        p.join(30)
    for state_dir in dirs:
        d = Path(state_dir)
        mine = [g[1:] for g in got if g[0] == state_dir]
        assert len(mine) == 4 and all(len(g) == 2 for g in mine), mine
        assert len(set(mine)) == 1, mine
        assert (d / "secrets" / "service_api_key").read_text() == mine[0][0]
        assert not [f for f in (d / "secrets").iterdir() if f.name.endswith(".tmp")]
