# A throw-away PostgreSQL cluster for the tests and the benchmarks. Source this file, then:
#   pg_start [extra postgres -c settings]   installs Debian's postgresql if missing, starts a
#                                            cluster on a free loopback port under a temp dir
#                                            (as the postgres user when run as root, never as
#                                            root), exports FLEET_TEST_POSTGRES (its URL) and
#                                            FLEET_TEST_PG_STOP / FLEET_TEST_PG_START (commands)
#   pg_stop                                  stops it and removes its directory
# shellcheck shell=bash

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

pg_install() {
  [ -n "$(pg_bin)" ] && return 0
  echo "==> installing postgresql (Debian package)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # The package's own cluster is not ours: we start a throw-away one.
  command -v pg_ctlcluster >/dev/null && $sudo pg_ctlcluster --force "$(basename "$(dirname "$(pg_bin)")")" main stop 2>/dev/null || true
  [ -n "$(pg_bin)" ]
}

pg_start() {
  pg_install || { echo "postgresql could not be installed" >&2; return 1; }
  local bin port as=""
  bin=$(pg_bin)
  PG_DIR=$(mktemp -d /tmp/fleet-events-pg.XXXXXX)
  chmod 755 "$PG_DIR"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$PG_DIR"
    as="runuser -u postgres --"
  fi
  $as "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  local opts="-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=300 $*"
  export FLEET_TEST_PG_START="$as $bin/pg_ctl -D $PG_DIR/data -l $PG_DIR/log -w -o '$opts' start"
  export FLEET_TEST_PG_STOP="$as $bin/pg_ctl -D $PG_DIR/data -m fast -w stop"
  sh -c "$FLEET_TEST_PG_START" >/dev/null
  export FLEET_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port"
  export PG_DIR
  echo "==> PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($PG_DIR)"
}

pg_stop() {
  [ -n "${PG_DIR:-}" ] || return 0
  sh -c "$FLEET_TEST_PG_STOP" >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
  unset PG_DIR FLEET_TEST_POSTGRES FLEET_TEST_PG_START FLEET_TEST_PG_STOP
}
