# Shared by start_all.sh, stop_all.sh, run_tests.sh and docker-entrypoint.sh (sourced, not run).
# Sets up the virtualenv when needed and exports the environment supervisord.conf reads.

semg_die() { echo "$(basename "$0"): $*" >&2; exit 1; }

semg_find_python() {
  local cand
  for cand in "${SEMG_BOOTSTRAP_PYTHON:-}" python3.11 python3 python; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}

# semg_setup_venv runtime|dev : create .venv if absent, (re)install when the requirements changed.
semg_setup_venv() {
  local kind="$1" req="requirements.txt" py stamp want
  [ "$kind" = dev ] && req="requirements-dev.txt"
  SEMG_VENV="${SEMG_VENV:-$SEMG_REPO/.venv}"
  if [ ! -x "$SEMG_VENV/bin/python" ]; then
    py="$(semg_find_python)" || semg_die "Python 3.11 or newer is required (set SEMG_BOOTSTRAP_PYTHON)"
    echo "creating virtualenv $SEMG_VENV"
    "$py" -m venv "$SEMG_VENV" || semg_die "could not create the virtualenv at $SEMG_VENV"
  fi
  stamp="$SEMG_VENV/.semg-installed-$kind"
  want="$(cat "$SEMG_REPO/requirements.txt" "$SEMG_REPO/$req" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing dependencies from $req (first run takes a few minutes)"
    # a first run cut short (power lost, Ctrl-C) while `venv` was installing pip left a virtualenv without it
    if ! "$SEMG_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
      echo "the virtualenv $SEMG_VENV has no pip (its creation was cut short?): installing it"
      "$SEMG_VENV/bin/python" -m ensurepip --upgrade >/dev/null \
        || semg_die "could not install pip into $SEMG_VENV: remove that directory and run $(basename "$0") again"
    fi
    "$SEMG_VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null 2>&1 || true
    "$SEMG_VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$SEMG_REPO/$req" \
      || semg_die "pip install -r $req failed (see the messages above)"
    echo "$want" > "$stamp"
  fi
  # Make the repo's packages importable from anywhere without a build step.
  local site
  site="$("$SEMG_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$SEMG_REPO" > "$site/semg-repo.pth"
  SEMG_PYTHON="$SEMG_VENV/bin/python"
  export SEMG_VENV SEMG_PYTHON
}

# semg_export_env : settings-derived variables for supervisord.conf (fails with one line on bad settings).
semg_export_env() {
  export SEMG_REPO
  SEMG_STATE_DIR="${SEMG_STATE_DIR:-$SEMG_REPO/.state}"
  case "$SEMG_STATE_DIR" in /*) ;; *) SEMG_STATE_DIR="$SEMG_REPO/${SEMG_STATE_DIR#./}" ;; esac
  export SEMG_STATE_DIR
  mkdir -p "$SEMG_STATE_DIR/logs" "$SEMG_STATE_DIR/run" || semg_die "cannot create SEMG_STATE_DIR=$SEMG_STATE_DIR"
  chmod 755 "$SEMG_STATE_DIR"
  # the logs hold people's data (PostgreSQL logs a failed statement with its values: names, emails, notes)
  chmod 700 "$SEMG_STATE_DIR/logs"
  local envfile="$SEMG_STATE_DIR/run/supervisor.env"
  # holds the supervisor password: private file
  (umask 077; "$SEMG_PYTHON" -m semg.config shell > "$envfile") || exit 1
  chmod 600 "$envfile"
  # shellcheck disable=SC1090
  . "$envfile"
  export SEMG_DB_INIT="${SEMG_DB_INIT:-true}"
  # supervisord runs its programs as the user that starts it (root must name itself; anyone else may only)
  SEMG_RUN_UID="$(id -u)"; export SEMG_RUN_UID
  # Marks the processes of this instance for stop_all.sh (semg.procs). Not SEMG_STATE_DIR itself: users set
  # that in their own shells, which stop_all.sh must never kill.
  export SEMG_INSTANCE="$SEMG_STATE_DIR"
}

semg_supervisord_pid() {
  local pidfile="$SEMG_STATE_DIR/run/supervisord.pid" pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # After a power cut or a container restart the file is stale and its PID may be anyone's by now (the
  # user's editor): only a process started for this state dir (semg_export_env's SEMG_INSTANCE) is ours.
  local theirs
  theirs="$(grep -azm1 '^SEMG_INSTANCE=' "/proc/$pid/environ" 2>/dev/null | tr -d '\0')" || return 1
  theirs="${theirs#SEMG_INSTANCE=}"  # compared as paths: SEMG_STATE_DIR may be given with a '/' more or less
  [ -n "$theirs" ] && [ "$(realpath -m -- "$theirs")" = "$(realpath -m -- "$SEMG_STATE_DIR")" ] || return 1
  # a killed supervisord nobody reaped yet (a container's PID 1 may never) is a zombie: not running
  local stat; stat="$(cat "/proc/$pid/stat" 2>/dev/null)"; stat="${stat##*) }"
  [ "${stat%% *}" != Z ] && echo "$pid"
}

semg_ctl() { "$SEMG_PYTHON" -m supervisor.supervisorctl -c "$SEMG_REPO/supervisord.conf" "$@"; }

# semg_preflight : refuse to half-start. Every problem visible now (busy ports, unreachable external
# services) is reported, one line each, before anything runs; then the embedded cluster is initialised.
semg_preflight() {
  local problems
  if ! problems="$("$SEMG_PYTHON" -m semg.embedded preflight 2>&1)"; then
    echo "$problems" | sed "s/^/$(basename "$0"): /" >&2
    exit 1
  fi
  if [ "$SEMG_EMBEDDED_PG" = true ]; then
    "$SEMG_PYTHON" -m semg.embedded init-postgres >/dev/null || exit 1
  fi
}
