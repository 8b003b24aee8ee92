#!/usr/bin/env bash
# Slow subscribers cost ingest nothing measurable (issue 10, item 6): the bidi `Stream` load with
# SUBSCRIBERS `Subscribe` calls open that never read a message, against the same load with none,
# in one run. Prints tables and appends them to benches/RESULTS.md with the command.
#
#   benches/subscribers.sh                        # 4 rounds, 8 s measured per run
#   ROUNDS=6 MEASURE=10 benches/subscribers.sh
#   APPEND=0 BUILD=0 benches/subscribers.sh       # print only; use the binaries as built
#   NOISE_LIMIT=2.0 RETRIES=1 RETRY_PAUSE=10      # a run during which other processes used more
#                                                 # than 2 CPU s is measured again (once)
#
# The load driver is benches/idle_subscribers.rs (a Rust client, far cheaper per event than ghz,
# so the server, not the client, is what the 2 cores are mostly spent on). Each run gets a fresh
# server on a fresh data directory (TLS, the admin token). With subscribers, the driver first
# opens SUBSCRIBERS calls (no filter: every event matches every subscriber) over SUB_CONNECTIONS
# connections of their own (`[subscribe] max_per_connection` is 64), waits until each has its
# response headers (so it is on the server's bus), and never reads them. Then STREAMS `Stream`
# calls over CONNECTIONS connections send events as fast as the server answers: unmeasured for
# WARMUP seconds and until WARMUP_EVENTS events were answered (every subscriber's queue,
# `[subscribe] buffer` = 4096 events, and its HTTP/2 window must fill first: that took about
# 18 000 events), then MEASURE seconds over which the events answered and the CPU time of the
# server (/proc/PID/stat), of the driver and of the rest of the machine (/proc/stat) are
# counted. After the load all subscribers but one are closed, and that one (it has a connection
# of its own: the unread messages of the others would hold the HTTP/2 window of a connection it
# shared with them) is read to its end, then sent one closing event (the misses at the end ride
# on it) and read to that: the messages it got plus the `missed_before` they carried must add
# up to every event answered while it was open.
#
# Two event types, each registered before the run: BENCH_APP_STORED (stored, Info) and
# BENCH_APP_NOT_STORED (`do_not_store`: classified, published, answered, never stored). The
# server runs with durability "normal" (no fsync per group commit, which would bound the stored
# rate by the disk and hide CPU costs), the flood threshold and the store cap out of the way.
#
# Rounds alternate the order (none first in odd rounds, subscribers first in even ones), so
# drift in the machine's load falls on both; ROUNDS should be even. Each ratio is the geometric
# mean of the per-round ratios, with subscribers ÷ without.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
ROUNDS=${ROUNDS:-4}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
SUB_CONNECTIONS=${SUB_CONNECTIONS:-16}
STREAMS=${STREAMS:-8}
CONNECTIONS=${CONNECTIONS:-4}
WARMUP=${WARMUP:-3}
WARMUP_EVENTS=${WARMUP_EVENTS:-30000}
MEASURE=${MEASURE:-8}
APPEND=${APPEND:-1}
NOISE_LIMIT=${NOISE_LIMIT:-2.0}
RETRIES=${RETRIES:-1}
RETRY_PAUSE=${RETRY_PAUSE:-10}

source benches/common.sh
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

export PATH="$(go env GOPATH)/bin:$PATH"
command -v ghz >/dev/null || go install github.com/bojand/ghz/cmd/ghz@latest
[ "${BUILD:-1}" = 0 ] ||
  cargo build --release --bin fleet-events --example idle_subscribers
mkdir -p "$work/bin"
cp "$root/target/release/fleet-events" "$root/target/release/examples/idle_subscribers" "$work/bin/"
fleet="$work/bin/fleet-events"
driver="$work/bin/idle_subscribers"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

cat > "$work/config.toml" <<'TOML'
[flood]
threshold = 100000000

[store]
durability = "normal"
max_events = 1000000000
TOML

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

results="$work/results.tsv"
: > "$results"
retried=0
run_once() { # round type subscribers -> one row in $work/row
  local round=$1 type=$2 subs=$3
  start_fleet tls "$work/data" "$work/config.toml"
  register_type BENCH_APP_STORED false
  register_type "$NOT_STORED_TYPE" true
  line=$("$driver" "$addr" "$work/data" "$pid" "$type" "$subs" "$SUB_CONNECTIONS" "$STREAMS" \
    "$CONNECTIONS" "$WARMUP" "$WARMUP_EVENTS" "$MEASURE") || { echo "the driver failed ($type, $subs)" >&2; exit 1; }
  stop_server
  printf '%s\t%s\t%s\t%s\n' "$round" "$type" "$subs" "$line" > "$work/row"
}

run() { # round type subscribers
  local attempt other
  for attempt in $(seq 0 "$RETRIES"); do
    run_once "$@"
    other=$(cut -f 9 "$work/row")
    cat "$work/row" >&2
    awk -v o="$other" -v l="$NOISE_LIMIT" 'BEGIN {exit !(o > l)}' || break
    [ "$attempt" = "$RETRIES" ] && break
    echo "  (other processes used ${other} CPU s during that run: measuring it again in ${RETRY_PAUSE} s)" >&2
    retried=$((retried + 1))
    sleep "$RETRY_PAUSE"
  done
  cat "$work/row" >> "$results"
}

