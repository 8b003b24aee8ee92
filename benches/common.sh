# Shared by benches/load.sh, benches/backends.sh and benches/tls_cost.sh (sourced after
# `cd` to the repository root and with $work set to a scratch directory).
#
# fleet-events' client port serves TLS by default and every call needs a credential. On first
# start the server writes into its --data-dir: ca.pem (the CA clients pin), server.pem and
# server.key (for localhost, 127.0.0.1, ::1) and admin.token (a bearer token, role admin).
# The benchmarks start each server on a fresh data directory, then read the CA and the token
# from it. ghz takes them as `--cacert DATA/ca.pem --metadata '{"authorization":"Bearer T"}'`
# (ghz's own `--insecure` means plaintext, used only against a server started with
# `[server] insecure_plaintext = true`, which still wants the token).
#
# Clients may not send the built-in KLSRV_* types (PERMISSION_DENIED), so the load uses
# application types: BENCH_APP_EVENT is unknown to the catalog and stored (unknown types are
# stored with Info retention); BENCH_APP_NOT_STORED is registered by `register_not_stored`
# with do_not_store.
# shellcheck shell=bash

bench_build() { # -> sets fleet, echo_bin, open_streams_bin, load_client_bin; ghz on PATH. BUILD=0: use the
  # binaries already in target/release as they are. Needs $work.
  export PATH="$(go env GOPATH)/bin:$PATH"
  command -v ghz >/dev/null || go install github.com/bojand/ghz/cmd/ghz@latest
  [ "${BUILD:-1}" = 0 ] ||
    cargo build --release --locked --bin fleet-events --example echo_server --example open_streams \
      --example load_client
  # Copies, so that a build running alongside cannot swap a binary in the middle of a run.
  mkdir -p "$work/bin"
  cp "$root/target/release/fleet-events" "$root/target/release/examples/echo_server" \
    "$root/target/release/examples/open_streams" "$root/target/release/examples/load_client" \
    "$work/bin/"
  fleet="$work/bin/fleet-events"
  echo_bin="$work/bin/echo_server"
  open_streams_bin="$work/bin/open_streams"
  load_client_bin="$work/bin/load_client"
}

# The event payloads (ghz templates: a new UUID per message, so every event id is unique).
bench_event() { # EVENT_TYPE -> JSON
  printf '{"event_id":"{{newUUID}}","device_id":"dev-{{randomInt 0 5000}}","event_type":"%s","application":"mdm-push","params":{"code":"503","endpoint":"fcm.googleapis.com/v1/projects/fleet/messages:send"}}' "$1"
}
STORED_TYPE=BENCH_APP_EVENT
NOT_STORED_TYPE=BENCH_APP_NOT_STORED

wait_ready() { # READY_FILE NAME [FILE_THAT_MUST_EXIST] -> sets addr
  for _ in $(seq 400); do
    [ -s "$1" ] && { [ -z "${3:-}" ] || [ -s "$3" ]; } && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  [ -s "$1" ] || {
    echo "server $2 did not start" >&2
    tail -n 20 "$work/server.log" >&2 2>/dev/null
    exit 1
  }
  addr=$(cat "$1")
}

# start_fleet tls|plain DATA_DIR CONFIG_FILE [serve flags...]: fleet-events on a fresh data
# directory with the given config (without a [server] section: plain adds
# `insecure_plaintext = true` there). Sets pid, addr and ghz_conn (the transport and
# credential flags for ghz).
start_fleet() {
  local mode=$1 data=$2 config=$3 ready="$work/ready" run_config="$work/run-config.toml"
  shift 3
  rm -f "$ready"
  rm -rf "$data"
  cp "$config" "$run_config"
  case "$mode" in
    tls) ;;
    plain) printf '\n[server]\ninsecure_plaintext = true\n' >> "$run_config" ;;
    *) echo "start_fleet: mode $mode is not tls or plain" >&2; exit 1 ;;
  esac
  "$fleet" serve --listen 127.0.0.1:0 --data-dir "$data" --config "$run_config" \
    --ready-file "$ready" --log warn "$@" 2>>"$work/server.log" &
  pid=$!
  wait_ready "$ready" fleet-events "$data/admin.token"
  local token
  token=$(tr -d '[:space:]' < "$data/admin.token")
  if [ "$mode" = tls ]; then ghz_conn=(--cacert "$data/ca.pem"); else ghz_conn=(--insecure); fi
  ghz_conn+=(--metadata "{\"authorization\":\"Bearer $token\"}")
  # The same credentials for benches/load_client.rs.
  if [ "$mode" = tls ]; then fast_conn=(--ca "$data/ca.pem"); else fast_conn=(--plaintext); fi
  fast_conn+=(--token "$token")
}

