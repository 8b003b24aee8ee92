"""Credentials on the client port: TLS with the server's own CA, bearer tokens and their roles,
device enrolment (Enroll / mutual TLS / Renew / RevokeDevice) and the audit events of
administrative writes.

Every test talks to the real server over real grpcio channels made by conftest.FleetServer:
``server.channel`` pins ``<data_dir>/ca.pem`` and sends the bootstrap admin token; the other
credentials (none, another token, a device certificate, a token in the wrong header) get channels
of their own. After every test the server must still answer grpc health with SERVING to a
caller without any credential.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
import urllib.parse

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import DEFAULT_CONFIG
from fleet_helpers import RPC_TIMEOUT, event, now, query_all, rpc_error
from fleetevents.v1 import fleetevents_pb2 as pb
from grpc_health.v1 import health_pb2

DEVICE_URI_PREFIX = "urn:fleet-events:device:"
APP_TYPE = "PYTEST_APP_EVENT"
STREAM_TIMEOUT = 30.0

_seq = itertools.count(1)


def unique(prefix: str) -> str:
    """A name no other test of the module uses (tokens and devices share one server)."""
    return f"{prefix}-{next(_seq)}"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(key, cn: str | None = None, dns: tuple[str, ...] = (), uris: tuple[str, ...] = (),
             org: str | None = None) -> str:
    """A PEM CSR signed by `key`, with the given subject CN/O and alternative names."""
    attrs = []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    sans = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def device_uri(device_id: str) -> str:
    return DEVICE_URI_PREFIX + urllib.parse.quote(device_id, safe="")


def code_of(err: grpc.RpcError) -> str:
    return f"{err.code()} {err.details()!r}"


def create_token(server, role: int, name: str | None = None) -> str:
    """Creates a bearer token as admin and returns its secret."""
    name = name or unique(f"py-{pb.Role.Name(role).removeprefix('ROLE_').lower()}")
    resp = server.access.CreateToken(pb.CreateTokenRequest(name=name, role=role),
                                     timeout=RPC_TIMEOUT)
    assert resp.info.name == name
    assert resp.info.role == role
    assert resp.info.created_by == "token:admin"
    assert resp.token.startswith("fet_")
    return resp.token


def enrollment_token(server, uses: int = 1, label: str = "pytest") -> pb.CreateEnrollmentTokenResponse:
    resp = server.access.CreateEnrollmentToken(
        pb.CreateEnrollmentTokenRequest(uses=uses, valid_for_secs=600, label=label),
        timeout=RPC_TIMEOUT,
    )
    assert resp.token.startswith("fee_")
    assert resp.info.id != ""
    assert resp.info.uses == max(uses, 1)
    assert resp.info.used == 0
    assert resp.info.label == label
    return resp


def enroll(server, device_id: str, token: str | None = None, key=None, csr: str | None = None):
    """Enrols `device_id` over a channel without any credential. Returns (cert PEM, key PEM,
    DeviceCertificate)."""
    if token is None:
        token = enrollment_token(server).token
    key = key or new_key()
    if csr is None:
        csr = make_csr(key, cn=device_id)
    anon = server.stubs(server.secure_channel())
    cert = anon.enrollment.Enroll(
        pb.EnrollRequest(token=token, device_id=device_id, csr_pem=csr), timeout=RPC_TIMEOUT
    )
    return cert.certificate_pem.encode(), key_pem(key), cert


def used_count(server, enrollment_id: str) -> int:
    resp = server.access.ListEnrollmentTokens(pb.ListEnrollmentTokensRequest(),
                                              timeout=RPC_TIMEOUT)
    [t] = [t for t in resp.tokens if t.id == enrollment_id]
    return t.used


def audit_events(server, event_type: str, **params) -> list[pb.Classification]:
    """Stored audit events of `event_type` whose params include all of `params`."""
    found = query_all(server.events, event_type=event_type)
    return [c for c in found if all(c.params.get(k) == v for k, v in params.items())]


def health_status(server, channel) -> int:
    from grpc_health.v1 import health_pb2_grpc

    resp = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT
    )
    return resp.status


@pytest.fixture(autouse=True)
def still_serving(server):
    """Whatever a test sent, the server answers health with SERVING afterwards, to a caller
    without any credential."""
    yield
    assert server.proc is not None and server.proc.poll() is None, (
        f"the server exited\nstderr:\n{server.stderr_text()}"
    )
    assert health_status(server, server.secure_channel()) == \
        health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------------------------
# Transport, health, no credential
# --------------------------------------------------------------------------------------------


def test_health_and_whoami(server):
    """grpc health answers SERVING without a credential (TLS, CA pinned, no token); the
    bootstrap admin token from <data_dir>/admin.token is the token named admin with role admin."""
    assert health_status(server, server.secure_channel()) == \
        health_pb2.HealthCheckResponse.SERVING
    me = server.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name, me.role) == ("token", "admin", pb.ROLE_ADMIN)
    # The token file is readable by its owner only.
    mode = (server.data_dir / "admin.token").stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


def test_plaintext_client_cannot_use_the_tls_port(server):
    """A client speaking plaintext HTTP/2 to the TLS port gets no answer (UNAVAILABLE), even
    with the admin token; the server is unaffected."""
    ch = server.plaintext_channel(token=server.admin_token)
    err = rpc_error(server.stubs(ch).access.WhoAmI, pb.WhoAmIRequest(), timeout=5)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, code_of(err)


def test_client_that_does_not_trust_the_ca_fails(server):
    """A client pinning another CA refuses the server's certificate (UNAVAILABLE)."""
    other_key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some other CA")])
    other_ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(days=1))
        .not_valid_after(now() + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(other_key, hashes.SHA256())
    )
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(
            root_certificates=other_ca.public_bytes(serialization.Encoding.PEM)),
        grpc.access_token_call_credentials(server.admin_token),
    )
    ch = grpc.secure_channel(server.address, creds)
    try:
        err = rpc_error(server.stubs(ch).access.WhoAmI, pb.WhoAmIRequest(), timeout=5)
    finally:
        ch.close()
    assert err.code() == grpc.StatusCode.UNAVAILABLE, code_of(err)


