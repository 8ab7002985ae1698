#!/usr/bin/env bash
# dtm's Python client against dtm-rs: installs the `dtmcli` package from PyPI into a
# virtualenv under target/, starts a dtm server on free ports with a fresh embedded store
# (or the store STORE_DRIVER and friends name), and runs scripts/compat/python_flows.py:
# saga, TCC and msg flows through dtmcli's API, checked by final status and by the branch
# calls the server made. The msg back-check flows use dtmcli's barrier on MariaDB.
#   scripts/compat-python.sh              build the debug server and run
#   DTM_BIN=target/release/dtm scripts/compat-python.sh
# Exit status: 0 all flows passed, 1 a flow failed or the server did not start, 3 the
# client could not be installed (no python3 venv, or PyPI not reachable).
set -uo pipefail
cd "$(dirname "$0")/.."

DTMCLI_VERSION="${DTMCLI_VERSION:-1.7.7.0}"
venv=target/compat-python
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import dtmcli" 2>/dev/null; then
  python3 -m venv "$venv" || { echo "compat-python: python3 -m venv failed" >&2; exit 3; }
  "$venv/bin/pip" install -q "dtmcli==$DTMCLI_VERSION" ||
    { echo "compat-python: pip could not install dtmcli==$DTMCLI_VERSION" >&2; exit 3; }
fi

bin="${DTM_BIN:-}"
if [ -z "$bin" ]; then
  cargo build -q -p dtm-server --bin dtm || exit 1
  bin=target/debug/dtm
fi
bin=$(realpath "$bin") || exit 1

free_port() { "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
grpc_port=$(free_port)
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
(cd "$dir" && HTTP_PORT=$http_port GRPC_PORT=$grpc_port RETRY_INTERVAL=1 \
  TRANS_CRON_INTERVAL=1 LOG_LEVEL=warn exec "$bin") >"$dir/dtm.log" 2>&1 &
pid=$!
up() { "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
  "http://127.0.0.1:$http_port/api/ping" 2>/dev/null; }
for _ in $(seq 1 100); do
  up && break
  sleep 0.1
done
if ! up; then
  echo "compat-python: the server did not start:" >&2
  cat "$dir/dtm.log" >&2
  exit 1
fi
DTM_URL="http://127.0.0.1:$http_port" "$venv/bin/python" scripts/compat/python_flows.py
status=$?
[ $status -eq 0 ] || { echo "--- server log" >&2; tail -50 "$dir/dtm.log" >&2; }
exit $status
