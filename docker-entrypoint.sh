#!/usr/bin/env bash
# Entry point of the single-image deployment: every service under supervisord in the foreground.
#   docker run ... semg            run everything (embedded PostgreSQL + NATS unless POSTGRES_HOST / NATS_SERVER)
#   docker run ... semg --create-db  also wait for the (external) PostgreSQL, create POSTGRES_DB if absent and
#                                    apply the schema (always done for the embedded database)
# Any setting can be overridden with -e. Also runnable outside Docker (the tests do) with SEMG_STATE_DIR etc.
set -euo pipefail
SEMG_REPO="${SEMG_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
cd "$SEMG_REPO"
. "$SEMG_REPO/scripts/lib.sh"

create_db=false
for arg in "$@"; do
  case "$arg" in
    --create-db) create_db=true ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) semg_die "unknown argument: $arg (expected --create-db)" ;;
  esac
done

SEMG_VENV="${SEMG_VENV:-$SEMG_REPO/.venv}"
SEMG_PYTHON="${SEMG_PYTHON:-$SEMG_VENV/bin/python}"
[ -x "$SEMG_PYTHON" ] || semg_die "no Python environment at $SEMG_VENV"
export SEMG_VENV SEMG_PYTHON
[ "${POSTGRES_HOST:-}" = "" ] && create_db=true   # the embedded database is always initialised
export SEMG_DB_INIT="$create_db"
semg_export_env

semg_preflight
# what the services run, as start_all.sh records it: a start_all.sh run inside the container then finds it running
SEMG_CODE_STAMP="$("$SEMG_PYTHON" -m semg.procs code-stamp)" || exit 1
export SEMG_CODE_STAMP
# exec: supervisord receives docker stop's SIGTERM and shuts every service down cleanly.
exec "$SEMG_PYTHON" -m supervisor.supervisord -n -c "$SEMG_REPO/supervisord.conf"
