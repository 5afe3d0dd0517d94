#!/usr/bin/env bash
# Stop every service of this platform instance (same SEMG_STATE_DIR) and leave no process behind.
# Data stays in $SEMG_STATE_DIR and is there again on the next ./start_all.sh.
set -euo pipefail
SEMG_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SEMG_REPO"
. "$SEMG_REPO/scripts/lib.sh"

[ -x "${SEMG_VENV:-$SEMG_REPO/.venv}/bin/python" ] || { echo "nothing to stop (no virtualenv yet)"; exit 0; }
SEMG_VENV="${SEMG_VENV:-$SEMG_REPO/.venv}"; SEMG_PYTHON="$SEMG_VENV/bin/python"
semg_export_env

if pid="$(semg_supervisord_pid)"; then
  echo "stopping services (supervisord pid $pid)..."
  semg_ctl shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 120); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
fi
# Whatever survived (a crashed supervisord, a detached child) is ended too.
"$SEMG_PYTHON" -m semg.procs kill
rm -f "$SEMG_STATE_DIR/run/supervisord.pid"
left="$("$SEMG_PYTHON" -m semg.procs list)"
if [ -n "$left" ]; then
  echo "stop_all.sh: processes still running:" >&2; echo "$left" >&2; exit 1
fi
echo "stopped"
