"""Backpressure with a real grpcio client (issue 10, item 3): a standard client is never
disconnected when the store stalls.

The test takes the SQLite write lock of the server's store (`BEGIN IMMEDIATE` on
`<data_dir>/events.sqlite3`) and holds it for a few seconds while one Stream call sends 20 000
small events. The server's writer waits for the lock, answers stop, and the client must simply
be slowed down by HTTP/2 flow control: the Stream call ends OK with every answer in order, other
calls on the same connection (health, ListEventTypes) keep succeeding during the stall, and the
connection never leaves READY (a GOAWAY, e.g. ENHANCE_YOUR_CALM for too many DATA frames, would
drop it).

The same scenario runs with grpc-js (tests/node/backpressure.test.js) and grpc-go
(tests/go/backpressure_test.go).
"""

from __future__ import annotations

import sqlite3
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet_helpers import RPC_TIMEOUT, event
from fleetevents.v1 import fleetevents_pb2 as pb
from fleetevents.v1 import fleetevents_pb2_grpc as pb_grpc

# A flood threshold out of the way: 20 000 events from a few devices must all pass.
BACKPRESSURE_CONFIG = """\
[flood]
threshold = 1000000
window = "3600s"
block = "3600s"
"""

DB_FILE = "events.sqlite3"
WARNING_TYPE = "PY_BACKPRESSURE_WARNING"
N_EVENTS = 20_000
DEVICES = [f"py-bp-dev-{i}" for i in range(4)]
# The request iterator takes the store's write lock just before yielding this event, so the
# first events are answered normally and the rest meet the stall.
LOCK_BEFORE_EVENT = 1_000
HOLD_SECS = 4.0
# The answers must pause at least this long while the lock is held (proof of the stall).
MIN_STALL_SECS = 2.0
# Other calls on the same connection: one round every SIDE_PERIOD, each call within
# SIDE_TIMEOUT, never more than SIDE_MAX_GAP between two successes during the stall.
SIDE_PERIOD = 0.1
SIDE_TIMEOUT = 2.0
SIDE_MAX_GAP = 0.2 + 0.3  # the 200 ms cadence the issue asks for, plus scheduling slack
STREAM_TIMEOUT = 120.0
FORBIDDEN = ("enhance_your_calm", "too_many_data_frames", "goaway", "go_away")


@pytest.fixture(scope="module")
def server_config() -> str:
    return BACKPRESSURE_CONFIG


@pytest.fixture(scope="module")
def warning_type(server):
    t = server.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(
            event_type=WARNING_TYPE, severity=pb.SEVERITY_WARNING,
            display_name="Backpressure test warning", application="pytest",
        ),
        timeout=RPC_TIMEOUT,
    )
    assert t.raised_by == pb.RAISED_BY_CLIENTS
    return t.event_type


