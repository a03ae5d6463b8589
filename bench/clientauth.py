"""What each client authentication method costs a token request (issue 17):
`python -m bench.clientauth [--rounds 200] [--json]`.

For each `auth` method, the time `clientauth.authenticate` takes to produce what one token
request carries (the Basic header; a freshly signed assertion; the federated token read from
its file; the client certificate pair read and checked), with the key material already
parsed, and the time when every request finds the key file changed (a rotation, so it is
parsed again). Key material is real (RSA 2048, EC P-256 keys and certificates written to a
temporary folder). Measured on the machine it runs on; nothing is asserted (the behaviour is
tested in tests/test_clientauth.py and tests/test_enterprise_idps.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.heal import emit, table
from refresher.clientauth import KeyMaterial, authenticate
from refresher.config import TokenJobConfig
from refresher.credentials import read_credentials
from testdoubles.keys import KeyPair, ServiceAccountIssuer, new_ec_key, new_rsa_key

TOKEN_URL = "https://idp.example.test/oauth2/token"
SECRET = "bench-client-secret-long-enough-for-HS256-0123456789"


def _jobs(folder: Path) -> dict[str, tuple[TokenJobConfig, Callable[[], None] | None]]:
    secret = folder / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    rsa_pair = KeyPair.create(folder / "rsa")
    # Two keys to alternate between: each rotation writes the other (generating a key is not
    # part of what a rotation costs the refresher).
    spare_keys = [new_rsa_key(), rsa_pair.key]
    ec_pair = KeyPair.create(folder / "ec", key=new_ec_key())
    token_file = folder / "projected-token"
    ServiceAccountIssuer().project(token_file, audience="api://bench", issued_at=time.time())

    def job(**fields: Any) -> TokenJobConfig:
        return TokenJobConfig.model_validate(
            {
                "name": "bench",
                "token_url": TOKEN_URL,
                "client_id": "bench-client",
                "sinks": [{"type": "file", "path": str(folder / "unused")}],
                **fields,
            }
        )

    rsa_key = {"file": str(rsa_pair.key_file)}
    ec_key = {"file": str(ec_pair.key_file)}
    with_secret = {"client_secret": {"file": str(secret)}}
    return {
        "client_secret_basic": (job(auth="client_secret_basic", **with_secret), None),
        "client_secret_jwt (HS256)": (job(auth="client_secret_jwt", **with_secret), None),
        "private_key_jwt RS256": (
            job(auth="private_key_jwt", private_key=rsa_key),
            lambda: rsa_pair.reissue(key=_next(spare_keys)),
        ),
        "private_key_jwt PS256": (
            job(auth="private_key_jwt", private_key=rsa_key, alg="PS256"),
            None,
        ),
        "private_key_jwt ES256 + x5t#S256": (
            job(
                auth="private_key_jwt",
                private_key=ec_key,
                certificate={"file": str(ec_pair.cert_file)},
            ),
            None,
        ),
        "federated_jwt": (job(auth="federated_jwt", assertion_file=str(token_file)), None),
        "tls_client_auth": (
            job(
                auth="tls_client_auth",
                client_certificate={"file": str(rsa_pair.cert_file)},
                client_key=rsa_key,
            ),
            None,
        ),
    }


def _next(keys: list[Any]) -> Any:
    keys.append(keys.pop(0))
    return keys[0]


def _time(run: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure(rounds: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-clientauth-") as folder:
        for name, (job, rotate) in _jobs(Path(folder)).items():
            keys = KeyMaterial()
            credentials = read_credentials(job)

            def once(
                job: TokenJobConfig = job, credentials: Any = credentials, keys: KeyMaterial = keys
            ) -> object:
                return authenticate(
                    job,
                    credentials,
                    token_endpoint=TOKEN_URL,
                    issuer=None,
                    now=time.time(),
                    keys=keys,
                )

            once()  # parse the key material once
            warm = _time(once, rounds)
            row: dict[str, Any] = {
                "median_ms": round(statistics.median(warm), 3),
                "p99_ms": round(sorted(warm)[int(0.99 * (len(warm) - 1))], 3),
            }
            if rotate is not None:
                rotated = []
                for _ in range(max(rounds // 10, 5)):
                    rotate()
                    rotated += _time(once, 1)
                row["after_rotation_median_ms"] = round(statistics.median(rotated), 3)
            figures[name] = row
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clientauth")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = measure(args.rounds)
    rows = [
        [name, row["median_ms"], row["p99_ms"], row.get("after_rotation_median_ms", "-")]
        for name, row in figures.items()
    ]
    text = table(
        f"What one token request's client authentication costs ({args.rounds} rounds)",
        ["method", "median ms", "p99 ms", "median ms, key file changed each time"],
        rows,
    )
    emit(figures, text, as_json=args.json)


if __name__ == "__main__":
    main()
