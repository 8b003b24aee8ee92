#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs that is not in the repo
# (Go tools via `go install`, Python packages via pip into a venv under target/), checks
# formatting and lints, builds once (release), runs the Rust tests (unit, integration,
# process-level, and each Criterion bench once in test mode) on the embedded SQLite store, then
# the same integration tests again on PostgreSQL (Debian's package, installed when missing; a
# throw-away cluster on a free port, stopped at exit), then the Python grpcio suite against the
# same release binary, then the client tests and examples in Node, Go and Java. The contract
# is checked by buf (lint, breaking). Idempotent; cleans up the servers it starts.
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

step "the contract: buf lint and buf breaking"
# buf from its npm package (a prebuilt binary: seconds, where `go install` compiles for
# minutes), pinned, into target/tools, only when missing.
buf_version=1.75.0
buf="$root/target/tools/node_modules/.bin/buf"
if [ ! -x "$buf" ] || [ "$("$buf" --version)" != "$buf_version" ]; then
  echo "installing buf $buf_version"
  npm install --no-audit --no-fund --loglevel=error --prefix "$root/target/tools" \
    "@bufbuild/buf@$buf_version" >/dev/null
fi
"$buf" lint
# No wire or source break against the previous commit (FLEET_BUF_AGAINST names another
# git ref, e.g. the last release); skipped where there is no previous commit (a shallow clone).
against=${FLEET_BUF_AGAINST:-HEAD~1}
if git rev-parse -q --verify "$against^{commit}" >/dev/null; then
  "$buf" breaking proto --against ".git#ref=$against,subdir=proto"
  echo "buf breaking: no break against $against"
else
  echo "buf breaking: skipped, $against is not in this clone"
fi

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

step "client tests in Node and Go (grpc-js, grpc-go), and the client examples of clients/"
# The examples (Go with buf, Node, Java with Maven, Python) run against one fresh server, each
# line of their output checked.
FLEET_EVENTS_BIN="$root/target/release/fleet-events" scripts/clients.sh node go examples
