#!/usr/bin/env bash
# The load benchmark: ghz against fleet-events and, in the same run, against the bare tonic echo
# server (benches/echo_server.rs) with identical calls, message sizes, concurrency and
# connections. Prints a table and appends it to benches/RESULTS.md with the command.
#
#   benches/load.sh                 # 10 s per scenario
#   DURATION=30s benches/load.sh    # longer
#
# Each (scenario, server) pair gets a fresh server process, so its CPU seconds (utime+stime
# from /proc) and peak RSS (VmHWM) are its own. fleet-events runs on its embedded default
# (SQLite, durability "full": fsync per group commit) with the flood threshold raised out of
# the way (counting still happens); "fleet-events-normal" rows are the same server with
# durability "normal" (no fsync per commit), to show what the fsync costs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
DURATION=${DURATION:-10s}
UNARY_CONCURRENCY=${UNARY_CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-4}
STREAM_MESSAGES=${STREAM_MESSAGES:-1000}

export PATH="$(go env GOPATH)/bin:$PATH"
command -v ghz >/dev/null || go install github.com/bojand/ghz/cmd/ghz@latest

cargo build --release --locked --bin fleet-events --example echo_server --example open_streams
fleet="$root/target/release/fleet-events"
echo_bin="$root/target/release/examples/echo_server"

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start_server() { # kind -> sets pid, addr
  local ready="$work/ready"
  rm -f "$ready"
  case "$1" in
    fleet-events|fleet-events-normal)
      rm -rf "$work/data"
      printf '[flood]\nthreshold = 100000000\n' > "$work/config.toml"
      # The same server, committing without an fsync per group commit: shows what fsync costs.
      [ "$1" = fleet-events-normal ] && printf '[store]\ndurability = "normal"\n' >> "$work/config.toml"
      "$fleet" serve --listen 127.0.0.1:0 --data-dir "$work/data" --config "$work/config.toml" \
        --ready-file "$ready" --log warn &
      ;;
    echo) "$echo_bin" 127.0.0.1:0 "$ready" 2>/dev/null & ;;
  esac
  pid=$!
  for _ in $(seq 300); do [ -s "$ready" ] && break; sleep 0.05; done
  [ -s "$ready" ] || { echo "server $1 did not start" >&2; exit 1; }
  addr=$(cat "$ready")
}

stop_server() { # -> prints "cpu_seconds peak_rss_kib"
  local ticks hwm
  ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  echo "$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t/hz}') $hwm"
}

event='{"event_id":"{{newUUID}}","device_id":"dev-{{randomInt 0 5000}}","event_type":"KLSRV_GCM_HTTP_ERROR","application":"mdm-push","params":{"code":"503","endpoint":"fcm.googleapis.com/v1/projects/fleet/messages:send"}}'
notstored='{"event_id":"{{newUUID}}","device_id":"dev-{{randomInt 0 5000}}","event_type":"KLSRV_APN_CERTIFICATE_EXPIRES_SOON","application":"mdm-push","params":{"code":"503","endpoint":"fcm.googleapis.com/v1/projects/fleet/messages:send"}}'

results="$work/results.tsv"
: > "$results"
run() { # scenario server messages_per_call ghz-args...
  local scenario=$1 server=$2 per_call=$3; shift 3
  start_server "$server"
  ghz --insecure -z "$DURATION" --connections "$CONNECTIONS" -O json -o "$work/out.json" "$@" "$addr" \
    || { echo "ghz failed against $server" >&2; exit 1; }
  read -r cpu rss < <(stop_server)
  python3 - "$work/out.json" "$scenario" "$server" "$per_call" "$cpu" "$rss" >> "$results" <<'PY'
import json, sys
path, scenario, server, per_call, cpu, rss = sys.argv[1:]
r = json.load(open(path))
ok = r["statusCodeDistribution"].get("OK", 0)
errors = sum(v for k, v in r["statusCodeDistribution"].items() if k != "OK")
secs = r["total"] / 1e9
lat = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
rate = ok * int(per_call) / secs
print("\t".join([scenario, server, f"{rate:.0f}", f"{lat.get(50, 0):.2f}", f"{lat.get(99, 0):.2f}",
                 cpu, f"{int(rss) / 1024:.0f}", str(errors)]))
PY
}

unary=(--call fleetevents.v1.EventService/Classify -c "$UNARY_CONCURRENCY")
stream=(--call fleetevents.v1.EventService/Stream -c "$STREAMS" --stream-call-count "$STREAM_MESSAGES" --stream-dynamic-messages)
for server in echo fleet-events; do
  run "unary Classify, stored type" "$server" 1 "${unary[@]}" -d "$event"
  run "unary Classify, not-stored type" "$server" 1 "${unary[@]}" -d "$notstored"
  run "bidi Stream, stored type" "$server" "$STREAM_MESSAGES" "${stream[@]}" -d "$event"
done
run "unary Classify, stored type" fleet-events-normal 1 "${unary[@]}" -d "$event"
run "bidi Stream, stored type" fleet-events-normal "$STREAM_MESSAGES" "${stream[@]}" -d "$event"

# Memory held per open Stream call: OPEN_STREAMS calls held open at once, one event answered
# on each, server RSS growth divided by the count.
OPEN_STREAMS=${OPEN_STREAMS:-10000}
streams_note=""
for server in echo fleet-events; do
  start_server "$server"
  line=$("$root/target/release/examples/open_streams" "$addr" "$OPEN_STREAMS" "$pid" 100)
  stop_server > /dev/null
  streams_note+="- $server: $line"$'\n'
done

table=$(python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
echo = {r[0]: r for r in rows if r[1] == "echo"}
print("| scenario | server | msgs/s | p50 ms | p99 ms | server CPU s | peak RSS MiB | errors | vs echo msgs/s | vs echo p99 |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    e = echo.get(r[0])
    ratio = f"{float(r[2]) / float(e[2]) * 100:.0f} %" if e and float(e[2]) else "-"
    p99 = f"{float(r[4]) / float(e[4]):.2f}x" if e and float(e[4]) else "-"
    if r[1] == "echo":
        ratio, p99 = "(ceiling)", ""
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]} | {ratio} | {p99} |")
PY
)
header="## $(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores"
cmd="DURATION=$DURATION UNARY_CONCURRENCY=$UNARY_CONCURRENCY CONNECTIONS=$CONNECTIONS STREAMS=$STREAMS STREAM_MESSAGES=$STREAM_MESSAGES benches/load.sh"
cmd="OPEN_STREAMS=$OPEN_STREAMS $cmd"
printf '%s\n\n`%s`\n\n%s\n\nOpen streams held at once:\n%s' "$header" "$cmd" "$table" "$streams_note"
printf '\n%s\n\n`%s`\n\n%s\n\nOpen streams held at once:\n%s' "$header" "$cmd" "$table" "$streams_note" >> benches/RESULTS.md
