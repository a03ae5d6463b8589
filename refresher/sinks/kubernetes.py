"""A token in a Kubernetes Secret: one API write per refresh (rule 5 of docs/design.md).

The write is a JSON merge patch of only the keys the refresher owns, so keys written by others
survive, carrying the `resourceVersion` last seen as a precondition: a concurrent writer makes
it fail with 409, and the sink re-reads and tries again (bounded). In steady state the
resourceVersion comes from our own previous write, so a refresh costs exactly one request.
The Secret's annotations record expiry, refresh time, scope and the token's fingerprint (never
the token), which is also how a restart knows the expiry of an opaque token.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import urllib3
from kubernetes.client.exceptions import ApiException

from refresher.clock import format_utc, parse_utc
from refresher.config import KubernetesSinkConfig
from refresher.errors import Reason, RefreshError
from refresher.kube import Kube
from refresher.metrics import NudgeStats
from refresher.tokens import Token, fingerprint, stored_times, token_problem

if TYPE_CHECKING:
    from refresher.nudge import Nudger

log = logging.getLogger(__name__)

ANNOTATION = "refresher.io/"
# Set while the Secret holds a token the probe rejected as soon as it was issued.
UNPROBEABLE = f"{ANNOTATION}probe"
UNPROBEABLE_VALUE = "rejected-at-issue"
# A follower's rejection report for the leader (the fingerprint of the token rejected).
REJECTED = f"{ANNOTATION}rejected"
MANAGED_BY = {"app.kubernetes.io/managed-by": "refresher"}
MAX_CONFLICT_RETRIES = 5


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode("ascii")


def _status_message(err: ApiException) -> str:
    """The API server's own explanation (a Status object); never the raw exception text."""
    try:
        status = json.loads(err.body or "")
    except (ValueError, TypeError):
        return err.reason or f"HTTP {err.status}"
    message = status.get("message") if isinstance(status, dict) else None
    return str(message)[:300] if message else (err.reason or f"HTTP {err.status}")


