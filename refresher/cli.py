"""The `refresher` command: run, once, check, status, demo.

Exit codes: 0 all good; 1 a token is missing or a fetch failed; 2 the config is wrong (every
problem printed with its path before anything runs) or `run` cannot listen on its port.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from refresher import __version__, logs
from refresher.clientauth import assertion_alg
from refresher.clock import format_utc
from refresher.config import Config, KubernetesSinkConfig, load_config
from refresher.discovery import metadata_problem
from refresher.errors import ConfigError, Reason, RefreshError
from refresher.idp import IdPClient, new_session
from refresher.metrics import Metrics
from refresher.nudge import NEVER_WHY, nudgers
from refresher.presets import TLS_METHODS
from refresher.refresh import JobRunner
from refresher.schedule import as_stored, believable, stored_lifetime_bound, token_refresh_at
from refresher.sinks import SinkFactory, describe

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# `status`'s state for a stored expiry further ahead than any token of the job lives.
UNBELIEVABLE = "unbelievable"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-format", choices=["json", "text"], help="default: json unless a terminal"
    )
    common.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    with_config = argparse.ArgumentParser(add_help=False, parents=[common])
    with_config.add_argument(
        "-c", "--config", type=Path, required=True, help="the YAML config file"
    )

    parser = argparse.ArgumentParser(
        prog="refresher",
        description="Keeps OAuth2 client-credentials tokens fresh in files and Secrets.",
    )
    parser.add_argument("--version", action="version", version=f"refresher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[with_config], help="run as a daemon (Deployment)")
    once = commands.add_parser(
        "once", parents=[with_config], help="refresh what is due, then exit 0 or 1 (CronJob)"
    )
    once.add_argument(
        "--pushgateway",
        metavar="URL",
        help="push this run's metrics to a Prometheus Pushgateway (default: config `pushgateway`)",
    )
    check = commands.add_parser("check", parents=[with_config], help="validate the config")
    check.add_argument(
        "--fetch", action="store_true", help="also fetch each token once (not written)"
    )
    check.add_argument(
        "--offline",
        action="store_true",
        help="do not read the discovery documents of jobs with an issuer",
    )
    check.add_argument(
        "--include-revoking",
        action="store_true",
        help="with --fetch, also fetch from IdPs that revoke the previous token on reissue",
    )
    commands.add_parser("status", parents=[with_config], help="show what each sink holds")
    demo = commands.add_parser(
        "demo", parents=[common], help="run the whole loop against a local IdP"
    )
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--dir", type=Path, default=None, help="where to write the token file")
    demo.add_argument("--port", type=int, default=9464, help="metrics port (0: any free port)")
    demo.add_argument("--lifetime", type=float, default=20.0, help="token lifetime in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        # The demo speaks to a person: readable lines, and only warnings from the log.
        logs.configure(
            args.log_format or "text", "warning" if args.log_level == "info" else args.log_level
        )
        from refresher.demo import run_demo
        from refresher.http import ListenError

        try:
            return run_demo(
                duration=args.duration, directory=args.dir, port=args.port, lifetime=args.lifetime
            )
        except ListenError as err:  # the metrics port is taken: say so, and how to pick another
            print(f"refresher: {err.strerror} (try --port 0)", file=sys.stderr)
            return EXIT_CONFIG

    logs.configure(args.log_format, args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(
            f"refresher: {args.config}: {len(err.problems)} problem(s) in the config:",
            file=sys.stderr,
        )
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    handler = {"run": cmd_run, "once": cmd_once, "check": cmd_check, "status": cmd_status}[
        args.command
    ]
    try:
        return handler(config, args)
    except ConfigError as err:  # found only when used: e.g. no Kubernetes client config
        for problem in err.problems:
            print(f"refresher: {args.config}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        logs.flush()  # the queued log lines, before the caller reads or the process exits


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from refresher.daemon import Daemon
    from refresher.http import ListenError

    try:
        daemon = Daemon(config)
    except ListenError as err:  # e.g. the port is in use: one line, like a config problem
        print(f"refresher: {err.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    daemon.run_forever()
    return EXIT_OK


# How long `once` waits for the nudges of its writes before it exits.
NUDGE_WAIT = 60.0


def run_once(config: Config, metrics: Metrics) -> list[JobRunner]:
    """One pass: every job reads its sinks and refreshes only if due. Returns the runners."""
    from refresher.daemon import build_runners

    runners = build_runners(config)
    metrics.bind_jobs(lambda: [runner.snapshot() for runner in runners])

    def one(runner: JobRunner) -> None:
        # `step` reads the sinks, then refreshes only if that is due; it counts any error on
        # the way as a failed attempt instead of letting it end the pass with a traceback.
        runner.step()

    with ThreadPoolExecutor(config.settings.max_concurrent_refreshes) as pool:
        list(pool.map(one, runners))
    _wait_for_nudges(runners, NUDGE_WAIT)
    return runners


def _wait_for_nudges(runners: Sequence[JobRunner], seconds: float) -> None:
    """Let the nudges the pass started finish (they run on threads of their own, which the
    end of the process would cut off), at most `seconds` in all."""
    deadline = time.monotonic() + seconds
    for nudger in nudgers(sink for runner in runners for sink in runner.sinks):
        if not nudger.idle.wait(max(0.0, deadline - time.monotonic())):
            log.warning("a nudge did not finish in time", extra={"token": nudger.job})
        nudger.close()  # what is left is not waited for at exit


def cmd_once(config: Config, args: argparse.Namespace) -> int:
    metrics = Metrics()
    runners = run_once(config, metrics)
    missing = [runner.job.name for runner in runners if not runner.snapshot().ready]
    if missing:
        log.error("jobs without a valid token", extra={"tokens": missing})
    pushgateway = args.pushgateway or config.settings.pushgateway
    if pushgateway and not push_metrics(metrics, pushgateway):
        return EXIT_FAILED
    return EXIT_FAILED if missing else EXIT_OK


def push_metrics(metrics: Metrics, url: str) -> bool:
    """Replace this instance's group on the Pushgateway with this run's metrics."""
    from prometheus_client import push_to_gateway

    instance = os.environ.get("HOSTNAME") or socket.gethostname()
    try:
        push_to_gateway(
            url,
            job="refresher",
            registry=metrics.registry,
            grouping_key={"instance": instance},
            timeout=10,
        )
    except OSError as err:
        log.error("cannot push metrics", extra={"pushgateway": url, "error": type(err).__name__})
        return False
    log.info("metrics pushed", extra={"pushgateway": url, "instance": instance})
    return True


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    idp = IdPClient(new_session())
    discovered: dict[str, str] = {}
    status = EXIT_OK if args.offline else _check_discovery(config, idp, discovered)
    print(f"config OK: {len(config.jobs)} token job(s)")
    for job in config.jobs:
        where = job.token_url or job.issuer_url
        url = urlsplit(where or "(from credentials_file)")
        kind = "url" if job.token_url or not job.issuer_url else "issuer"
        sinks = ", ".join(describe(sink) for sink in job.sinks)
        print(
            f"  {job.name}: provider={job.provider} {kind}={url.scheme}://{url.netloc}{url.path} "
            f"auth={job.auth} scopes={' '.join(job.scopes) or '-'} sinks={sinks}"
        )
        if job.name in discovered:
            print(f"    {discovered[job.name]}")
    if status != EXIT_OK or not args.fetch:
        return status
    failed = False
    for job in config.jobs:
        if job.revokes_on_reissue and not args.include_revoking:
            print(f"  {job.name}: skipped: the IdP revokes the live token on reissue")
            print("    (a fetch would cut off every consumer; --include-revoking to do it anyway)")
            continue
        try:
            token = idp.fetch(job)
        except RefreshError as err:
            failed = True
            print(f"  {job.name}: FAILED {err}")
            continue
        assert token is not None  # `still_wanted` was not given, so it cannot say no
        print(
            f"  {job.name}: ok, fingerprint {token.fingerprint}, "
            f"expires in {token.expires_at - time.time():.0f} s (not written)"
        )
    return EXIT_FAILED if failed else EXIT_OK


def _check_discovery(config: Config, idp: IdPClient, discovered: dict[str, str]) -> int:
    """Read the discovery document of each job with an issuer: one that does not take the
    job's setup is a config error (ConfigError: exit 2); one that cannot be read, a failure.
    `discovered`: what each job's document says, by job name."""
    problems: list[str] = []
    unreachable = False
    for index, job in enumerate(config.jobs):
        if job.token_url or job.issuer_url is None:
            continue
        try:
            metadata = idp.discovery.metadata(job)
        except RefreshError as err:
            if err.reason is Reason.DISCOVERY:
                problems.append(f"tokens[{index}].issuer: {err.message}")
            else:
                unreachable = True
                discovered[job.name] = f"discovery FAILED {err}"
            continue
        try:
            problem = metadata_problem(job, metadata, assertion_alg(job, idp.keys))
        except RefreshError as err:  # the key: reported by the config check already
            problem = f"private_key: {err.message}"
        if problem is not None:
            problems.append(f"tokens[{index}].{problem}")
            continue
        alias = metadata.mtls_token_endpoint if job.auth in TLS_METHODS else None
        # Validated printable by `discovery.parse_metadata`.
        discovered[job.name] = f"token endpoint {alias or metadata.token_endpoint} (discovered)"
    if problems:
        raise ConfigError(problems)
    return EXIT_FAILED if unreachable else EXIT_OK


