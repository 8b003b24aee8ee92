#!/usr/bin/env bash
# Scale of one server (issue 14, item 4): a fleet of DEVICES devices in real time against
# fleet-events on its embedded default (SQLite, durability "full", TLS, the admin token): each
# device sends one stored event a minute (unary Classify) and one heartbeat every 15 minutes
# (DeviceService/ReportHeartbeat), paced by `many_devices fleet` (open loop: the offered load
# does not slow down when answers do). For each fleet size: offered and answered rates, p50/p99,
# errors, the server's cores busy and CPU µs per call. The load driver shares the machine's
# cores with the server, so "cores busy" is the server's own share.
#
#   benches/fleet_scale.sh                          # 60 000, 300 000 and 600 000 devices, 30 s each
#   FLEETS="100000 1000000" SECONDS_EACH=60 benches/fleet_scale.sh
#   APPEND=0 BUILD=0 benches/fleet_scale.sh         # print only; use the binaries as built
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
FLEETS=${FLEETS:-60000 300000 600000}
SECONDS_EACH=${SECONDS_EACH:-30}
CONNECTIONS=${CONNECTIONS:-16}
APPEND=${APPEND:-1}
source benches/common.sh
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
[ "${BUILD:-1}" = 0 ] || cargo build --release --locked --bin fleet-events --example many_devices
mkdir -p "$work/bin"
cp "$root/target/release/fleet-events" "$root/target/release/examples/many_devices" "$work/bin/"
fleet="$work/bin/fleet-events"
results="$work/results.tsv"
: > "$results"
for devices in $FLEETS; do
  printf '' > "$work/config.toml"
  start_fleet tls "$work/data" "$work/config.toml"
  run=$(printf '%08x' $((RANDOM * 32768 + RANDOM)))
  "$work/bin/many_devices" fleet "$addr" "$work/data" "$run" "$STORED_TYPE" "$devices" \
    "$SECONDS_EACH" "$CONNECTIONS" "$pid" > "$work/out.json"
  stop_server
  python3 - "$work/out.json" >> "$results" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("\t".join(str(x) for x in [
    r["devices"], f"{r['events_offered_per_s']:.0f}", f"{r['events_per_s']:.0f}",
    f"{r['event_p50_ms']:.2f}", f"{r['event_p99_ms']:.2f}", r["event_errors"],
    f"{r['heartbeats_offered_per_s']:.0f}", f"{r['heartbeats_per_s']:.0f}",
    f"{r['heartbeat_p99_ms']:.2f}", r["heartbeat_errors"],
    f"{r['server_cores_busy']:.2f}", f"{r['server_cpu_us_per_call']:.0f}"]))
PY
done
table=$(python3 - "$results" <<'PY'
import sys
print("| devices | events/s offered | answered | p50 ms | p99 ms | errors | heartbeats/s offered | answered | p99 ms | errors | server cores busy | server CPU µs/call |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for l in open(sys.argv[1]):
    if l.strip():
        print("| " + " | ".join(l.rstrip("\n").split("\t")) + " |")
PY
)
header=$(results_header "Fleet scale: ")
cmd="FLEETS=\"$FLEETS\" SECONDS_EACH=$SECONDS_EACH CONNECTIONS=$CONNECTIONS benches/fleet_scale.sh"
printf '%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table" >> benches/RESULTS.md
