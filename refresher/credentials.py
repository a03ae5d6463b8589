"""Where client credentials come from, read again on every attempt.

Re-reading means a rotated client secret (a mounted Secret updated by the kubelet, a changed
environment in a CronJob) is picked up without a restart. Values never leave this module in
anything printable: `Credentials.__repr__` hides them.
"""

from __future__ import annotations

import configparser
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from refresher.errors import Reason, RefreshError

if TYPE_CHECKING:
    from refresher.config import CredentialSource, TokenJobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CredentialRef:
    """One value, given literally (only for non-secret values), by env var, or by file."""

    value: str | None = None
    env: str | None = None
    file: Path | None = None

    @classmethod
    def of(cls, source: CredentialSource) -> CredentialRef:
        return cls(value=source.value, env=source.env, file=source.file)

    def describe(self) -> str:
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        return "literal value"

    def read(self) -> str:
        if self.value is not None:
            return self.value
        if self.env is not None:
            try:
                value = os.environ.get(self.env)
            except ValueError:  # a name no environment can hold (a lone surrogate)
                value = None
            if value is None:
                raise RefreshError(
                    Reason.CREDENTIALS, f"environment variable {self.env} is not set"
                )
            return value
        assert self.file is not None
        try:
            # Kubernetes Secret files and `echo > file` both tend to end in a newline that is
            # not part of the secret.
            return _read_text(self.file).rstrip("\r\n")
        except OSError as err:
            raise RefreshError(
                Reason.CREDENTIALS, f"cannot read {self.file}: {err.strerror}"
            ) from None


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: str = field(repr=False)
    # Written beside the token (Lucidtech's api_key); secret too.
    extras: dict[str, str] = field(default_factory=dict, repr=False)
    # Where the IdP lives, when a credentials file says so (Lucidtech's `auth_endpoint`);
    # `endpoints.token_url` turns it into the token URL.
    auth_endpoint: str | None = None


_warned_readable: set[Path] = set()

# A client secret or a credentials.cfg is a few hundred bytes; a file far larger (or endless,
# like /dev/zero given by mistake) is not one and is not read into memory.
MAX_CREDENTIAL_FILE_BYTES = 64 * 1024


def _read_text(path: Path) -> str:
    """A credential file's text. Raises OSError (unreadable) or RefreshError (not one)."""
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise RefreshError(Reason.CREDENTIALS, f"{path} is not UTF-8 text") from None


def read_credential_file(path: Path) -> bytes:
    """A key, certificate or token file's bytes, read as a secret file is (no FIFO, no
    endless file, a warning when every user may read it). Raises RefreshError
    (CREDENTIALS) with the reason, never the content."""
    try:
        return _read_bytes(path)
    except OSError as err:
        raise RefreshError(Reason.CREDENTIALS, f"cannot read {path}: {err.strerror}") from None


