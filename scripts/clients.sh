#!/usr/bin/env bash
# Real-client tests in other languages against the release binary: grpc-js (tests/node, node's
# built-in test runner) and grpc-go (tests/go, go test). Backpressure under a store stall (issue
# 10, item 3) and answers before an error status with compression (item 4). The grpcio variant
# of the backpressure test (tests/python/test_backpressure.py) runs with the Python suite.
# `examples` builds the four client examples of clients/ (Go, Node, Java, Python), runs each
# against one real server and checks every line they print (issue 13, item 6).
#
#   scripts/clients.sh            # node and go
#   scripts/clients.sh go         # only the languages named (node, go, python)
#   scripts/clients.sh examples   # the four examples (or go-example, node-example,
#                                 # java-example, python-example)
#
# FLEET_EVENTS_BIN selects the server binary (default target/release/fleet-events). Needs node
# and npm, Go, and python3 with sqlite3 (the tests hold the store's write lock through it).
# Installs the npm packages from tests/node/package-lock.json (npm ci, only when the lockfile
# changed) and the Go modules of tests/go/go.sum. Idempotent; every test stops its servers.
# The examples also need Java 17+ with Maven, and install when missing: protoc-gen-go and
# protoc-gen-go-grpc (go install), buf (npm, into target/tools as scripts/test.sh does, unless
# buf 1.75.0 is on PATH), the Maven artifacts (~/.m2), the npm packages of clients/node and a
# venv at target/clients-pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

