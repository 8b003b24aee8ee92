#!/usr/bin/env bash
# What TLS costs on the client port: fleet-events with TLS + bearer token (the default) against
# the same server in plaintext (`[server] insecure_plaintext = true`, still with the token,
# which every call needs), in one run, for the bidi `Stream` (the agents' path) and the unary
# `Classify`. The bare tonic echo server is measured the same way (plaintext and TLS with the
# same kind of certificate, no credential check), to show what TLS costs a server that does
# no work. Prints tables and appends them to benches/RESULTS.md with the command.
#
#   benches/tls_cost.sh                       # 4 rounds of 8 s per run
#   DURATION=15s ROUNDS=6 benches/tls_cost.sh
#   ECHO=0 benches/tls_cost.sh                # fleet-events only
#   HANDSHAKES=0 benches/tls_cost.sh          # skip the handshake measurement
#   APPEND=0 BUILD=0 benches/tls_cost.sh      # print only; use the binaries as built
#   NOISE_LIMIT=1.0 RETRIES=3 RETRY_PAUSE=30  # a run during which other processes used more
#                                             # than 1 CPU s is measured again (up to 3 times)
#
# Rounds interleave the transports (plaintext first in odd rounds, TLS first in even ones), so
# drift in the machine's load falls on both. The order matters on this machine (in one run the
# second of a pair was the faster in every round, whichever transport it was), so ROUNDS should
# be even: then each TLS ÷ plaintext ratio, the geometric mean of the per-round ratios, has
# each order equally often. The medians table gives the absolute figures, median over rounds.
#
# fleet-events runs with durability "normal" (no fsync per group commit: on this disk the fsync
# would dominate the unary latency and mask the difference), the flood threshold and the store
# cap (max_events) out of the way, and every event of the application type BENCH_APP_EVENT
# (stored) with a fresh UUID as its id. A fresh server per run on a fresh data directory.
#
# The figures. events/s are the events ghz got acknowledged (Stream: OK calls x messages per
# call; Classify: OK calls) over the run. On 2 cores ghz itself takes most of the CPU (its
# own CPU is in the table), so events/s are bound by the client, and its TLS cost (Go's
# crypto/tls) is in them too. The main figure is the server's CPU per event: utime+stime of the
# server process from /proc/PID/stat over the ghz run, divided by the events the server
# stored (counted in its SQLite database after it stopped; for the echo server, the events
# acknowledged). p50/p99 are ghz's latencies: per call for Classify, and per Stream call of
# STREAM_MESSAGES events for Stream. Handshakes: `openssl s_time -new` for HANDSHAKES seconds
# against each TLS server, server CPU per full TLS handshake.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
DURATION=${DURATION:-8s}
ROUNDS=${ROUNDS:-4}
UNARY_CONCURRENCY=${UNARY_CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
STREAMS=${STREAMS:-4}
STREAM_MESSAGES=${STREAM_MESSAGES:-1000}
ECHO=${ECHO:-1}
HANDSHAKES=${HANDSHAKES:-5}
APPEND=${APPEND:-1}
NOISE_LIMIT=${NOISE_LIMIT:-1.0}
RETRIES=${RETRIES:-3}
RETRY_PAUSE=${RETRY_PAUSE:-30}

source benches/common.sh
work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
bench_build
hz=$(getconf CLK_TCK)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

cat > "$work/config.toml" <<'TOML'
[flood]
threshold = 100000000

[store]
durability = "normal"
max_events = 1000000000
TOML

start() { # server transport -> pid, addr, ghz_conn
  case "$1" in
    fleet-events) start_fleet "$2" "$work/data" "$work/config.toml" ;;
    echo) start_echo "$2" ;;
  esac
}

event=$(bench_event "$STORED_TYPE")
unary=(--call fleetevents.v1.EventService/Classify -c "$UNARY_CONCURRENCY")
stream=(--call fleetevents.v1.EventService/Stream -c "$STREAMS" --stream-call-count "$STREAM_MESSAGES"
  --stream-dynamic-messages)

