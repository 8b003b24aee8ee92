"""End-to-end fixtures for the fleet-events gRPC server.

At session start the Python stubs are generated from proto/fleetevents/v1/fleetevents.proto into
a temporary directory (never committed) that is put on sys.path, so test modules can
``from fleetevents.v1 import fleetevents_pb2``.

The server fixtures start the real binary (``FLEET_EVENTS_BIN``, default
``<repo>/target/release/fleet-events``) on a free port, wait for its ready file, confirm with
grpc.health.v1 that it is SERVING, and stop it with SIGTERM at the end, asserting exit code 0.

The server serves TLS on its client port and wants a credential on nearly every call. On first
start it writes its CA (``<data_dir>/ca.pem``) and a bearer token of role admin
(``<data_dir>/admin.token``); ``FleetServer.channel`` pins that CA and sends that token, so the
stubs of ``FleetServer`` act as the administrator. ``FleetServer.secure_channel`` /
``mtls_channel`` / ``plaintext_channel`` make channels with other credentials (another token, a
device certificate, none at all), and ``Stubs(channel)`` gives every service's stub on one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import resources
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
PROTO_FILE = "fleetevents/v1/fleetevents.proto"
DEFAULT_BIN = REPO / "target" / "release" / "fleet-events"

READY_POLL_SECS = 0.02
READY_DEADLINE_SECS = 30.0
STOP_DEADLINE_SECS = 15.0
RPC_TIMEOUT = 10.0

# The configuration most modules share: a low flood threshold so the flood test is quick.
DEFAULT_CONFIG = """\
[flood]
threshold = 5       # more than 5 events of one type from one device within window -> blocked
window = "3600s"
block = "3600s"

[store]
max_events = 400000
"""

_STUB_DIR: str | None = None


# --------------------------------------------------------------------------------------------
# Stub generation
# --------------------------------------------------------------------------------------------


def _generate_stubs() -> str:
    out = tempfile.mkdtemp(prefix="fleetevents-pystubs-")
    well_known = resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        PROTO_FILE,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(
            f"protoc failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
        )
    return out


def pytest_configure(config):
    global _STUB_DIR
    if _STUB_DIR is None:
        _STUB_DIR = _generate_stubs()
        sys.path.insert(0, _STUB_DIR)


def pytest_unconfigure(config):
    global _STUB_DIR
    if _STUB_DIR is not None:
        try:
            sys.path.remove(_STUB_DIR)
        except ValueError:
            pass
        shutil.rmtree(_STUB_DIR, ignore_errors=True)
        _STUB_DIR = None


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------

_ADDR_RE = re.compile(r"^\S+:\d+$")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

CA_FILE = "ca.pem"
ADMIN_TOKEN_FILE = "admin.token"


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata to every call (for plaintext channels, where grpcio refuses call
    credentials, and for tokens put in the wrong header on purpose)."""

    def __init__(self, metadata: list[tuple[str, str]]):
        self._metadata = list(metadata)

    def _details(self, d):
        md = list(d.metadata or []) + self._metadata
        return _CallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready,
                            d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class Stubs:
    """The stub of every fleet-events service (and grpc health) on one channel."""

    def __init__(self, channel: grpc.Channel):
        from fleetevents.v1 import fleetevents_pb2_grpc as g
        from grpc_health.v1 import health_pb2_grpc

        self.channel = channel
        self.events = g.EventServiceStub(channel)
        self.catalog = g.CatalogServiceStub(channel)
        self.devices = g.DeviceServiceStub(channel)
        self.access = g.AccessServiceStub(channel)
        self.enrollment = g.EnrollmentServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


def _config_says_plaintext(config_text: str | None) -> bool:
    if not config_text:
        return False
    try:
        cfg = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError:
        return False
    return bool(cfg.get("server", {}).get("insecure_plaintext", False))


def server_binary() -> Path:
    return Path(os.environ.get("FLEET_EVENTS_BIN", str(DEFAULT_BIN)))


