#!/usr/bin/env bash
# Scale of a primary with SECONDARIES secondaries (issue 14, item 4), all on this machine: one
# primary (hierarchy listener, mutual TLS, certificates made here with openssl) and
# SECONDARIES secondaries, each forwarding EVERY event (`forward_min_severity = "INFO"`, the
# worst case for the primary; the default forwards WARNING and above). Each secondary gets its
# share of a fleet of DEVICES devices in real time from `many_devices fleet` (one stored event a
# minute, one heartbeat every 15 minutes, paced). Reported: what the secondaries answered, what
# reached the primary's store during the run and after (the relay's lag), and the CPU (cores
# busy) of the primary, of all secondaries and of the drivers, all sharing the machine's cores.
#
#   benches/hierarchy_scale.sh                    # 10 secondaries, 100 000 devices, 30 s
#   DEVICES=300000 SECONDS_EACH=60 benches/hierarchy_scale.sh
#   APPEND=0 BUILD=0 benches/hierarchy_scale.sh   # print only; use the binaries as built
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
SECONDARIES=${SECONDARIES:-10}
DEVICES=${DEVICES:-100000}
SECONDS_EACH=${SECONDS_EACH:-30}
CONNECTIONS=${CONNECTIONS:-2}
APPEND=${APPEND:-1}
source benches/common.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ "${BUILD:-1}" = 0 ] || cargo build --release --locked --bin fleet-events --example many_devices
mkdir -p "$work/bin" "$work/pki"
cp "$root/target/release/fleet-events" "$root/target/release/examples/many_devices" "$work/bin/"
fleet="$work/bin/fleet-events"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The hierarchy's certificates (README "Running a hierarchy").
cd "$work/pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -keyout ca.key -out ca.pem -subj "/CN=bench hierarchy CA" 2>/dev/null
ids=(primary)
for i in $(seq 0 $((SECONDARIES - 1))); do ids+=("sec-$i"); done
for id in "${ids[@]}"; do
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$id.key" \
    -subj "/CN=$id" -addext "subjectAltName=DNS:$id,DNS:localhost" 2>/dev/null |
    openssl x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -copy_extensions copy \
      -out "$id.pem" 2>/dev/null
done
cd "$root"

config() { # id -> a config file
  cat > "$work/$1.toml" <<TOML
[server]
server_id = "$1"
[flood]
threshold = 100000000
[hierarchy]
tls_cert = "$work/pki/$1.pem"
tls_key = "$work/pki/$1.key"
tls_ca = "$work/pki/ca.pem"
forward_min_severity = "INFO"
[metrics]
listen = "127.0.0.1:$2"
TOML
}
start() { # id metrics_port [serve flags...] -> sets pid, addr
  local id=$1 mport=$2 ready="$work/$1.ready"
  shift 2
  config "$id" "$mport"
  "$fleet" serve --listen 127.0.0.1:0 --data-dir "$work/$id" --config "$work/$id.toml" \
    --ready-file "$ready" --log warn "$@" 2>>"$work/$id.log" &
  pid=$!
  pids+=("$pid")
  wait_ready "$ready" "$id" "$work/$id/admin.token"
}
stored() { # metrics_port -> events in that server's store
  curl -sf "http://127.0.0.1:$1/metrics" | awk '/^fleet_store_events / {print int($2)}'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

hport=$(free_port)
pmetrics=$(free_port)
start primary "$pmetrics" --hierarchy-listen "127.0.0.1:$hport"
primary_pid=$pid
sec_pids=()
sec_addrs=()
sec_metrics=()
for i in $(seq 0 $((SECONDARIES - 1))); do
  m=$(free_port)
  start "sec-$i" "$m" --upstream "https://localhost:$hport"
  sec_pids+=("$pid")
  sec_addrs+=("$addr")
  sec_metrics+=("$m")
done
per=$((DEVICES / SECONDARIES))
p0=$(ticks "$primary_pid")
s0=0; for p in "${sec_pids[@]}"; do s0=$((s0 + $(ticks "$p"))); done
start_s=$(date +%s.%N)
drivers=()
for i in $(seq 0 $((SECONDARIES - 1))); do
  run=$(printf '%08x' $((i + 1)))
  "$work/bin/many_devices" fleet "${sec_addrs[$i]}" "$work/sec-$i" "$run" "$STORED_TYPE" "$per" \
    "$SECONDS_EACH" "$CONNECTIONS" "${sec_pids[$i]}" > "$work/driver-$i.json" &
  drivers+=("$!")
done
for d in "${drivers[@]}"; do wait "$d"; done
end_s=$(date +%s.%N)
at_end=$(stored "$pmetrics")
p1=$(ticks "$primary_pid")
s1=0; for p in "${sec_pids[@]}"; do s1=$((s1 + $(ticks "$p"))); done
# The relay's lag: how long until the primary holds everything the secondaries answered.
answered=$(python3 - "$work" "$SECONDARIES" <<'PY'
import json, sys
print(sum(json.load(open(f"{sys.argv[1]}/driver-{i}.json"))["events_per_s"] * json.load(open(f"{sys.argv[1]}/driver-{i}.json"))["seconds"] for i in range(int(sys.argv[2]))))
PY
)
answered=${answered%.*}
lag_start=$(date +%s.%N)
caught_up=""
for _ in $(seq 600); do
  now_stored=$(stored "$pmetrics")
  if [ "$now_stored" -ge "$answered" ]; then caught_up=$(python3 -c "print(f'{$(date +%s.%N) - $lag_start:.1f}')"); break; fi
  sleep 0.1
done
final=$(stored "$pmetrics")
hz=$(getconf CLK_TCK)
table=$(python3 - "$work" "$SECONDARIES" "$DEVICES" "$start_s" "$end_s" "$p0" "$p1" "$s0" "$s1" "$hz" "$at_end" "$final" "${caught_up:-not within 60 s}" <<'PY'
import json, sys
work, n, devices, t0, t1, p0, p1, s0, s1, hz, at_end, final, lag = sys.argv[1:]
n, devices, secs, hz = int(n), int(devices), float(t1) - float(t0), int(hz)
d = [json.load(open(f"{work}/driver-{i}.json")) for i in range(n)]
offered = sum(x["events_offered_per_s"] for x in d)
answered = sum(x["events_per_s"] for x in d)
errors = sum(x["event_errors"] + x["heartbeat_errors"] for x in d)
p99 = max(x["event_p99_ms"] for x in d)
hb = sum(x["heartbeats_per_s"] for x in d)
primary = (int(p1) - int(p0)) / hz / secs
secondaries = (int(s1) - int(s0)) / hz / secs
print("| secondaries | devices | events/s offered | answered by the secondaries | worst secondary p99 ms | heartbeats/s | errors | primary: events stored during the run | after the run | relay caught up after s | primary cores busy | secondaries' cores busy |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {n} | {devices} | {offered:.0f} | {answered:.0f} | {p99:.2f} | {hb:.0f} | {errors} | {int(at_end)} | {int(final)} | {lag} | {primary:.2f} | {secondaries:.2f} |")
PY
)
header=$(results_header "Hierarchy scale: ")
cmd="SECONDARIES=$SECONDARIES DEVICES=$DEVICES SECONDS_EACH=$SECONDS_EACH CONNECTIONS=$CONNECTIONS benches/hierarchy_scale.sh"
printf '%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n' "$header" "$cmd" "$table" >> benches/RESULTS.md