export FLEET_EVENTS_BIN=${FLEET_EVENTS_BIN:-$root/target/release/fleet-events}
case "$FLEET_EVENTS_BIN" in /*) ;; *) FLEET_EVENTS_BIN="$root/$FLEET_EVENTS_BIN" ;; esac
if [ ! -x "$FLEET_EVENTS_BIN" ]; then
  echo "server binary $FLEET_EVENTS_BIN missing (cargo build --release, or set FLEET_EVENTS_BIN)" >&2
  exit 1
fi

langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(node go)
examples=()

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is needed by scripts/clients.sh" >&2; exit 1; }
  done
}
need python3

for lang in "${langs[@]}"; do
  case "$lang" in
    node)
      need node npm
      step "grpc-js client tests (node $(node --version))"
      stamp=tests/node/node_modules/.lock-sha256
      want=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
      if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
        echo "$want" >"$stamp"
      fi
      node --test --test-concurrency=1 tests/node/*.test.js
      ;;
    go)
      need go
      step "grpc-go client tests ($(go env GOVERSION))"
      (cd tests/go && go test -count=1 -v ./...)
      ;;
    examples)
      examples+=(go node java python)
      ;;
    go-example | node-example | java-example | python-example)
      examples+=("${lang%-example}")
      ;;
    python)
      venv="$root/target/pyenv"
      py="$venv/bin/python"
      [ -x "$py" ] || py=python3
      step "grpcio backpressure test"
      "$py" -m pytest -q tests/python/test_backpressure.py
      ;;
    *)
      echo "unknown language $lang (node, go, python, examples, go-example, node-example," \
        "java-example, python-example)" >&2
      exit 2
      ;;
  esac
done

# ---------------------------------------------------------------------------------------------
# The client examples: generate and build each one, start one server, run each against it and
# check what it printed, stop the server (SIGTERM, exit code 0).
# ---------------------------------------------------------------------------------------------

GO_PLUGIN_VERSION=v1.36.12      # google.golang.org/protobuf/cmd/protoc-gen-go
GO_GRPC_PLUGIN_VERSION=v1.6.2   # google.golang.org/grpc/cmd/protoc-gen-go-grpc
BUF_VERSION=1.75.0

# The lines every example must print, in this order, and nothing else on stdout.
EXAMPLE_LINES=(
  '^connect server=127\.0\.0\.1:[0-9]+ kind=token name=[^ ]+ role=ROLE_ADMIN$'
  '^register event_type=EXAMPLE_DISK_CLONED result=(created|exists)$'
  '^classify event_id=classify-1 outcome=OUTCOME_STORED severity=SEVERITY_WARNING display_name="Disk cloned \(example\)"$'
  '^stream sent=5 received=5 in_order=true stored=5$'
  '^duplicate event_id=stream-1 outcome=OUTCOME_DUPLICATE$'
  '^subscribe event_id=live-1 received=true$'
  '^query page_size=2 pages=4 count=7$'
  '^invalid code=INVALID_ARGUMENT field=device_id reason=INVALID_FIELD domain=fleet-events$'
  '^done$'
)

example_build() { # lang
  case "$1" in
    go)
      need go npm
      local gobin
      gobin="$(go env GOPATH)/bin"
      export PATH="$gobin:$PATH"
      if [ "$(protoc-gen-go --version 2>/dev/null)" != "protoc-gen-go $GO_PLUGIN_VERSION" ]; then
        go install "google.golang.org/protobuf/cmd/protoc-gen-go@$GO_PLUGIN_VERSION"
      fi
      if [ "$(protoc-gen-go-grpc --version 2>/dev/null)" != "protoc-gen-go-grpc ${GO_GRPC_PLUGIN_VERSION#v}" ]; then
        go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$GO_GRPC_PLUGIN_VERSION"
      fi
      # buf: the one on PATH when it is this version, else the one scripts/test.sh installs from
      # npm into target/tools (a 33 MB download in seconds, where `go install` compiles for
      # minutes), installed here the same way when missing.
      buf=buf
      if [ "$(buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
        buf="$root/target/tools/node_modules/.bin/buf"
        if [ "$("$buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
          npm install --prefix "$root/target/tools" --no-audit --no-fund --loglevel=error \
            "@bufbuild/buf@$BUF_VERSION" >/dev/null
        fi
      fi
      (cd clients/go && "$buf" generate ../../proto --template buf.gen.yaml &&
        go build -o "$work/example-go" .)
      ;;
    node)
      need node npm
      local stamp=clients/node/node_modules/.lock-sha256 want
      want=$(sha256sum clients/node/package-lock.json | cut -d' ' -f1)
      if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        (cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
        echo "$want" >"$stamp"
      fi
      ;;
    java)
      need java mvn
      # Stubs are generated by the build (protoc runs again only when the .proto changed).
      # Debian's Maven 3.8 writes colour resets (ESC[0m) even with -q -B: taken out.
      mvn -q -B -f clients/java/pom.xml compile 2>&1 | sed 's/\x1b\[[0-9;]*m//g'
      ;;
    python)
      local venv="$root/target/clients-pyenv" want pip
      # python3's own pip installs into the venv (--python): a venv without a pip of its own is
      # made in a second, where ensurepip takes several.
      pip=(python3 -m pip --python "$venv/bin/python")
      if ! python3 -m pip --help 2>/dev/null | grep -- "--python <python>" >/dev/null; then
        pip=("$venv/bin/python" -m pip)
      fi
      if [ ! -x "$venv/bin/python" ]; then
        if [ "${pip[0]}" = python3 ]; then python3 -m venv --without-pip "$venv"; else python3 -m venv "$venv"; fi
      fi
      want=$(sha256sum clients/python/requirements.txt | cut -d' ' -f1)
      if [ "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$want" ]; then
        "${pip[@]}" install --quiet --disable-pip-version-check -r clients/python/requirements.txt
        echo "$want" >"$venv/.requirements-sha256"
      fi
      rm -rf clients/python/gen && mkdir clients/python/gen
      "$venv/bin/python" -m grpc_tools.protoc -I proto --python_out=clients/python/gen \
        --pyi_out=clients/python/gen --grpc_python_out=clients/python/gen \
        fleetevents/v1/fleetevents.proto
      ;;
  esac
}

example_run() { # lang: runs the example with FLEET_EVENTS_SERVER/CA/TOKEN set
  case "$1" in
    go) "$work/example-go" ;;
    node) node clients/node/example.js ;;
    java) mvn -q -B -f clients/java/pom.xml exec:java ;;
    python) "$root/target/clients-pyenv/bin/python" clients/python/example.py ;;
  esac
}

# Checks one example's stdout against EXAMPLE_LINES; prints what differs.
example_check() { # file
  local i=0 line ok=1
  mapfile -t got <"$1"
  if [ ${#got[@]} -ne ${#EXAMPLE_LINES[@]} ]; then
    echo "  printed ${#got[@]} lines, want ${#EXAMPLE_LINES[@]}"
    ok=0
  fi
  for i in "${!EXAMPLE_LINES[@]}"; do
    line=${got[$i]:-<none>}
    if ! [[ "$line" =~ ${EXAMPLE_LINES[$i]} ]]; then
      echo "  line $((i + 1)): '$line' does not match /${EXAMPLE_LINES[$i]}/"
      ok=0
    fi
  done
  [ $ok = 1 ]
}

server_pid=""
stop_server() { # SIGTERM, then the exit code must be 0 within 15 s
  [ -n "$server_pid" ] || return 0
  local pid=$server_pid rc=0 deadline=$((SECONDS + 15))
  server_pid=""
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "the server did not exit within 15 s of SIGTERM" >&2
    return 1
  fi
  wait "$pid" || rc=$?
  if [ $rc -ne 0 ]; then
    echo "the server exited with code $rc after SIGTERM (want 0); its log:" >&2
    tail -n 40 "$work/server.log" >&2
    return 1
  fi
}

run_examples() {
  local started=$SECONDS lang failed=()
  step "client examples: ${examples[*]} (clients/)"
  work=$(mktemp -d)
  trap 'stop_server || true; rm -rf "$work"' EXIT
  # The builds run side by side (javac and pip overlap well); each one's output is shown after.
  local pids=() build_failed=()
  for lang in "${examples[@]}"; do
    (
      t=$SECONDS
      example_build "$lang"
      echo "built in $((SECONDS - t)) s"
    ) >"$work/build-$lang.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!examples[@]}"; do
    lang=${examples[$i]}
    wait "${pids[$i]}" || build_failed+=("$lang")
    sed "s/^/  $lang build | /" "$work/build-$lang.log"
  done
  if [ ${#build_failed[@]} -gt 0 ]; then
    echo "client examples FAILED to build: ${build_failed[*]}" >&2
    exit 1
  fi

  # One server for all: fresh data dir, free port; FLEET_EVENTS_* of ours would be read as its
  # configuration, so it gets none of them.
  local unset_env=() v
  for v in $(compgen -e); do
    case "$v" in FLEET_EVENTS_*) unset_env+=(-u "$v") ;; esac
  done
  env "${unset_env[@]}" "$FLEET_EVENTS_BIN" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
    --ready-file "$work/ready" </dev/null >"$work/server.log" 2>&1 &
  server_pid=$!
  local deadline=$((SECONDS + 30)) addr=""
  while :; do
    addr=$(cat "$work/ready" 2>/dev/null || true)
    [[ "$addr" =~ ^[^[:space:]]+:[0-9]+$ ]] && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "the server exited before it was ready; its log:" >&2
      cat "$work/server.log" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "the server wrote no address to its ready file within 30 s; its log:" >&2
      cat "$work/server.log" >&2
      exit 1
    fi
    sleep 0.02
  done
  echo "server at $addr (data dir $work/data)"

  for lang in "${examples[@]}"; do
    local t=$SECONDS rc=0
    echo "--- $lang example"
    FLEET_EVENTS_SERVER="$addr" FLEET_EVENTS_CA="$work/data/ca.pem" \
      FLEET_EVENTS_TOKEN="$(cat "$work/data/admin.token")" \
      example_run "$lang" >"$work/$lang.out" 2>"$work/$lang.err" || rc=$?
    # (the ESC[0m of Maven again: not the example's output)
    sed -i 's/\x1b\[[0-9;]*m//g' "$work/$lang.out" "$work/$lang.err"
    sed "s/^/  $lang | /" "$work/$lang.out"
    sed "s/^/  $lang ! /" "$work/$lang.err" >&2
    if [ $rc -ne 0 ]; then
      echo "  the $lang example exited with code $rc"
      failed+=("$lang")
    elif ! example_check "$work/$lang.out"; then
      failed+=("$lang")
    fi
    echo "  ($((SECONDS - t)) s)"
  done

  stop_server
  trap - EXIT
  rm -rf "$work"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "client examples FAILED: ${failed[*]} ($((SECONDS - started)) s)" >&2
    exit 1
  fi
  echo "client examples ok: ${examples[*]} ($((SECONDS - started)) s)"
}

[ ${#examples[@]} -eq 0 ] || run_examples