class FleetServer:
    """One fleet-events server process plus a channel and stubs to talk to it."""

    def __init__(self, workdir: Path, config_text: str | None = DEFAULT_CONFIG,
                 data_dir: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = Path(data_dir) if data_dir else self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.workdir / "ready"
        self.config_path: Path | None = None
        if config_text is not None:
            self.config_path = self.workdir / "config.toml"
            self.config_path.write_text(config_text)
        # Whether the client port serves plaintext (`[server] insecure_plaintext = true`).
        self.plaintext = _config_says_plaintext(config_text)
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.channel: grpc.Channel | None = None
        # The server's CA (PEM) and the bootstrap admin token, read after every start.
        self.ca_pem: bytes | None = None
        self.admin_token: str | None = None
        # Channels made by the helpers below, closed when the server stops.
        self._extra_channels: list[grpc.Channel] = []
        self._starts = 0
        self._stderr_path: Path | None = None

    # -- process control --------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            str(server_binary()),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            "--ready-file",
            str(self.ready_file),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def stderr_text(self, limit: int = 20000) -> str:
        if self._stderr_path is None or not self._stderr_path.exists():
            return "<no stderr>"
        text = self._stderr_path.read_text(errors="replace")
        return text[-limit:]

    def start(self) -> "FleetServer":
        assert self.proc is None, "server already running"
        binary = server_binary()
        if not binary.exists():
            pytest.fail(f"server binary {binary} does not exist (set FLEET_EVENTS_BIN)")
        # A ready file left by an earlier run of this server must not be mistaken for this one.
        if self.ready_file.exists():
            self.ready_file.unlink()
        self._starts += 1
        self._stderr_path = self.workdir / f"stderr.{self._starts}.log"
        stdout_path = self.workdir / f"stdout.{self._starts}.log"
        # Keep the server hermetic: FLEET_EVENTS_* variables of the caller's environment (e.g.
        # FLEET_EVENTS_BIN) would otherwise be read as configuration overrides.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_EVENTS_")}
        env.setdefault("RUST_BACKTRACE", "1")
        with open(self._stderr_path, "wb") as err, open(stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE_SECS
        address = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                pytest.fail(
                    f"fleet-events exited with code {rc} before it was ready.\n"
                    f"command: {' '.join(self.command())}\nstderr:\n{self.stderr_text()}"
                )
            if self.ready_file.exists():
                text = self.ready_file.read_text(errors="replace").strip()
                if _ADDR_RE.match(text):
                    address = text
                    break
            if time.monotonic() >= deadline:
                self._kill_quietly()
                pytest.fail(
                    f"fleet-events did not write a valid address into {self.ready_file} within "
                    f"{READY_DEADLINE_SECS:.0f} s.\ncommand: {' '.join(self.command())}\n"
                    f"stderr:\n{self.stderr_text()}"
                )
            time.sleep(READY_POLL_SECS)

        self.address = address
        self._read_credentials()
        if self.plaintext:
            self.channel = self._plain(
                [("authorization", f"Bearer {self.admin_token}")], track=False
            )
        else:
            self.channel = grpc.secure_channel(
                address,
                grpc.composite_channel_credentials(
                    grpc.ssl_channel_credentials(root_certificates=self.ca_pem),
                    grpc.access_token_call_credentials(self.admin_token),
                ),
                options=CHANNEL_OPTIONS,
            )
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)
        remaining = max(1.0, deadline - time.monotonic())
        try:
            resp = health.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=remaining,
                wait_for_ready=True,
            )
        except grpc.RpcError as e:
            self._kill_quietly()
            pytest.fail(
                f"health check of fleet-events at {address} failed: {e.code()} {e.details()}\n"
                f"stderr:\n{self.stderr_text()}"
            )
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            self._kill_quietly()
            pytest.fail(
                f"fleet-events at {address} wrote its ready file but health says "
                f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}\n"
                f"stderr:\n{self.stderr_text()}"
            )

    def _read_credentials(self) -> None:
        """Reads the CA to pin and the admin token the server wrote to its data dir."""
        ca_path = self.data_dir / CA_FILE
        token_path = self.data_dir / ADMIN_TOKEN_FILE
        missing = [str(p) for p in (ca_path, token_path) if not p.is_file()]
        if missing:
            self._kill_quietly()
            pytest.fail(
                f"fleet-events wrote its ready file but not {', '.join(missing)}\n"
                f"stderr:\n{self.stderr_text()}"
            )
        self.ca_pem = ca_path.read_bytes()
        token = token_path.read_text().strip()
        if not token.startswith("fet_") or "\n" in token:
            self._kill_quietly()
            pytest.fail(f"{token_path} does not hold one fet_ token: {token[:12]!r}...")
        self.admin_token = token

    # -- channels with other credentials --------------------------------------------------------

    def _track(self, ch: grpc.Channel) -> grpc.Channel:
        self._extra_channels.append(ch)
        return ch

    def _plain(self, metadata: list[tuple[str, str]], track: bool = True) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        if metadata:
            ch = grpc.intercept_channel(ch, _MetadataInterceptor(metadata))
        return self._track(ch) if track else ch

    def secure_channel(self, token: str | None = None,
                       metadata: list[tuple[str, str]] | None = None) -> grpc.Channel:
        """A TLS channel pinning the server's CA, sending `token` as `authorization: Bearer`
        (none when None) and any extra `metadata` on every call."""
        assert self.address is not None, "server not started"
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        if token is not None:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        ch = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)
        if metadata:
            ch = grpc.intercept_channel(ch, _MetadataInterceptor(metadata))
        return self._track(ch)

    def mtls_channel(self, certificate_pem: bytes | str, key_pem: bytes | str,
                     token: str | None = None) -> grpc.Channel:
        """A TLS channel presenting a client certificate (a device certificate from Enroll),
        and no token unless one is given."""
        assert self.address is not None, "server not started"
        as_bytes = (lambda v: v.encode() if isinstance(v, str) else v)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=as_bytes(key_pem),
            certificate_chain=as_bytes(certificate_pem),
        )
        if token is not None:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        return self._track(grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS))

    def plaintext_channel(self, token: str | None = None,
                          metadata: list[tuple[str, str]] | None = None) -> grpc.Channel:
        """A plaintext channel (no TLS), with `authorization: Bearer <token>` when a token is
        given and any extra metadata."""
        assert self.address is not None, "server not started"
        md = list(metadata or [])
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        return self._plain(md)

    def stubs(self, channel: grpc.Channel | None = None) -> Stubs:
        """Every service's stub on `channel` (default: the admin channel)."""
        return Stubs(channel if channel is not None else self.channel)

    def _close_channel(self) -> None:
        for ch in self._extra_channels:
            ch.close()
        self._extra_channels.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _kill_quietly(self) -> None:
        self._close_channel()
        if self.proc is not None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=STOP_DEADLINE_SECS)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None

    def stop(self) -> int:
        """SIGTERM; returns the exit code, failing if it takes longer than 15 s."""
        assert self.proc is not None, "server not running"
        self._close_channel()
        proc = self.proc
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=STOP_DEADLINE_SECS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.proc = None
            pytest.fail(
                f"fleet-events did not exit within {STOP_DEADLINE_SECS:.0f} s of SIGTERM.\n"
                f"stderr:\n{self.stderr_text()}"
            )
        self.proc = None
        return rc

    def kill(self) -> int:
        """SIGKILL (a crash, no shutdown at all); returns the exit code (-9)."""
        assert self.proc is not None, "server not running"
        self._close_channel()
        proc = self.proc
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=STOP_DEADLINE_SECS)
        self.proc = None
        return rc

    def stop_and_check(self) -> None:
        rc = self.stop()
        assert rc == 0, (
            f"fleet-events exited with code {rc} after SIGTERM (want 0).\n"
            f"stderr:\n{self.stderr_text()}"
        )

    # -- stubs ------------------------------------------------------------------------------

    @property
    def events(self):
        from fleetevents.v1 import fleetevents_pb2_grpc

        return fleetevents_pb2_grpc.EventServiceStub(self.channel)

    @property
    def catalog(self):
        from fleetevents.v1 import fleetevents_pb2_grpc

        return fleetevents_pb2_grpc.CatalogServiceStub(self.channel)

    @property
    def devices(self):
        from fleetevents.v1 import fleetevents_pb2_grpc

        return fleetevents_pb2_grpc.DeviceServiceStub(self.channel)

    @property
    def access(self):
        from fleetevents.v1 import fleetevents_pb2_grpc

        return fleetevents_pb2_grpc.AccessServiceStub(self.channel)

    @property
    def enrollment(self):
        from fleetevents.v1 import fleetevents_pb2_grpc

        return fleetevents_pb2_grpc.EnrollmentServiceStub(self.channel)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_config() -> str | None:
    """The TOML config the module's shared server gets; modules may override this fixture."""
    return DEFAULT_CONFIG


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, server_config):
    """One server shared by all tests of a module (tests use distinct device ids)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.module.__name__)[-40:]
    srv = FleetServer(tmp_path_factory.mktemp(f"srv-{name}"), config_text=server_config)
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop_and_check()


@pytest.fixture
def server_factory(tmp_path):
    """Starts servers of a test's own; every one still running at the end is stopped with
    SIGTERM and must exit with code 0."""
    started: list[FleetServer] = []

    def make(config_text: str | None = DEFAULT_CONFIG, name: str = "own") -> FleetServer:
        srv = FleetServer(tmp_path / f"{name}-{len(started)}", config_text=config_text)
        started.append(srv)
        return srv

    yield make
    errors = []
    for srv in started:
        if srv.proc is not None:
            rc = srv.stop()
            if rc != 0:
                errors.append(f"exit code {rc} after SIGTERM\nstderr:\n{srv.stderr_text()}")
    assert not errors, "\n".join(errors)
