"""Key material for client-authentication tests: RSA and EC keys, certificates, and the
projected service-account tokens a cluster would issue, written to files as a mounted Secret
or a projected volume would hold them."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["KeyPair", "ServiceAccountIssuer", "new_ec_key", "new_rsa_key", "write_atomically"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` in one rename, as the kubelet swaps a mounted Secret's content."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


@dataclass
class KeyPair:
    """A private key and a self-signed certificate for it, each in its own PEM file."""

    key: PrivateKey = field(repr=False)
    key_file: Path
    cert_file: Path
    certificate: x509.Certificate = field(repr=False)

    @classmethod
    def create(
        cls,
        folder: Path,
        name: str = "client",
        *,
        key: PrivateKey | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> KeyPair:
        folder.mkdir(parents=True, exist_ok=True)
        pair = cls(
            key=key or new_rsa_key(),
            key_file=folder / f"{name}.key",
            cert_file=folder / f"{name}.crt",
            certificate=None,  # type: ignore[arg-type]  # set by `reissue`
        )
        pair.reissue(key=pair.key, not_before=not_before, not_after=not_after)
        return pair

    def reissue(
        self,
        *,
        key: PrivateKey | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        common_name: str = "refresher-test-client",
    ) -> None:
        """A new certificate (for a new key, when given), both files replaced atomically."""
        self.key = key or self.key
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        write_atomically(self.key_file, self.private_pem)
        write_atomically(self.cert_file, self.certificate_pem, mode=0o640)

    @property
    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def x5t_s256(self) -> str:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass
class ServiceAccountIssuer:
    """A cluster's service-account token issuer: signs projected tokens with its own key,
    the way the kubelet's TokenRequest does, and writes them where a pod would read them."""

    issuer: str = "https://kubernetes.default.svc.cluster.local"
    key: rsa.RSAPrivateKey = field(default_factory=new_rsa_key, repr=False)

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        *,
        audience: str,
        subject: str = "system:serviceaccount:apps:refresher",
        issued_at: float,
        lifetime: float = 3600.0,
        **claims: Any,
    ) -> str:
        body = {
            "iss": self.issuer,
            "sub": subject,
            "aud": [audience],
            "iat": int(issued_at),
            "nbf": int(issued_at),
            "exp": int(issued_at + lifetime),
            "kubernetes.io": {"namespace": subject.split(":")[2]},
            **claims,
        }
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "cluster"})

    def project(self, path: Path, **kwargs: Any) -> str:
        """Write a fresh token to `path` (atomically, as the kubelet rotates it)."""
        token = self.token(**kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, token.encode(), mode=0o640)
        return token
