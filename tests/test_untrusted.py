"""Nothing read back is trusted blindly, and no secret leaves by a side door (issue 13).

Stored expiries no token of the job could have, tokens no sink can hold, sinks that point at
the refresher's own inputs, temp files that are not ours, FIFOs and devices at sink paths,
symlinks planted in world-writable folders, proxies that would read clear-text credentials,
IdPs that echo the secret back in disguise, and configs that expand without bound.

Everything runs through stable surfaces: the CLI (`refresher.cli.main`, or a real
`python -m refresher` process where a hang, a memory limit or the daemon is the point), real
files, and real loopback servers: the local IdP, a local Kubernetes API, and the small
scripted servers below.
"""

from __future__ import annotations

import base64
import http.server
import json
import math
import os
import resource
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import jwt
import pytest
import yaml

from refresher.cli import main
from refresher.errors import Reason, RefreshError
from refresher.tokens import fingerprint
from testdoubles.kubeapi import FakeKubeAPI
from tests.conftest import CLIENT_ID, CLIENT_SECRET, LocalIdP, job_for, wait_for

ROOT = Path(__file__).parent.parent
NOW = time.time()
DAY = 86400.0


# --------------------------------------------------------------------------- helpers


def write_config(path: Path, *jobs: dict[str, Any], **settings: Any) -> Path:
    settings.setdefault("metrics", {"enabled": False})
    path.write_text(yaml.safe_dump({"tokens": list(jobs), **settings}))
    return path


def held(path: Path, fmt: str) -> str:
    """The token a sink file holds, read the way its consumers read it."""
    text = path.read_text()
    if fmt == "raw":
        return text
    if fmt == "header":
        return text.removeprefix("Authorization: Bearer ")
    if fmt == "json":
        return str(json.loads(text)["access_token"])
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "ACCESS_TOKEN":
            return shlex.split(value)[0]
    raise AssertionError(f"no ACCESS_TOKEN in {path}")


def iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def limit_memory(limit: int = 1 << 30) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def refresher_process(
    *args: str, timeout: float, memory: int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m refresher ARGS` of this checkout; fails the test when it outlives `timeout`."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "refresher", *args],
            cwd=ROOT,
            env=env or child_env(),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            preexec_fn=None if memory is None else limit_memory(memory),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`refresher {' '.join(args)}` still running after {timeout} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Recorded:
    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body


Answer = Callable[[Recorded], tuple[int, dict[str, str], bytes]]


class Scripted:
    """A loopback HTTP server that records every request and answers with `answer(request)`.
    With the default answer (502 to everything, CONNECT included) it is a forward proxy that
    only listens: what a proxy from the environment would have been told."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer or (lambda request: (502, {}, b"recorded, not forwarded"))
        self.requests: list[Recorded] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Recorded(self.command, self.path, dict(self.headers), body)
                owner.requests.append(request)
                status, headers, payload = owner.answer(request)
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

            do_GET = do_POST = do_CONNECT = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def token_answer(access_token: str, **extra: Any) -> Answer:
    payload = {"access_token": access_token, "token_type": "Bearer", "expires_in": 3600, **extra}
    body = json.dumps(payload).encode()  # control characters and surrogates as \u escapes
    return lambda request: (200, {}, body)


def generic_job(url: str, secret_file: Path, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "job",
        "token_url": url,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret_file)},
        "connect_timeout": 2,
        "read_timeout": 5,
        "min_refresh_interval": 0.2,
    }
    job.update(overrides)
    return job


# ================================================================ stored expiries


def store(path: Path, fmt: str, access_token: str, issued_at: float, expires_at: float) -> None:
    """Write a sink file (and, for raw and header, its metadata file) as if by the refresher."""
    if fmt == "json":
        document = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_at": "whatever an editor left",
            "expires_at_epoch": expires_at,
            "issued_at_epoch": issued_at,
            "scope": "read",
        }
        path.write_text(json.dumps(document))  # NaN as the JSON extension `NaN`
    elif fmt == "env":
        path.write_text(
            f"ACCESS_TOKEN={access_token}\nTOKEN_TYPE=Bearer\n"
            f"TOKEN_EXPIRES_AT={expires_at!r}\nTOKEN_ISSUED_AT={issued_at!r}\n"
        )
    else:
        prefix = "Authorization: Bearer " if fmt == "header" else ""
        path.write_text(prefix + access_token)
        meta = {
            "fingerprint": fingerprint(access_token),
            "issued_at": issued_at,
            "expires_at": expires_at,
            "scope": "read",
        }
        path.with_name(f".{path.name}.refresher.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("fmt", "lifetime", "ahead"),
    [
        ("json", None, 300 * DAY),
        ("env", None, 300 * DAY),
        ("raw", None, 300 * DAY),  # the expiry is in the metadata file
        ("header", None, 300 * DAY),
        ("json", "1h", 2 * 3600),  # with `lifetime` set, that is the bound
        ("env", None, 2 * DAY),
    ],
)
def test_once_fetches_instead_of_believing_a_stored_expiry_too_far_ahead(
    fmt: str,
    lifetime: str | None,
    ahead: float,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
) -> None:
    idp = make_idp("generic", lifetime=3600)
    sink = tmp_path / "token"
    store(sink, fmt, "opaque-edited-token", NOW - 60, NOW + ahead)
    extra = {"lifetime": lifetime} if lifetime else {}
    job = job_for(
        idp, secret_file, sink, sinks=[{"type": "file", "path": str(sink), "format": fmt}]
    )
    config = write_config(tmp_path / "c.yaml", {**job, **extra})
    assert main(["once", "-c", str(config)]) == 0
    assert idp.token_requests == 1
    assert held(sink, fmt) == idp.issued[-1].access_token


def test_once_fetches_instead_of_believing_a_jwt_exp_300_days_ahead(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3600)
    sink = tmp_path / "token"
    sink.write_text(jwt.encode({"exp": int(NOW + 300 * DAY), "iat": int(NOW)}, "k" * 32))
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, sink))
    assert main(["once", "-c", str(config)]) == 0
    assert idp.token_requests == 1
    assert sink.read_text() == idp.issued[-1].access_token


@pytest.mark.parametrize("fmt", ["json", "env", "raw"])
def test_a_believable_stored_expiry_is_still_reused(
    fmt: str, make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3600)
    sink = tmp_path / "token"
    store(sink, fmt, "opaque-stored-token", NOW - 600, NOW + 3000)
    job = job_for(
        idp, secret_file, sink, sinks=[{"type": "file", "path": str(sink), "format": fmt}]
    )
    assert main(["once", "-c", str(write_config(tmp_path / "c.yaml", job))]) == 0
    assert idp.token_requests == 0
    assert held(sink, fmt) == "opaque-stored-token"


def test_a_stored_token_with_a_line_break_is_refreshed_not_copied_to_other_sinks(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3600)
    edited, header = tmp_path / "token.json", tmp_path / "token.header"
    store(edited, "json", "abc\r\nX-Injected: yes", NOW - 60, NOW + 3000)  # believable expiry
    sinks = [{"type": "file", "path": str(edited), "format": "json"}, _file(header, "header")]
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, edited, sinks=sinks))
    assert main(["once", "-c", str(config)]) == 0
    assert idp.token_requests == 1
    new = idp.issued[-1].access_token
    assert held(edited, "json") == new
    assert header.read_text() == f"Authorization: Bearer {new}"


def status_of(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """Run `refresher status`: exit code, the STATE of each sink row, the whole output."""
    code = main(["status", "-c", str(config)])
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert lines and lines[0].startswith("JOB"), out.out
    header = lines[0]
    states = [line[header.index("STATE") :].strip() for line in lines[1:]]
    return code, states, out.out + out.err


ABSURD_EXPIRIES = {
    "year 300000": (300_000 - 1970) * 365.25 * DAY,
    "1e300": 1e300,
    "negative": -1e12,
    "NaN": math.nan,
    "300 days": NOW + 300 * DAY,
}


@pytest.mark.parametrize("expiry", ABSURD_EXPIRIES)
@pytest.mark.parametrize("fmt", ["json", "env", "raw"])
def test_status_shows_absurd_stored_expiries_without_a_traceback(
    fmt: str,
    expiry: str,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    idp = make_idp("generic")
    sink = tmp_path / "token"
    store(sink, fmt, "opaque-edited-token", NOW - 60, ABSURD_EXPIRIES[expiry])
    job = job_for(
        idp, secret_file, sink, sinks=[{"type": "file", "path": str(sink), "format": fmt}]
    )
    code, (state,), output = status_of(write_config(tmp_path / "c.yaml", job), capsys)
    assert "Traceback" not in output
    assert code == 1, output  # not a valid token
    expected = {"negative": "expired", "NaN": "missing"}.get(expiry, "unbelievable")
    assert state == expected, output


def test_a_secret_annotated_300_days_ahead_is_refreshed_and_shown_unbelievable(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    idp = make_idp("generic", lifetime=3600)
    stored = "opaque-stored-in-secret"
    with FakeKubeAPI() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace="tokens")
        api.put_object(
            "secrets",
            "tokens",
            "api-token",
            {
                "metadata": {
                    "name": "api-token",
                    "annotations": {
                        "refresher.io/fingerprint": fingerprint(stored),
                        "refresher.io/issued-at": iso(NOW - 60),
                        "refresher.io/expires-at": iso(NOW + 300 * DAY),
                    },
                },
                "data": {"token": base64.b64encode(stored.encode()).decode()},
            },
        )
        job = job_for(
            idp,
            secret_file,
            tmp_path / "unused",
            sinks=[{"type": "kubernetes", "name": "api-token"}],
        )
        config = write_config(tmp_path / "c.yaml", job, kubernetes={"kubeconfig": str(kubeconfig)})

        code, states, output = status_of(config, capsys)
        assert (code, states) == (1, ["unbelievable"]), output

        assert main(["once", "-c", str(config)]) == 0
        assert idp.token_requests == 1
        secret = api.get_object("secrets", "tokens", "api-token")
        assert secret is not None
        written = base64.b64decode(secret["data"]["token"]).decode()
        assert written == idp.issued[-1].access_token

        code, states, output = status_of(config, capsys)
        assert (code, states) == (0, ["valid"]), output


# ========================================================== tokens from the IdP

BAD_TOKENS = {
    "CR LF": "eyJhbGciOi.abc\r\nX-Injected: yes",
    "LF": "abc\nTOKEN_EXPIRES_AT=99999999999",
    "form feed": "abc\fdef",
    "NUL": "abc\x00def",
    "U+2028": "abc\u2028def",
    "U+0085": "abc\x85def",
    "non-ASCII": "abc\u00e9def",
    "lone surrogate": "abc\ud800def",
    "space": "abc def",
    "16 KiB + 1": "a" * (16 * 1024 + 1),
}
FORMATS = ("raw", "header", "env", "json")


@pytest.fixture
def four_sinks(tmp_path: Path) -> list[Path]:
    """One sink per format, each holding bytes that are no token (so a fetch is due)."""
    paths = [tmp_path / "sinks" / f"token.{fmt}" for fmt in FORMATS]
    paths[0].parent.mkdir()
    for path in paths:
        path.write_bytes(b"previous content\n")
    return paths


def _sink_configs(paths: list[Path]) -> list[dict[str, str]]:
    return [
        {"type": "file", "path": str(path), "format": fmt}
        for path, fmt in zip(paths, FORMATS, strict=True)
    ]


@pytest.mark.parametrize("name", BAD_TOKENS)
def test_once_refuses_a_token_no_sink_can_hold(
    name: str,
    secret_file: Path,
    tmp_path: Path,
    four_sinks: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = BAD_TOKENS[name]
    with Scripted(token_answer(bad)) as idp:
        job = generic_job(idp.url + "/token", secret_file, sinks=_sink_configs(four_sinks))
        config = write_config(tmp_path / "c.yaml", job)
        code = main(["once", "-c", str(config), "--log-format", "json"])
    out = capsys.readouterr()
    assert code == 1
    failures = [json.loads(line) for line in out.err.splitlines() if '"refresh failed"' in line]
    assert [record["reason"] for record in failures] == ["invalid_response"], out.err
    assert "access_token" in failures[0]["error"]
    assert "Traceback" not in out.err + out.out
    assert bad not in out.err + out.out and bad[:12] not in out.err
    # Every sink untouched, and nothing else written beside them.
    assert all(path.read_bytes() == b"previous content\n" for path in four_sinks)
    assert sorted(p.name for p in four_sinks[0].parent.iterdir()) == sorted(
        p.name for p in four_sinks
    )


def test_printable_ascii_tokens_are_accepted_and_read_back_from_every_format(
    secret_file: Path, tmp_path: Path, four_sinks: list[Path]
) -> None:
    # Outside RFC 6750's b64token, inside RFC 6749's VSCHAR: issued by real IdPs.
    token = "1234567890|AbC-._~+/%:!#$&'()*,;<>?@[]^`{}\"\\=="
    with Scripted(token_answer(token)) as idp:
        job = generic_job(idp.url + "/token", secret_file, sinks=_sink_configs(four_sinks))
        config = write_config(tmp_path / "c.yaml", job)
        assert main(["once", "-c", str(config)]) == 0
        assert main(["once", "-c", str(config)]) == 0  # read back from every sink: reused
        assert len(idp.requests) == 1
    for path, fmt in zip(four_sinks, FORMATS, strict=True):
        assert held(path, fmt) == token


def test_a_granted_scope_with_a_line_break_is_not_written(
    secret_file: Path, tmp_path: Path, four_sinks: list[Path]
) -> None:
    scope = "read\nTOKEN_EXPIRES_AT=99999999999"
    with Scripted(token_answer("fine-token", scope=scope)) as idp:
        job = generic_job(
            idp.url + "/token", secret_file, sinks=_sink_configs(four_sinks), scopes=["read"]
        )
        assert main(["once", "-c", str(write_config(tmp_path / "c.yaml", job))]) == 0
    env = four_sinks[FORMATS.index("env")].read_text()
    assert "TOKEN_SCOPE=read\n" in env  # the scope asked for, not the one with a line in it
    assert "99999999999" not in env
    assert json.loads(four_sinks[FORMATS.index("json")].read_text())["scope"] == "read"


def _failures_metric(port: int, job: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "refresher_refresh_failures_total"
                and sample.labels.get("token") == job
                and sample.labels.get("reason") == "invalid_response"
            ):
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("name", ["CR LF", "lone surrogate"])
def test_the_daemon_counts_a_refused_token_as_an_invalid_response_failure(
    name: str, secret_file: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "token.json"
    sink.write_bytes(b"previous content\n")
    port = free_port()
    with Scripted(token_answer(BAD_TOKENS[name])) as idp:
        job = generic_job(
            idp.url + "/token",
            secret_file,
            sinks=[{"type": "file", "path": str(sink), "format": "json"}],
        )
        config = write_config(
            tmp_path / "c.yaml", job, metrics={"enabled": True, "bind": "127.0.0.1", "port": port}
        )
        stderr = tmp_path / "stderr"
        with stderr.open("wb") as errors:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "refresher",
                    "run",
                    "-c",
                    str(config),
                    "--log-format",
                    "json",
                ],
                cwd=ROOT,
                env=child_env(),
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
            try:
                wait_for(lambda: _failures_metric(port, "job") >= 2, timeout=30, interval=0.2)
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                finally:
                    process.kill()
    log = stderr.read_text(errors="replace")
    assert "Traceback" not in log
    assert BAD_TOKENS[name] not in log
    assert sink.read_bytes() == b"previous content\n"


# ================================================================== sink files


def check(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check", "-c", str(config)])
    out = capsys.readouterr()
    return code, out.err + out.out


def _secret_job(secret_file: Path, *sinks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return generic_job("https://idp.example.com/token", secret_file, sinks=list(sinks), **extra)


def _file(path: Path | str, fmt: str = "raw") -> dict[str, str]:
    return {"type": "file", "path": str(path), "format": fmt}


@pytest.mark.parametrize("spelling", ["same", "double slash", "symlinked folder", "dot dot"])
def test_a_sink_over_the_client_secret_file_is_refused_however_spelled(
    spelling: str, secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    path = {
        "same": str(secret_file),
        "double slash": "/" + str(secret_file),
        "symlinked folder": str(tmp_path / "link" / secret_file.name),
        "dot dot": str(tmp_path / "sub" / ".." / secret_file.name),
    }[spelling]
    job = _secret_job(secret_file, _file(tmp_path / "ok"), _file(path))
    code, output = check(write_config(tmp_path / "c.yaml", job), capsys)
    assert code == 2
    assert (
        f"  tokens[0].sinks[1].path: {path}" in output
        and "is the file of tokens[0].client_secret; a refresh would overwrite it" in output
    ), output
    assert CLIENT_SECRET not in output


@pytest.mark.parametrize(
    "what", ["config", "client_id", "ca_bundle", "credentials_file", "kubeconfig"]
)
def test_a_sink_over_any_file_the_refresher_reads_is_refused(
    what: str, secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    read = tmp_path / f"{what}.file"
    read.write_text("client_id = a\nclient_secret = b\n" if what == "credentials_file" else "x")
    extra: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    if what == "client_id":
        extra["client_id"] = {"file": str(read)}
    elif what == "ca_bundle":
        extra["ca_bundle"] = str(read)
    elif what == "credentials_file":
        extra = {"credentials_file": str(read), "client_id": None, "client_secret": None}
    elif what == "kubeconfig":
        settings["kubernetes"] = {"kubeconfig": str(read)}
    else:
        read = config
    job = {k: v for k, v in {**_secret_job(secret_file, _file(read)), **extra}.items() if v}
    code, output = check(write_config(config, job, **settings), capsys)
    assert code == 2
    assert f"  tokens[0].sinks[0].path: {read} is " in output, output
    assert "a refresh would overwrite it" in output


@pytest.mark.parametrize("collision", ["double slash", "symlinked folder", "metadata file"])
def test_two_sinks_writing_one_file_are_refused_however_spelled(
    collision: str, secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    first = tmp_path / "token"
    second = {
        "double slash": _file("/" + str(first)),
        "symlinked folder": _file(tmp_path / "link" / "token"),
        # A raw sink keeps its expiry in `.token.refresher.json` beside it.
        "metadata file": _file(tmp_path / ".token.refresher.json", "json"),
    }[collision]
    jobs = [
        _secret_job(secret_file, _file(first)),
        _secret_job(secret_file, second, name="other", scopes=["other"]),
    ]
    code, output = check(write_config(tmp_path / "c.yaml", *jobs), capsys)
    assert code == 2
    assert "  tokens[1].sinks[0].path: " in output, output
    assert "is already written by tokens[0].sinks[0]" in output, output


def test_run_exits_2_on_a_sink_over_its_own_config(secret_file: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    write_config(config, _secret_job(secret_file, _file(config)))
    before = config.read_bytes()
    result = refresher_process("run", "-c", str(config), timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"tokens[0].sinks[0].path: {config} is the config file" in result.stderr
    assert config.read_bytes() == before


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("https://idp.example.com/token", "https://idp.example.com/token/"),
        ("https://idp.example.com/token", "HTTPS://IdP.Example.COM/token"),
        ("https://idp.example.com/token", "https://idp.example.com:443/token"),
        ("https://idp.example.com/token/", "https://IDP.example.com:443/token"),
        ("http://127.0.0.1/token", "http://127.0.0.1:80/token/"),
    ],
)
def test_two_jobs_asking_for_one_token_are_refused_however_the_url_is_spelled(
    first: str, second: str, secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        generic_job(first, secret_file, name="a", sinks=[_file(tmp_path / "a")]),
        generic_job(second, secret_file, name="b", sinks=[_file(tmp_path / "b")]),
    ]
    code, output = check(write_config(tmp_path / "c.yaml", *jobs), capsys)
    assert code == 2
    assert "  tokens[1]: requests the same token as tokens[0]" in output, output


def test_jobs_for_different_endpoints_are_fine(
    secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = [
        "https://idp.example.com/token",
        "https://idp.example.com/other",
        "https://idp.example.com:8443/token",
    ]
    jobs = [
        generic_job(url, secret_file, name=f"j{i}", sinks=[_file(tmp_path / f"t{i}")])
        for i, url in enumerate(urls)
    ]
    code, output = check(write_config(tmp_path / "c.yaml", *jobs), capsys)
    assert code == 0, output


# =================================================================== temp files

OLD = NOW - 3600


def test_status_never_removes_temp_files_and_once_removes_only_its_own(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    idp = make_idp("generic", lifetime=3600, token_format="opaque")
    folder = tmp_path / "tokens"
    folder.mkdir()
    ours = [
        folder / ".token.refresher-0123456789abcdef.tmp",
        folder / "..token.refresher.json.refresher-0123456789abcdef.tmp",  # its metadata's
    ]
    young = folder / ".token.refresher-fedcba9876543210.tmp"  # maybe a live write
    theirs = [
        folder / ".token.x1y2z3.tmp",  # another program's, beside our file
        folder / ".cache.tmp",
        folder / ".other.refresher-0123456789abcdef.tmp",  # not a sink of this config
    ]
    for path in (*ours, young, *theirs):
        path.write_text("half a token")
        os.utime(path, (OLD, OLD))
    os.utime(young, None)
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, folder / "token"))

    assert main(["status", "-c", str(config)]) == 1  # read-only: nothing is removed
    capsys.readouterr()
    assert all(path.exists() for path in (*ours, young, *theirs))

    assert main(["once", "-c", str(config)]) == 0
    assert not any(path.exists() for path in ours)
    assert young.exists() and all(path.exists() for path in theirs)
    assert idp.issued[-1].access_token == (folder / "token").read_text()


# =============================================================== odd files at sinks


def test_a_fifo_at_the_sink_path_neither_hangs_once_nor_is_replaced(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic")
    sink = tmp_path / "token"
    os.mkfifo(sink)
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, sink))
    result = refresher_process("once", "-c", str(config), "--log-format", "json", timeout=30)
    assert result.returncode == 1, result.stderr
    assert "a FIFO" in result.stderr and '"reason": "sink"' in result.stderr
    assert "Traceback" not in result.stderr
    assert stat.S_ISFIFO(os.lstat(sink).st_mode)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_symlink_to_dev_zero_is_refused_by_status_in_bounded_memory(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic")
    sink = tmp_path / "token"
    sink.symlink_to("/dev/zero")
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, sink))
    result = refresher_process("status", "-c", str(config), timeout=60, memory=1 << 30)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: cannot read {sink}: it is a character device" in result.stdout


def test_an_oversized_file_at_the_sink_path_is_not_read_as_a_token(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    idp = make_idp("generic")
    sink = tmp_path / "token"
    sink.write_bytes(b"x" * (1 << 20))
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, sink))
    code, _, output = status_of(config, capsys)
    assert code == 1
    assert "larger than 64 KiB" in output


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A world-writable sticky folder (like /tmp) in which another user has made a symlink
    `tokens` to a folder of ours; returns (the symlink, the folder it points at)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a symlink to another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.mkdir()
    link = shared / "tokens"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)
    return link, victim


def test_a_symlink_another_user_planted_in_a_world_writable_folder_is_not_followed(
    planted: tuple[Path, Path],
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    link, victim = planted
    idp = make_idp("generic")
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, link / "token"))
    assert main(["once", "-c", str(config), "--log-format", "json"]) == 1
    err = capsys.readouterr().err
    assert f"{link} is a symlink another user made in a world-writable folder" in err
    assert list(victim.iterdir()) == []

    os.lchown(link, os.geteuid(), os.getegid())  # our own symlink: followed
    assert main(["once", "-c", str(config)]) == 0
    assert (victim / "token").read_text() == idp.issued[-1].access_token


# ======================================================================= proxies


def test_a_plain_http_token_request_never_goes_through_a_proxy(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idp = make_idp("generic")
    sink = tmp_path / "token"
    with Scripted() as proxy:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, sink))
        assert main(["once", "-c", str(config)]) == 0
    assert proxy.requests == []
    assert idp.token_requests == 1 and sink.read_text() == idp.issued[-1].access_token


