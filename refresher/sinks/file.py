"""A token in a file, written atomically (rule 5 of docs/design.md).

The new content goes to a temporary file in the same folder, is fsynced, then renamed over
the target: a reader sees the old token or the new one, never a torn one, and a crash leaves
one of the two. Formats that do not carry the expiry (`raw`, `header`) get a small metadata
file beside them (`.<name>.refresher.json`) so a restart knows when an opaque token expires.

What is read back is not trusted: only a regular file (a FIFO would block, `/dev/zero` never
ends) of at most MAX_FILE_BYTES is read; a FIFO, device or socket at a sink path is never
replaced; and a symlink that another user (not root) planted in a world-writable folder such
as /tmp is never followed on the way to a sink. Temporary files are named
`.<name>.refresher-<16 hex>.tmp`, and only those of the sink's own files are ever removed, by
`remove_leftovers`, which the runner calls on start and read-only commands never do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from refresher.config import FileSinkConfig
from refresher.errors import Reason, RefreshError
from refresher.formats import StoredToken, number, parse, render
from refresher.tokens import Token, fingerprint, stored_times, token_problem

log = logging.getLogger(__name__)

ABANDONED_AFTER = 60.0  # seconds; see FileSink.remove_leftovers
# A token file is a few KiB at most (tokens are capped at 16 KiB by the IdP client).
MAX_FILE_BYTES = 64 * 1024
# `.<target name>.refresher-<16 hex digits>.tmp`: unmistakably ours, and says whose it is.
TEMP_FILE = re.compile(r"\.(?P<target>.+)\.refresher-[0-9a-f]{16}\.tmp")
# Per folder, the temp files found by the first sweep there, by target name: a folder is
# listed once per process, however many sinks it holds.
_leftovers: dict[Path, dict[str, list[str]]] = {}
_leftovers_lock = threading.Lock()


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path`, matching TEMP_FILE."""
    return path.with_name(f".{path.name}.refresher-{secrets.token_hex(8)}.tmp")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def refuse_special(path: Path) -> None:
    """Raise RefreshError(SINK) when `path` is a FIFO, device, socket or folder: replacing it
    by a rename would silently take it away from whoever made it. A regular file or a symlink
    is fine (a symlink is replaced, never written through)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise RefreshError(
            Reason.SINK, f"cannot write {path}: {err.strerror or type(err).__name__}"
        ) from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise RefreshError(
            Reason.SINK, f"{path} is {_kind(mode)}, not a regular file; refusing to replace it"
        )


def planted_symlink(path: Path) -> Path | None:
    """The first symlink on the way to `path` (its last component included) that sits in a
    world-writable folder (like /tmp) and belongs to neither this user nor root: another user
    may have planted it there to point our writes at their choice of folder. None when there
    is none (components that do not exist yet are created by us). Resolved component by
    component, as the kernel would, up to 40 links."""
    remaining = list(reversed(Path(os.path.abspath(path)).parts[1:]))
    current = Path("/")
    links = 0
    uid = os.geteuid()
    while remaining:
        name = remaining.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent  # `current` holds no symlinks, so this is its parent
            continue
        candidate = current / name
        try:
            info = os.lstat(candidate)
        except OSError:
            return None
        if not stat.S_ISLNK(info.st_mode):
            current = candidate
            continue
        links += 1
        try:
            folder_mode = os.stat(current).st_mode
            target = os.readlink(candidate)
        except OSError:
            return None
        if folder_mode & stat.S_IWOTH and info.st_uid not in (uid, 0):
            return candidate
        if links > 40:
            return None  # the kernel gives up too (ELOOP): the open or write fails
        if os.path.isabs(target):
            current = Path("/")
        remaining.extend(reversed(Path(target).parts[1 if os.path.isabs(target) else 0 :]))
    return None


def _check_path(path: Path, action: str) -> None:
    link = planted_symlink(path)
    if link is not None:
        raise RefreshError(
            Reason.SINK,
            f"cannot {action} {path}: {link} is a symlink another user made in a "
            "world-writable folder; not followed",
        )


def read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """The content of the regular file at `path` (a symlink to one is followed), None when
    there is none. Raises RefreshError(SINK) for anything else: another kind of file, more
    than `limit` bytes, an unreadable one. Never blocks on a FIFO, never reads without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RefreshError(
            Reason.SINK, f"cannot read {path}: {err.strerror or type(err).__name__}"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefreshError(Reason.SINK, f"cannot read {path}: it is {_kind(mode)}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise RefreshError(
            Reason.SINK, f"cannot read {path}: {err.strerror or type(err).__name__}"
        ) from None
    finally:
        os.close(fd)
    if size > limit:
        raise RefreshError(
            Reason.SINK, f"cannot read {path}: larger than {limit // 1024} KiB, not a token file"
        )
    return b"".join(chunks)


def atomic_write(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Replace `path` with `data` so that no reader ever sees a partial file.

    `durable` fsyncs the content before the rename, so that even a power loss leaves the old
    or the new content, not an empty file; the rename itself is made durable by `sync_dir`.
    """
    while True:
        temp_name = temp_path(path)
        try:
            # O_EXCL and O_NOFOLLOW: never an existing file, never through a symlink.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temp_name, flags, 0o600)
        except FileExistsError:  # 2**64 names: only ever by someone guessing on purpose
            continue
        break
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


def _temp_files(folder: Path) -> dict[str, list[str]]:
    """The names in `folder` matching TEMP_FILE, by the name of the file they were for."""
    found: dict[str, list[str]] = {}
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = TEMP_FILE.fullmatch(entry.name)
            if match:
                found.setdefault(match["target"], []).append(entry.name)
    return found


def sync_dir(folder: Path) -> None:
    """Make renames in `folder` durable. Readers already see them; this is for crashes."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class FileSink:
    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        self.path = config.absolute_path
        self.name = f"file:{self.path}"
        self.meta_path = config.metadata_file

    # ------------------------------------------------------------------------------ write

    def write(self, token: Token) -> None:
        _check_path(self.path.parent, "write")
        refuse_special(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, render(token, self.config.format), self.config.mode)
        except OSError as err:
            raise RefreshError(
                Reason.SINK, f"cannot write {self.path}: {err.strerror or type(err).__name__}"
            ) from None

    @staticmethod
    def _needs_metadata(token: Token) -> bool:
        """Whether reading the token back would not give the times we hold: opaque tokens,
        and JWTs whose `iat`/`exp` differ from what we determined (a shorter `expires_in`,
        receipt later than `iat`). Those times are what a restarted process, or `status`,
        plans the refresh point from (rule 9 of docs/design.md), so they must be the same.
        A stale metadata file is harmless: it names another fingerprint."""
        # Read back "at the end of time": a JWT without a usable `iat` then shows an issue time
        # far from ours (read back at any real moment it would take that moment's), so it
        # gets metadata too.
        times = stored_times(token.access_token, math.inf)
        if times is None:
            return True
        issued_at, expires_at = times
        return (
            abs(issued_at - token.issued_at) > 0.001 or abs(expires_at - token.expires_at) > 0.001
        )

    def settle(self, token: Token) -> None:
        # The metadata is only a hint for restarts, keyed by fingerprint: if a crash loses it,
        # a restart falls back to the JWT's exp or refreshes. So it is written after the token
        # (outside the write window) and without an fsync of its own.
        if self.config.format in ("raw", "header") and self._needs_metadata(token):
            self._write_metadata(token)
        sync_dir(self.path.parent)  # makes both renames durable

    def mark_unprobeable(self, token: Token) -> None:
        self._write_metadata(replace(token, unprobeable=True))

    def _write_metadata(self, token: Token) -> None:
        meta: dict[str, Any] = {
            "fingerprint": token.fingerprint,
            "issued_at": token.issued_at,
            "expires_at": token.expires_at,
            "scope": token.scope,
        }
        if token.unprobeable:
            meta["unprobeable"] = True
        try:
            refuse_special(self.meta_path)
            atomic_write(self.meta_path, json.dumps(meta).encode(), self.config.mode, durable=False)
        except (OSError, RefreshError) as err:
            error = err.message if isinstance(err, RefreshError) else err.strerror
            log.warning(
                "cannot write token metadata",
                extra={"path": str(self.meta_path), "error": error or type(err).__name__},
            )

    # ------------------------------------------------------------------------------- read

    def read(self, now: float) -> Token | None:
        """What the file holds; read-only (`refresher status` calls it too)."""
        _check_path(self.path, "read")
        data = read_regular(self.path)
        if data is None:
            return None
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RefreshError(Reason.SINK, f"cannot read {self.path}: not UTF-8 text") from None
        stored = parse(content, self.config.format)
        if stored is None or not stored.access_token or token_problem(stored.access_token):
            return None  # an edited token may carry line breaks into the other sinks' formats
        meta = self._metadata_of(stored.access_token)
        times, scope = stored.times, stored.scope
        if times is None:
            times, scope = self._sidecar_times(stored, meta, now)
        if times is None:
            return None  # unknown expiry: treated as no token, so it gets refreshed
        issued_at, expires_at = times
        return Token(
            stored.access_token,
            issued_at,
            expires_at,
            scope=scope,
            extras=dict(stored.extras),
            unprobeable=meta is not None and meta.get("unprobeable") is True,
        )

    def remove_leftovers(self, now: float) -> None:
        """Remove the temp files of this sink's own two files (token and metadata) that a
        process killed between creating and renaming them left behind: names matching
        TEMP_FILE for exactly those files, regular files, older than ABANDONED_AFTER (a write
        takes milliseconds; a younger one may be another process's live write). Nothing else
        in the folder is touched. The runner calls this on start, never `status`. Each folder
        is listed once per process: with thousands of sinks in one folder, a listing per sink
        would cost thousands of listings. Best effort: never raises."""
        folder = self.path.parent
        if planted_symlink(folder) is not None:
            return  # reported by read and write
        with _leftovers_lock:
            found = _leftovers.get(folder)
            if found is None:
                found = _leftovers[folder] = _temp_files(folder)
            mine = [
                name
                for target in (self.path.name, self.meta_path.name)
                for name in found.pop(target, [])
            ]
        for name in mine:
            with contextlib.suppress(OSError):
                info = os.lstat(folder / name)
                if stat.S_ISREG(info.st_mode) and now - info.st_mtime > ABANDONED_AFTER:
                    os.unlink(folder / name)

    def _metadata_of(self, access_token: str) -> dict[str, Any] | None:
        """The metadata file's content when it names this token (else it is stale)."""
        try:
            data = read_regular(self.meta_path)
            meta = None if data is None else json.loads(data)
        except (RefreshError, ValueError, RecursionError):
            return None
        if isinstance(meta, dict) and meta.get("fingerprint") == fingerprint(access_token):
            return meta
        return None

    def _sidecar_times(
        self, stored: StoredToken, meta: dict[str, Any] | None, now: float
    ) -> tuple[tuple[float, float] | None, str | None]:
        """The times (and scope) of a token whose format does not carry them: from the
        metadata file when it names this token, else from the JWT's claims."""
        if meta is not None:
            issued_at, expires_at = number(meta.get("issued_at")), number(meta.get("expires_at"))
            scope = meta.get("scope") if isinstance(meta.get("scope"), str) else None
            if issued_at is not None and expires_at is not None:
                return (issued_at, expires_at), scope
        return stored_times(stored.access_token, now), None
