#!/usr/bin/env bash
# Set up and run the whole test suite. It starts its own PostgreSQL and NATS on free ports in a temporary
# directory (tests/conftest.py) and never touches a running instance. Extra arguments go to pytest,
# e.g. ./run_tests.sh tests/udpserver -x
set -euo pipefail
SEMG_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SEMG_REPO"
. "$SEMG_REPO/scripts/lib.sh"

semg_setup_venv dev

# The browser tests need Debian's chromium (never a downloaded browser build).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && [ "${SEMG_SKIP_BROWSER:-0}" != 1 ] \
   && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "run_tests.sh: could not install chromium; browser tests will be skipped" >&2
fi

# The sketch's host tests (tests/arduino, tests/udpserver/test_udp_vectors.py) build it with g++/gcc.
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing g++ for the sketch's host tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
    || echo "run_tests.sh: could not install g++; the sketch's host tests will be skipped" >&2
fi

# Keep the tests away from any developer instance: only the fixtures' temporary settings apply.
unset SEMG_STATE_DIR POSTGRES_HOST NATS_SERVER

# Two pytest processes (pytest-xdist), each with its own PostgreSQL, NATS and ports; a test file stays on one of
# them, so its module fixtures start once. Most of the suite waits on services, so this halves its time on two
# cores. SEMG_TEST_WORKERS=0 runs everything in this one process (e.g. to see a test's prints with -s).
workers="${SEMG_TEST_WORKERS:-2}"
case "$workers" in
  ''|*[!0-9]*) echo "run_tests.sh: SEMG_TEST_WORKERS must be a number of processes, got '$workers'" >&2; exit 2 ;;
esac
parallel=()
[ "$workers" -ge 2 ] && parallel=(-n "$workers" --dist loadfile)
# pytest's shared temporary root (/tmp/pytest-of-$USER) is made private (0700) again by every pytest that starts on
# this machine, while the embedded PostgreSQL (an unprivileged user when we are root) must enter the tests' state
# dirs under it: this run gets a root of its own, removed when every test passed, kept (with its logs) otherwise.
tmp_root="$(mktemp -d /tmp/semg-tests.XXXXXX)"
chmod 755 "$tmp_root"
set +e
# (an empty array is "unbound" to bash < 4.4, hence the + form)
"$SEMG_PYTHON" -m pytest --basetemp "$tmp_root/t" ${parallel[@]+"${parallel[@]}"} "$@"
rc=$?
set -e
if [ "$rc" = 0 ] || [ "$rc" = 5 ]; then
  rm -rf "$tmp_root"
else
  echo "run_tests.sh: the temporary files and logs of this run are kept in $tmp_root" >&2
fi
exit "$rc"