NO_CREDENTIAL_CALLS = {
    "QueryEvents": lambda s: s.events.QueryEvents(pb.QueryEventsRequest(), timeout=RPC_TIMEOUT),
    "Classify": lambda s: s.events.Classify(
        event("py-anon-1", APP_TYPE, event_id="anon-1"), timeout=RPC_TIMEOUT),
    "Stream": lambda s: list(s.events.Stream(
        iter([event("py-anon-1", APP_TYPE, event_id="anon-2")]), timeout=RPC_TIMEOUT)),
    "Subscribe": lambda s: next(iter(s.events.Subscribe(pb.SubscribeRequest(),
                                                        timeout=RPC_TIMEOUT))),
    "ListEventTypes": lambda s: s.catalog.ListEventTypes(pb.ListEventTypesRequest(),
                                                         timeout=RPC_TIMEOUT),
    "RegisterEventType": lambda s: s.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(event_type="PY_ANON_TYPE", severity=pb.SEVERITY_INFO),
        timeout=RPC_TIMEOUT),
    "ListDevices": lambda s: s.devices.ListDevices(pb.ListDevicesRequest(), timeout=RPC_TIMEOUT),
    "CheckDevices": lambda s: s.devices.CheckDevices(pb.CheckDevicesRequest(),
                                                     timeout=RPC_TIMEOUT),
    "ListTokens": lambda s: s.access.ListTokens(pb.ListTokensRequest(), timeout=RPC_TIMEOUT),
    "CreateToken": lambda s: s.access.CreateToken(
        pb.CreateTokenRequest(name="py-anon", role=pb.ROLE_ADMIN), timeout=RPC_TIMEOUT),
    "WhoAmI": lambda s: s.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT),
    "Renew": lambda s: s.enrollment.Renew(
        pb.RenewRequest(csr_pem=make_csr(new_key(), cn="py-anon-1")), timeout=RPC_TIMEOUT),
}


@pytest.mark.parametrize("call", list(NO_CREDENTIAL_CALLS))
def test_no_credential_is_unauthenticated(server, call):
    """A caller with TLS but no token and no client certificate is refused with UNAUTHENTICATED
    on every service (reads, writes, streams, the access service itself), and the details say
    what credential is needed. Nothing it sent is stored and no token is made."""
    anon = server.stubs(server.secure_channel())
    try:
        NO_CREDENTIAL_CALLS[call](anon)
    except grpc.RpcError as e:
        err = e
    else:
        raise AssertionError(f"{call} without a credential succeeded")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    details = err.details() or ""
    assert call in details, details
    assert "credential" in details and "Bearer" in details, details

    assert query_all(server.events, device_id="py-anon-1") == []
    names = [t.name for t in server.access.ListTokens(pb.ListTokensRequest(),
                                                      timeout=RPC_TIMEOUT).tokens]
    assert "py-anon" not in names


# --------------------------------------------------------------------------------------------
# Bad tokens
# --------------------------------------------------------------------------------------------


def test_bad_tokens_are_unauthenticated(server):
    """Tokens the server cannot accept are refused with UNAUTHENTICATED, each with a reason:
    a string that is not a fleet-events token, a well-formed but unknown token, another
    authorization scheme, and a real token put in a header other than `authorization`."""
    cases = [
        ("garbage", server.secure_channel(token="not-a-token"),
         ["not a fleet-events token", "fet_"]),
        ("unknown fet_ token", server.secure_channel(token="fet_" + "A" * 43),
         ["unknown or revoked token"]),
        ("basic scheme", server.secure_channel(
            metadata=[("authorization", f"Basic {server.admin_token}")]),
         ["Bearer <token>"]),
        ("x-api-key header", server.secure_channel(
            metadata=[("x-api-key", server.admin_token)]),
         ["authorization", "x-api-key"]),
    ]
    for name, ch, words in cases:
        stubs = server.stubs(ch)
        for fn, req in [
            (stubs.events.QueryEvents, pb.QueryEventsRequest()),
            (stubs.access.WhoAmI, pb.WhoAmIRequest()),
        ]:
            err = rpc_error(fn, req)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, f"{name}: {code_of(err)}"
            for w in words:
                assert w in (err.details() or ""), f"{name}: {err.details()!r} lacks {w!r}"
            # The secret itself is never echoed back.
            assert server.admin_token not in (err.details() or "")


