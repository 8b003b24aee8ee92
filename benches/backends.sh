#!/usr/bin/env bash
# Stored ingest per backend: ghz bidi Stream (the agents' path, events of a stored type,
# acknowledged after commit) against fleet-events on the embedded SQLite store and on
# PostgreSQL, with the bare tonic echo server as the ceiling, all in one run. PostgreSQL is a
# throw-away cluster (scripts/pg.sh) with its durable defaults (fsync on, synchronous_commit
# on); SQLite runs with durability "full" (fsync per group commit). Prints a table and appends
# it to benches/RESULTS.md with the command.
#
#   benches/backends.sh                 # 10 s per run
#   DURATION=30s benches/backends.sh
#   APPEND=0 benches/backends.sh        # print only, do not append to RESULTS.md
#   BUILD=0 benches/backends.sh         # use the binaries in target/release as they are
#   TRANSPORT=plain benches/backends.sh # all three in plaintext (fleet-events with
#                                       # insecure_plaintext; the token is still sent)
#
# All three servers serve TLS by default; ghz pins the CA of the server's data directory and
# sends its admin token (benches/common.sh); the echo server serves a certificate made by
# fleet-events and ignores the token. The events are of BENCH_APP_EVENT, an application type (clients may
# not send KLSRV_* types), which is stored (unknown types are stored with Info retention).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-4}
STREAM_MESSAGES=${STREAM_MESSAGES:-1000}
APPEND=${APPEND:-1}
TRANSPORT=${TRANSPORT:-tls}

source benches/common.sh
source scripts/pg.sh
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; pg_stop; rm -rf "$work"; }
trap cleanup EXIT
bench_build
pg_start
psql -q "$FLEET_TEST_POSTGRES/postgres" -c "CREATE DATABASE bench"

start_server() { # kind -> sets pid, addr, ghz_conn
  printf '[flood]\nthreshold = 100000000\n' > "$work/config.toml"
  case "$1" in
    sqlite) start_fleet "$TRANSPORT" "$work/data" "$work/config.toml" ;;
    postgres) start_fleet "$TRANSPORT" "$work/data" "$work/config.toml" --store "$FLEET_TEST_POSTGRES/bench" ;;
    echo) start_echo "$TRANSPORT" ;;
  esac
}

event=$(bench_event "$STORED_TYPE")
results="$work/results.tsv"
: > "$results"
for server in echo sqlite postgres; do
  start_server "$server"
  ghz "${ghz_conn[@]}" -z "$DURATION" --connections "$CONNECTIONS" -O json -o "$work/out.json" \
    --call fleetevents.v1.EventService/Stream -c "$STREAMS" --stream-call-count "$STREAM_MESSAGES" \
    --stream-dynamic-messages -d "$event" "$addr" || { echo "ghz failed against $server" >&2; exit 1; }
  ticks=$(cpu_ticks)
  stop_server
  python3 - "$work/out.json" "$server" "$ticks" "$(getconf CLK_TCK)" "$STREAM_MESSAGES" >> "$results" <<'PY'
import json, sys
path, server, ticks, hz, per_call = sys.argv[1:]
r = json.load(open(path))
ok = r["statusCodeDistribution"].get("OK", 0)
errors = sum(v for k, v in r["statusCodeDistribution"].items() if k != "OK")
rate = ok * int(per_call) / (r["total"] / 1e9)
print("\t".join([server, f"{rate:.0f}", f"{int(ticks) / int(hz):.1f}", str(errors)]))
PY
done
stored_pg=$(psql -Atq "$FLEET_TEST_POSTGRES/bench" -c "SELECT n FROM event_count")

table=$(python3 - "$results" "$stored_pg" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {r[0]: r for r in rows}
print("| bidi Stream, stored type | events/s | fleet-events CPU s | errors | vs echo | vs SQLite |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    vs_echo = "(ceiling)" if r[0] == "echo" else f"{float(r[1]) / float(by['echo'][1]) * 100:.0f} %"
    vs_sqlite = "" if r[0] == "echo" else f"{float(r[1]) / float(by['sqlite'][1]) * 100:.0f} %"
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {vs_echo} | {vs_sqlite} |")
print(f"\nEvents in the PostgreSQL store after its run: {sys.argv[2]}.")
PY
)
header=$(results_header "Backends: ")
cmd="TRANSPORT=$TRANSPORT DURATION=$DURATION CONNECTIONS=$CONNECTIONS STREAMS=$STREAMS STREAM_MESSAGES=$STREAM_MESSAGES benches/backends.sh"
printf '%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table" >> benches/RESULTS.md
