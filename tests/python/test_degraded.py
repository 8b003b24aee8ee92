"""Degraded, not down: a full data volume and an exhausted descriptor table.

README "Degraded, not down": the server starts on a full data volume; queries, subscriptions and
live-only types work; stored events get RESOURCE_EXHAUSTED; the health of
`fleetevents.v1.EventService` is NOT_SERVING (the overall health "" stays SERVING);
KLSRV_NO_SPACE_ON_VOLUMES is delivered to subscribers at once even when it cannot be stored, and
stored (once) at a later check once space allows; the store is probed every 2 s and ingest
resumes by itself when space is freed.

README "Limits": when the process runs out of file descriptors, the accept loop retries every
100 ms (no busy loop; one warning per 10 s) and the pending connections wait in the backlog until
a descriptor is free.

The full-disk tests mount a 40 MiB tmpfs as the data volume (the machine runs the tests as root)
and fill it with a filler file until ENOSPC; they are skipped when mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import queue
import resource
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import CHANNEL_OPTIONS, FleetServer
from fleet_helpers import RPC_TIMEOUT, event, query_all
from fleetevents.v1 import fleetevents_pb2 as pb
from fleetevents.v1 import fleetevents_pb2_grpc as pb_grpc

SERVER_ID = "py-degraded-srv"
NO_SPACE = "KLSRV_NO_SPACE_ON_VOLUMES"
EVENT_SERVICE = "fleetevents.v1.EventService"

# Only the explicit CheckCapacity calls (and the one at start-up) run capacity checks.
DEGRADED_CONFIG = f"""\
[server]
server_id = "{SERVER_ID}"

[flood]
threshold = 100000
window = "60s"
block = "3600s"

[store]
max_events = 400000
durability = "normal"

[capacity]
check_interval = "3600s"
volume_min_free_percent = 10
"""

STORED_TYPE = "PY_DEGRADED_STORED"
LIVE_TYPE = "PY_DEGRADED_LIVE"
DEVICE = "py-degraded-dev"
N_STORED = 5

VOLUME_SIZE = "40m"
FILLER = "filler.bin"

# The store is probed every 2 s (STORE_PROBE_EVERY): recovery must be seen well within this.
HEALTH_DEADLINE = 15.0
LIVE_DEADLINE = 10.0


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Subscriber:
    """Reads one Subscribe call in a thread into a queue."""

    def __init__(self, srv: FleetServer, request: pb.SubscribeRequest | None = None):
        self.call = srv.events.Subscribe(request or pb.SubscribeRequest())
        self.queue: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for c in self.call:
                self.queue.put(c)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e
        finally:
            self.queue.put(None)

    def get(self, timeout: float) -> pb.Classification:
        item = self.queue.get(timeout=timeout)
        if item is None:
            raise AssertionError(f"subscription ended: {self.error}")
        return item

    def wait_for(self, pred, deadline_secs: float, what: str) -> tuple[pb.Classification, list]:
        """Reads until an event matches `pred`; returns it and everything read before it."""
        seen = []
        deadline = time.monotonic() + deadline_secs
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"subscriber did not receive {what} within {deadline_secs:.0f} s; got "
                    f"{[(c.event_type, c.event_id) for c in seen]}"
                )
            try:
                c = self.get(timeout=left)
            except queue.Empty:
                continue
            if pred(c):
                return c, seen
            seen.append(c)

    def close(self):
        self.call.cancel()
        self.thread.join(timeout=10)


def register_types(srv: FleetServer) -> None:
    stored = srv.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(
            event_type=STORED_TYPE, severity=pb.SEVERITY_WARNING, display_name="Degraded stored",
            application="pytest",
        ),
        timeout=RPC_TIMEOUT,
    )
    assert stored.store is True
    live = srv.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(
            event_type=LIVE_TYPE, severity=pb.SEVERITY_WARNING, display_name="Degraded live only",
            do_not_store=True, application="pytest",
        ),
        timeout=RPC_TIMEOUT,
    )
    assert live.store is False


def store_some(srv: FleetServer) -> list[str]:
    ids = [f"degraded-stored-{i}" for i in range(N_STORED)]
    for eid in ids:
        c = srv.events.Classify(event(DEVICE, STORED_TYPE, event_id=eid), timeout=RPC_TIMEOUT)
        assert c.stored is True and c.blocked is False, eid
    return ids


def live_event(srv: FleetServer, tag: str) -> pb.Classification:
    """Sends one live-only event with a fresh event id; it must be accepted, not stored."""
    eid = f"{tag}-{uuid.uuid4().hex[:12]}"
    c = srv.events.Classify(event(DEVICE, LIVE_TYPE, event_id=eid), timeout=RPC_TIMEOUT)
    assert c.event_id == eid
    assert c.stored is False and c.blocked is False, c
    return c


def subscribe_live(srv: FleetServer) -> Subscriber:
    """Opens a Subscribe (all severities, types, devices) and returns once it is live: live-only
    probe events are sent until one arrives."""
    sub = Subscriber(srv)
    deadline = time.monotonic() + LIVE_DEADLINE
    while True:
        probe = live_event(srv, "probe")
        try:
            sub.wait_for(lambda c, eid=probe.event_id: c.event_id == eid, 0.5, "a probe")
            return sub
        except AssertionError:
            if sub.error is not None or time.monotonic() >= deadline:
                sub.close()
                raise


def capacity(srv: FleetServer) -> pb.CapacityStatus:
    return pb_grpc.CapacityServiceStub(srv.channel).CheckCapacity(
        pb.CheckCapacityRequest(), timeout=RPC_TIMEOUT
    )


def health_status(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
    ).status


def wait_health(srv: FleetServer, service: str, want: int, deadline_secs: float) -> float:
    """Polls the health of `service` until it is `want`; returns the seconds it took."""
    start = time.monotonic()
    last = None
    while True:
        last = health_status(srv.channel, service)
        if last == want:
            return time.monotonic() - start
        if time.monotonic() - start >= deadline_secs:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name
            raise AssertionError(
                f"health of {service!r} stayed {name(last)} for {deadline_secs:.0f} s "
                f"(want {name(want)})\nstderr:\n{srv.stderr_text(6000)}"
            )
        time.sleep(0.2)


def fill_volume(path: Path) -> int:
    """Writes `path` until the volume says ENOSPC; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            buf = b"\xa5" * size
            while True:
                try:
                    n = os.write(fd, buf)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        break
                    raise
                written += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def no_space_stored(srv: FleetServer) -> list[pb.Classification]:
    return query_all(srv.events, event_type=NO_SPACE, page_size=100)


