"""Where a job asks for its token: the one resolver of a job's token endpoint.

Today the URL comes from the job's `token_url`, or from a credentials file's `auth_endpoint`
joined with the provider's token path (Lucidtech). Discovery and mTLS endpoint aliases will
resolve here too, which is why this is a function of the job *and* its credentials, called on
every attempt, and not a field of the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from refresher.errors import Reason, RefreshError
from refresher.presets import PRESETS

if TYPE_CHECKING:
    from refresher.config import TokenJobConfig
    from refresher.credentials import Credentials

DEFAULT_TOKEN_PATH = "/oauth2/token"


def token_url(job: TokenJobConfig, credentials: Credentials) -> str:
    """The token endpoint for this job with these credentials."""
    if job.token_url:
        return job.token_url
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
