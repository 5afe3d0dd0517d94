#!/usr/bin/env bash
# Set up and run the whole platform: virtualenv + dependencies, embedded PostgreSQL/NATS (unless external
# ones are configured), schema, and every service under supervisord. Safe to run again at any time.
set -euo pipefail
SEMG_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SEMG_REPO"
. "$SEMG_REPO/scripts/lib.sh"

semg_setup_venv runtime
semg_export_env

started_here=false
if pid="$(semg_supervisord_pid)"; then
  # The services keep the settings they were started with: new ports or addresses need a restart.
  changed="$("$SEMG_PYTHON" -m semg.procs changed "$pid")" || exit 1
  [ -z "$changed" ] || semg_die "already running (supervisord pid $pid) with other values of $changed;" \
    "to apply them: ./stop_all.sh, then ./start_all.sh"
  # The services also keep the code they were started with: after a `git pull` (or checkout) while they ran,
  # saying "running" would leave the old code, and the old database schema, in place
  "$SEMG_PYTHON" -m semg.procs code-changed "$pid" || semg_die "already running (supervisord pid $pid)," \
    "with the code as it was when it started, not the code now in $SEMG_REPO (a git pull or checkout since?);" \
    "to run this code: ./stop_all.sh, then ./start_all.sh"
  echo "already running (supervisord pid $pid); making sure every service is up"
  semg_ctl start all >/dev/null 2>&1 || true
else
  started_here=true
  # supervisord gone (killed, OOM) but its services still up: they hold the ports, so say what they are
  left="$("$SEMG_PYTHON" -m semg.procs list)" || exit 1
  [ -z "$left" ] || semg_die "services of an earlier start still run without their supervisor (PIDs" \
    "$(echo "$left" | cut -d' ' -f1 | paste -sd' ')): stop them with ./stop_all.sh, then ./start_all.sh"
  semg_preflight
  SEMG_CODE_STAMP="$("$SEMG_PYTHON" -m semg.procs code-stamp)" || exit 1
  export SEMG_CODE_STAMP  # what the services run, for the check above at the next start
  "$SEMG_PYTHON" -m supervisor.supervisord -c "$SEMG_REPO/supervisord.conf" \
    || semg_die "supervisord did not start (see $SEMG_STATE_DIR/logs/supervisord.log)"
fi

echo "waiting for the services to become healthy..."
if ! "$SEMG_PYTHON" -m semg.health --wait "${SEMG_START_TIMEOUT:-180}"; then
  echo "start_all.sh: not every service became healthy; last log lines:" >&2
  for svc in postgres nats dbinit api udpserver inference trainer backup ui; do
    log="$SEMG_STATE_DIR/logs/$svc.log"
    [ -s "$log" ] && { echo "--- $svc" >&2; tail -n 3 "$log" >&2; }
  done
  if $started_here; then
    echo "start_all.sh: stopping what was started" >&2
    "$SEMG_REPO/stop_all.sh" >/dev/null 2>&1 || true
  else  # it was running before this run: never take a running install down
    echo "start_all.sh: the platform was already running and is left running; see the logs above" >&2
  fi
  exit 1
fi

# sensors: the address a board on the network sends to (this machine's, when listening on every interface)
read -r ui_url api_url host udp_port < <("$SEMG_PYTHON" -c '
from semg.config import get_settings as g
from udpserver.troubleshooting import sensor_address
s = g(); a = sensor_address(s.udp_bind_host)
print(s.ui_url, s.api_url, (f"[{a}]" if ":" in a else a) if a else s.service_url_host, s.udp_port)')
reach=""
case "$host" in
  127.*|localhost|"[::1]") reach="   (this computer only: SEMG_UDP_BIND_HOST=0.0.0.0 for boards on Wi-Fi)" ;;
esac
cat <<TXT

The sEMG platform is running.
  Web UI        $ui_url      (password: $SEMG_STATE_DIR/secrets/ui_password)
  REST API      $api_url/docs
  Sensors (UDP) $host:$udp_port$reach
  Logs          $SEMG_STATE_DIR/logs/
Stop everything with ./stop_all.sh
TXT
