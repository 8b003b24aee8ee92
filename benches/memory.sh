#!/usr/bin/env bash
# Memory follows what is active (issue 10, item 7). Two measurements of the server's resident
# memory (VmRSS from /proc/PID/status), printed and appended to benches/RESULTS.md with the
# command:
#
# 1. A million one-event devices. A fresh server; its RSS at the start; then MILLION events,
#    each from its own device (ids shaped like UUIDs, 36 characters), sent over STREAMS bidi
#    `Stream` calls as fast as the server answers; the RSS right after and the peak (VmHWM);
#    then the RSS every POLL seconds while the server forgets the devices (the device registry
#    forgets the last event time of a quiet unregistered device after 60 s, checking every 60 s;
#    the flood sweep, every `[flood] sweep_interval` = 5 s here, evicts counters idle for
#    two windows of `window` = 60 s), until SETTLE seconds after the last event when the
#    last three readings agree within 1 MiB, or WAIT seconds at most. Reported: final - start.
#    Done with the live-only type BENCH_APP_NOT_STORED (`do_not_store`: the store is not
#    involved) and, with STORED=1, again on a fresh server with the stored type
#    BENCH_APP_STORED (`[store] max_events` = MAX_EVENTS, default the server's 400 000).
# 2. The bound per registered device, on the first server once it has forgotten the million:
#    REGISTER devices report one heartbeat each (DeviceService/ReportHeartbeat: fingerprint,
#    host name, licence key, status facts), then the RSS once the registry has saved them (its
#    batched save runs every 5 s); then each of them sends one live-only event (a registered
#    device's last event time is never forgotten). Reported: (RSS after - RSS before) / REGISTER
#    for each step.
#
#   benches/memory.sh                     # both types, about 7 minutes
#   STORED=0 benches/memory.sh            # the live-only million and the registration only
#   LIVE=0 CACHE_MIB=8 benches/memory.sh  # the stored million only, with `[store] cache_mib` = 8
#                                         # (the SQLite page cache, 64 MiB by default)
#   APPEND=0 BUILD=0 benches/memory.sh    # print only; use the binaries as built
#
# Everything over TLS with the admin token (benches/common.sh); the load driver is
# benches/many_devices.rs. The server runs on its defaults (durability "full") except the
# flood window and sweep above.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
MILLION=${MILLION:-1000000}
REGISTER=${REGISTER:-100000}
STREAMS=${STREAMS:-8}
CONNECTIONS=${CONNECTIONS:-4}
HB_CONCURRENCY=${HB_CONCURRENCY:-64}
MAX_EVENTS=${MAX_EVENTS:-400000}
POLL=${POLL:-5}
SETTLE=${SETTLE:-130}
WAIT=${WAIT:-200}
STORED=${STORED:-1}
LIVE=${LIVE:-1}
CACHE_MIB=${CACHE_MIB:-}
APPEND=${APPEND:-1}

source benches/common.sh
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

export PATH="$(go env GOPATH)/bin:$PATH"
command -v ghz >/dev/null || go install github.com/bojand/ghz/cmd/ghz@latest
[ "${BUILD:-1}" = 0 ] ||
  cargo build --release --bin fleet-events --example many_devices
mkdir -p "$work/bin"
cp "$root/target/release/fleet-events" "$root/target/release/examples/many_devices" "$work/bin/"
fleet="$work/bin/fleet-events"
driver="$work/bin/many_devices"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

cat > "$work/config.toml" <<TOML
[flood]
window = "60s"
sweep_interval = "5s"

[store]
max_events = $MAX_EVENTS
TOML
[ -z "$CACHE_MIB" ] || echo "cache_mib = $CACHE_MIB" >> "$work/config.toml"