class _WriteLock:
    """Holds the SQLite write lock of the server's store for `hold` seconds in a thread."""

    def __init__(self, db_path, hold: float):
        self.db_path = str(db_path)
        self.hold = hold
        self.acquired = threading.Event()
        self.acquired_at: float | None = None
        self.released_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sqlite-write-lock", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        con = None
        try:
            # timeout: how long to wait for the server's writer to let go of the lock.
            con = sqlite3.connect(self.db_path, timeout=10.0, isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            self.acquired_at = time.monotonic()
            self.acquired.set()
            time.sleep(self.hold)  # the stall itself
            con.execute("ROLLBACK")
            self.released_at = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.acquired.set()
        finally:
            if con is not None:
                con.close()


class _SideCalls:
    """Health/Check and CatalogService/ListEventTypes on the stream's channel, one round every
    SIDE_PERIOD, until stopped. Records (started, finished, name, ok, detail) per call."""

    def __init__(self, channel: grpc.Channel):
        self.health = health_pb2_grpc.HealthStub(channel)
        self.catalog = pb_grpc.CatalogServiceStub(channel)
        self.calls: list[tuple[float, float, str, bool, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="side-calls", daemon=True)

    def _one(self, name, fn, req, check) -> None:
        t0 = time.monotonic()
        try:
            resp = fn(req, timeout=SIDE_TIMEOUT)
            ok, detail = check(resp)
        except grpc.RpcError as e:
            ok, detail = False, f"{e.code()} {e.details()}"
        self.calls.append((t0, time.monotonic(), name, ok, detail))

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            self._one(
                "Health/Check", self.health.Check, health_pb2.HealthCheckRequest(service=""),
                lambda r: (r.status == health_pb2.HealthCheckResponse.SERVING, str(r.status)),
            )
            self._one(
                "ListEventTypes", self.catalog.ListEventTypes, pb.ListEventTypesRequest(),
                # A non-empty catalog page (the list may be paged: WARNING_TYPE need not be on
                # the first page).
                lambda r: (len(r.event_types) > 0, f"{len(r.event_types)} types"),
            )
            self.stop.wait(max(0.0, SIDE_PERIOD - (time.monotonic() - t0)))

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=SIDE_TIMEOUT * 3)


def test_grpcio_stream_survives_a_store_stall(server, warning_type):
    """grpcio streams 20 000 small events on one Stream call while the store's write lock is
    held for 4 s. The call ends OK with all 20 000 answers in order, the answers really paused
    during the stall, health and ListEventTypes on the same channel answered all along, and
    the connection stayed READY (no GOAWAY)."""
    db_path = server.data_dir / DB_FILE
    assert db_path.is_file(), f"no {DB_FILE} in {server.data_dir}: {list(server.data_dir.iterdir())}"

    channel = server.secure_channel(token=server.admin_token)
    health = health_pb2_grpc.HealthStub(channel)
    first = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT,
                         wait_for_ready=True)
    assert first.status == health_pb2.HealthCheckResponse.SERVING

    # Every connectivity change of the channel from now on (it is READY): a GOAWAY or a
    # dropped connection shows up as IDLE / CONNECTING / TRANSIENT_FAILURE.
    states: list[tuple[float, grpc.ChannelConnectivity]] = []
    def on_state(s: grpc.ChannelConnectivity) -> None:
        states.append((time.monotonic(), s))

    channel.subscribe(on_state, try_to_connect=False)

    sent = [
        event(DEVICES[i % len(DEVICES)], warning_type, event_id=f"py-bp-{i:05d}")
        for i in range(N_EVENTS)
    ]
    lock = _WriteLock(db_path, HOLD_SECS)
    sent_at: list[float] = []

    def requests():
        for i, e in enumerate(sent):
            if i == LOCK_BEFORE_EVENT:
                lock.start()
                lock.acquired.wait(timeout=15.0)
            sent_at.append(time.monotonic())
            yield e

    side = _SideCalls(channel)
    side.start()
    answers: list[pb.Classification] = []
    answer_at: list[float] = []
    error: grpc.RpcError | None = None
    started = time.monotonic()
    try:
        for a in pb_grpc.EventServiceStub(channel).Stream(requests(), timeout=STREAM_TIMEOUT):
            answer_at.append(time.monotonic())
            answers.append(a)
    except grpc.RpcError as e:
        error = e
    ended = time.monotonic()
    side.finish()
    lock.thread.join(timeout=20.0)
    channel.unsubscribe(on_state)

    stderr = server.stderr_text()
    summary = (
        f"stream: {len(answers)} answers in {ended - started:.2f} s, error "
        f"{error.code() if error else None} {error.details() if error else ''}\n"
        f"lock: acquired {(lock.acquired_at or 0) - started:.2f} s, released "
        f"{(lock.released_at or 0) - started:.2f} s after the call started, error {lock.error!r}\n"
        f"side calls: {len(side.calls)}, failed "
        f"{[(round(s - started, 2), n, d) for s, _, n, ok, d in side.calls if not ok][:10]}\n"
        f"channel states: {[(round(t - started, 2), s.name) for t, s in states]}\n"
        f"server stderr (tail):\n{stderr[-4000:]}"
    )

    # The call ended OK with exactly one answer per event, in order.
    assert error is None, summary
    assert len(answers) == N_EVENTS, summary
    assert [a.event_id for a in answers] == [e.event_id for e in sent], summary
    assert all(a.event_type == warning_type and a.stored and not a.blocked for a in answers)

    # The stall really happened: the lock was held while the call ran, events were in flight
    # (sent, not yet answered) when it was released, and the answers paused >= 2 s inside it.
    assert lock.error is None, summary
    assert lock.acquired_at is not None and lock.released_at is not None, summary
    t_acq, t_rel = lock.acquired_at, lock.released_at
    sent_before_release = sum(1 for t in sent_at if t < t_rel)
    answered_before_release = sum(1 for t in answer_at if t < t_rel)
    assert sent_before_release > LOCK_BEFORE_EVENT, summary
    assert sent_before_release > answered_before_release, summary
    points = [started] + answer_at
    gaps = [(b - a, a, b) for a, b in zip(points, points[1:])]
    stall = max((g for g in gaps if g[1] < t_rel and g[2] > t_acq), default=None)
    assert stall is not None and stall[0] >= MIN_STALL_SECS, (
        f"answers did not pause >= {MIN_STALL_SECS} s while the lock was held: {stall}\n{summary}"
    )

    # Other calls on the same connection went on during the stall.
    assert side.calls and all(ok for *_, ok, _ in side.calls), summary
    during = sorted(end for s, end, _, ok, _ in side.calls if ok and t_acq <= end <= t_rel)
    marks = [t_acq] + during + [t_rel]
    worst = max(b - a for a, b in zip(marks, marks[1:]))
    assert worst <= SIDE_MAX_GAP, (
        f"{len(during)} side calls completed during the {t_rel - t_acq:.2f} s stall, longest "
        f"gap without one {worst:.2f} s\n{summary}"
    )

    # Never disconnected: the channel stayed READY, and the server logged no GOAWAY.
    assert all(s == grpc.ChannelConnectivity.READY for _, s in states), summary
    low = stderr.lower()
    assert not any(f in low for f in FORBIDDEN), summary

    print(
        f"\ngrpcio: {N_EVENTS} answers in {ended - started:.2f} s; lock held "
        f"{t_rel - t_acq:.2f} s; answers paused {stall[0]:.2f} s; {sent_before_release} events "
        f"sent and {answered_before_release} answered before the release; "
        f"{len(during)} side calls OK during the stall (longest gap {worst:.2f} s)"
    )