class KubernetesSecretSink:
    def __init__(
        self,
        config: KubernetesSinkConfig,
        kube: Kube,
        *,
        job: str,
        nudge_stats: NudgeStats | None = None,
    ) -> None:
        self.config = config
        self.kube = kube
        self.job = job
        self.namespace = config.namespace or kube.namespace
        self.name = f"kubernetes:{self.namespace}/{config.name}"
        self._api = kube.core()
        self._resource_version: str | None = None  # of the Secret as we last saw it
        self.nudger: Nudger | None = None
        if config.nudge is not None:
            from refresher.nudge import Nudger

            stats = nudge_stats or NudgeStats()
            stats.add_job(job)
            keys = {config.token_key, *config.extra_keys}
            keys |= {
                key
                for key in (
                    config.authorization_key,
                    config.expires_at_key,
                    config.scope_key,
                    config.fingerprint_key,
                )
                if key
            }
            self.nudger = Nudger(
                job, self.namespace, config.name, config.nudge, kube, stats, keys=keys
            )

    @property
    def _where(self) -> str:
        return f"secret {self.config.name!r} in namespace {self.namespace!r}"

    # ------------------------------------------------------------------------------ write

    def owned_data(self, token: Token) -> dict[str, str]:
        """The Secret keys this sink owns, base64-encoded as the API wants them."""
        values = {self.config.token_key: token.access_token}
        if self.config.authorization_key:
            values[self.config.authorization_key] = f"Bearer {token.access_token}"
        if self.config.expires_at_key:
            values[self.config.expires_at_key] = format_utc(token.expires_at)
        if self.config.scope_key and token.scope:
            values[self.config.scope_key] = token.scope
        if self.config.fingerprint_key:
            values[self.config.fingerprint_key] = token.fingerprint
        if self.config.write_credential_extras:
            values.update(token.extras)
        values.update(self.config.extra_keys)
        return {key: _b64(value) for key, value in values.items()}

    def _metadata(self, token: Token) -> dict[str, Any]:
        annotations: dict[str, str | None] = {
            f"{ANNOTATION}expires-at": format_utc(token.expires_at),
            f"{ANNOTATION}issued-at": format_utc(token.issued_at),
            f"{ANNOTATION}refreshed-at": format_utc(time.time()),
            f"{ANNOTATION}fingerprint": token.fingerprint,
            f"{ANNOTATION}token-job": self.job,
        }
        if token.scope:
            annotations[f"{ANNOTATION}scope"] = token.scope
        # A note about the previous token is removed (null deletes in a merge patch).
        annotations[UNPROBEABLE] = UNPROBEABLE_VALUE if token.unprobeable else None
        annotations[REJECTED] = None  # a report about the previous token is answered
        return {"labels": dict(MANAGED_BY), "annotations": annotations}

    def write(self, token: Token) -> None:
        data = self.owned_data(token)
        for _ in range(MAX_CONFLICT_RETRIES):
            metadata = self._metadata(token)
            if self._resource_version is not None:
                metadata["resourceVersion"] = self._resource_version
            try:
                result = self._merge_patch({"metadata": metadata, "data": data})
            except ApiException as err:
                if err.status == 409:  # someone wrote in between: re-read, then try again
                    self._reread()
                    continue
                if err.status == 404:
                    if self._create(token, data):
                        return
                    continue  # created by someone else in between: patch that one
                raise self._error(err, "patch") from None
            self._resource_version = result.metadata.resource_version
            return
        raise RefreshError(
            Reason.SINK, f"{self._where}: still conflicting after {MAX_CONFLICT_RETRIES} attempts"
        )

    def settle(self, token: Token) -> None:
        # The API server made the write durable before it answered. Called after the last
        # sink of the refresh was written, so the nudge (on a thread of its own) cannot
        # delay any of them.
        if self.nudger is not None:
            self.nudger.nudge(token)

    def note_rejected(self, fingerprint_: str) -> None:
        """A follower's rejection report, for the leader, which watches this Secret: one
        patch of one annotation. Raises RefreshError(SINK)."""
        try:
            self._merge_patch({"metadata": {"annotations": {REJECTED: fingerprint_}}})
        except ApiException as err:
            raise self._error(err, "patch") from None

    @staticmethod
    def reported(secret: Any) -> str | None:
        """The fingerprint a follower reported on this Secret object, if any."""
        annotations = (secret.metadata.annotations or {}) if secret.metadata else {}
        value = annotations.get(REJECTED)
        return value if isinstance(value, str) else None

    def mark_unprobeable(self, token: Token) -> None:
        # One patch of one annotation, on the version this sink wrote: if someone wrote the
        # Secret since, it may hold another token, and the note is dropped (a hint only).
        metadata: dict[str, Any] = {"annotations": {UNPROBEABLE: UNPROBEABLE_VALUE}}
        if self._resource_version is not None:
            metadata["resourceVersion"] = self._resource_version
        try:
            result = self._merge_patch({"metadata": metadata})
        except (ApiException, RefreshError) as err:
            log.warning(
                "cannot note the probe's verdict on the Secret",
                extra={
                    "sink": self.name,
                    "error": getattr(err, "status", None) or type(err).__name__,
                },
            )
            return
        self._resource_version = result.metadata.resource_version

    def remove_leftovers(self, now: float) -> None:
        pass  # a Secret write is one request: nothing is left half done

    def _create(self, token: Token, data: dict[str, str]) -> bool:
        """Create the missing Secret if allowed; False when it appeared meanwhile."""
        if not self.config.create:
            raise RefreshError(
                Reason.SINK,
                f"{self._where} does not exist; create it, or set `create: true` on the sink "
                "(which needs the `create` verb on secrets)",
            )
        metadata = self._metadata(token)
        annotations = metadata["annotations"]
        metadata["annotations"] = {k: v for k, v in annotations.items() if v is not None}
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.config.name, **metadata},
            "type": self.config.secret_type,
            "data": data,
        }
        try:
            result = self._call("create", self._api.create_namespaced_secret, self.namespace, body)
        except ApiException as err:
            if err.status == 409:
                self._resource_version = None
                return False
            raise self._error(err, "create") from None
        self._resource_version = result.metadata.resource_version
        return True

    def _merge_patch(self, body: dict[str, Any]) -> Any:
        return self._call(
            "patch",
            self._api.patch_namespaced_secret,
            self.config.name,
            self.namespace,
            body,
            _content_type="application/merge-patch+json",
        )

    def _reread(self) -> None:
        secret = self._get()
        self._resource_version = secret.metadata.resource_version if secret else None

    # ------------------------------------------------------------------------------- read

    def read(self, now: float) -> Token | None:
        secret = self._get()
        if secret is None:
            return None
        self._resource_version = secret.metadata.resource_version
        return self.token_of(secret, now)

    def token_of(self, secret: Any, now: float) -> Token | None:
        """The token a Secret object (`V1Secret`, from a read or a watch event) holds under
        this sink's key, with the times its annotations give; None when it holds none this
        refresher should hand anyone."""
        encoded = (secret.data or {}).get(self.config.token_key)
        if not encoded:
            return None
        try:
            access_token = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        if token_problem(access_token):
            return None  # not a token anyone should be handed: refresh it
        annotations = secret.metadata.annotations or {}
        times: tuple[float, float] | None = None
        if annotations.get(f"{ANNOTATION}fingerprint") == fingerprint(access_token):
            issued_at = parse_utc(annotations.get(f"{ANNOTATION}issued-at"))
            expires_at = parse_utc(annotations.get(f"{ANNOTATION}expires-at"))
            if issued_at is not None and expires_at is not None:
                times = (issued_at, expires_at)
        times = times or stored_times(access_token, now)
        if times is None:
            return None  # opaque and unannotated: unknown expiry, so refresh it
        noted = annotations.get(f"{ANNOTATION}fingerprint") == fingerprint(access_token)
        return Token(
            access_token,
            times[0],
            times[1],
            scope=annotations.get(f"{ANNOTATION}scope"),
            unprobeable=noted and annotations.get(UNPROBEABLE) == UNPROBEABLE_VALUE,
        )

    def _get(self) -> Any:
        try:
            return self._call(
                "get", self._api.read_namespaced_secret, self.config.name, self.namespace
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise self._error(err, "get") from None

    # ---------------------------------------------------------------------------- plumbing

    def _call(self, verb: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, _request_timeout=self.kube.request_timeout, **kwargs)
        except ApiException:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise RefreshError(
                Reason.SINK,
                f"{verb} {self._where}: Kubernetes API unreachable ({type(err).__name__})",
            ) from None

    def _error(self, err: ApiException, verb: str) -> RefreshError:
        detail = _status_message(err)
        if err.status == 403:
            message = (
                f"forbidden: RBAC does not allow `{verb}` on {self._where}; grant the verb on "
                f"this Secret in the Role ({detail})"
            )
        elif err.status == 401:
            message = f"{verb} {self._where}: the API rejected our credentials ({detail})"
        else:
            message = f"{verb} {self._where}: HTTP {err.status} ({detail})"
        return RefreshError(Reason.SINK, message, status=err.status)
