"""A loopback HTTP(S) server whose answers are scripted as raw bytes, for hostile-IdP tests.

`tests/test_idp_client.py`'s `_Scripted` answers with a status, headers and a body; the tests here
also need what no well-behaved server does: a body that trickles in a few bytes at a time,
chunked transfer encoding without end, a gzip bomb, and TLS with a certificate from a CA
that nobody trusts. A `ScriptedServer` reads each request (recording it), then hands the
connection to a script: a function that writes whatever it likes to the socket.

A `ScriptedServer` is a `refresher.loopback.LoopbackServer`: it binds to 127.0.0.1 only, and
`stop()` ends the scripts that are still writing (they wait on `stopping` instead of sleeping,
and their connections are shut down), so no test leaves a thread behind for long.

The certificate helpers at the end make what the local token server's TLS takes
(`refresher.localidp.IdPTls`, PEM material: the shipped module never imports trustme):
`idp_tls` (a server certificate for 127.0.0.1 and the client CA to accept),
`client_cert` (a certificate from a CA, with a chosen validity) and `self_signed_cert`,
each written to files for `requests`' `cert=`.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from refresher.localidp import IdPTls
from refresher.loopback import LoopbackServer, owner_of

if TYPE_CHECKING:  # imported where used: the scripted server's users need neither
    import trustme
    from cryptography import x509

__all__ = [
    "ClientCert",
    "Connection",
    "Recorded",
    "Script",
    "ScriptedServer",
    "client_cert",
    "fixed",
    "idp_tls",
    "response_head",
    "self_signed_cert",
    "self_signed_certificate",
    "serving",
]

_MAX_REQUEST = 64 * 1024


@dataclass(frozen=True)
class Recorded:
    """One request as the server read it off the socket."""

    request_line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Connection:
    """What a script gets: the socket to write to, and an event set when the server stops."""

    sock: socket.socket
    stopping: threading.Event

    def send(self, data: bytes) -> bool:
        """Write; False when the client has gone away (which ends most scripts)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def pause(self, seconds: float) -> bool:
        """Wait, unless the server is stopping; False means stop writing."""
        return not self.stopping.wait(seconds)


Script = Callable[[Connection], None]


def response_head(status: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} Scripted", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fixed(status: int, headers: dict[str, str], body: bytes) -> Script:
    """A complete answer with a Content-Length."""

    def script(connection: Connection) -> None:
        head = response_head(status, {**headers, "Content-Length": str(len(body))})
        connection.send(head + body)

    return script


class _Handler(socketserver.BaseRequestHandler):
    @property
    def owner(self) -> ScriptedServer:
        return cast(ScriptedServer, owner_of(self))

    def handle(self) -> None:
        self.request.settimeout(5.0)
        try:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.do_handshake()  # a client that distrusts us stops here
            recorded = _read_request(self.request)
        except (OSError, ValueError):
            return
        script = self.owner._record(recorded)
        script(Connection(self.request, self.owner.stopping))
        with suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)


