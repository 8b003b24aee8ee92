#!/usr/bin/env bash
# The load benchmark: ghz against fleet-events and, in the same run, against the bare tonic echo
# server (benches/echo_server.rs) with identical calls, message sizes, concurrency and
# connections. Prints a table and appends it to benches/RESULTS.md with the command.
#
#   benches/load.sh                    # 10 s per scenario
#   DURATION=30s benches/load.sh       # longer
#   TRANSPORT=plain benches/load.sh    # both servers in plaintext (fleet-events with
#                                      # insecure_plaintext; the token is still sent)
#   APPEND=0 benches/load.sh           # print only, do not append to RESULTS.md
#   BUILD=0 benches/load.sh            # use the binaries in target/release as they are
#   BASELINE_BIN=/path/to/fleet-events benches/load.sh
#                                      # also run an older build ("fleet-events-baseline" rows,
#                                      # same scenarios, same run) to compare against
#   METRICS=1 benches/load.sh          # also "fleet-events-scraped" rows: the same server with
#                                      # its Prometheus port on, scraped every second
#   OPEN_STREAMS=0 benches/load.sh     # skip the memory-per-open-stream measurement
#   CLIENT=ghz benches/load.sh         # drive with ghz instead of the fast Rust client (the
#                                      # interoperability check; on 2 shared cores ghz is the
#                                      # bottleneck, so its rows are labelled client-bound)
#   SCENARIOS="stream unary" benches/load.sh
#                                      # only these of the fast client's scenarios (unary:
#                                      # stored Classify, unary-live: not-stored Classify,
#                                      # stream: stored Stream, stream-full: the same with the
#                                      # store filled to its cap of 400 000 first, so every
#                                      # commit trims); NORMAL=0 skips the
#                                      # durability "normal" rows
#   ROUNDS=3 benches/load.sh           # each scenario 3 times, servers interleaved; the table
#                                      # shows the median of each figure
#   OUTPUTS=1 benches/load.sh          # also "fleet-events-outputs" rows: the same server with
#                                      # notifications on for both bench types (a webhook to a
#                                      # local receiver, at most 10 000 a minute, the rest held
#                                      # back into digests) and a SIEM destination (RFC 5424
#                                      # over TCP to a local receiver that reads and discards)
#
# Both servers serve TLS by default (fleet-events' default; the echo server with a certificate
# made by fleet-events), and ghz pins the server's CA and sends fleet-events' admin token as
# `authorization: Bearer ...` (see benches/common.sh), so the echo ceiling pays for the same
# encryption but checks no credential. The events are of application types (clients may not
# send KLSRV_* types): BENCH_APP_EVENT, unknown and so stored with Info retention, and
# BENCH_APP_NOT_STORED, registered with do_not_store before the run.
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
TRANSPORT=${TRANSPORT:-tls}
APPEND=${APPEND:-1}
CLIENT=${CLIENT:-fast}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2s}
DEVICES=${DEVICES:-5000}
SCENARIOS=${SCENARIOS:-unary unary-live stream stream-full}
NORMAL=${NORMAL:-1}
want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

source benches/common.sh
work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  [ -n "${scraper:-}" ] && kill "$scraper" 2>/dev/null
  [ -n "${hook_pid:-}" ] && kill "$hook_pid" 2>/dev/null
  [ -n "${siem_pid:-}" ] && kill "$siem_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
bench_build
BASELINE_BIN=${BASELINE_BIN:-}
servers=(echo fleet-events)
if [ -n "$BASELINE_BIN" ]; then
  cp "$BASELINE_BIN" "$work/bin/fleet-events-baseline"
  servers+=(fleet-events-baseline)
fi
[ "${METRICS:-0}" = 1 ] && servers+=(fleet-events-scraped)
scraper=""
hook_pid=""
if [ "${OUTPUTS:-0}" = 1 ]; then
  servers+=(fleet-events-outputs)
  # The webhook receiver: answers 200 to every POST, on a port of its own.
  hook_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 - "$hook_port" <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
  hook_pid=$!
  hook_url="http://127.0.0.1:$hook_port/hook"
  # The SIEM receiver: reads octet-counted syslog and throws it away, on a port of its own.
  siem_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 - "$siem_port" <<'PY' &
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def drain(c):
    while c.recv(1 << 20):
        pass