# ===================================================================== scrubbing


def _b64(text: str, encode: Callable[[bytes], bytes] = base64.b64encode) -> str:
    return encode(text.encode()).decode()


ECHOES: dict[str, Callable[[str, str], str]] = {
    # (secret, the Basic credentials as received) -> what a hostile IdP echoes
    "as sent": lambda secret, basic: secret,
    "URL-encoded": lambda secret, basic: quote(secret, safe=""),
    "URL-encoded, / kept": lambda secret, basic: quote(secret),
    "form-encoded": lambda secret, basic: quote_plus(secret),
    "base64": lambda secret, basic: _b64(secret),
    "base64 unpadded": lambda secret, basic: _b64(secret).rstrip("="),
    "base64url": lambda secret, basic: _b64(secret, base64.urlsafe_b64encode),
    "base64url unpadded": lambda secret, basic: _b64(secret, base64.urlsafe_b64encode).rstrip("="),
    "upper-cased": lambda secret, basic: secret.upper(),
    "lower-cased": lambda secret, basic: secret.lower(),
    "one character short": lambda secret, basic: secret[:-1],
    "first character dropped": lambda secret, basic: secret[1:],
    "Basic credentials": lambda secret, basic: basic,
    "Basic credentials, lower-cased": lambda secret, basic: basic.lower(),
    "base64 of the form-encoded secret": lambda secret, basic: _b64(quote_plus(secret)),
}