results="$work/results.tsv"
: > "$results"
retried=0
run_once() { # round call server transport -> one row in $work/row
  local round=$1 call=$2 server=$3 transport=$4 per_call t0 t1 stored=""
  if [ "$call" = Stream ]; then per_call=$STREAM_MESSAGES; args=("${stream[@]}")
  else per_call=1; args=("${unary[@]}"); fi
  start "$server" "$transport"
  s0=$(head -n 1 /proc/stat)
  t0=$(cpu_ticks)
  /usr/bin/time -f '%U %S' -o "$work/ghz.time" \
    ghz "${ghz_conn[@]}" -z "$DURATION" --connections "$CONNECTIONS" -O json -o "$work/out.json" \
    "${args[@]}" -d "$event" "$addr" || { echo "ghz failed against $server ($transport)" >&2; exit 1; }
  sleep 0.5 # the commits of the last events received
  t1=$(cpu_ticks)
  s1=$(head -n 1 /proc/stat)
  stop_server
  [ "$server" = fleet-events ] &&
    stored=$(sqlite3 "$work/data/events.sqlite3" "SELECT count(*) FROM events WHERE event_type = '$STORED_TYPE'")
  python3 - "$work/out.json" "$work/ghz.time" "$round" "$call" "$server" "$transport" "$per_call" \
    "$((t1 - t0))" "$hz" "$stored" "$s0" "$s1" > "$work/row" <<'PY'
import json, sys
out, ghz_time, round_, call, server, transport, per_call, ticks, hz, stored, s0, s1 = sys.argv[1:]
r = json.load(open(out))
ok = r["statusCodeDistribution"].get("OK", 0)
errors = sum(v for k, v in r["statusCodeDistribution"].items() if k != "OK")
secs = r["total"] / 1e9
acked = ok * int(per_call)
lat = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
server_cpu = int(ticks) / int(hz)
events = int(stored) if stored else acked
ghz_cpu = sum(float(x) for x in open(ghz_time).read().split()[-2:])
# The whole machine over the run (/proc/stat): CPU used by other processes, and stolen by the
# hypervisor; both are noise for this run.
a = [int(x) for x in s0.split()[1:9]]
b = [int(x) for x in s1.split()[1:9]]
d = [y - x for x, y in zip(a, b)]  # user nice system idle iowait irq softirq steal
other = (d[0] + d[1] + d[2] + d[5] + d[6]) / int(hz) - server_cpu - ghz_cpu
steal = d[7] / int(hz)
print("\t".join(str(x) for x in [
    round_, call, server, transport, f"{acked / secs:.0f}", f"{lat.get(50, 0):.2f}",
    f"{lat.get(99, 0):.2f}", f"{server_cpu:.2f}", events, f"{server_cpu / events * 1e6:.2f}",
    f"{ghz_cpu:.2f}", f"{ghz_cpu / max(acked, 1) * 1e6:.2f}", errors, f"{max(other, 0):.2f}",
    f"{steal:.2f}"]))
PY
}

# A run during which other processes used more than NOISE_LIMIT CPU seconds (a build or a test
# suite on this shared machine) is measured again, after a pause, up to RETRIES times; then
# it is kept as it is (the "other processes' CPU" column shows it).
run() { # round call server transport
  local attempt other
  for attempt in $(seq 0 "$RETRIES"); do
    run_once "$@"
    other=$(cut -f 14 "$work/row")
    cat "$work/row" >&2
    awk -v o="$other" -v l="$NOISE_LIMIT" 'BEGIN {exit !(o > l)}' || break
    [ "$attempt" = "$RETRIES" ] && break
    echo "  (other processes used ${other} CPU s during that run: measuring it again in ${RETRY_PAUSE} s)" >&2
    retried=$((retried + 1))
    sleep "$RETRY_PAUSE"
  done
  cat "$work/row" >> "$results"
}

servers=(fleet-events)
[ "$ECHO" = 0 ] || servers+=(echo)
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order=(plain tls); else order=(tls plain); fi
  for call in Stream Classify; do
    for server in "${servers[@]}"; do
      for transport in "${order[@]}"; do run "$round" "$call" "$server" "$transport"; done
    done
  done
done

# Full TLS handshakes (a new session each, no resumption): server CPU per handshake.
handshakes="$work/handshakes.tsv"
: > "$handshakes"
if [ "$HANDSHAKES" != 0 ]; then
  for server in "${servers[@]}"; do
    start "$server" tls
    ca="$work/data/ca.pem"; [ "$server" = echo ] && ca="$work/echo-certs/ca.pem"
    t0=$(cpu_ticks)
    n=$(openssl s_time -connect "$addr" -new -time "$HANDSHAKES" -CAfile "$ca" 2>/dev/null |
      awk '/connections in/ {print $1; exit}')
    t1=$(cpu_ticks)
    stop_server
    printf '%s\t%s\t%s\n' "$server" "${n:-0}" "$((t1 - t0))" >> "$handshakes"
  done
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