def status_rows(config: Config, now: float) -> tuple[list[tuple[str, ...]], bool]:
    """What `status` prints: one row per sink, and whether every sink holds a valid token.

    "due" is decided by the same plan as the daemon's (`schedule.token_refresh_at`), so
    both name the same refresh point for the same stored token; "unbelievable" by the same
    bound on stored expiries (`schedule.stored_lifetime_bound`): a token the daemon would
    not keep is not shown as valid."""
    rows: list[tuple[str, ...]] = [
        ("JOB", "SINK", "EXPIRES AT", "TIME LEFT", "REFRESH AT", "FINGERPRINT", "STATE")
    ]
    all_valid = True
    factory = SinkFactory(config.settings.kubernetes)
    for job in config.jobs:
        policy = job.schedule_policy()
        bound = stored_lifetime_bound(job.lifetime, None)
        for sink_config in job.sinks:
            sink = factory.build(sink_config, job=job.name)
            try:
                token = sink.read(now)
            except RefreshError as err:
                rows.append((job.name, sink.name, "-", "-", "-", "-", f"error: {err.message}"))
                all_valid = False
                continue
            if token is None:
                rows.append((job.name, sink.name, "-", "-", "-", "-", "missing"))
                all_valid = False
                continue
            # The daemon's own adoption rules: the same bound, the same stored-time reading.
            if not believable(token, now, bound):
                expires = format_utc(token.expires_at, "seconds")
                rows.append(
                    (job.name, sink.name, expires, "-", "now", token.fingerprint, UNBELIEVABLE)
                )
                all_valid = False
                continue
            token = as_stored(token, now)
            left = token.expires_at - now
            refresh_point = token_refresh_at(policy, job.name, token)
            if left <= 0:
                state, all_valid = "expired", False
            elif now >= refresh_point:
                state = "due"
            else:
                state = "valid"
            rows.append(
                (
                    job.name,
                    sink.name,
                    format_utc(token.expires_at, "seconds"),
                    f"{left:.0f}s",
                    format_utc(refresh_point, "seconds"),
                    token.fingerprint,
                    state,
                )
            )
    return rows, all_valid


