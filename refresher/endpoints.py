"""Where a job asks for its token: the one resolver of a job's token endpoint.

The URL comes from the job's `token_url`; from a credentials file's `auth_endpoint` joined
with the provider's token path (Lucidtech); or from the issuer's discovery document
(discovery.py), whose mTLS endpoint alias (RFC 8705 5) takes over for a client certificate
method. That is why this is a function of the job, its credentials and its IdP's metadata,
called on every attempt, and not a field of the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from refresher.errors import Reason, RefreshError
from refresher.presets import PRESETS, TLS_METHODS

if TYPE_CHECKING:
    from refresher.config import TokenJobConfig
    from refresher.credentials import Credentials
    from refresher.discovery import ProviderMetadata

DEFAULT_TOKEN_PATH = "/oauth2/token"


def token_url(
    job: TokenJobConfig, credentials: Credentials, metadata: ProviderMetadata | None = None
) -> str:
    """The token endpoint for this job with these credentials (and its IdP's metadata, for
    a job with an issuer)."""
    if job.token_url:
        return job.token_url
    if job.issuer_url is not None:
        if metadata is None:
            raise RefreshError(Reason.DISCOVERY, "the token endpoint is not discovered yet")
        if job.auth in TLS_METHODS:
            return metadata.mtls_token_endpoint or metadata.token_endpoint
        return metadata.token_endpoint
    if credentials.auth_endpoint:
        path = PRESETS[job.provider].token_path or DEFAULT_TOKEN_PATH
        return credentials.auth_endpoint.rstrip("/") + path
    raise RefreshError(
        Reason.CREDENTIALS, "no token URL: set `token_url`, or `auth_endpoint` in credentials_file"
    )


_DEFAULT_PORTS = {"https": 443, "http": 80}


def endpoint_key(url: str) -> str:
    """One spelling per endpoint: `HTTPS://IdP.example:443/token/` and
    `https://idp.example/token` are the same key. Rate limits (and the one-writer rule) key on
    it. The query string is kept (it may name a tenant); a fragment never reaches a server."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = parts.path.rstrip("/") or "/"
    return urlunsplit((scheme, netloc, path, parts.query, ""))
