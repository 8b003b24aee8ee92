#!/usr/bin/env bash
# Real-client tests in other languages against the release binary: grpc-js (tests/node, node's
# built-in test runner) and grpc-go (tests/go, go test). Backpressure under a store stall (issue
# 10, item 3) and answers before an error status with compression (item 4). The grpcio variant
# of the backpressure test (tests/python/test_backpressure.py) runs with the Python suite.
#
#   scripts/clients.sh            # node and go
#   scripts/clients.sh go         # only the languages named (node, go, python)
#
# FLEET_EVENTS_BIN selects the server binary (default target/release/fleet-events). Needs node
# and npm, Go, and python3 with sqlite3 (the tests hold the store's write lock through it).
# Installs the npm packages from tests/node/package-lock.json (npm ci, only when the lockfile
# changed) and the Go modules of tests/go/go.sum. Idempotent; every test stops its servers.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

export FLEET_EVENTS_BIN=${FLEET_EVENTS_BIN:-$root/target/release/fleet-events}
case "$FLEET_EVENTS_BIN" in /*) ;; *) FLEET_EVENTS_BIN="$root/$FLEET_EVENTS_BIN" ;; esac
if [ ! -x "$FLEET_EVENTS_BIN" ]; then
  echo "server binary $FLEET_EVENTS_BIN missing (cargo build --release, or set FLEET_EVENTS_BIN)" >&2
  exit 1
fi

langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(node go)

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is needed by scripts/clients.sh" >&2; exit 1; }
  done
}
need python3

for lang in "${langs[@]}"; do
  case "$lang" in
    node)
      need node npm
      step "grpc-js client tests (node $(node --version))"
      stamp=tests/node/node_modules/.lock-sha256
      want=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
      if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
        echo "$want" >"$stamp"
      fi
      node --test --test-concurrency=1 tests/node/*.test.js
      ;;
    go)
      need go
      step "grpc-go client tests ($(go env GOVERSION))"
      (cd tests/go && go test -count=1 -v ./...)
      ;;
    python)
      venv="$root/target/pyenv"
      py="$venv/bin/python"
      [ -x "$py" ] || py=python3
      step "grpcio backpressure test"
      "$py" -m pytest -q tests/python/test_backpressure.py
      ;;
    *)
      echo "unknown language $lang (node, go, python)" >&2
      exit 2
      ;;
  esac
done