tables=$(python3 - "$results" "$handshakes" "$hz" "$HANDSHAKES" <<'PY'
import math, statistics as st, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
F = dict(round=0, call=1, server=2, transport=3, rate=4, p50=5, p99=6, cpu=7, events=8, us=9,
         ghz_cpu=10, ghz_us=11, errors=12, other=13, steal=14)
def col(call, server, transport, f):
    return [float(r[F[f]]) for r in rows if (r[1], r[2], r[3]) == (call, server, transport)]
def by_round(call, server, transport, f):
    return {r[0]: float(r[F[f]]) for r in rows if (r[1], r[2], r[3]) == (call, server, transport)}
keys = []
for r in rows:
    if (r[1], r[2]) not in keys:
        keys.append((r[1], r[2]))
med = lambda xs: st.median(xs) if xs else float("nan")

print("Medians over the rounds:\n")
print("| call | server | transport | events/s | p50 ms | p99 ms | server CPU µs/event | ghz CPU µs/event | errors (all rounds) |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for call, server in keys:
    for t in ("plain", "tls"):
        name = "plaintext + token" if t == "plain" else "TLS + token"
        if server == "echo":
            name = name.replace(" + token", "")
        print(f"| {call} | {server} | {name} | {med(col(call, server, t, 'rate')):.0f} "
              f"| {med(col(call, server, t, 'p50')):.2f} | {med(col(call, server, t, 'p99')):.2f} "
              f"| {med(col(call, server, t, 'us')):.2f} | {med(col(call, server, t, 'ghz_us')):.2f} "
              f"| {sum(col(call, server, t, 'errors')):.0f} |")

print("\nTLS ÷ plaintext: the geometric mean of the per-round ratios (each round's in brackets; "
      "> 1 means TLS is higher):\n")
print("| call | server | events/s | server CPU µs/event | extra server CPU µs/event (mean) | p99 |")
print("|---|---|---:|---:|---:|---:|")
gmean = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")
for call, server in keys:
    cells = []
    for f in ("rate", "us"):
        p, t = by_round(call, server, "plain", f), by_round(call, server, "tls", f)
        rs = [t[k] / p[k] for k in p if k in t and p[k] and t[k]]
        cells.append(f"**{gmean(rs):.3f}** ({', '.join(f'{x:.2f}' for x in rs)})")
    p, t = by_round(call, server, "plain", "us"), by_round(call, server, "tls", "us")
    extra = [t[k] - p[k] for k in p if k in t]
    cells.append(f"{st.mean(extra):+.2f} ({', '.join(f'{x:+.2f}' for x in extra)})")
    p, t = by_round(call, server, "plain", "p99"), by_round(call, server, "tls", "p99")
    rs = [t[k] / p[k] for k in p if k in t and p[k] and t[k]]
    cells.append(f"{gmean(rs):.2f}x")
    print(f"| {call} | {server} | " + " | ".join(cells) + " |")

hs = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
if hs:
    hz, secs = int(sys.argv[3]), sys.argv[4]
    print(f"\nFull TLS handshakes (`openssl s_time -new`, {secs} s, no resumption):\n")
    for server, n, ticks in hs:
        n, ticks = int(n), int(ticks)
        per = f"{ticks / hz / n * 1e6:.0f} µs server CPU per handshake" if n else "no handshakes"
        print(f"- {server}: {n} handshakes, {per}")

others = [float(r[F["other"]]) for r in rows]
steals = [float(r[F["steal"]]) for r in rows]
print(f"\nNoise: CPU used by other processes during a run, median {med(others):.2f} s, most "
      f"{max(others):.2f} s; stolen by the hypervisor, median {med(steals):.2f} s, most {max(steals):.2f} s "
      f"(out of {len(rows)} runs; each run is 2 cores x its duration).")
print("\n<details><summary>Every run</summary>\n")
print("| round | call | server | transport | events/s | p50 ms | p99 ms | server CPU s | events | server CPU µs/event | ghz CPU s | ghz CPU µs/event | errors | other processes' CPU s | stolen CPU s |")
print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print("\n</details>")
PY
)
header=$(results_header "TLS cost: ")
cmd="DURATION=$DURATION ROUNDS=$ROUNDS UNARY_CONCURRENCY=$UNARY_CONCURRENCY CONNECTIONS=$CONNECTIONS STREAMS=$STREAMS STREAM_MESSAGES=$STREAM_MESSAGES ECHO=$ECHO HANDSHAKES=$HANDSHAKES benches/tls_cost.sh"
note="Runs measured again because other processes used more than $NOISE_LIMIT CPU s: $retried. Load average before and after: $load_before / $load_after."
printf '%s\n\n`%s`\n\n%s\n\n%s\n' "$header" "$cmd" "$tables" "$note"
[ "$APPEND" = 0 ] || printf '\n%s\n\n`%s`\n\n%s\n\n%s\n' "$header" "$cmd" "$tables" "$note" >> benches/RESULTS.md