def _read_request(sock: socket.socket) -> Recorded:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > _MAX_REQUEST:
            raise ValueError("incomplete request head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = min(int(headers.get("content-length", "0")), _MAX_REQUEST)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return Recorded(request_line, headers, body)


class ScriptedServer(LoopbackServer):
    """`with ScriptedServer(script) as server:` serves `server.url()` until the block ends."""

    def __init__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(_Handler, name="scripted")
        self._script = script
        self._tls = tls
        self._lock = threading.Lock()
        self._recorded: list[Recorded] = []

    def _wrap(self, sock: socket.socket) -> socket.socket:
        if self._tls is None:
            return sock
        # The handshake happens in the handler's thread (on first read), not in accept().
        return self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def _record(self, recorded: Recorded) -> Script:
        """Remember a request; the script to answer it with."""
        with self._lock:
            self._recorded.append(recorded)
            return self._script

    def url(self, path: str = "/token", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def set_script(self, script: Script) -> None:
        with self._lock:
            self._script = script

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._recorded)


@contextmanager
def serving(script: Script, *, tls: ssl.SSLContext | None = None) -> Iterator[ScriptedServer]:
    with ScriptedServer(script, tls=tls) as server:
        yield server


# ------------------------------------------------- certificates for the local token server


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key, written to files (for `requests`' ``cert=``)."""

    cert_file: str
    key_file: str
    cert_pem: bytes
    sha256: str
    """Hex SHA-256 of the certificate's DER (what `Authentication.client_cert_sha256` shows)."""
    subject_dn: str
    """RFC 4514, as `IdPTls.tls_clients` wants it."""
    not_after: datetime.datetime

    @property
    def requests_cert(self) -> tuple[str, str]:
        return self.cert_file, self.key_file


def idp_tls(
    server_ca: trustme.CA,
    directory: Path,
    *,
    client_ca: trustme.CA | None = None,
    require_client_cert: bool = False,
    tls_clients: Mapping[str, str] | None = None,
    self_signed_clients: Mapping[str, str | bytes] | None = None,
) -> IdPTls:
    """TLS for a `LocalIdP`: a certificate for 127.0.0.1 from ``server_ca`` (whose
    certificate is written to ``directory``, the `ca_bundle` for clients), and
    ``client_ca`` as the issuer of the client certificates it accepts."""
    leaf = server_ca.issue_cert("127.0.0.1")
    bundle = directory / f"localidp-ca-{id(server_ca):x}.pem"
    server_ca.cert_pem.write_to_path(str(bundle))
    return IdPTls(
        cert_chain_pem=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        private_key_pem=leaf.private_key_pem.bytes(),
        client_ca_pem=None if client_ca is None else client_ca.cert_pem.bytes(),
        require_client_cert=require_client_cert,
        tls_clients=dict(tls_clients or {}),
        self_signed_clients=dict(self_signed_clients or {}),
        ca_bundle=str(bundle),
    )


def client_cert(
    ca: trustme.CA,
    directory: Path,
    common_name: str,
    *,
    organization: str | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> ClientCert:
    """A client certificate from ``ca`` (subject ``CN=common_name``, trustme's OU and O):
    issuing another with the same arguments is what cert-manager's renewal looks like."""
    leaf = ca.issue_cert(
        f"{common_name}.clients.test",  # trustme writes an empty (invalid) SAN without one
        common_name=common_name,
        organization_name=organization,
        not_before=not_before,
        not_after=not_after,
    )
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return _written(directory, chain, leaf.private_key_pem.bytes())


def self_signed_certificate(
    private_key: Any,
    common_name: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.Certificate:
    """A self-signed client certificate for a key (no key usage extension: OpenSSL takes a
    self-signed certificate for its own issuer only without one, or with keyCertSign)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(private_key, hashes.SHA256())
    )


def self_signed_cert(
    directory: Path,
    common_name: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> ClientCert:
    """A self-signed client certificate (P-256) and its key (self_signed_tls_client_auth)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = self_signed_certificate(
        key, common_name, not_before=not_before, not_after=not_after
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _written(directory, certificate.public_bytes(serialization.Encoding.PEM), key_pem)


def _written(directory: Path, chain_pem: bytes, key_pem: bytes) -> ClientCert:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certificate = x509.load_pem_x509_certificate(chain_pem)
    der = certificate.public_bytes(serialization.Encoding.DER)
    sha256 = hashlib.sha256(der).hexdigest()
    cert_file, key_file = (
        directory / f"client-{sha256[:16]}.pem",
        directory / f"client-{sha256[:16]}.key",
    )
    cert_file.write_bytes(chain_pem)
    key_file.write_bytes(key_pem)
    return ClientCert(
        cert_file=str(cert_file),
        key_file=str(key_file),
        cert_pem=chain_pem,
        sha256=sha256,
        subject_dn=certificate.subject.rfc4514_string(),
        not_after=certificate.not_valid_after_utc,
    )