def test_revoked_token_is_refused_on_the_open_channel(server):
    """A viewer token works until an administrator revokes it; the very next call on the same,
    still open channel is UNAUTHENTICATED. ListTokens shows it revoked (and never a secret), its
    name cannot be reused, and revoking an unknown name is NOT_FOUND."""
    name = unique("py-revoked-viewer")
    token = create_token(server, pb.ROLE_VIEWER, name)
    viewer = server.stubs(server.secure_channel(token=token))
    me = viewer.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name, me.role) == ("token", name, pb.ROLE_VIEWER)
    viewer.events.QueryEvents(pb.QueryEventsRequest(page_size=1), timeout=RPC_TIMEOUT)

    info = server.access.RevokeToken(pb.RevokeTokenRequest(name=name), timeout=RPC_TIMEOUT)
    assert info.name == name
    assert info.HasField("revoked_at")

    err = rpc_error(viewer.events.QueryEvents, pb.QueryEventsRequest(page_size=1))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "revoked" in err.details(), err.details()

    listed = server.access.ListTokens(pb.ListTokensRequest(), timeout=RPC_TIMEOUT)
    [t] = [t for t in listed.tokens if t.name == name]
    assert t.role == pb.ROLE_VIEWER
    assert t.HasField("revoked_at")
    assert t.created_by == "token:admin"
    [admin] = [t for t in listed.tokens if t.name == "admin"]
    assert admin.role == pb.ROLE_ADMIN and not admin.HasField("revoked_at")
    assert admin.created_by == "bootstrap"
    assert "fet_" not in str(listed)

    err = rpc_error(server.access.CreateToken,
                    pb.CreateTokenRequest(name=name, role=pb.ROLE_VIEWER))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, code_of(err)
    err = rpc_error(server.access.RevokeToken, pb.RevokeTokenRequest(name=unique("py-nobody")))
    assert err.code() == grpc.StatusCode.NOT_FOUND, code_of(err)


