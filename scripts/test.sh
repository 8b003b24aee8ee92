#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs that is not in the repo
# (Go tools via `go install`, Python packages via pip into a venv under target/), checks
# formatting and lints, builds once (release), runs the Rust tests (unit, integration,
# process-level, and each Criterion bench once in test mode) on the embedded SQLite store, then
# the same integration tests again on PostgreSQL (Debian's package, installed when missing; a
# throw-away cluster on a free port, stopped at exit), then the Python grpcio suite against the
# same release binary. Idempotent; cleans up the servers it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "tools (go install, only when missing)"
export GOFLAGS=${GOFLAGS:-}
gobin="$(go env GOPATH)/bin"
export PATH="$gobin:$PATH"
install_go_tool() { # name module
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "installing $1"
    go install "$2@latest"
  fi
}
install_go_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl
install_go_tool grpc-health-probe github.com/grpc-ecosystem/grpc-health-probe
install_go_tool ghz github.com/bojand/ghz/cmd/ghz

step "python packages (venv in target/pyenv)"
venv="$root/target/pyenv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt

step "rsyslog for the SIEM export tests (Debian's package, only when missing)"
# tests/python/test_siem.py starts its own rsyslogd (plain TCP, TLS through the gtls driver,
# UDP) on loopback ports under a temp dir; the package's own service is never used.
rsyslog_present() {
  { command -v rsyslogd >/dev/null 2>&1 || [ -x /usr/sbin/rsyslogd ]; } &&
    compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null
}
if ! rsyslog_present; then
  echo "installing rsyslog rsyslog-gnutls"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog rsyslog-gnutls >/dev/null
  rsyslog_present
fi

step "format and lints"
cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings

step "rust tests on SQLite (release build, benches once in test mode)"
unset FLEET_TEST_POSTGRES
# The PostgreSQL-only tests wait for the next pass.
FLEET_TEST_SQLITE_PASS=1 FLEET_BENCH_QUICK=1 cargo test --release --all-targets --locked

step "the same integration tests on PostgreSQL"
source scripts/pg.sh
trap pg_stop EXIT
# fsync off: a throw-away cluster; crash safety of the server is tested on its side.
pg_start -c fsync=off
cargo test --release --tests --locked
pg_stop
trap - EXIT

step "python grpcio suite"
FLEET_EVENTS_BIN="$root/target/release/fleet-events" "$venv/bin/python" -m pytest -q tests/python

step "client tests in Node and Go (grpc-js, grpc-go)"
FLEET_EVENTS_BIN="$root/target/release/fleet-events" scripts/clients.sh