while True:
    c, _ = srv.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
PY
  siem_pid=$!
fi

start_server() { # kind -> sets pid, addr, ghz_conn, data
  case "$1" in
    fleet-events|fleet-events-normal|fleet-events-baseline|fleet-events-scraped|fleet-events-outputs)
      data="$work/data"
      printf '[flood]\nthreshold = 100000000\n[store]\n' > "$work/config.toml"
      # An empty store: the cap out of reach of the run, so no commit trims (the scenario
      # "store at its cap" keeps the default and fills the store first).
      [ "${UNCAPPED:-0}" = 1 ] && printf 'max_events = 1000000000\n' >> "$work/config.toml"
      local mport=""
      if [ "$1" = fleet-events-scraped ]; then
        mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      fi
      # The same server, committing without an fsync per group commit: shows what fsync costs.
      [ "$1" = fleet-events-normal ] && printf 'durability = "normal"\n' >> "$work/config.toml"
      [ -n "$mport" ] && printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$mport" >> "$work/config.toml"
      if [ "$1" = fleet-events-baseline ]; then
        local current=$fleet
        fleet="$work/bin/fleet-events-baseline"
        start_fleet "$TRANSPORT" "$data" "$work/config.toml"
        fleet=$current
      else
        start_fleet "$TRANSPORT" "$data" "$work/config.toml"
      fi
      register_not_stored
      if [ "$1" = fleet-events-outputs ]; then enable_outputs; fi
      if [ -n "$mport" ]; then
        # A Prometheus-like scraper: one full scrape a second for the whole run.
        (while sleep 1; do curl -sf -o /dev/null "http://127.0.0.1:$mport/metrics" || exit 1; done) &
        scraper=$!
      fi
      ;;
    echo) data="$work/echo-certs"; start_echo "$TRANSPORT" ;;
  esac
}

stop_server_stats() { # -> prints "cpu_seconds peak_rss_kib"
  local ticks hwm
  ticks=$(cpu_ticks)
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  if [ -n "$scraper" ]; then
    kill "$scraper" 2>/dev/null || true
    wait "$scraper" 2>/dev/null || true
    scraper=""
  fi
  stop_server
  echo "$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t/hz}') $hwm"
}

event=$(bench_event "$STORED_TYPE")
notstored=$(bench_event "$NOT_STORED_TYPE")

results="$work/results.tsv"
: > "$results"
run() { # scenario server messages_per_call ghz-args...
  local scenario=$1 server=$2 per_call=$3; shift 3
  start_server "$server"
  ghz "${ghz_conn[@]}" -z "$DURATION" --connections "$CONNECTIONS" -O json -o "$work/out.json" "$@" "$addr" \
    || { echo "ghz failed against $server" >&2; exit 1; }
  stop_server_stats > "$work/stats"
  read -r cpu rss < "$work/stats"
  python3 - "$work/out.json" "$scenario" "$server" "$per_call" "$cpu" "$rss" >> "$results" <<'PY'
import json, sys
path, scenario, server, per_call, cpu, rss = sys.argv[1:]
r = json.load(open(path))
ok = r["statusCodeDistribution"].get("OK", 0)
errors = sum(v for k, v in r["statusCodeDistribution"].items() if k != "OK")
secs = r["total"] / 1e9
lat = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
rate = ok * int(per_call) / secs
per_msg = float(cpu) * 1e6 / (ok * int(per_call)) if ok else 0
print("\t".join([scenario, server, f"{rate:.0f}", f"{lat.get(50, 0):.2f}", f"{lat.get(99, 0):.2f}",
                 cpu, f"{int(rss) / 1024:.0f}", str(errors), f"{per_msg:.1f}"]))
PY
}