@pytest.mark.parametrize(
    "req, field",
    [
        (pb.CreateTokenRequest(name="", role=pb.ROLE_VIEWER), "name"),
        (pb.CreateTokenRequest(name="bad name!", role=pb.ROLE_VIEWER), "name"),
        (pb.CreateTokenRequest(name="x" * 129, role=pb.ROLE_VIEWER), "name"),
        (pb.CreateTokenRequest(name="py-no-role", role=pb.ROLE_UNSPECIFIED), "role"),
        (pb.CreateTokenRequest(name="py-bad-role", role=99), "role"),
    ],
    ids=["empty_name", "bad_chars", "long_name", "no_role", "unknown_role"],
)
def test_create_token_rejects_bad_input(server, req, field):
    """CreateToken refuses malformed names and roles with INVALID_ARGUMENT naming the field."""
    err = rpc_error(server.access.CreateToken, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, code_of(err)
    assert field in (err.details() or ""), err.details()


# --------------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------------


def test_viewer_reads_but_does_not_write(server):
    """A viewer may query, list and get, but not change settings, send events, run checks or
    manage tokens: those are PERMISSION_DENIED naming the method, the token and its role."""
    name = unique("py-viewer")
    v = server.stubs(server.secure_channel(token=create_token(server, pb.ROLE_VIEWER, name)))
    v.events.QueryEvents(pb.QueryEventsRequest(page_size=1), timeout=RPC_TIMEOUT)
    types = v.catalog.ListEventTypes(pb.ListEventTypesRequest(), timeout=RPC_TIMEOUT)
    assert any(t.event_type == "FLEET_AUDIT_ACCESS" for t in types.event_types)
    v.devices.ListDevices(pb.ListDevicesRequest(), timeout=RPC_TIMEOUT)

    denied = [
        ("UpdateEventTypeSettings", v.catalog.UpdateEventTypeSettings,
         pb.UpdateEventTypeSettingsRequest(event_type="FLEET_AUDIT_ACCESS", store=False)),
        ("Classify", v.events.Classify, event("py-viewer-dev", APP_TYPE, event_id="v-1")),
        ("CheckDevices", v.devices.CheckDevices, pb.CheckDevicesRequest()),
        ("CreateToken", v.access.CreateToken,
         pb.CreateTokenRequest(name=unique("py-escalate"), role=pb.ROLE_ADMIN)),
        ("ListTokens", v.access.ListTokens, pb.ListTokensRequest()),
    ]
    for method, fn, req in denied:
        err = rpc_error(fn, req)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{method}: {code_of(err)}"
        d = err.details() or ""
        assert method in d and name in d and "viewer" in d, d

    # Nothing happened: the audit type is still stored, no event for the device.
    t = server.catalog.GetEventType(pb.GetEventTypeRequest(event_type="FLEET_AUDIT_ACCESS"),
                                    timeout=RPC_TIMEOUT)
    assert t.store is True
    assert query_all(server.events, device_id="py-viewer-dev") == []


def test_ingest_sends_for_any_device_but_nothing_else(server):
    """An ingest token sends events for any device (they are stored), but not server-raised
    built-in types, and may neither read events nor manage tokens."""
    name = unique("py-ingest")
    i = server.stubs(server.secure_channel(token=create_token(server, pb.ROLE_INGEST, name)))
    me = i.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name, me.role) == ("token", name, pb.ROLE_INGEST)

    for dev in ("py-ingest-a", "py-ingest-b"):
        c = i.events.Classify(event(dev, APP_TYPE, event_id=f"{dev}-1"), timeout=RPC_TIMEOUT)
        assert (c.device_id, c.event_type, c.stored, c.blocked) == (dev, APP_TYPE, True, False)
        assert [x.event_id for x in query_all(server.events, device_id=dev)] == [f"{dev}-1"]
    answers = list(i.events.Stream(
        iter([event("py-ingest-c", APP_TYPE, event_id="c-1"),
              event("py-ingest-d", APP_TYPE, event_id="d-1")]), timeout=STREAM_TIMEOUT))
    assert [(a.device_id, a.stored) for a in answers] == [("py-ingest-c", True),
                                                          ("py-ingest-d", True)]

    err = rpc_error(i.events.Classify,
                    event("py-ingest-a", "KLSRV_EVENT_HOSTS_CONFLICT", event_id="a-klsrv"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
    assert "KLSRV_EVENT_HOSTS_CONFLICT" in err.details(), err.details()
    assert [x.event_id for x in query_all(server.events, device_id="py-ingest-a")] == \
        ["py-ingest-a-1"]

    for method, fn, req in [
        ("ListTokens", i.access.ListTokens, pb.ListTokensRequest()),
        ("QueryEvents", i.events.QueryEvents, pb.QueryEventsRequest()),
        ("RegisterEventType", i.catalog.RegisterEventType,
         pb.RegisterEventTypeRequest(event_type="PY_INGEST_TYPE", severity=pb.SEVERITY_INFO)),
    ]:
        err = rpc_error(fn, req)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{method}: {code_of(err)}"
        assert method in err.details() and "ingest" in err.details(), err.details()


def test_operator_runs_checks_but_does_not_administer(server):
    """An operator may run CheckDevices and read, may call the block actions (a missing block
    is NOT_FOUND, not a refusal), but may not register types, send events or make tokens."""
    name = unique("py-operator")
    o = server.stubs(server.secure_channel(token=create_token(server, pb.ROLE_OPERATOR, name)))
    me = o.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name, me.role) == ("token", name, pb.ROLE_OPERATOR)
    resp = o.devices.CheckDevices(pb.CheckDevicesRequest(), timeout=RPC_TIMEOUT)
    assert all(c.origin == pb.ORIGIN_SERVER for c in resp.raised), resp
    o.events.QueryEvents(pb.QueryEventsRequest(page_size=1), timeout=RPC_TIMEOUT)
    err = rpc_error(o.devices.UnblockFrequentEvent,
                    pb.FrequentEventBlockKey(device_id="py-op-none", event_type=APP_TYPE))
    assert err.code() == grpc.StatusCode.NOT_FOUND, code_of(err)

    for method, fn, req in [
        ("RegisterEventType", o.catalog.RegisterEventType,
         pb.RegisterEventTypeRequest(event_type="PY_OPERATOR_TYPE", severity=pb.SEVERITY_INFO)),
        ("Classify", o.events.Classify, event("py-op-dev", APP_TYPE, event_id="op-1")),
        ("CreateToken", o.access.CreateToken,
         pb.CreateTokenRequest(name=unique("py-op-made"), role=pb.ROLE_VIEWER)),
        ("RevokeDevice", o.access.RevokeDevice, pb.RevokeDeviceRequest(device_id="py-op-dev")),
    ]:
        err = rpc_error(fn, req)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{method}: {code_of(err)}"
        assert method in err.details() and "operator" in err.details(), err.details()


# --------------------------------------------------------------------------------------------
# Enrolment and device certificates
# --------------------------------------------------------------------------------------------


def test_enrolment_end_to_end(server):
    """An agent enrols with a single-use enrolment token and a CSR for its own key, then talks
    with its device certificate alone (mutual TLS, no token): WhoAmI says device; Classify for
    itself (empty or explicit device_id) is stored; for another device it is PERMISSION_DENIED
    naming both ids; a Stream [own, own, other] answers two and ends PERMISSION_DENIED; calls a
    device may not make are refused. The used-up token cannot enrol anyone else."""
    device = unique("py-agent")
    other = unique("py-agent-other")
    et = enrollment_token(server, uses=1, label="lab-1")
    key = new_key()
    cert_pem, kpem, dc = enroll(server, device, token=et.token, key=key)

    assert dc.device_id == device
    assert dc.label == "lab-1"
    assert dc.ca_pem.encode() == server.ca_pem
    assert dc.not_after.ToDatetime(tzinfo=dt.timezone.utc) > now() + dt.timedelta(days=300)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device_uri(device)]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    ca = x509.load_pem_x509_certificate(server.ca_pem)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert used_count(server, et.info.id) == 1

    # The used-up token enrols no one else.
    err = rpc_error(server.stubs(server.secure_channel()).enrollment.Enroll,
                    pb.EnrollRequest(token=et.token, device_id=other,
                                     csr_pem=make_csr(new_key(), cn=other)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "used up" in err.details(), err.details()

    agent = server.stubs(server.mtls_channel(cert_pem, kpem))
    me = agent.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name, me.role) == ("device", device, pb.ROLE_UNSPECIFIED)

    mine = agent.events.Classify(event("", APP_TYPE, event_id="mine-1"), timeout=RPC_TIMEOUT)
    assert (mine.device_id, mine.event_id, mine.stored) == (device, "mine-1", True)
    explicit = agent.events.Classify(event(device, APP_TYPE, event_id="mine-2"),
                                     timeout=RPC_TIMEOUT)
    assert (explicit.device_id, explicit.stored) == (device, True)

    err = rpc_error(agent.events.Classify, event(other, APP_TYPE, event_id="theirs-1"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
    assert device in err.details() and other in err.details(), err.details()

    call = agent.events.Stream(iter([
        event(device, "PYTEST_APP_STREAM", event_id="s-1"),
        event("", "PYTEST_APP_STREAM", event_id="s-2"),
        event(other, "PYTEST_APP_STREAM", event_id="s-3"),
    ]), timeout=STREAM_TIMEOUT)
    answered, stream_err = [], None
    try:
        for c in call:
            answered.append(c)
    except grpc.RpcError as e:
        stream_err = e
    assert [(c.event_id, c.device_id) for c in answered] == [("s-1", device), ("s-2", device)]
    assert stream_err is not None, "the stream ended without an error"
    assert stream_err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(stream_err)
    assert device in stream_err.details() and other in stream_err.details()

    stored = query_all(server.events, device_id=device)
    assert sorted(c.event_id for c in stored) == ["mine-1", "mine-2", "s-1", "s-2"]
    assert query_all(server.events, device_id=other) == []

    # Heartbeats: its own (empty = mine), not another device's.
    hb = agent.devices.ReportHeartbeat(
        pb.DeviceHeartbeat(device_id="", fingerprint="fp-1", hostname="agent-host"),
        timeout=RPC_TIMEOUT)
    assert hb.device.device_id == device
    err = rpc_error(agent.devices.ReportHeartbeat,
                    pb.DeviceHeartbeat(device_id=other, fingerprint="fp-2"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
    assert device in err.details() and other in err.details(), err.details()

    # A device may not use the console's calls, nor send server-raised types.
    for method, fn, req in [
        ("QueryEvents", agent.events.QueryEvents, pb.QueryEventsRequest()),
        ("ListTokens", agent.access.ListTokens, pb.ListTokensRequest()),
        ("CreateEnrollmentToken", agent.access.CreateEnrollmentToken,
         pb.CreateEnrollmentTokenRequest(uses=5)),
    ]:
        err = rpc_error(fn, req)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{method}: {code_of(err)}"
        assert method in err.details() and "device" in err.details(), err.details()
    err = rpc_error(agent.events.Classify, event("", "KLSRV_HOST_STATUS_WARNING"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
    assert "KLSRV_HOST_STATUS_WARNING" in err.details(), err.details()

    # Enrolment is audited, naming the device as the credential.
    [audit] = audit_events(server, "FLEET_AUDIT_ACCESS", rpc="Enroll",
                           target=f"device:{device}")
    assert audit.params["credential"] == f"device:{device}"
    assert "lab-1" in audit.params["change"]


def test_device_id_with_special_characters(server):
    """A device id with a space, a slash and a non-ASCII letter is percent-encoded in the
    certificate's URI name and read back intact: WhoAmI and Classify name it exactly."""
    device = unique("py dev/ü")
    cert_pem, kpem, _ = enroll(server, device)
    cert = x509.load_pem_x509_certificate(cert_pem)
    [uri] = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uri.startswith(DEVICE_URI_PREFIX)
    assert urllib.parse.unquote(uri[len(DEVICE_URI_PREFIX):]) == device
    agent = server.stubs(server.mtls_channel(cert_pem, kpem))
    assert agent.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT).name == device
    c = agent.events.Classify(event("", APP_TYPE, event_id="sp-1"), timeout=RPC_TIMEOUT)
    assert c.device_id == device


def test_csr_must_name_only_the_device(server):
    """Enroll refuses, with PERMISSION_DENIED, a CSR whose subject names another device or
    holds more than a CN, or that asks for extra alternative names (a DNS name, another
    device's URI). Refusals use none of the token's uses; a CSR with no subject, or naming the
    device in CN and its exact URI, is accepted."""
    device = unique("py-csr")
    et = enrollment_token(server, uses=2)
    anon = server.stubs(server.secure_channel())
    bad = {
        "other CN": (make_csr(new_key(), cn="py-someone-else"), ["py-someone-else", device]),
        "extra DNS SAN": (make_csr(new_key(), cn=device, dns=("evil.example.com",)),
                          ["evil.example.com"]),
        "other device URI": (make_csr(new_key(), uris=(device_uri("py-someone-else"),)),
                             ["py-someone-else"]),
        "extra O": (make_csr(new_key(), cn=device, org="Evil Corp"), ["common name"]),
    }
    for case, (csr, words) in bad.items():
        err = rpc_error(anon.enrollment.Enroll,
                        pb.EnrollRequest(token=et.token, device_id=device, csr_pem=csr))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{case}: {code_of(err)}"
        for w in words:
            assert w in err.details(), f"{case}: {err.details()!r} lacks {w!r}"
    err = rpc_error(anon.enrollment.Enroll,
                    pb.EnrollRequest(token=et.token, device_id=device, csr_pem="not a csr"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, code_of(err)
    assert "csr_pem" in err.details(), err.details()
    assert used_count(server, et.info.id) == 0

    # Empty subject: accepted, the certificate still names the device.
    key = new_key()
    cert_pem, kpem, dc = enroll(server, device, token=et.token, key=key,
                                csr=make_csr(key))
    assert dc.device_id == device
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
    # CN and the exact URI: accepted.
    device2 = unique("py-csr")
    key2 = new_key()
    _, _, dc2 = enroll(server, device2, token=et.token, key=key2,
                       csr=make_csr(key2, cn=device2, uris=(device_uri(device2),)))
    assert dc2.device_id == device2
    assert used_count(server, et.info.id) == 2


def test_enrolment_token_refusals(server):
    """Enroll with an unknown enrolment token, with a bearer token instead, or with a revoked
    enrolment token is UNAUTHENTICATED with the reason; a bad device id is INVALID_ARGUMENT."""
    anon = server.stubs(server.secure_channel())
    device = unique("py-enrol-refused")

    def try_enroll(token, device_id=device):
        return rpc_error(anon.enrollment.Enroll, pb.EnrollRequest(
            token=token, device_id=device_id, csr_pem=make_csr(new_key(), cn=device_id or None)))

    err = try_enroll("fee_nosuchid.nosuchsecret")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "unknown enrolment token" in err.details(), err.details()
    err = try_enroll(server.admin_token)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "fee_" in err.details(), err.details()

    et = enrollment_token(server, uses=3)
    # The right id with a wrong secret is no better than an unknown token.
    err = try_enroll(f"fee_{et.info.id}.wrongsecret")
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "unknown enrolment token" in err.details(), err.details()

    err = try_enroll(et.token, device_id="")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, code_of(err)
    assert "device_id" in err.details(), err.details()

    revoked = server.access.RevokeEnrollmentToken(
        pb.RevokeEnrollmentTokenRequest(id=et.info.id), timeout=RPC_TIMEOUT)
    assert revoked.id == et.info.id and revoked.HasField("revoked_at")
    err = try_enroll(et.token)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "revoked" in err.details(), err.details()
    assert used_count(server, et.info.id) == 0

    err = rpc_error(server.access.CreateEnrollmentToken,
                    pb.CreateEnrollmentTokenRequest(valid_for_secs=10 * 365 * 86400))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, code_of(err)
    assert "valid_for_secs" in err.details(), err.details()


def test_enrolment_token_expires(server):
    """An enrolment token valid for one second stops working once that second is over:
    UNAUTHENTICATED saying it expired. (Polled with a CSR naming another device, which the
    server refuses with PERMISSION_DENIED while the token is valid, so no use is taken.)"""
    device = unique("py-expiring")
    resp = server.access.CreateEnrollmentToken(
        pb.CreateEnrollmentTokenRequest(uses=1, valid_for_secs=1), timeout=RPC_TIMEOUT)
    created = resp.info.created_at.ToDatetime(tzinfo=dt.timezone.utc)
    expires = resp.info.expires_at.ToDatetime(tzinfo=dt.timezone.utc)
    assert expires - created == dt.timedelta(seconds=1)
    anon = server.stubs(server.secure_channel())
    probe = pb.EnrollRequest(token=resp.token, device_id=device,
                             csr_pem=make_csr(new_key(), cn="py-not-the-device"))
    deadline = time.monotonic() + 15
    codes = set()
    while True:
        err = rpc_error(anon.enrollment.Enroll, probe)
        codes.add(err.code())
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
            break
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
        assert time.monotonic() < deadline, "the enrolment token did not expire within 15 s"
        time.sleep(0.05)
    assert "expired" in err.details(), err.details()
    assert used_count(server, resp.info.id) == 0
    # A good CSR does not help now.
    err = rpc_error(anon.enrollment.Enroll, pb.EnrollRequest(
        token=resp.token, device_id=device, csr_pem=make_csr(new_key(), cn=device)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "expired" in err.details(), err.details()


def test_concurrent_enrolments_never_exceed_the_uses(server):
    """Eight agents enrol at once with one token of three uses: exactly three get a certificate
    and the other five are UNAUTHENTICATED (used up); the token shows 3 of 3 used."""
    et = enrollment_token(server, uses=3)
    devices = [unique("py-race") for _ in range(8)]
    barrier = threading.Barrier(len(devices))
    results: dict[str, object] = {}

    def run(dev):
        ch = server.secure_channel()
        stub = server.stubs(ch).enrollment
        req = pb.EnrollRequest(token=et.token, device_id=dev,
                               csr_pem=make_csr(new_key(), cn=dev))
        barrier.wait(timeout=30)
        try:
            results[dev] = stub.Enroll(req, timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            results[dev] = e

    threads = [threading.Thread(target=run, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == len(devices)
    ok = [d for d, r in results.items() if isinstance(r, pb.DeviceCertificate)]
    refused = [r for r in results.values() if isinstance(r, grpc.RpcError)]
    assert len(ok) == 3, {d: (r if isinstance(r, pb.DeviceCertificate) else code_of(r))
                          for d, r in results.items()}
    assert all(results[d].device_id == d for d in ok)
    assert [r.code() for r in refused] == [grpc.StatusCode.UNAUTHENTICATED] * 5
    assert all("used up" in r.details() for r in refused), [r.details() for r in refused]
    assert used_count(server, et.info.id) == 3


def test_certificate_not_from_the_servers_ca(server):
    """A self-made certificate carrying a device URI is refused with UNAUTHENTICATED saying it
    was not issued by this server's CA."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "py-forged")])
    forged = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(days=1))
        .not_valid_after(now() + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(device_uri("py-forged"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    agent = server.stubs(server.mtls_channel(forged.public_bytes(serialization.Encoding.PEM),
                                             key_pem(key)))
    err = rpc_error(agent.events.Classify, event("", APP_TYPE, event_id="forged-1"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert "not issued by this server's CA" in err.details(), err.details()
    assert query_all(server.events, device_id="py-forged") == []


def test_revoke_device_reaches_the_open_channel(server):
    """After an administrator revokes a device, the next call on its still open channel is
    UNAUTHENTICATED saying it was revoked, and so is a new connection with the same certificate.
    The device can enrol again with a new enrolment token and its new certificate works. The
    revocation is audited naming the admin token."""
    device = unique("py-revoked-dev")
    cert_pem, kpem, _ = enroll(server, device)
    agent = server.stubs(server.mtls_channel(cert_pem, kpem))
    c = agent.events.Classify(event("", APP_TYPE, event_id="before"), timeout=RPC_TIMEOUT)
    assert c.stored is True

    r = server.access.RevokeDevice(pb.RevokeDeviceRequest(device_id=device), timeout=RPC_TIMEOUT)
    assert r.device_id == device
    assert r.HasField("revoked_at")

    for fn, req in [
        (agent.events.Classify, event("", APP_TYPE, event_id="after")),
        (agent.access.WhoAmI, pb.WhoAmIRequest()),
        (agent.enrollment.Renew, pb.RenewRequest(csr_pem=make_csr(new_key(), cn=device))),
    ]:
        err = rpc_error(fn, req)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
        assert "revoked" in err.details() and device in err.details(), err.details()
    fresh = server.stubs(server.mtls_channel(cert_pem, kpem))
    err = rpc_error(fresh.access.WhoAmI, pb.WhoAmIRequest())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    assert [x.event_id for x in query_all(server.events, device_id=device)] == ["before"]

    # Enrolling again gives a certificate the revocation does not cover.
    cert2, kpem2, _ = enroll(server, device)
    again = server.stubs(server.mtls_channel(cert2, kpem2))
    me = again.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name) == ("device", device)
    # ...while the old certificate stays revoked.
    err = rpc_error(server.stubs(server.mtls_channel(cert_pem, kpem)).access.WhoAmI,
                    pb.WhoAmIRequest())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)

    [audit] = audit_events(server, "FLEET_AUDIT_ACCESS", rpc="RevokeDevice",
                           target=f"device:{device}")
    assert audit.params["credential"] == "token:admin"
    assert "revoked" in audit.params["change"]
    assert audit.origin == pb.ORIGIN_SERVER


def test_renew_gives_a_new_working_certificate(server):
    """A device renews with its current certificate and a CSR for a new key: the new
    certificate names the same device, is issued by the CA, and works on a new connection.
    Renew with a CSR naming another device is PERMISSION_DENIED; with a token (even admin) it
    is PERMISSION_DENIED, as Renew is for devices only."""
    device = unique("py-renew")
    cert_pem, kpem, _ = enroll(server, device)
    agent = server.stubs(server.mtls_channel(cert_pem, kpem))

    new = new_key()
    renewed = agent.enrollment.Renew(pb.RenewRequest(csr_pem=make_csr(new, cn=device)),
                                     timeout=RPC_TIMEOUT)
    assert renewed.device_id == device
    assert renewed.ca_pem.encode() == server.ca_pem
    new_cert = x509.load_pem_x509_certificate(renewed.certificate_pem.encode())
    old_cert = x509.load_pem_x509_certificate(cert_pem)
    assert new_cert.serial_number != old_cert.serial_number
    assert new_cert.public_key().public_numbers() == new.public_key().public_numbers()
    new_cert.verify_directly_issued_by(x509.load_pem_x509_certificate(server.ca_pem))
    [uri] = new_cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uri == device_uri(device)

    renewed_agent = server.stubs(server.mtls_channel(renewed.certificate_pem, key_pem(new)))
    me = renewed_agent.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name) == ("device", device)
    c = renewed_agent.events.Classify(event("", APP_TYPE, event_id="renewed-1"),
                                      timeout=RPC_TIMEOUT)
    assert (c.device_id, c.stored) == (device, True)

    err = rpc_error(agent.enrollment.Renew,
                    pb.RenewRequest(csr_pem=make_csr(new_key(), cn="py-someone-else")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
    assert "py-someone-else" in err.details(), err.details()

    err = rpc_error(server.enrollment.Renew, pb.RenewRequest(csr_pem=make_csr(new_key())))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, code_of(err)
    assert "Renew" in err.details(), err.details()

    [audit] = audit_events(server, "FLEET_AUDIT_ACCESS", rpc="Renew", target=f"device:{device}")
    assert audit.params["credential"] == f"device:{device}"


# --------------------------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------------------------


def test_admin_writes_are_audited_with_the_credential(server):
    """Token creation and revocation and catalog changes each raise a stored audit event of
    their area's type naming the credential that made them, the RPC, the target and the
    change: the bootstrap admin appears as token:admin, a second admin token by its own name."""
    second = unique("py-admin2")
    admin2 = server.stubs(server.secure_channel(token=create_token(server, pb.ROLE_ADMIN, second)))
    [made] = audit_events(server, "FLEET_AUDIT_ACCESS", rpc="CreateToken",
                          target=f"token:{second}")
    assert made.params["credential"] == "token:admin"
    assert "admin" in made.params["change"]
    assert made.origin == pb.ORIGIN_SERVER
    assert made.event_type == "FLEET_AUDIT_ACCESS"
    assert made.severity == pb.SEVERITY_INFO

    viewer = unique("py-audited-viewer")
    resp = admin2.access.CreateToken(pb.CreateTokenRequest(name=viewer, role=pb.ROLE_VIEWER),
                                     timeout=RPC_TIMEOUT)
    assert resp.info.created_by == f"token:{second}"
    admin2.access.RevokeToken(pb.RevokeTokenRequest(name=viewer), timeout=RPC_TIMEOUT)
    [c] = audit_events(server, "FLEET_AUDIT_ACCESS", rpc="CreateToken", target=f"token:{viewer}")
    assert c.params["credential"] == f"token:{second}"
    assert "viewer" in c.params["change"]
    [r] = audit_events(server, "FLEET_AUDIT_ACCESS", rpc="RevokeToken", target=f"token:{viewer}")
    assert r.params["credential"] == f"token:{second}"

    admin2.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(event_type="PY_AUDITED_TYPE", severity=pb.SEVERITY_INFO),
        timeout=RPC_TIMEOUT)
    admin2.catalog.UpdateEventTypeSettings(
        pb.UpdateEventTypeSettingsRequest(event_type="PY_AUDITED_TYPE", retention_days=7),
        timeout=RPC_TIMEOUT)
    catalog = audit_events(server, "FLEET_AUDIT_CATALOG", credential=f"token:{second}")
    assert sorted(a.params["rpc"] for a in catalog) == ["RegisterEventType",
                                                        "UpdateEventTypeSettings"]
    assert all("PY_AUDITED_TYPE" in a.params["target"] for a in catalog), \
        [dict(a.params) for a in catalog]

    # Refused writes leave no audit event.
    v = server.stubs(server.secure_channel(token=create_token(server, pb.ROLE_VIEWER)))
    rpc_error(v.catalog.UpdateEventTypeSettings,
              pb.UpdateEventTypeSettingsRequest(event_type="PY_AUDITED_TYPE", retention_days=9))
    assert len(audit_events(server, "FLEET_AUDIT_CATALOG", target=catalog[0].params["target"])) \
        == 2


# --------------------------------------------------------------------------------------------
# insecure_plaintext
# --------------------------------------------------------------------------------------------


def test_insecure_plaintext_still_needs_credentials(server_factory):
    """With `[server] insecure_plaintext = true` the port speaks plaintext HTTP/2, but calls
    still need a credential: none is UNAUTHENTICATED, the admin token works, health is open."""
    srv = server_factory(DEFAULT_CONFIG + "\n[server]\ninsecure_plaintext = true\n",
                         name="plaintext")
    srv.start()
    assert srv.plaintext
    assert health_status(srv, srv.plaintext_channel()) == health_pb2.HealthCheckResponse.SERVING
    err = rpc_error(srv.stubs(srv.plaintext_channel()).events.QueryEvents,
                    pb.QueryEventsRequest())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, code_of(err)
    me = srv.access.WhoAmI(pb.WhoAmIRequest(), timeout=RPC_TIMEOUT)
    assert (me.kind, me.name, me.role) == ("token", "admin", pb.ROLE_ADMIN)
    c = srv.events.Classify(event("py-plain-1", APP_TYPE, event_id="plain-1"),
                            timeout=RPC_TIMEOUT)
    assert c.stored is True