for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order=(0 "$SUBSCRIBERS"); else order=("$SUBSCRIBERS" 0); fi
  for type in BENCH_APP_STORED "$NOT_STORED_TYPE"; do
    for subs in "${order[@]}"; do run "$round" "$type" "$subs"; done
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

tables=$(python3 - "$results" "$SUBSCRIBERS" <<'PY'
import math, statistics as st, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
n_subs = sys.argv[2]
# round type subs events secs rate server_cpu driver_cpu other steal rss_kib open total
# received missed
for r in rows:
    ev = int(r[3])
    r.append(float(r[6]) / ev * 1e6 if ev else float("nan"))  # 15: server µs/event
    r.append(float(r[7]) / ev * 1e6 if ev else float("nan"))  # 16: driver µs/event
types = []
for r in rows:
    if r[1] not in types:
        types.append(r[1])
med = lambda xs: st.median(xs) if xs else float("nan")
gmean = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")
def col(t, s, i):
    return [float(r[i]) for r in rows if r[1] == t and r[2] == s]
def by_round(t, s, i):
    return {r[0]: float(r[i]) for r in rows if r[1] == t and r[2] == s}
label = {"BENCH_APP_STORED": "stored", "BENCH_APP_NOT_STORED": "live-only (not stored)"}

print("Medians over the rounds:\n")
print("| events | subscribers (never read) | events/s | server CPU µs/event | driver CPU µs/event | server RSS MiB at the end |")
print("|---|---:|---:|---:|---:|---:|")
for t in types:
    for s in ("0", n_subs):
        print(f"| {label.get(t, t)} | {s} | {med(col(t, s, 5)):.0f} | {med(col(t, s, 15)):.2f} "
              f"| {med(col(t, s, 16)):.2f} | {med(col(t, s, 10)) / 1024:.0f} |")

print(f"\n{n_subs} subscribers ÷ none: the geometric mean of the per-round ratios (each round's in "
      "brackets):\n")
print("| events | events/s | server CPU µs/event | extra server CPU µs/event (mean) | within 10 % of the rate? |")
print("|---|---:|---:|---:|---|")
for t in types:
    cells = []
    for i in (5, 15):
        a, b = by_round(t, "0", i), by_round(t, n_subs, i)
        rs = [b[k] / a[k] for k in a if k in b and a[k] and b[k]]
        cells.append((gmean(rs), f"**{gmean(rs):.3f}** ({', '.join(f'{x:.2f}' for x in rs)})"))
    a, b = by_round(t, "0", 15), by_round(t, n_subs, 15)
    extra = [b[k] - a[k] for k in a if k in b]
    verdict = "yes" if cells[0][0] >= 0.90 else f"**no**: {(1 - cells[0][0]) * 100:.0f} % fewer events/s"
    print(f"| {label.get(t, t)} | {cells[0][1]} | {cells[1][1]} "
          f"| {st.mean(extra):+.2f} ({', '.join(f'{x:+.2f}' for x in extra)}) | {verdict} |")

subs_rows = [r for r in rows if r[2] != "0"]
if subs_rows:
    opened = [int(r[11]) for r in subs_rows]
    print(f"\nSubscribers open in every run with subscribers: {min(opened)}-{max(opened)}. One of them, "
          "read to its end after each run (events answered in the whole run = messages it got + "
          "missed_before they carried):\n")
    for r in subs_rows:
        total, got, missed = int(r[12]), int(r[13]), int(r[14])
        ok = "adds up" if got + missed == total else f"**{total - got - missed:+d} unaccounted**"
        print(f"- round {r[0]}, {label.get(r[1], r[1])}: {total} = {got} received + {missed} missed: {ok}")
others = [float(r[8]) for r in rows]
steals = [float(r[9]) for r in rows]
print(f"\nNoise: CPU used by other processes during a measured span, median {med(others):.2f} s, most "
      f"{max(others):.2f} s; stolen by the hypervisor, median {med(steals):.2f} s, most {max(steals):.2f} s "
      f"(out of {len(rows)} runs; each span is 2 cores x its duration).")
print("\n<details><summary>Every run</summary>\n")
print("| round | event type | subscribers | events | secs | events/s | server CPU s | driver CPU s | other processes' CPU s | stolen CPU s | server RSS KiB | subscribers open | events in all | subscriber received | subscriber missed | server CPU µs/event | driver CPU µs/event |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(r[:15]) + f" | {r[15]:.2f} | {r[16]:.2f} |")
print("\n</details>")
PY
)
header=$(results_header "Idle subscribers: ")
cmd="ROUNDS=$ROUNDS SUBSCRIBERS=$SUBSCRIBERS SUB_CONNECTIONS=$SUB_CONNECTIONS STREAMS=$STREAMS CONNECTIONS=$CONNECTIONS WARMUP=$WARMUP WARMUP_EVENTS=$WARMUP_EVENTS MEASURE=$MEASURE benches/subscribers.sh"
note="Runs measured again because other processes used more than $NOISE_LIMIT CPU s: $retried. Load average before and after: $load_before / $load_after."
printf '%s\n\n`%s`\n\n%s\n\n%s\n' "$header" "$cmd" "$tables" "$note"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n\n%s\n' "$header" "$cmd" "$tables" "$note" >> benches/RESULTS.md
