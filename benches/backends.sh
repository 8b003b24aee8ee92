#!/usr/bin/env bash
# Stored ingest per backend: bidi Stream from benches/load_client.rs (or ghz, CLIENT=ghz) (the agents' path, events of a stored type,
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
#   ROUNDS=3 benches/backends.sh        # 3 rounds, servers interleaved; medians
#   CLIENT=ghz benches/backends.sh      # ghz instead of benches/load_client.rs (client-bound)
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
CLIENT=${CLIENT:-fast}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2s}

source benches/common.sh
source scripts/pg.sh
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; pg_stop; rm -rf "$work"; }
trap cleanup EXIT
bench_build
pg_start

# utime+stime of every PostgreSQL process now (the cluster's backends among them).
pg_cpu_ticks() {
  local total=0 p t
  for p in $(pgrep -x postgres); do
    t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) && total=$((total + t))
  done
  echo "$total"
}
start_server() { # kind -> sets pid, addr, ghz_conn
  printf '[flood]\nthreshold = 100000000\n' > "$work/config.toml"
  case "$1" in
    sqlite) start_fleet "$TRANSPORT" "$work/data" "$work/config.toml" ;;
    postgres)
      # A fresh database each round, as SQLite gets a fresh data directory.
      psql -q "$FLEET_TEST_POSTGRES/postgres" -c "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench"
      start_fleet "$TRANSPORT" "$work/data" "$work/config.toml" --store "$FLEET_TEST_POSTGRES/bench" ;;
    echo) start_echo "$TRANSPORT" ;;
  esac
}

event=$(bench_event "$STORED_TYPE")
results="$work/results.tsv"
: > "$results"
for round in $(seq "$ROUNDS"); do
  for server in echo sqlite postgres; do
    start_server "$server"
    pg_before=$(pg_cpu_ticks)
    if [ "$CLIENT" = ghz ]; then
      ghz "${ghz_conn[@]}" -z "$DURATION" --connections "$CONNECTIONS" -O json -o "$work/out.json" \
        --call fleetevents.v1.EventService/Stream -c "$STREAMS" --stream-call-count "$STREAM_MESSAGES" \
        --stream-dynamic-messages -d "$event" "$addr" || { echo "ghz failed against $server" >&2; exit 1; }
    else
      "$load_client_bin" --server "$addr" "${fast_conn[@]}" --mode stream --streams "$STREAMS" \
        --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
        --event-type "$STORED_TYPE" --server-pid "$pid" > "$work/out.json" \
        || { echo "load_client failed against $server" >&2; cat "$work/out.json" >&2; exit 1; }
    fi
    ticks=$(cpu_ticks)
    pg_ticks=$(( $(pg_cpu_ticks) - pg_before ))
    stop_server
    python3 - "$work/out.json" "$server" "$ticks" "$(getconf CLK_TCK)" "$STREAM_MESSAGES" "$pg_ticks" >> "$results" <<'PY'
import json, sys
path, server, ticks, hz, per_call, pg_ticks = sys.argv[1:]
r = json.load(open(path))
if "statusCodeDistribution" in r:  # ghz
    ok = r["statusCodeDistribution"].get("OK", 0)
    errors = sum(v for k, v in r["statusCodeDistribution"].items() if k != "OK")
    rate = ok * int(per_call) / (r["total"] / 1e9)
    per_event = ""
else:  # load_client: CPU per event over the measured interval, and the store's own thread
    errors, rate = r["errors"], r["events_per_s"]
    per_event = f"{r['server_cpu_us_per_event']:.2f}"
# PostgreSQL's own processes, over the whole run (warm-up included), per event answered.
answered = rate * (r["seconds"] if "seconds" in r else r["total"] / 1e9)
pg = f"{int(pg_ticks) / int(hz) * 1e6 / answered:.2f}" if server == "postgres" and answered else ""
print("\t".join([server, f"{rate:.0f}", f"{int(ticks) / int(hz):.1f}", str(errors), per_event, pg]))
PY
  done
done
stored_pg=$(psql -Atq "$FLEET_TEST_POSTGRES/bench" -c "SELECT n FROM event_count")

table=$(python3 - "$results" "$stored_pg" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
# The median of each figure over the rounds, per server, in first-seen order.
groups = {}
for r in rows:
    groups.setdefault(r[0], []).append(r)
def med(rs, i):
    vals = [float(r[i]) for r in rs if r[i] != ""]
    return statistics.median(vals) if vals else None
by = {s: [med(rs, i) for i in range(1, 6)] for s, rs in groups.items()}
print("| bidi Stream, stored type | events/s | server CPU s | errors | CPU µs/event | PostgreSQL CPU µs/event | vs echo | vs SQLite | rounds |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for s, (rate, cpu, errors, per, pg) in by.items():
    vs_echo = "(ceiling)" if s == "echo" else f"{rate / by['echo'][0] * 100:.0f} %"
    vs_sqlite = "" if s == "echo" else f"{rate / by['sqlite'][0] * 100:.0f} %"
    per = "" if per is None else f"{per:.2f}"
    pg = "" if pg is None else f"{pg:.2f}"
    print(f"| {s} | {rate:.0f} | {cpu:.1f} | {errors:.0f} | {per} | {pg} | {vs_echo} | {vs_sqlite} | {len(groups[s])} |")
print(f"\nEvents in the PostgreSQL store after its run: {sys.argv[2]}.")
PY
)
header=$(results_header "Backends: ")
cmd="CLIENT=$CLIENT ROUNDS=$ROUNDS TRANSPORT=$TRANSPORT DURATION=$DURATION CONNECTIONS=$CONNECTIONS STREAMS=$STREAMS STREAM_MESSAGES=$STREAM_MESSAGES benches/backends.sh"
printf '%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table" >> benches/RESULTS.md