# The fast client (benches/load_client.rs): closed loop, unique ids over DEVICES devices, the
# same event as ghz's; the server's CPU time is read over the measured interval only.
run_fast() { # scenario server unary|stream event_type [prefill_events]
  local scenario=$1 server=$2 mode=$3 type=$4 prefill=${5:-0} filled=0
  start_server "$server"
  # A store filled first (to its cap: the measured run then trims continuously).
  while [ "$filled" -lt "$prefill" ]; do
    "$load_client_bin" --server "$addr" "${fast_conn[@]}" --mode stream --streams "$STREAMS" \
      --connections "$CONNECTIONS" --duration 3s --warmup 0s --devices "$DEVICES" \
      --event-type "$type" > "$work/fill.json"
    filled=$((filled + $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(int(r["events"]))' "$work/fill.json")))
  done
  "$load_client_bin" --server "$addr" "${fast_conn[@]}" --mode "$mode" \
    --connections "$CONNECTIONS" --concurrency "$UNARY_CONCURRENCY" --streams "$STREAMS" \
    --duration "$DURATION" --warmup "$WARMUP" --devices "$DEVICES" --event-type "$type" \
    --server-pid "$pid" > "$work/out.json" \
    || { echo "load_client failed against $server" >&2; cat "$work/out.json" >&2; exit 1; }
  stop_server_stats > "$work/stats"
  read -r cpu rss < "$work/stats"
  python3 - "$work/out.json" "$scenario" "$server" "$cpu" "$rss" >> "$results" <<'PY'
import json, sys
path, scenario, server, cpu, rss = sys.argv[1:]
r = json.load(open(path))
per = r["server_cpu_us_per_event"] or 0
w = (r.get("server_threads") or {}).get("sqlite-writer") or {}
print("\t".join([scenario, server, f"{r['events_per_s']:.0f}", f"{r['p50_us'] / 1000:.2f}",
                 f"{r['p99_us'] / 1000:.2f}", cpu, f"{int(rss) / 1024:.0f}", str(r["errors"]),
                 f"{per:.2f}", f"{r['p999_us'] / 1000:.2f}",
                 f"{w.get('cpu_us_per_event', 0):.2f}", f"{w.get('busy', 0):.2f}"]))
PY
}

unary=(--call fleetevents.v1.EventService/Classify -c "$UNARY_CONCURRENCY")
stream=(--call fleetevents.v1.EventService/Stream -c "$STREAMS" --stream-call-count "$STREAM_MESSAGES" --stream-dynamic-messages)
for round in $(seq "$ROUNDS"); do
  if [ "$CLIENT" = ghz ]; then
    for server in "${servers[@]}"; do
      run "unary Classify, stored type" "$server" 1 "${unary[@]}" -d "$event"
      run "unary Classify, not-stored type" "$server" 1 "${unary[@]}" -d "$notstored"
      run "bidi Stream, stored type" "$server" "$STREAM_MESSAGES" "${stream[@]}" -d "$event"
    done
    run "unary Classify, stored type" fleet-events-normal 1 "${unary[@]}" -d "$event"
    run "bidi Stream, stored type" fleet-events-normal "$STREAM_MESSAGES" "${stream[@]}" -d "$event"
  else
    for server in "${servers[@]}"; do
      want unary && run_fast "unary Classify, stored type" "$server" unary "$STORED_TYPE"
      want unary-live && run_fast "unary Classify, not-stored type" "$server" unary "$NOT_STORED_TYPE"
      want stream && UNCAPPED=1 run_fast "bidi Stream, stored type" "$server" stream "$STORED_TYPE"
    done
    # The default cap (400 000) reached before the measured run, so every commit trims.
    want stream-full && run_fast "bidi Stream, stored type, store at its cap" fleet-events stream \
      "$STORED_TYPE" 420000
    if [ "$NORMAL" = 1 ]; then
      want unary && run_fast "unary Classify, stored type" fleet-events-normal unary "$STORED_TYPE"
      want stream && UNCAPPED=1 run_fast "bidi Stream, stored type" fleet-events-normal stream "$STORED_TYPE"
    fi
  fi
done

# Memory held per open Stream call: OPEN_STREAMS calls held open at once, one event answered
# on each, server RSS growth divided by the count.
OPEN_STREAMS=${OPEN_STREAMS:-10000}
streams_note=""
for server in echo fleet-events; do
  [ "$OPEN_STREAMS" -gt 0 ] || break
  start_server "$server"
  if [ "$TRANSPORT" = tls ]; then
    line=$("$open_streams_bin" "$addr" "$OPEN_STREAMS" "$pid" 100 "$data")
  else
    line=$("$open_streams_bin" "$addr" "$OPEN_STREAMS" "$pid" 100)
  fi
  stop_server
  streams_note+="- $server: $line"$'\n'
done

table=$(python3 - "$results" "$CLIENT" <<'PY'
import statistics, sys
raw = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
client = sys.argv[2]
# The median of every numeric figure over the rounds, per (scenario, server), in first-seen order.
groups = {}
for r in raw:
    groups.setdefault((r[0], r[1]), []).append(r)
def med(rs, i):
    vals = [float(r[i]) for r in rs if len(r) > i]
    return statistics.median(vals) if vals else 0.0
rows = []
for (scenario, server), rs in groups.items():
    rows.append([scenario, server] + [med(rs, i) for i in range(2, 12)] + [len(rs)])
echo = {r[0]: r for r in rows if r[1] == "echo"}
# The store-at-cap scenario is the stored Stream's: its ceiling is the same.
for r in rows:
    if r[0].startswith("bidi Stream, stored type") and r[0] not in echo and "bidi Stream, stored type" in echo:
        echo[r[0]] = echo["bidi Stream, stored type"]
label = " (ghz: client-bound)" if client == "ghz" else ""
print(f"| scenario | server{label} | msgs/s | p50 ms | p99 ms | p999 ms | server CPU s | CPU µs/msg | writer CPU µs/msg | writer busy | peak RSS MiB | errors | vs echo msgs/s | vs echo p99 | vs echo CPU/msg |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    e = echo.get(r[0])
    ratio = f"{r[2] / e[2]:.2f}" if e and e[2] else "-"
    p99 = f"{r[4] / e[4]:.2f}x" if e and e[4] else "-"
    cpu = f"{r[8] / e[8]:.1f}x" if e and e[8] else "-"
    if r[1] == "echo":
        ratio, p99, cpu = "(ceiling)", "", ""
    p999 = f"{r[9]:.2f}" if client != "ghz" else "-"
    writer = f"{r[10]:.2f} | {r[11]:.2f}" if r[10] else "- | -"
    print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} | {p999} | {r[5]:.1f} | {r[8]:.2f} | {writer} | {r[6]:.0f} | {r[7]:.0f} | {ratio} | {p99} | {cpu} |")
PY
)
header=$(results_header "")
cmd="CLIENT=$CLIENT ROUNDS=$ROUNDS TRANSPORT=$TRANSPORT DURATION=$DURATION UNARY_CONCURRENCY=$UNARY_CONCURRENCY CONNECTIONS=$CONNECTIONS STREAMS=$STREAMS STREAM_MESSAGES=$STREAM_MESSAGES benches/load.sh"
cmd="OPEN_STREAMS=$OPEN_STREAMS $cmd"
[ -n "$BASELINE_BIN" ] && cmd="BASELINE_BIN=<the baseline build> $cmd"
[ "${METRICS:-0}" = 1 ] && cmd="METRICS=1 $cmd"
[ "${OUTPUTS:-0}" = 1 ] && cmd="OUTPUTS=1 $cmd"
printf '%s\n\n`%s`\n\n%s\n\nOpen streams held at once:\n%s' "$header" "$cmd" "$table" "$streams_note"
[ "$APPEND" = 0 ] ||
  printf '\n%s\n\n`%s`\n\n%s\n\nOpen streams held at once:\n%s' "$header" "$cmd" "$table" "$streams_note" >> benches/RESULTS.md
