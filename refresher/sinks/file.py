"""A token in a file, written atomically (design rule 5).

The new content goes to a temporary file in the same folder, is fsynced, then renamed over
the target: a reader sees the old token or the new one, never a torn one, and a crash leaves
one of the two. Formats that do not carry the expiry (`raw`, `header`) get a small metadata
file beside them (`.<name>.refresher.json`) so a restart knows when an opaque token expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import tempfile
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refresher.config import FileSinkConfig
from refresher.errors import Reason, RefreshError
from refresher.tokens import Token, fingerprint, stored_times

log = logging.getLogger(__name__)

ABANDONED_AFTER = 60.0  # seconds; see FileSink._remove_abandoned_temp_files
_swept_folders: set[Path] = set()
_swept_lock = threading.Lock()


def atomic_write(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Replace `path` with `data` so that no reader ever sees a partial file.

    `durable` fsyncs the content before the rename, so that even a power loss leaves the old
    or the new content, not an empty file; the rename itself is made durable by `sync_dir`.
    """
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # before any byte is written: the token is never world-readable
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def sync_dir(folder: Path) -> None:
    """Make renames in `folder` durable. Readers already see them; this is for crashes."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _env_line(key: str, value: str) -> str:
    return f"{key}={shlex.quote(value)}\n"


def render(token: Token, fmt: str) -> bytes:
    """The file content for a token in one of the formats."""
    if fmt == "raw":
        return token.access_token.encode()
    if fmt == "header":
        return f"Authorization: Bearer {token.access_token}".encode()
    if fmt == "json":
        document: dict[str, Any] = {
            "access_token": token.access_token,
            "token_type": token.token_type,
            "expires_at": _iso(token.expires_at),
            "expires_at_epoch": round(token.expires_at, 3),
            "issued_at_epoch": round(token.issued_at, 3),
            "scope": token.scope,
            **token.extras,
        }
        return (json.dumps(document, indent=2) + "\n").encode()
    lines = [
        _env_line("ACCESS_TOKEN", token.access_token),
        _env_line("TOKEN_TYPE", token.token_type),
        _env_line("TOKEN_EXPIRES_AT", f"{token.expires_at:.3f}"),
        _env_line("TOKEN_ISSUED_AT", f"{token.issued_at:.3f}"),
    ]
    if token.scope:
        lines.append(_env_line("TOKEN_SCOPE", token.scope))
    lines += [_env_line(key.upper(), value) for key, value in token.extras.items()]
    return "".join(lines).encode()


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


class FileSink:
    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        self.path = Path(os.path.abspath(config.path))
        self.name = f"file:{self.path}"
        self.meta_path = self.path.with_name(f".{self.path.name}.refresher.json")

    # ------------------------------------------------------------------------------ write

    def write(self, token: Token) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, render(token, self.config.format), self.config.mode)
        except OSError as err:
            raise RefreshError(
                Reason.SINK, f"cannot write {self.path}: {err.strerror or type(err).__name__}"
            ) from None

    @staticmethod
    def _needs_metadata(token: Token) -> bool:
        """Whether reading the token back could not tell its expiry safely by itself: opaque
        tokens, and JWTs whose `exp` is later than the expiry we determined (a shorter
        `expires_in`). A stale metadata file is harmless: it names another fingerprint."""
        times = stored_times(token.access_token, token.issued_at)
        return times is None or times[1] > token.expires_at

    def settle(self, token: Token) -> None:
        # The metadata is only a hint for restarts, keyed by fingerprint: if a crash loses it,
        # a restart falls back to the JWT's exp or refreshes. So it is written after the token
        # (outside the write window) and without an fsync of its own.
        try:
            if self.config.format in ("raw", "header") and self._needs_metadata(token):
                meta = {
                    "fingerprint": token.fingerprint,
                    "issued_at": token.issued_at,
                    "expires_at": token.expires_at,
                    "scope": token.scope,
                }
                atomic_write(
                    self.meta_path, json.dumps(meta).encode(), self.config.mode, durable=False
                )
        except OSError as err:
            log.warning(
                "cannot write token metadata",
                extra={"path": str(self.meta_path), "error": err.strerror or type(err).__name__},
            )
        sync_dir(self.path.parent)  # makes both renames durable

    # ------------------------------------------------------------------------------- read

    def read(self, now: float) -> Token | None:
        self._remove_abandoned_temp_files(now)
        try:
            content = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise RefreshError(Reason.SINK, f"cannot read {self.path}: {reason}") from None
        parse = {"raw": self._parse_raw, "header": self._parse_header, "json": self._parse_json}
        return parse.get(self.config.format, self._parse_env)(content, now)

    def _remove_abandoned_temp_files(self, now: float) -> None:
        """A process killed between creating a temp file and renaming it leaves the file
        behind. A write takes milliseconds, so one older than a minute is abandoned (younger
        ones may be a live write by another process, e.g. while `refresher status` runs).
        Each folder is swept once per process: with thousands of tokens in one folder, a
        sweep per token would cost a directory listing per token."""
        folder = self.path.parent
        with _swept_lock:
            if folder in _swept_folders:
                return
            _swept_folders.add(folder)
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > ABANDONED_AFTER:
                            os.unlink(entry.path)

    def _with_times(
        self,
        access_token: str,
        times: tuple[float, float] | None,
        scope: str | None,
        extras: Mapping[str, str],
    ) -> Token | None:
        if not access_token or times is None:
            return None  # unknown expiry: treated as no token, so it gets refreshed
        issued_at, expires_at = times
        return Token(access_token, issued_at, expires_at, scope=scope, extras=dict(extras))

    def _sidecar_times(
        self, access_token: str, now: float
    ) -> tuple[tuple[float, float] | None, str | None]:
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint(access_token):
            issued_at, expires_at = _float(meta.get("issued_at")), _float(meta.get("expires_at"))
            scope = meta.get("scope") if isinstance(meta.get("scope"), str) else None
            if issued_at is not None and expires_at is not None:
                return (issued_at, expires_at), scope
        return stored_times(access_token, now), None

    def _parse_raw(self, content: str, now: float) -> Token | None:
        access_token = content.strip()
        times, scope = self._sidecar_times(access_token, now)
        return self._with_times(access_token, times, scope, {})

    def _parse_header(self, content: str, now: float) -> Token | None:
        prefix = "Authorization: Bearer "
        if not content.startswith(prefix):
            return None
        return self._parse_raw(content.removeprefix(prefix), now)

    def _parse_json(self, content: str, now: float) -> Token | None:
        try:
            document = json.loads(content)
        except ValueError:
            return None
        if not isinstance(document, dict) or not isinstance(document.get("access_token"), str):
            return None
        issued_at = _float(document.get("issued_at_epoch"))
        expires_at = _float(document.get("expires_at_epoch"))
        times = (
            (issued_at, expires_at) if issued_at is not None and expires_at is not None else None
        )
        scope = document.get("scope") if isinstance(document.get("scope"), str) else None
        known = {
            "access_token",
            "token_type",
            "expires_at",
            "expires_at_epoch",
            "issued_at_epoch",
            "scope",
        }
        extras = {k: v for k, v in document.items() if k not in known and isinstance(v, str)}
        return self._with_times(document["access_token"], times, scope, extras)

    def _parse_env(self, content: str, now: float) -> Token | None:
        values: dict[str, str] = {}
        for line in content.splitlines():
            key, sep, raw_value = line.partition("=")
            if not sep:
                continue
            try:
                parts = shlex.split(raw_value)
            except ValueError:
                return None
            values[key] = parts[0] if parts else ""
        issued_at = _float(values.pop("TOKEN_ISSUED_AT", None))
        expires_at = _float(values.pop("TOKEN_EXPIRES_AT", None))
        times = (
            (issued_at, expires_at) if issued_at is not None and expires_at is not None else None
        )
        access_token = values.pop("ACCESS_TOKEN", "")
        scope = values.pop("TOKEN_SCOPE", None)
        values.pop("TOKEN_TYPE", None)
        extras = {key.lower(): value for key, value in values.items()}
        return self._with_times(access_token, times, scope, extras)