def _read_bytes(path: Path) -> bytes:
    """A credential file's bytes. Raises OSError (unreadable) or RefreshError (not one).

    Warns once per path when every user may read the file. Group-readable files are not
    warned about: a Kubernetes Secret volume with `fsGroup` (or `defaultMode: 0440`) gives
    exactly that, on purpose, to share the secret with the pod's group; a warning on every
    such start would teach operators to ignore the one that matters.
    """
    try:
        # os.open rather than a text-mode open(): read on every attempt, and a text wrapper
        # costs more than the read itself.
        # O_NONBLOCK: a FIFO at the path must not hold a refresh thread for ever.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except ValueError:  # a NUL byte or a lone surrogate in the path
        raise RefreshError(
            Reason.CREDENTIALS, f"cannot read {str(path)!r}: not a valid path"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a FIFO, a device, a folder: not a credential
            raise RefreshError(Reason.CREDENTIALS, f"{path} is not a regular file")
        if mode & stat.S_IROTH and path not in _warned_readable:
            _warned_readable.add(path)
            log.warning("credential file is readable by every user", extra={"path": str(path)})
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CREDENTIAL_FILE_BYTES and (chunk := os.read(fd, 64 * 1024)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_CREDENTIAL_FILE_BYTES:
        raise RefreshError(
            Reason.CREDENTIALS,
            f"{path} is longer than {MAX_CREDENTIAL_FILE_BYTES} bytes; not a credential",
        )
    return b"".join(chunks)


def read_lucidtech_cfg(path: Path) -> dict[str, str]:
    """Parse Lucidtech's `credentials.cfg` (`key = value` lines, no section header)."""
    try:
        text = _read_text(path)
    except OSError as err:
        raise RefreshError(Reason.CREDENTIALS, f"cannot read {path}: {err.strerror}") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string("[lucidtech]\n" + text, source=str(path))
    except configparser.Error:
        # configparser's messages quote the offending line, which may hold the secret.
        raise RefreshError(
            Reason.CREDENTIALS, f"{path} is not a `key = value` credentials file"
        ) from None
    values = {key: value.strip() for key, value in parser.items("lucidtech")}
    missing = [key for key in ("client_id", "client_secret") if not values.get(key)]
    if missing:
        raise RefreshError(Reason.CREDENTIALS, f"{path} lacks {', '.join(missing)}")
    return values


def lucidtech_credentials(path: Path) -> Credentials:
    values = read_lucidtech_cfg(path)
    extras = {"api_key": values["api_key"]} if values.get("api_key") else {}
    return Credentials(
        client_id=values["client_id"],
        client_secret=values["client_secret"],
        extras=extras,
        auth_endpoint=values.get("auth_endpoint") or None,
    )


def _combine(
    from_file: Credentials | None,
    client_id: str | None,
    client_secret: str | None,
    *,
    needs_secret: bool = True,
) -> Credentials:
    """Values given in the job win over those of its credentials file. A method without a
    client secret (a private key, a certificate, a federated token) has an empty one."""
    if from_file is not None:
        return Credentials(
            client_id=from_file.client_id if client_id is None else client_id,
            client_secret=from_file.client_secret if client_secret is None else client_secret,
            extras=from_file.extras,
            auth_endpoint=from_file.auth_endpoint,
        )
    if client_id is None or (needs_secret and client_secret is None):
        # validation makes this unreachable
        raise RefreshError(Reason.CREDENTIALS, "no client_id and client_secret configured")
    return Credentials(client_id=client_id, client_secret=client_secret or "")


def read_credentials(job: TokenJobConfig) -> Credentials:
    """Read a job's credentials now. Raises RefreshError(CREDENTIALS) when a source is
    unreadable."""
    from_file = (
        lucidtech_credentials(job.credentials_file) if job.credentials_file is not None else None
    )
    client_id = CredentialRef.of(job.client_id).read() if job.client_id else None
    client_secret = CredentialRef.of(job.client_secret).read() if job.client_secret else None
    return _combine(from_file, client_id, client_secret, needs_secret=job.uses_client_secret)


def check_credentials(job: TokenJobConfig, path: str) -> tuple[list[str], Credentials | None]:
    """For config validation: every unreadable source of a job, each with its config path,
    and the credentials when all could be read (each source read once)."""
    problems: list[str] = []
    from_file: Credentials | None = None
    if job.credentials_file is not None:
        try:
            from_file = lucidtech_credentials(job.credentials_file)
        except RefreshError as err:
            problems.append(f"{path}.credentials_file: {err.message}")
    else:
        required = ("client_id", "client_secret") if job.uses_client_secret else ("client_id",)
        hint = " (or give credentials_file)" if job.uses_client_secret else ""
        problems += [
            f"{path}.{name}: required{hint}" for name in required if getattr(job, name) is None
        ]
    values: dict[str, str] = {}
    for name in ("client_id", "client_secret"):
        source: CredentialSource | None = getattr(job, name)
        if source is not None:
            try:
                values[name] = CredentialRef.of(source).read()
            except RefreshError as err:
                problems.append(f"{path}.{name}: {err.message}")
    if problems:
        return problems, None
    credentials = _combine(
        from_file,
        values.get("client_id"),
        values.get("client_secret"),
        needs_secret=job.uses_client_secret,
    )
    return [], credentials