# start_echo tls|plain: the bare tonic echo server; with tls it serves the certificate of a
# fleet-events data directory made once ($work/echo-certs), so the handshake and the record
# encryption are the same as fleet-events'. The token is sent too (the echo ignores it), so
# the bytes on the wire match. Sets pid, addr, ghz_conn, fast_conn.
start_echo() {
  local mode=$1 certs="$work/echo-certs" ready="$work/ready"
  if [ ! -s "$certs/admin.token" ]; then
    printf '' > "$work/echo-certs.toml"
    start_fleet tls "$certs" "$work/echo-certs.toml"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  fi
  rm -f "$ready"
  if [ "$mode" = tls ]; then
    "$echo_bin" 127.0.0.1:0 "$ready" "$certs/server.pem" "$certs/server.key" 2>>"$work/server.log" &
  else
    "$echo_bin" 127.0.0.1:0 "$ready" 2>>"$work/server.log" &
  fi
  pid=$!
  wait_ready "$ready" echo
  if [ "$mode" = tls ]; then ghz_conn=(--cacert "$certs/ca.pem"); else ghz_conn=(--insecure); fi
  ghz_conn+=(--metadata "{\"authorization\":\"Bearer $(tr -d '[:space:]' < "$certs/admin.token")\"}")
  if [ "$mode" = tls ]; then fast_conn=(--ca "$certs/ca.pem"); else fast_conn=(--plaintext); fi
  fast_conn+=(--token "$(tr -d '[:space:]' < "$certs/admin.token")")
}

# Registers BENCH_APP_NOT_STORED (classified and answered, never stored) on the running
# fleet-events, as the admin.
register_not_stored() {
  ghz "${ghz_conn[@]}" --call fleetevents.v1.CatalogService/RegisterEventType -n 1 -c 1 \
    -d "{\"event_type\":\"$NOT_STORED_TYPE\",\"severity\":\"SEVERITY_INFO\",\"application\":\"bench\",\"do_not_store\":true}" \
    -O json -o "$work/register.json" "$addr"
  python3 - "$work/register.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if r["statusCodeDistribution"].get("OK") != 1:
    sys.exit(f"RegisterEventType failed: {r['statusCodeDistribution']} {[d.get('error') for d in r.get('details') or []]}")
PY
}

ghz_once() { # CALL JSON: one unary call with the admin token, which must succeed
  ghz "${ghz_conn[@]}" --call "$1" -n 1 -c 1 -d "$2" -O json -o "$work/once.json" "$addr"
  python3 - "$work/once.json" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if r["statusCodeDistribution"].get("OK") != 1:
    sys.exit(f"{sys.argv[2]} failed: {r['statusCodeDistribution']} {[d.get('error') for d in r.get('details') or []]}")
PY
}

# Every output on: a webhook channel to a local receiver that answers 200, a notification
# rule on both bench types (at most 10 000 messages a minute; what is over it is held back and
# summed up in digests), and a SIEM destination (RFC 5424 over TCP to a local receiver that
# discards). Needs $hook_url and $siem_port.
enable_outputs() {
  ghz_once fleetevents.v1.NotificationService/PutChannel \
    "{\"name\":\"bench-hook\",\"webhook\":{\"url\":\"$hook_url\"}}"
  ghz_once fleetevents.v1.CatalogService/RegisterEventType \
    "{\"event_type\":\"$STORED_TYPE\",\"severity\":\"SEVERITY_INFO\",\"application\":\"bench\"}"
  local t
  for t in "$STORED_TYPE" "$NOT_STORED_TYPE"; do
    ghz_once fleetevents.v1.CatalogService/UpdateEventTypeSettings \
      "{\"event_type\":\"$t\",\"notify\":true,\"notification\":{\"channels\":[\"bench-hook\"],\"max_messages\":10000,\"period_secs\":60}}"
  done
  ghz_once fleetevents.v1.SiemService/PutDestination \
    "{\"name\":\"bench-siem\",\"host\":\"127.0.0.1\",\"port\":$siem_port,\"transport\":\"SYSLOG_TRANSPORT_TCP\",\"format\":\"SIEM_FORMAT_RFC5424\"}"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; } # utime+stime of the server so far

stop_server() {
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
}

results_header() { # TITLE -> the "## ..." line: date, revision, cores
  echo "## $1$(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores"
}