def _echo(how: Callable[[str, str], str], status: int = 401) -> Answer:
    """An IdP that refuses the client and quotes its secret back, encoded `how`."""

    def answer(request: Recorded) -> tuple[int, dict[str, str], bytes]:
        basic = request.headers.get("Authorization", "").removeprefix("Basic ")
        secret = unquote_plus(base64.b64decode(basic).decode().partition(":")[2])
        description = f"client secret {how(secret, basic)} is not the one we know"
        body = {"error": "invalid_client", "error_description": description}
        return status, {}, json.dumps(body).encode()

    return answer


@pytest.mark.parametrize("echo", ECHOES)
def test_an_idp_echoing_the_secret_in_disguise_is_never_quoted(
    echo: str, secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Scripted(_echo(ECHOES[echo])) as idp:
        config = write_config(
            tmp_path / "c.yaml",
            generic_job(idp.url + "/token", secret_file, sinks=[_file(tmp_path / "token")]),
        )
        outputs = []
        for argv in (
            ["check", "--fetch"],
            ["once", "--log-format", "json"],
            ["once", "--log-format", "text"],
        ):
            assert main([*argv, "-c", str(config)]) == 1
            out = capsys.readouterr()
            outputs.append(out.out + out.err)
        basic = idp.requests[0].headers["Authorization"].removeprefix("Basic ")
    echoed = ECHOES[echo](CLIENT_SECRET, basic)
    text = "\n".join(outputs)
    assert "FAILED invalid_client: HTTP 401 (invalid_client" in text  # the error code stays
    assert '"reason": "invalid_client"' in text
    for leak in (echoed, echoed[:12], echoed[-12:]):
        assert leak not in text, f"{echo} echo leaked"
    assert CLIENT_SECRET[:8] not in text


def test_a_harmless_description_is_still_shown(
    secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"error": "invalid_scope", "error_description": "The scope 'read' is not allowed"}
    answer: Answer = lambda request: (400, {}, json.dumps(body).encode())  # noqa: E731
    with Scripted(answer) as idp:
        job = generic_job(idp.url + "/token", secret_file, sinks=[_file(tmp_path / "token")])
        assert main(["check", "--fetch", "-c", str(write_config(tmp_path / "c.yaml", job))]) == 1
    assert "HTTP 400 (invalid_scope: The scope 'read' is not allowed)" in capsys.readouterr().out


# ============================================================== ${ENV} expansion


@pytest.mark.parametrize("tenant", [None, "acme"])
def test_a_nested_default_is_refused_with_its_path(
    tenant: str | None,
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEFAULT_TENANT", "fallback")
    if tenant is None:
        monkeypatch.delenv("TENANT", raising=False)
    else:
        monkeypatch.setenv("TENANT", tenant)
    job = _secret_job(
        secret_file, _file(tmp_path / "t"), headers={"X-Tenant": "${TENANT:-${DEFAULT_TENANT}}"}
    )
    code, output = check(write_config(tmp_path / "c.yaml", job), capsys)
    assert code == 2
    assert "  tokens[0].headers.X-Tenant: `${TENANT:-...}` holds another `${...}`" in output
    assert "nesting is not supported" in output


def _alias_bomb(path: Path, secret_file: Path, tmp_path: Path) -> Path:
    """One string `${BIG}` behind 1,000 YAML aliases, in the scopes and in the headers."""
    lines = [
        "tokens:",
        "  - name: bomb",
        "    token_url: https://idp.example.com/token",
        f"    client_id: {CLIENT_ID}",
        f"    client_secret: {{file: {secret_file}}}",
        f"    sinks: [{{type: file, path: {tmp_path / 'token'}}}]",
        "    scopes:",
        "      - &big '${BIG}'",
        *["      - *big"] * 999,
        "    headers:",
        *[f"      h{i}: *big" for i in range(1000)],
        "metrics: {enabled: false}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_alias_bomb_is_refused_quickly_in_little_memory(
    secret_file: Path, tmp_path: Path
) -> None:
    config = _alias_bomb(tmp_path / "bomb.yaml", secret_file, tmp_path)
    stdout, stderr = tmp_path / "out", tmp_path / "err"
    started = time.monotonic()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "refresher", "check", "-c", str(config)],
            cwd=ROOT,
            env=child_env(BIG="x" * 100_000),
            stdout=out,
            stderr=err,
            preexec_fn=limit_memory(1 << 30),
        )
        while True:  # wait4: the child's own peak memory
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > 60:
                process.kill()
                pytest.fail("the alias bomb still ran after 60 s")
            time.sleep(0.05)
    elapsed = time.monotonic() - started
    messages = stderr.read_text(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 2, messages
    assert "(top level): with its ${...} and YAML aliases expanded" in messages
    assert "more than" in messages and "Traceback" not in messages
    assert usage.ru_maxrss < 200 * 1024, f"peak RSS {usage.ru_maxrss} KiB"
    assert elapsed < 20


def test_a_large_plain_config_still_loads(
    secret_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The bound is on what expansion adds, not on the file: 2 MB written out is fine.
    job = _secret_job(secret_file, _file(tmp_path / "t"), headers={"X-Big": "y" * 2_000_000})
    code, output = check(write_config(tmp_path / "c.yaml", job), capsys)
    assert code == 0, output[:500]


def test_a_large_variable_used_once_is_fine_but_not_a_thousand_times(
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BIG", "z" * 100_000)
    once = _secret_job(secret_file, _file(tmp_path / "t"), headers={"X-Big": "${BIG}"})
    code, output = check(write_config(tmp_path / "c.yaml", once), capsys)
    assert code == 0, output[:500]
    many = _secret_job(
        secret_file, _file(tmp_path / "t"), headers={f"h{i}": "${BIG}" for i in range(20)}
    )
    code, output = check(write_config(tmp_path / "c.yaml", many), capsys)
    assert code == 2 and "YAML aliases expanded" in output


def test_a_fifo_at_a_credential_path_is_a_credentials_failure_not_a_hang(tmp_path: Path) -> None:
    from refresher.credentials import CredentialRef

    fifo = tmp_path / "client-secret"
    os.mkfifo(fifo)
    with pytest.raises(RefreshError) as caught:
        CredentialRef(file=fifo).read()
    assert caught.value.reason is Reason.CREDENTIALS
    assert "not a regular file" in caught.value.message