@pytest.fixture
def small_volume(tmp_path):
    """A 40 MiB tmpfs mounted for the test, unmounted at the end."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs data volume needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_SIZE}", "tmpfs", str(mnt)],
        capture_output=True, text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs data volume here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, text=True)


@pytest.fixture
def degraded_server(tmp_path, small_volume):
    """One server whose data dir lives on the small volume; stopped (at the latest) before the
    volume is unmounted."""
    srv = FleetServer(tmp_path / "srv", config_text=DEGRADED_CONFIG,
                      data_dir=small_volume / "data")
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv._kill_quietly()
        filler = small_volume / FILLER
        if filler.exists():
            filler.unlink()


def assert_volume_full(mnt: Path) -> None:
    st = os.statvfs(mnt)
    assert st.f_bavail * st.f_frsize < 64 * 1024, (
        f"the volume still has {st.f_bavail * st.f_frsize} bytes free after filling"
    )


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------


def test_full_disk_degrades_not_down_and_recovers(degraded_server, small_volume):
    """A server runs on a small volume with a console subscribed to every event. The volume
    fills up. A capacity check delivers KLSRV_NO_SPACE_ON_VOLUMES to the console at once, though
    it cannot be stored; stored types are refused with RESOURCE_EXHAUSTED while queries and
    live-only types go on, and the EventService health is NOT_SERVING ("" stays SERVING). When
    the filler is deleted, the health is SERVING again by itself, stored events are accepted,
    and the next check stores the deferred KLSRV_NO_SPACE_ON_VOLUMES exactly once (without
    delivering it to subscribers a second time)."""
    srv = degraded_server
    srv.start()
    register_types(srv)
    stored_ids = store_some(srv)
    first = capacity(srv)
    assert first.volume_low is False, first
    assert list(first.raised) == []

    sub = subscribe_live(srv)
    try:
        fill_volume(small_volume / FILLER)
        assert_volume_full(small_volume)

        # The check finds the volume low and delivers the onset live, though it cannot store it.
        status = capacity(srv)
        assert status.volume_low is True, status
        assert [c.event_type for c in status.raised] == [NO_SPACE], status
        got, _ = sub.wait_for(lambda c: c.event_type == NO_SPACE, LIVE_DEADLINE, NO_SPACE)
        assert got.event_id == status.raised[0].event_id
        assert got.device_id == SERVER_ID
        assert got.origin == pb.ORIGIN_SERVER
        assert got.params.get("min_free_percent") == "10", got
        assert no_space_stored(srv) == [], "stored although the volume is full"
        # `stored` says "written to the event store": checked at the end, so that the rest of
        # the behaviour is checked whatever this flag says.
        raised_live = status.raised[0]

        # Queries go on.
        assert sorted(c.event_id for c in query_all(srv.events, device_id=DEVICE)) == stored_ids

        # Stored types are refused with RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as ei:
            srv.events.Classify(event(DEVICE, STORED_TYPE, event_id="degraded-while-full"),
                                timeout=RPC_TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (
            f"{ei.value.code()} {ei.value.details()}\nstderr:\n{srv.stderr_text(6000)}"
        )

        # Live-only types are classified and delivered.
        live = live_event(srv, "while-full")
        sub.wait_for(lambda c: c.event_id == live.event_id, LIVE_DEADLINE, "the live-only event")

        # The event path is NOT_SERVING; the server as a whole is SERVING.
        wait_health(srv, EVENT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING,
                    HEALTH_DEADLINE)
        assert health_status(srv.channel, "") == health_pb2.HealthCheckResponse.SERVING
        # Once per onset: a second check while still low raises nothing.
        again = capacity(srv)
        assert again.volume_low is True and list(again.raised) == [], again

        # Space is freed: ingest resumes by itself.
        (small_volume / FILLER).unlink()
        took = wait_health(srv, EVENT_SERVICE, health_pb2.HealthCheckResponse.SERVING,
                           HEALTH_DEADLINE)
        assert health_status(srv.channel, "") == health_pb2.HealthCheckResponse.SERVING
        c = srv.events.Classify(event(DEVICE, STORED_TYPE, event_id="degraded-after-free"),
                                timeout=RPC_TIMEOUT)
        assert c.stored is True, c

        # The next check stores the deferred onset, once.
        after = capacity(srv)
        assert after.volume_low is False, after
        assert list(after.raised) == [], after
        stored = no_space_stored(srv)
        assert len(stored) == 1, (
            f"want the deferred {NO_SPACE} stored once after space was freed, found "
            f"{len(stored)} (EventService SERVING again after {took:.1f} s)\n"
            f"stderr:\n{srv.stderr_text(6000)}"
        )
        assert stored[0].event_id == got.event_id
        assert stored[0].device_id == SERVER_ID
        assert stored[0].stored is True
        capacity(srv)
        assert len(no_space_stored(srv)) == 1

        # Storing it later does not deliver it to subscribers a second time.
        sentinel = live_event(srv, "sentinel")
        _, before = sub.wait_for(lambda c: c.event_id == sentinel.event_id, LIVE_DEADLINE,
                                 "the sentinel")
        repeats = [c for c in before if c.event_type == NO_SPACE]
        assert repeats == [], f"{NO_SPACE} delivered again when stored late: {repeats}"
    finally:
        sub.close()
    srv.stop_and_check()

    # The Classification of an event that could not be written must not say it was stored.
    claims = [
        f"{where} said stored=true"
        for where, c in (("the CheckCapacity answer", raised_live), ("the subscriber", got))
        if c.stored
    ]
    assert not claims, (
        f"the {NO_SPACE} raised on a full volume was not written (it was stored only after "
        f"space was freed), but " + " and ".join(claims)
    )


def test_starts_on_full_volume(degraded_server, small_volume):
    """A server that ran on a small volume is stopped, the volume is filled to the last byte,
    and the server is started again. It starts (ready file, health "" SERVING), answers queries
    and subscriptions and accepts live-only events; stored events get RESOURCE_EXHAUSTED and the
    EventService health is NOT_SERVING. The onset found by the start-up check is not raised a
    second time by the next check. Once space is freed, the EventService is SERVING again by
    itself, stored events are accepted, and the next check stores the start-up's
    KLSRV_NO_SPACE_ON_VOLUMES exactly once."""
    srv = degraded_server
    srv.start()
    register_types(srv)
    stored_ids = store_some(srv)
    srv.stop_and_check()

    fill_volume(small_volume / FILLER)
    assert_volume_full(small_volume)

    srv.start()  # fails the test (with the server's stderr) when it cannot start
    assert health_status(srv.channel, "") == health_pb2.HealthCheckResponse.SERVING

    # Queries and subscriptions work; live-only events are delivered.
    assert sorted(c.event_id for c in query_all(srv.events, device_id=DEVICE)) == stored_ids
    sub = subscribe_live(srv)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            srv.events.Classify(event(DEVICE, STORED_TYPE, event_id="full-start-stored"),
                                timeout=RPC_TIMEOUT)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (
            f"{ei.value.code()} {ei.value.details()}\nstderr:\n{srv.stderr_text(6000)}"
        )
        live = live_event(srv, "full-start-live")
        sub.wait_for(lambda c: c.event_id == live.event_id, LIVE_DEADLINE, "the live-only event")

        wait_health(srv, EVENT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING,
                    HEALTH_DEADLINE)
        assert health_status(srv.channel, "") == health_pb2.HealthCheckResponse.SERVING

        # The start-up check found the volume low and raised the onset then: not again now.
        status = capacity(srv)
        assert status.volume_low is True, status
        assert list(status.raised) == [], (
            f"{NO_SPACE} raised again by the first check after start-up: {status.raised}"
        )
        assert no_space_stored(srv) == []

        (small_volume / FILLER).unlink()
        wait_health(srv, EVENT_SERVICE, health_pb2.HealthCheckResponse.SERVING, HEALTH_DEADLINE)
        c = srv.events.Classify(event(DEVICE, STORED_TYPE, event_id="full-start-after-free"),
                                timeout=RPC_TIMEOUT)
        assert c.stored is True, c

        after = capacity(srv)
        assert after.volume_low is False, after
        stored = no_space_stored(srv)
        assert len(stored) == 1, (
            f"want the {NO_SPACE} of the start-up check stored once after space was freed, "
            f"found {len(stored)}\nstderr:\n{srv.stderr_text(6000)}"
        )
        assert stored[0].device_id == SERVER_ID
        assert stored[0].params.get("min_free_percent") == "10", stored[0]
    finally:
        sub.close()
    srv.stop_and_check()


# --------------------------------------------------------------------------------------------
# The accept loop at the descriptor limit
# --------------------------------------------------------------------------------------------

# Handshakes and first requests must not time out while the test holds connections idle.
FD_CONFIG = """\
[server]
handshake_timeout = "60s"
first_request_timeout = "60s"

