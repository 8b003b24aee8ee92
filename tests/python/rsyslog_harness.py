"""A real syslog receiver for the SIEM export tests: Debian's ``rsyslogd`` run as a child
process with a configuration of its own in a temporary directory.

One ``rsyslogd`` listens on three free loopback ports:

- ``tcp_port``: ``imtcp``, plain TCP. imtcp recognises RFC 6587 octet counting by itself
  (a frame starting with a digit), and non-transparent framing (LF) otherwise;
- ``tls_port``: ``imtcp`` with the ``gtls`` netstream driver (RFC 5425), server
  authentication only (``authMode="anon"``: the client is not asked for a certificate),
  with a certificate for ``localhost`` and ``127.0.0.1`` issued by a CA the harness makes
  (``ca_file``);
- ``udp_port``: ``imudp`` (RFC 5426, one message per datagram).

What arrives on each port is written by ``omfile`` to its own file (``tcp.log``, ``tls.log``,
``udp.log``), one message a line, as the *raw* message (``%rawmsg%``: exactly the bytes the
sender framed, without the framing), JSON-escaped by rsyslog (``%rawmsg:::json%``) so that a
tab, a line feed or a quote inside a message cannot be confused with the end of a line;
``lines()`` undoes the escaping and gives back the exact messages. Control characters are
not rewritten on reception (``parser.escapeControlCharactersOnReceive="off"``), so a LEEF tab
arrives as a tab.

The process is self-contained for a container without systemd and for a user without root:
no ``imuxsock`` (no ``/dev/log``), no ``imklog``, no journal; ``processInternalMessages="on"``
keeps rsyslog's own messages inside this instance, where they go to ``internal.log`` in the
temp dir (the default ruleset; the three inputs have rulesets of their own, so nothing of
rsyslog's own ends up among the received messages); the work directory, the pid file and
every output file are in the temp dir; DNS lookups of senders are off.

``start()`` waits, with a deadline and without a bare sleep, until both TCP ports accept a
connection (the TLS one: a full handshake against ``ca_file``) and the UDP port is bound.
``stop()`` is SIGTERM and a wait, ``kill()`` SIGKILL (a crash: whatever rsyslog had
received but not yet written is lost), and ``start()`` again brings it back on the *same*
ports, appending to the same files.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

POLL_SECS = 0.02
START_DEADLINE_SECS = 15.0
STOP_DEADLINE_SECS = 10.0

KINDS = ("tcp", "tls", "udp")

_RUNNING: set["RsyslogHarness"] = set()


@atexit.register
def _kill_leftovers() -> None:  # a harness whose test never got to its teardown
    for h in list(_RUNNING):
        h.kill()


def rsyslogd_binary() -> str | None:
    """The path of rsyslogd, or None when it is not installed."""
    found = shutil.which("rsyslogd")
    if found:
        return found
    for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd"):
        if os.access(p, os.X_OK):
            return p
    return None


def gtls_available() -> bool:
    """Whether rsyslog's gtls netstream driver (Debian package rsyslog-gnutls) is installed."""
    import glob

    return bool(glob.glob("/usr/lib/*/rsyslog/lmnsd_gtls.so") or
                glob.glob("/usr/lib/rsyslog/lmnsd_gtls.so"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# Certificates
# ------------------------------------------------------------------------------------------


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, object, object]:
    """A self-signed CA (EC P-256): writes <name>.pem and returns (path, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rsyslog harness {name}")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    path = Path(directory) / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(directory: Path, ca_cert, ca_key,
                     dns_names=("localhost",), ips=("127.0.0.1",)) -> tuple[Path, Path]:
    """A server certificate for the given names, issued by the CA: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    san = [x509.DNSName(n) for n in dns_names] + [
        x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = Path(directory) / "server.pem"
    key_path = Path(directory) / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


# ------------------------------------------------------------------------------------------
# Framing helpers for senders (the self-test; the server does its own)
# ------------------------------------------------------------------------------------------


def octet_counted(message: str | bytes) -> bytes:
    """RFC 6587 3.4.1: "<length in bytes> <message>"."""
    data = message.encode() if isinstance(message, str) else message
    return str(len(data)).encode() + b" " + data


def _unescape_line(line: bytes) -> str:
    # rsyslog's ":::json" option escapes the message as the inside of a JSON string. Bytes
    # that are not UTF-8 (garbage someone sent, e.g. a TLS ClientHello on the plain port)
    # come back as U+FFFD.
    text = line.decode("utf-8", errors="replace")
    try:
        return json.loads('"' + text + '"')
    except ValueError:
        return text


class RsyslogHarness:
    """One rsyslogd with a TCP, a TLS and a UDP input on loopback (see the module doc)."""

    def __init__(self, workdir: Path, tls: bool = True, udp: bool = True):
        binary = rsyslogd_binary()
        if binary is None:
            raise RuntimeError("rsyslogd is not installed (scripts/test.sh installs it: "
                               "apt-get install rsyslog rsyslog-gnutls)")
        if tls and not gtls_available():
            raise RuntimeError("rsyslog's gtls driver is not installed (rsyslog-gnutls)")
        self.binary = binary
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.udp = udp
        self.host = "127.0.0.1"
        # Chosen once: a restart comes back on the same ports.
        self.tcp_port = free_port()
        self.tls_port = free_port() if tls else None
        self.udp_port = free_port(socket.SOCK_DGRAM) if udp else None
        self.conf_path = self.dir / "rsyslog.conf"
        self.pid_path = self.dir / "rsyslogd.pid"
        self.internal_log = self.dir / "internal.log"
        self.work_dir = self.dir / "work"
        self.work_dir.mkdir(exist_ok=True)
        self.ca_file: Path | None = None
        self.cert_file: Path | None = None
        self.key_file: Path | None = None
        if tls:
            self.ca_file, ca_cert, ca_key = make_ca(self.dir, "ca")
            self.cert_file, self.key_file = make_server_cert(self.dir, ca_cert, ca_key)
        self.proc: subprocess.Popen | None = None
        self._starts = 0
        self._write_config()

    # -- configuration --------------------------------------------------------------------

    def output(self, kind: str = "tcp") -> Path:
        assert kind in KINDS, kind
        return self.dir / f"{kind}.log"

    def _write_config(self) -> None:
        q = json.dumps  # an rsyslog string literal: double quotes, backslash escapes
        glob = [
            f"workDirectory={q(str(self.work_dir))}",
            'processInternalMessages="on"',
            'net.enableDNS="off"',
            'parser.escapeControlCharactersOnReceive="off"',
            'maxMessageSize="64k"',
        ]
        if self.tls:
            glob += [
                'defaultNetstreamDriver="ptcp"',
                f"defaultNetstreamDriverCAFile={q(str(self.ca_file))}",
                f"defaultNetstreamDriverCertFile={q(str(self.cert_file))}",
                f"defaultNetstreamDriverKeyFile={q(str(self.key_file))}",
            ]
        lines = [
            "# Written by tests/python/rsyslog_harness.py: a receiver for one test run.",
            "global(" + "\n       ".join(glob) + ")",
            'module(load="imtcp")',
        ]
        if self.udp:
            lines.append('module(load="imudp")')
        lines += [
            'template(name="raw" type="string" string="%rawmsg:::json%\\n")',
        ]
        kinds = ["tcp"] + (["tls"] if self.tls else []) + (["udp"] if self.udp else [])
        for kind in kinds:
            lines.append(
                f'ruleset(name="recv_{kind}") {{ action(type="omfile" '
                f'file={q(str(self.output(kind)))} template="raw") }}'
            )
        lines.append(
            f'input(type="imtcp" address="{self.host}" port="{self.tcp_port}" '
            'ruleset="recv_tcp")'
        )
        if self.tls:
            lines.append(
                f'input(type="imtcp" address="{self.host}" port="{self.tls_port}" '
                'ruleset="recv_tls" streamDriver.name="gtls" streamDriver.mode="1" '
                'streamDriver.authMode="anon")'
            )
        if self.udp:
            lines.append(
                f'input(type="imudp" address="{self.host}" port="{self.udp_port}" '
                'ruleset="recv_udp")'
            )
        # rsyslog's own messages (start, errors such as a failed TLS handshake).
        lines.append(f"*.* action(type=\"omfile\" file={q(str(self.internal_log))})")
        self.conf_path.write_text("\n".join(lines) + "\n")

    # -- process control -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [self.binary, "-n", "-f", str(self.conf_path), "-i", str(self.pid_path)]

    def start(self, deadline: float = START_DEADLINE_SECS) -> "RsyslogHarness":
        assert self.proc is None, "rsyslogd already running"
        self._starts += 1
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS",
                                                                  "LISTEN_PID")}
        log = open(self.dir / f"rsyslogd.{self._starts}.out", "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        finally:
            log.close()
        _RUNNING.add(self)
        self._wait_ready(time.monotonic() + deadline)
        return self

    def _diagnostics(self) -> str:
        out = []
        for p in sorted(self.dir.glob("rsyslogd.*.out")) + [self.internal_log]:
            if p.exists():
                out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def _wait_ready(self, end: float) -> None:
        pending = {"tcp"} | ({"tls"} if self.tls else set()) | ({"udp"} if self.udp else set())
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                _RUNNING.discard(self)
                raise RuntimeError(f"rsyslogd exited with code {rc} before it was ready\n"
                                   f"{self._diagnostics()}")
            for kind in sorted(pending):
                if self._probe(kind):
                    pending.discard(kind)
            if not pending:
                return
            if time.monotonic() >= end:
                self.kill()
                raise RuntimeError(f"rsyslogd not ready ({', '.join(sorted(pending))} not "
                                   f"listening) in time\n{self._diagnostics()}")
            time.sleep(POLL_SECS)

    def _probe(self, kind: str) -> bool:
        try:
            if kind == "tcp":
                with socket.create_connection((self.host, self.tcp_port), timeout=1.0):
                    return True
            if kind == "tls":
                with self.tls_connect(timeout=1.0):
                    return True
            if kind == "udp":
                return self._udp_bound()
        except OSError:
            return False
        return False

    def _udp_bound(self) -> bool:
        # /proc/net/udp: "sl local_address rem_address st ...", the address as hex IP:port.
        want = f"0100007F:{self.udp_port:04X}"
        try:
            with open("/proc/net/udp") as f:
                return any(line.split()[1] == want for line in list(f)[1:])
        except OSError:
            return True  # no procfs: the first datagram will tell

    def stop(self, deadline: float = STOP_DEADLINE_SECS) -> int:
        """SIGTERM, then wait for the exit (SIGKILL after the deadline). Returns the code."""
        if self.proc is None:
            return 0
        proc = self.proc
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        self.proc = None
        _RUNNING.discard(self)
        return rc

    def kill(self) -> int:
        """SIGKILL: a crash (what rsyslog had in memory and not yet written is lost)."""
        if self.proc is None:
            return 0
        proc = self.proc
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        self.proc = None
        _RUNNING.discard(self)
        return rc

    def restart(self) -> "RsyslogHarness":
        """Stops (if running) and starts again on the same ports."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> "RsyslogHarness":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- clients (the self-test and the TLS readiness probe) -------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        assert self.ca_file is not None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def tls_connect(self, server_hostname: str = "localhost", timeout: float = 5.0):
        raw = socket.create_connection((self.host, self.tls_port), timeout=timeout)
        try:
            return self.ssl_context().wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise

    # -- what arrived ----------------------------------------------------------------------

    def lines(self, kind: str = "tcp") -> list[str]:
        """Every message received on that input so far, exactly as sent (without framing).
        A last line still being written (no newline yet) is left for the next call."""
        path = self.output(kind)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data.split(b"\n")[:-1]
        return [_unescape_line(line) for line in complete]

    def wait_for_lines(self, n: int, deadline: float = 20.0, kind: str = "tcp",
                       select=None) -> list[str]:
        """Polls until at least n messages (of those `select` keeps, when given) arrived;
        returns them. Fails with what did arrive when the deadline passes."""
        end = time.monotonic() + deadline
        while True:
            got = self.lines(kind)
            if select is not None:
                got = [m for m in got if select(m)]
            if len(got) >= n:
                return got
            if time.monotonic() >= end:
                raise AssertionError(
                    f"{kind}: {len(got)} messages after {deadline:.0f} s, expected {n}; "
                    f"last: {got[-3:]!r}\n{self._diagnostics()[-3000:]}")
            time.sleep(POLL_SECS * 2)