def never_updated_rows(config: Config) -> list[tuple[str, ...]]:
    """The consumer pods a nudge cannot help (nudge.py), for each Secret sink with a nudge:
    one row per pod and reason, or one saying why the pods could not be listed."""
    rows: list[tuple[str, ...]] = []
    factory = SinkFactory(config.settings.kubernetes)
    for job in config.jobs:
        for sink_config in job.sinks:
            if not isinstance(sink_config, KubernetesSinkConfig) or sink_config.nudge is None:
                continue
            sink = factory.build(sink_config, job=job.name)
            (nudger,) = nudgers([sink])
            try:
                pods = nudger.list_pods()
            except Exception as err:
                rows.append((job.name, sink.name, "-", f"cannot list pods: {type(err).__name__}"))
                continue
            for found in nudger.never_updated(pods):
                rows.append((job.name, sink.name, found.pod, NEVER_WHY[found.reason]))
    return rows


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    rows, all_valid = status_rows(config, time.time())
    _print_table(rows)
    never = never_updated_rows(config)
    if never:
        print("\nPods that will not see a new token (a nudge cannot help; their owner can mount")
        print("the Secret as a plain volume, or use the token API or the proxy):")
        _print_table([("JOB", "SINK", "POD", "WHY"), *never])
    return EXIT_OK if all_valid else EXIT_FAILED
