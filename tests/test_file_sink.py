"""The file sink: atomic, private, readable back after a restart (rule 5 of docs/design.md)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import jwt
import pytest

from refresher.config import FileSinkConfig
from refresher.errors import Reason, RefreshError
from refresher.formats import render
from refresher.sinks.file import TEMP_FILE, FileSink, temp_path
from refresher.tokens import Token

NOW = 1_800_000_000.0


def sink(path: Path, fmt: str = "raw", mode: int | str = 0o600) -> FileSink:
    return FileSink(
        FileSinkConfig.model_validate(
            {"type": "file", "path": str(path), "format": fmt, "mode": mode}
        )
    )


def store(target: FileSink, written: Token) -> None:
    """What the runner does: write (the token becomes visible), then settle (metadata)."""
    target.write(written)
    target.settle(written)


def token(value: str = "opaque-token-value", lifetime: float = 3600, **kw: object) -> Token:
    return Token(value, NOW, NOW + lifetime, scope="a b", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["raw", "json", "env", "header"])
def test_every_format_round_trips_an_opaque_token(fmt: str, tmp_path: Path) -> None:
    target = sink(tmp_path / "token", fmt)
    written = token(extras={"api_key": "k-123"})
    store(target, written)
    back = target.read(NOW + 10)
    assert back is not None
    assert (back.access_token, back.issued_at, back.expires_at) == (
        written.access_token,
        written.issued_at,
        written.expires_at,
    )
    assert back.scope == "a b"


def test_formats_are_what_consumers_expect(tmp_path: Path) -> None:
    t = token("abc.def.ghi", extras={"api_key": "k-1"})
    store(sink(tmp_path / "raw"), t)
    assert (tmp_path / "raw").read_bytes() == b"abc.def.ghi"  # no newline
    store(sink(tmp_path / "hdr", "header"), t)
    assert (tmp_path / "hdr").read_text() == "Authorization: Bearer abc.def.ghi"
    store(sink(tmp_path / "j", "json"), t)
    document = json.loads((tmp_path / "j").read_text())
    assert document["access_token"] == "abc.def.ghi" and document["token_type"] == "Bearer"
    assert document["expires_at"] == "2027-01-15T09:00:00Z" and document["api_key"] == "k-1"
    # The fingerprint contract: the first 8 hex digits of the SHA-256 of the token.
    expected = hashlib.sha256(b"abc.def.ghi").hexdigest()[:8]
    assert document["fingerprint"] == expected
    store(sink(tmp_path / "e", "env"), t)
    env = (tmp_path / "e").read_text()
    assert "ACCESS_TOKEN=abc.def.ghi\n" in env and "API_KEY=k-1\n" in env
    assert "TOKEN_SCOPE='a b'\n" in env
    assert f"TOKEN_FINGERPRINT={expected}\n" in env


def test_jwt_in_raw_file_without_metadata_reads_its_exp(tmp_path: Path) -> None:
    value = jwt.encode({"exp": int(NOW) + 600, "iat": int(NOW)}, "k" * 32)
    (tmp_path / "token").write_text(value)
    back = sink(tmp_path / "token").read(NOW + 1)
    assert back is not None and back.expires_at == NOW + 600


def test_opaque_token_without_metadata_counts_as_none(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("opaque")
    assert sink(tmp_path / "token").read(NOW) is None


def test_stale_metadata_of_another_token_is_not_trusted(tmp_path: Path) -> None:
    target = sink(tmp_path / "token")
    store(target, token("first"))
    (tmp_path / "token").write_text("second")  # replaced by someone else; metadata is stale
    assert target.read(NOW) is None


@pytest.mark.parametrize(("mode", "expected"), [(0o600, 0o600), ("0640", 0o640), (0o644, 0o644)])
def test_mode(mode: int | str, expected: int, tmp_path: Path) -> None:
    store(sink(tmp_path / "token", mode=mode), token())
    assert stat.S_IMODE(os.stat(tmp_path / "token").st_mode) == expected


def test_creates_missing_folders_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = sink(tmp_path / "a" / "b" / "token")
    for i in range(5):
        store(target, token(f"t{i}"))
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [
        ".token.refresher.json",
        "token",
    ]


def test_unwritable_folder_is_a_sink_failure_and_keeps_the_old_token(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file fails for everyone.
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = sink(blocker / "token")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        store(sink(folder / "token"), token("old"))
        folder.chmod(0o500)
        target = sink(folder / "token")
    with pytest.raises(RefreshError) as caught:
        store(target, token("new"))
    assert caught.value.reason is Reason.SINK
    assert str(target.path) in caught.value.message


def test_readers_never_see_a_torn_or_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    target = sink(path)
    # Tokens of different lengths, so a torn read would show as a value that was never written.
    values = [f"token-{i}-" + "x" * (i % 7) * 500 for i in range(300)]
    store(target, token(values[0]))
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(path.read_text())

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    for value in values[1:]:
        store(target, token(value))
    stop.set()
    for thread in readers:
        thread.join()
    assert seen <= set(values)
    assert len(seen) > 1  # the readers did overlap the writes


def test_only_own_abandoned_temp_files_are_removed_and_only_on_request(tmp_path: Path) -> None:
    store(sink(tmp_path / "token"), token())
    target = sink(tmp_path / "token")
    abandoned = tmp_path / ".token.refresher-0123456789abcdef.tmp"
    abandoned_meta = tmp_path / "..token.refresher.json.refresher-0123456789abcdef.tmp"
    live = tmp_path / ".token.refresher-fedcba9876543210.tmp"
    others = [
        tmp_path / ".token.abc123.tmp",  # another program's, beside our file
        tmp_path / ".other.refresher-0123456789abcdef.tmp",  # another sink's
        tmp_path / ".editor-swap.tmp",
    ]
    for path in (abandoned, abandoned_meta, live, *others):
        path.write_text("half a tok")
        os.utime(path, (NOW - 3600, NOW - 3600))
    os.utime(live, (NOW, NOW))
    assert target.read(NOW + 1) is not None
    assert abandoned.exists()  # reading (as `status` does) never deletes
    target.remove_leftovers(NOW + 1)
    assert not abandoned.exists() and not abandoned_meta.exists()
    assert live.exists() and all(path.exists() for path in others)


def test_temp_files_match_the_pattern_the_sweep_removes(tmp_path: Path) -> None:
    name = temp_path(tmp_path / "token").name
    match = TEMP_FILE.fullmatch(name)
    assert match is not None and match["target"] == "token"


@pytest.mark.parametrize("fmt", ["json", "env"])
def test_extras_read_back_never_override_the_token_nor_add_lines(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "token"
    if fmt == "json":
        path.write_text(
            '{"access_token": "real", "token_type": "Bearer", "expires_at_epoch": 2e9,'
            ' "issued_at_epoch": 1e9, "Access_Token": "x\\nEVIL=1", "k\\nLD_PRELOAD": "y",'
            ' "api_key": "kept", "scope": "a\\nb"}'
        )
    else:
        path.write_text(
            "ACCESS_TOKEN=real\nTOKEN_EXPIRES_AT=2000000000\nTOKEN_ISSUED_AT=1000000000\n"
            "access_token=evil\nAPI_KEY=kept\nLD-PRELOAD=x\n"
        )
    sink = FileSink(FileSinkConfig(type="file", path=path, format=fmt))  # type: ignore[arg-type]
    token = sink.read(1.5e9)
    assert token is not None and token.access_token == "real"
    assert dict(token.extras) == {"api_key": "kept"}
    assert token.scope is None or "\n" not in token.scope
    for other in ("json", "env"):
        rendered = render(token, other).decode()  # type: ignore[arg-type]
        assert "EVIL" not in rendered and "LD_PRELOAD" not in rendered and "evil" not in rendered