[flood]
threshold = 100000
window = "60s"
block = "3600s"
"""

ACCEPT_FAILED = "accepting a connection failed"
FD_HEADROOM = 6
EXTRA_CONNECTIONS = 40
CPU_WINDOW = 2.0
MAX_CPU_SECS = 0.3
RECOVER_DEADLINE = 10.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]


def test_accept_loop_at_descriptor_limit_does_not_spin(server_factory):
    """The server's descriptor limit is lowered to a few above what it holds, and plain TCP
    clients connect until it cannot accept any more (the rest wait in the backlog). While at
    the limit, the server uses almost no CPU (no busy accept loop) and logs the failure at most
    once per 10 s. Once the clients go away, a new gRPC client connects and is answered."""
    srv = server_factory(FD_CONFIG, name="fdlimit")
    srv.start()
    pid = srv.proc.pid
    host, port = srv.address.rsplit(":", 1)

    fds = open_fds(pid)
    limit = max(fds) + 1 + FD_HEADROOM
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))

    socks: list[socket.socket] = []
    try:
        for _ in range(EXTRA_CONNECTIONS):
            socks.append(socket.create_connection((host, int(port)), timeout=5))

        # The server reaches its limit and says so.
        deadline = time.monotonic() + 10.0
        while ACCEPT_FAILED not in srv.stderr_text(200000):
            assert time.monotonic() < deadline, (
                f"no '{ACCEPT_FAILED}' in the server's stderr with {EXTRA_CONNECTIONS} "
                f"connections against a limit of {limit} descriptors ({len(open_fds(pid))} "
                f"open)\nstderr:\n{srv.stderr_text(4000)}"
            )
            time.sleep(0.1)
        at_limit = len(open_fds(pid))

        # No busy loop while it cannot accept.
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(CPU_WINDOW)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        used = cpu1 - cpu0
        assert used < MAX_CPU_SECS, (
            f"the server used {used:.2f} s of CPU in {t1 - t0:.1f} s while at its descriptor "
            f"limit ({at_limit} open, limit {limit}): a busy accept loop"
        )
    finally:
        for s in socks:
            s.close()

    # A new client (its own connection, not the admin channel's) is served once descriptors
    # are free again.
    options = CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
    ch = grpc.secure_channel(
        srv.address,
        grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=srv.ca_pem),
            grpc.access_token_call_credentials(srv.admin_token),
        ),
        options=options,
    )
    try:
        start = time.monotonic()
        last_err = None
        while True:
            left = RECOVER_DEADLINE - (time.monotonic() - start)
            if left <= 0:
                raise AssertionError(
                    f"no gRPC call succeeded within {RECOVER_DEADLINE:.0f} s after the extra "
                    f"connections closed: {last_err}\nstderr:\n{srv.stderr_text(4000)}"
                )
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=min(left, 3.0),
                    wait_for_ready=True,
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                break
            except grpc.RpcError as e:
                last_err = f"{e.code()} {e.details()}"
        # And a real call of the API on it.
        pb_grpc.CatalogServiceStub(ch).ListEventTypes(
            pb.ListEventTypesRequest(page_size=1), timeout=RPC_TIMEOUT
        )
    finally:
        ch.close()

    lines = [ln for ln in srv.stderr_text(2_000_000).splitlines() if ACCEPT_FAILED in ln]
    assert 1 <= len(lines) <= 3, (
        f"{len(lines)} '{ACCEPT_FAILED}' lines (want at most one per 10 s):\n"
        + "\n".join(lines[:10])
    )