register_type() { # NAME DO_NOT_STORE: registers an Info application type as the admin
  ghz "${ghz_conn[@]}" --call fleetevents.v1.CatalogService/RegisterEventType -n 1 -c 1 \
    -d "{\"event_type\":\"$1\",\"severity\":\"SEVERITY_INFO\",\"application\":\"bench\",\"do_not_store\":$2}" \
    -O json -o "$work/register.json" "$addr"
  python3 - "$work/register.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if r["statusCodeDistribution"].get("OK") != 1:
    sys.exit(f"RegisterEventType failed: {r['statusCodeDistribution']} {[d.get('error') for d in r.get('details') or []]}")
PY
}

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }  # KiB
hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$pid/status"; } # KiB
# VmRSS = RssAnon (heap, stacks) + RssFile (the executable's pages and other mapped files) +
# RssShmem; the file-backed part grows as more of the code is run, whatever the devices.
anon_file() { awk '/^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} END {print a "\t" f}' "/proc/$pid/status"; }
run_id() { printf '%08x' "$(( (RANDOM << 16) ^ RANDOM ))"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.0f", b - a}'; }

# A fresh server on a fresh data directory (as start_fleet in common.sh does), logging at debug
# level what the device registry forgets.
start() {
  rm -rf "$work/data" "$work/ready"
  "$fleet" serve --listen 127.0.0.1:0 --data-dir "$work/data" --config "$work/config.toml" \
    --ready-file "$work/ready" --log "warn,fleet_events::detectors::devices=debug" 2>"$work/server.log" &
  pid=$!
  wait_ready "$work/ready" fleet-events "$work/data/admin.token"
  ghz_conn=(--cacert "$work/data/ca.pem"
    --metadata "{\"authorization\":\"Bearer $(tr -d '[:space:]' < "$work/data/admin.token")\"}")
  register_type BENCH_APP_STORED false
  register_type "$NOT_STORED_TYPE" true
  sleep 2
}

million="$work/million.tsv"
series="$work/series.tsv"
: > "$million"
: > "$series"
one_million() { # TYPE LABEL: the server must be started; appends a row to $million
  local type=$1 label=$2 start_kib after_kib peak_kib final_kib line t_end el forgot start_af final_af
  start_kib=$(rss)
  start_af=$(anon_file)
  echo "$label: RSS at the start $start_kib KiB; sending $MILLION events from as many devices" >&2
  line=$("$driver" send "$addr" "$work/data" "$(run_id)" "$type" "$MILLION" "$STREAMS" "$CONNECTIONS")
  t_end=$(now)
  after_kib=$(rss)
  peak_kib=$(hwm)
  echo "$label: sent ($line); RSS $after_kib KiB, peak $peak_kib KiB" >&2
  printf '%s\t0\t%s\n' "$label" "$after_kib" >> "$series"
  local readings=("$after_kib") r lo hi
  while :; do
    sleep "$POLL"
    el=$(since "$t_end")
    r=$(rss)
    readings+=("$r")
    printf '%s\t%s\t%s\n' "$label" "$el" "$r" >> "$series"
    echo "  +${el} s: RSS $r KiB" >&2
    # Settled: SETTLE seconds after the last event, and the last three readings within 1 MiB.
    lo=$(printf '%s\n' "${readings[@]: -3}" | sort -n | head -n 1)
    hi=$(printf '%s\n' "${readings[@]: -3}" | sort -n | tail -n 1)
    [ "$el" -ge "$SETTLE" ] && [ $((hi - lo)) -le 1024 ] && break
    [ "$el" -ge "$WAIT" ] && break
  done
  final_kib=$(rss)
  final_af=$(anon_file)
  forgot=$({ grep -o 'forgotten=[0-9]*' "$work/server.log" || true; } | awk -F= '{s += $2} END {print s + 0}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$line" "$start_kib" "$after_kib" \
    "$peak_kib" "$final_kib" "$el" "$forgot" "$start_af" "$final_af" >> "$million"
}

register="$work/register.tsv"
: > "$register"
registration() { # on the running server: heartbeats, then one event each
  local run before hb_line hb_kib saved_kib ev_line ev_kib
  run=$(run_id)
  before=$(rss)
  echo "registering $REGISTER devices (RSS before: $before KiB)" >&2
  hb_line=$("$driver" register "$addr" "$work/data" "$run" "$REGISTER" "$HB_CONCURRENCY" "$CONNECTIONS")
  hb_kib=$(rss)
  sleep 12 # the registry's batched save (every 5 s) has run at least twice
  saved_kib=$(rss)
  echo "registered ($hb_line); RSS $hb_kib KiB, after the save $saved_kib KiB" >&2
  ev_line=$("$driver" send "$addr" "$work/data" "$run" "$NOT_STORED_TYPE" "$REGISTER" "$STREAMS" "$CONNECTIONS")
  sleep 2
  ev_kib=$(rss)
  echo "one event from each ($ev_line); RSS $ev_kib KiB" >&2
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$REGISTER" "$before" "$hb_line" "$hb_kib" "$saved_kib" \
    "$ev_line" "$ev_kib" >> "$register"
}

if [ "$LIVE" != 0 ]; then
  start
  one_million "$NOT_STORED_TYPE" "live-only"
  registration
  stop_server
fi
if [ "$STORED" != 0 ]; then
  start
  one_million BENCH_APP_STORED "stored"
  stored_events=$(sqlite3 "$work/data/events.sqlite3" "SELECT count(*) FROM events WHERE event_type = 'BENCH_APP_STORED'" 2>/dev/null || echo "?")
  stop_server
else
  stored_events=""
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

tables=$(python3 - "$million" "$register" "$series" "$MILLION" "$stored_events" "$MAX_EVENTS" <<'PY'
import sys
million = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
register = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
series = [l.rstrip("\n").split("\t") for l in open(sys.argv[3]) if l.strip()]
n, stored_events, max_events = int(sys.argv[4]), sys.argv[5], sys.argv[6]
mib = lambda k: f"{int(k) / 1024:.1f}"
print(f"{n:,}".replace(",", " ") + " events, each from its own device, then quiet:\n")
print("| events | sent in s | events/s | RSS at start MiB | right after MiB | peak (VmHWM) MiB | final MiB | final - start MiB | of which heap (RssAnon) MiB | of which files (RssFile) MiB | final after s | devices forgotten (server log) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in million:
    label, events, secs, rate, start, after, peak, final, el, forgot, sa, sf, fa, ff = r
    d = lambda a, b: f"{(int(b) - int(a)) / 1024:+.1f}"
    print(f"| {label} | {secs} | {rate} | {mib(start)} | {mib(after)} | {mib(peak)} | {mib(final)} "
          f"| **{d(start, final)}** | {d(sa, fa)} | {d(sf, ff)} | {el} | {forgot} |")
if stored_events:
    print(f"\nStored events in the stored run's database at the end: {stored_events} (`[store] max_events` = {max_events}).")
for r in register:
    N, before, hb_n, hb_secs, hb_rate, hb_kib, saved_kib, ev_n, ev_secs, ev_rate, ev_kib = r
    N, before = int(N), int(before)
    per = lambda k: f"{(int(k) - before) * 1024 / N:.0f}"
    print(f"\nRegistered devices, on the live-only server after it forgot the million "
          f"(RSS before: {mib(before)} MiB):\n")
    print("| step | RSS MiB | bytes per registered device |")
    print("|---|---:|---:|")
    print(f"| {N} heartbeats ({hb_secs} s, {hb_rate}/s) | {mib(hb_kib)} | {per(hb_kib)} |")
    print(f"| the same after the registry's batched save | {mib(saved_kib)} | **{per(saved_kib)}** |")
    print(f"| then one live-only event from each ({ev_secs} s) | {mib(ev_kib)} | {per(ev_kib)} |")
print("\n<details><summary>RSS while the server forgets (s after the last event answered: MiB)</summary>\n")
for label in dict.fromkeys(s[0] for s in series):
    pts = [f"{s[1]}: {mib(s[2])}" for s in series if s[0] == label]
    print(f"- {label}: " + ", ".join(pts))
print("\n</details>")
PY
)
header=$(results_header "Memory: ")
cmd="MILLION=$MILLION REGISTER=$REGISTER STREAMS=$STREAMS CONNECTIONS=$CONNECTIONS HB_CONCURRENCY=$HB_CONCURRENCY MAX_EVENTS=$MAX_EVENTS${CACHE_MIB:+ CACHE_MIB=$CACHE_MIB} LIVE=$LIVE STORED=$STORED benches/memory.sh"
note="Load average before and after: $load_before / $load_after."
printf '%s\n\n`%s`\n\n%s\n\n%s\n' "$header" "$cmd" "$tables" "$note"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n\n%s\n' "$header" "$cmd" "$tables" "$note" >> benches/RESULTS.md
