"""A loopback HTTP server that speaks the Kubernetes API for Secrets, Leases, Pods and TokenReviews.

Tests and benchmarks point the real ``kubernetes`` client at it (``write_kubeconfig``) and get
the wire behaviour of a kube-apiserver: the same paths and verbs, ``resourceVersion`` optimistic
concurrency, the four PATCH content types (JSON patch, merge patch, strategic merge patch and
server-side apply with field ownership), watches, TokenReviews, RBAC denials and ``Status``
bodies with the messages a real API server writes.  Faults can be injected: a concurrent writer
that makes the next writes stale (``inject_conflicts``), error statuses (``inject_errors``) and
slow responses (``inject_delay``); the last two apply to lists, watches (a delay holds back the
response headers) and TokenReviews too.

Where the real server differs from a naive expectation, the fake follows the server:
``Lease`` MicroTime fields must carry exactly six fractional digits (what Python's
``datetime.isoformat()`` does not guarantee), an apply patch without ``fieldManager`` is a 422,
a name-restricted RBAC rule does not authorize ``create``, Secrets/Leases delete with a
``Status`` of ``Success`` while a pod's DELETE answers the deleted pod, an unknown field label
of a Secret or pod selector is a 400 ``field label not supported: X``, and a pod's spec is all
but immutable.

The server is a :class:`refresher.loopback.LoopbackServer`: 127.0.0.1 only, HTTP/1.1 with
keep-alive, and a ``stop()`` that wakes delayed responses and drops kept-alive connections
(open watches included: their clients see the connection break, as when a server dies).

Watches (``GET .../secrets?watch=true``, Leases too), as the watch cache of a real server:

* ``resourceVersion`` is one global counter (etcd's revision): every write of any object bumps
  it, a list answers the current one in ``metadata.resourceVersion``, an object carries the one
  of its last write.  A watch from ``resourceVersion=RV`` streams every later change of the
  matching objects in order; with no ``resourceVersion`` (or ``"0"``) it starts with synthetic
  ``ADDED`` events for the current matching objects.  Events are newline-delimited JSON
  ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": {...}}`` (objects with ``kind``,
  ``apiVersion`` and ``managedFields``), one per chunk of a chunked ``application/json``
  response.  ``fieldSelector`` and ``labelSelector`` filter as on the server: a change that
  makes an object stop (start) matching is a ``DELETED`` (``ADDED``) event; a ``DELETED``
  event carries the last state with the deletion's ``resourceVersion``.
* The stream ends cleanly (the last chunk) after ``timeoutSeconds`` (``default_watch_timeout``
  when absent or 0); ``drop_watches()`` and ``stop()`` end it abruptly instead.
* History is bounded per resource (``watch_history`` events, 100 by default).  A watch from an
  RV older than the history gets, *like the real server*, ``200 OK`` and a single in-stream
  event ``{"type": "ERROR", "object": {"kind": "Status", ..., "reason": "Expired", "code": 410,
  "message": "too old resource version: RV (FLOOR)"}}``, then the end of the stream: a real
  kube-apiserver answers an expired watch in the stream, not with an HTTP 410.  Set
  ``expired_watch_as_http_410 = True`` for an HTTP ``410`` ``Status`` body instead, to prove a
  client handles that form too.  An RV ahead of the server's gets an in-stream ``504`` ("Too
  large resource version"), at once (the real server waits ~3 s for its cache first).
* ``allowWatchBookmarks=true`` streams ``BOOKMARK`` events (an object with only
  ``metadata.resourceVersion``), only when ``send_bookmarks()`` is called.
* Hooks: ``drop_watches()`` (connections shut down mid-stream), ``expire_watches()`` (an
  in-stream 410 to every open watch, after ``compact_history()``), ``compact_history()``
  (advance the RV, as if an unrelated object were written, and forget all history: a watch
  from any RV obtained before the call gets 410), ``open_watches``, ``wait_for_watches(n)``.

How the real ``kubernetes`` client (37.x, ``kubernetes.watch.Watch().stream``) surfaces them,
checked in tests/test_kubeapi.py:

* an expired RV, whether in the stream or as an HTTP 410, raises
  ``kubernetes.client.exceptions.ApiException`` with ``status == 410`` from the generator (the
  in-stream one has ``body is None`` and ``reason == "Expired: too old resource version: ..."``).
  Without ``timeout_seconds`` the client first retries once, silently, from the last RV it saw;
  with ``timeout_seconds`` it never retries;
* a dropped connection raises ``urllib3.exceptions.ProtocolError`` ("Response ended
  prematurely") from the generator; so does ``stop()``; a watch that was never answered (the
  server was down) raises ``urllib3.exceptions.MaxRetryError`` from the first ``next()``;
* the generator is lazy: the request goes out at the first ``next()``;
* the end of ``timeoutSeconds`` ends the generator (no exception) when ``timeout_seconds`` was
  passed; without it the client reconnects by itself from the last RV, forever;
* an idle stream longer than the client's read timeout (``_request_timeout``) raises
  ``urllib3.exceptions.ReadTimeoutError``: pass a read timeout above ``timeout_seconds``.

TokenReview (``POST /apis/authentication.k8s.io/v1/tokenreviews``, 201): the fake knows the
service-account tokens ``issue_service_account_token()`` handed out (JWT-shaped, not verifiable,
looked up by exact value) and answers like the real authenticator: ``status.authenticated`` is
true and ``status.user`` is ``system:serviceaccount:NS:NAME`` with its groups, and
``status.audiences`` is the intersection of the token's audiences with ``spec.audiences`` (with
the API server's own ``api_audiences`` when ``spec.audiences`` is empty).  An unknown, revoked
or expired token, or one whose audiences miss the target audiences, answers ``user: {}`` and an
``error`` (``[invalid bearer token, token audiences ["a"] is invalid for the target audiences
["b"]]`` and the like), with **no** ``authenticated`` key: false is omitted on the wire, so the
client's ``status.authenticated`` is ``None``.  The caller needs RBAC ``create`` on
``tokenreviews`` at the cluster scope (a ``Rule`` whose namespace is ``"*"``, the default).

Pods (core/v1 ``/api/v1/namespaces/NS/pods[/NAME]``, for the refresher's nudges, issue 18):

* Seeded by tests with ``add_pod(ns, name, labels=, annotations=, spec=, status=)`` (the server
  fills ``uid``, ``resourceVersion``, ``creationTimestamp``, ``kind``/``apiVersion``; a default
  spec with one container; the status is stored as given, ``{"phase": "Running"}`` by default),
  ``delete_pod`` and ``pod``; ``get_object``/``put_object``/``delete_object("pods", ...)`` too.
  The spec is validated as on create: containers need a ``name`` and an ``image`` and a
  ``volumeMount`` must name one of the pod's ``volumes`` (422 ``Not found: "x"``).
* ``GET`` (one pod, or a ``PodList`` with ``labelSelector`` -- equality, ``!=``, ``in``,
  ``notin``, ``key``, ``!key`` -- and ``fieldSelector`` on the pod field labels:
  ``metadata.name``, ``metadata.namespace``, ``spec.nodeName``, ``spec.restartPolicy``,
  ``spec.schedulerName``, ``spec.serviceAccountName``, ``spec.hostNetwork``, ``status.phase``,
  ``status.podIP``, ``status.nominatedNodeName``; any other is a 400 ``field label not
  supported: X``), ``PATCH`` with all four patch types, ``PUT``, ``POST`` (status set to
  ``Pending`` and the QoS class) and ``DELETE``; watches work as for Secrets but are not tested.
  ``CoreV1Api.patch_namespaced_pod`` with a dict body sends
  ``application/strategic-merge-patch+json`` (a list body: JSON patch); the strategic merge
  patch merges ``containers``, ``initContainers``, ``ephemeralContainers`` and ``volumes`` by
  ``name``, a container's ``env`` by ``name`` and ``volumeMounts`` by ``mountPath``, and
  replaces atomic lists (``tolerations``, ``envFrom``) as the server does.
* An update may change metadata (labels, annotations...) freely, but of the spec only what
  ``ValidatePodUpdate`` allows: container and init-container images, a lower
  ``activeDeadlineSeconds``, added tolerations, removed scheduling gates.  Anything else is a
  422 ``Pod "NAME" is invalid: spec: Forbidden: pod updates may not change fields other than
  `spec.containers[*].image`,...`` with the server's exact list, then a newline and a diff
  (an approximation of Go's deliberately unstable ``cmp.Diff``: match up to the newline); adding
  or removing a container is ``spec.containers: Forbidden: pod updates may not add or remove
  containers``.  ``status`` in a patch or update is ignored (the status subresource's job).  A
  change bumps ``resourceVersion``; a patch that changes nothing does not.  A missing pod is a
  404 ``pods "NAME" not found``.
* ``vanish_after_next_list(ns, names)``: right after the next successful pod list in ``ns`` is
  answered, those pods are deleted, so the client's follow-up GET/PATCH finds them gone (404).
* RBAC (``Rule(verbs, "pods", ns)``), ``inject_errors``/``inject_delay`` and the request record
  apply as for Secrets; ``inject_errors(..., resource="pods")`` and
  ``inject_delay(..., resource="pods")`` fail or hold back only pod requests (a slow pod API
  while Secret writes stay fast).  ``request_count(verb, resource)`` counts recorded requests by
  the verb the server authorizes them as (``"list"``, ``"patch"``... or an HTTP method in
  capitals), e.g. a nudge of 50 pods costs ``request_count("list", "pods") == 1`` and
  ``request_count("patch", "pods") == 50``; each ``RecordedRequest`` has ``verb``,
  ``resource``, ``namespace``, ``name`` and ``received_at`` (``time.time()``) for finer filters.
* Unlike a real server: no defaulting (a stored pod has exactly the fields it was given, so a
  patch that spells out a default the server would have filled in counts as a change), specs are
  compared as JSON with nulls and empty lists/maps ignored, only the validation above (no
  label/annotation syntax, resource or security checks, no rules for gated pods), a DELETE
  removes the pod at once (no ``deletionTimestamp``, no grace period), no kubelet (the status
  never changes by itself), no ``/status``, ``/log``, ``/exec`` or ``/eviction`` subresources,
  and server-side apply treats pod lists as atomic (no ``k:{"name":...}`` ownership).

Scope and simplifications (kept deliberately small):

* only namespaced ``secrets`` and ``pods`` (core/v1) and ``leases`` (coordination.k8s.io/v1),
  and ``tokenreviews``; no discovery, no pagination (``limit`` and ``continue`` are ignored: a
  list answers everything), no ``sendInitialEvents``, no watch of a single object by URL
  (``/secrets/NAME?watch`` or ``/api/v1/watch/...``); lists and watches support
  ``labelSelector`` and ``fieldSelector`` and ignore ``resourceVersion`` on lists;
* RBAC rules name a resource and a namespace, not an API group; ``list`` and ``watch`` of a
  name-restricted rule need ``fieldSelector=metadata.name=<name>``, as with the real authorizer;
* strategic merge patch behaves as a JSON merge patch plus the ``$patch`` directives and the
  merge keys of ``metadata.ownerReferences`` / ``metadata.finalizers`` and of the pod lists
  above (no ``$retainKeys``, no ``$setElementOrder`` ordering);
* server-side apply tracks ownership per leaf field (lists are atomic) and reports conflicts like
  the real server; ``stringData`` of an applied Secret is converted to ``data`` before ownership
  is computed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import re
import secrets as _random
import select
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from refresher.loopback import LoopbackServer, QuietHandler, owner_of

__all__ = [
    "RBAC",
    "ApiStatusError",
    "FakeKubeAPI",
    "RecordedRequest",
    "Rule",
]

Resource = Literal["secrets", "leases", "pods"]
JSONObject = dict[str, Any]
FieldPath = tuple[str, ...]

VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH, STRATEGIC_MERGE_PATCH)

CONFLICT_ANNOTATION = "other-writer/touched"
CONFLICT_MANAGER = "other-writer"

_MICROTIME_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_CONFIG_KEY_MSG = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
)
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")

# Metadata the server owns: never part of field ownership, never taken from a request body.
_UNTRACKED_METADATA = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    }
)
_KNOWN_METADATA = _UNTRACKED_METADATA | {"labels", "annotations", "ownerReferences", "finalizers"}
_METADATA_ORDER = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)

_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it (recorded before authentication)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    received_at: float = 0.0  # time.time() when the server received it

    def json(self) -> Any:
        """The body decoded as JSON (``None`` when empty)."""
        return json.loads(self.body) if self.body else None

    def _target(self, part: int) -> str | None:
        """One part of what `_classify` makes of the request (verb, resource, namespace,
        name); None for an unknown path."""
        target = _classify(self.method, self.path, self.query)
        return None if target is None else target[part]

    @property
    def resource(self) -> str | None:
        """``secrets``, ``leases``, ``pods`` or ``tokenreviews``; None for any other path."""
        return self._target(1)

    @property
    def verb(self) -> str | None:
        """The verb the server authorizes the request as: ``get``, ``list``, ``watch``,
        ``create``, ``update``, ``patch`` or ``delete``; None for an unknown path or a method
        the path does not allow."""
        return self._target(0)

    @property
    def namespace(self) -> str | None:
        """The namespace in the path ("" for a cluster-scoped resource); None if unknown."""
        return self._target(2)

    @property
    def name(self) -> str | None:
        """The object name in the path ("" for a collection); None for an unknown path."""
        return self._target(3)


@dataclass(frozen=True)
class Rule:
    """One RBAC policy rule: ``verbs`` on ``resource`` in ``namespace`` (``"*"`` matches all).

    ``names`` mirrors ``resourceNames``: ``None`` allows every name.  As in real RBAC a
    name-restricted rule never authorizes ``create`` (the name is not known at authorization
    time) and authorizes ``list`` and ``watch`` only with a ``fieldSelector=metadata.name=<name>``.

    ``namespace="*"`` (the default) is a ClusterRole bound by a ClusterRoleBinding: every
    namespace and the cluster scope.  Only such a rule authorizes a cluster-scoped resource,
    e.g. ``Rule(frozenset({"create"}), "tokenreviews")`` (what ``system:auth-delegator`` grants).
    """

    verbs: frozenset[str]
    resource: str
    namespace: str = "*"
    names: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "verbs", frozenset(self.verbs))
        if self.names is not None:
            object.__setattr__(self, "names", frozenset(self.names))
        unknown = self.verbs - VERBS - {"*"}
        if unknown:
            raise ValueError(f"unknown verbs {sorted(unknown)}; use {sorted(VERBS)}")

    def allows(self, verb: str, resource: str, namespace: str, name: str) -> bool:
        if not ({verb, "*"} & self.verbs):
            return False
        if self.resource not in (resource, "*") or self.namespace not in (namespace, "*"):
            return False
        return self.names is None or name in self.names


@dataclass
class RBAC:
    """An allow-list of rules for the one user the token authenticates as."""

    rules: list[Rule]
    user: str = "system:serviceaccount:default:refresher"

    def allows(self, verb: str, resource: str, namespace: str, name: str) -> bool:
        return any(rule.allows(verb, resource, namespace, name) for rule in self.rules)


class ApiStatusError(Exception):
    """A failure answered with a ``Status`` body (also raised by the direct-access helpers)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: JSONObject | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "")
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> JSONObject:
        body: JSONObject = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details:
            body["details"] = self.details
        body["code"] = self.code
        return body


# --------------------------------------------------------------------------------------------
# Resource kinds and their Status errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    resource: str
    group: str
    kind: str
    prefix: str  # URL prefix up to the version
    version: str = "v1"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``secrets`` / ``leases.coordination.k8s.io`` as in the server's messages."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def details(self, name: str, kind: str | None = None) -> JSONObject:
        details: JSONObject = {}
        if name:
            details["name"] = name
        if self.group:
            details["group"] = self.group
        details["kind"] = kind or self.resource
        return details

    def not_found(self, name: str) -> ApiStatusError:
        return ApiStatusError(
            404, f'{self.qualified} "{name}" not found', details=self.details(name)
        )

    def already_exists(self, name: str) -> ApiStatusError:
        return ApiStatusError(
            409,
            f'{self.qualified} "{name}" already exists',
            reason="AlreadyExists",
            details=self.details(name),
        )

    def conflict(self, name: str, why: str) -> ApiStatusError:
        return ApiStatusError(
            409,
            f'Operation cannot be fulfilled on {self.qualified} "{name}": {why}',
            details=self.details(name),
        )

    def stale(self, name: str) -> ApiStatusError:
        return self.conflict(
            name,
            "the object has been modified; please apply your changes to the latest version "
            "and try again",
        )

    def undecodable(self, detail: str) -> ApiStatusError:
        return ApiStatusError(
            400,
            f'{self.kind} in version "{self.version}" cannot be handled as a {self.kind}: {detail}',
        )

    def invalid(self, name: str, errors: list[_FieldError]) -> ApiStatusError:
        rendered = [f"{e.field}: {e.text}" for e in errors]
        summary = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
        details = self.details(name, kind=self.kind)
        details["causes"] = [
            {"reason": e.cause, "message": e.text, "field": e.field} for e in errors
        ]
        return ApiStatusError(422, f'{self.kind} "{name}" is invalid: {summary}', details=details)


@dataclass(frozen=True)
class _FieldError:
    field: str
    cause: str  # FieldValueInvalid, FieldValueRequired, FieldValueForbidden
    text: str

    @classmethod
    def invalid(cls, path: str, value: Any, detail: str) -> _FieldError:
        return cls(path, "FieldValueInvalid", f"Invalid value: {_go_quote(value)}: {detail}")

    @classmethod
    def required(cls, path: str, detail: str) -> _FieldError:
        return cls(path, "FieldValueRequired", f"Required value: {detail}")

    @classmethod
    def forbidden(cls, path: str, detail: str) -> _FieldError:
        return cls(path, "FieldValueForbidden", f"Forbidden: {detail}")


SECRETS = _Kind("secrets", "", "Secret", "/api/v1")
LEASES = _Kind("leases", "coordination.k8s.io", "Lease", "/apis/coordination.k8s.io/v1")
PODS = _Kind("pods", "", "Pod", "/api/v1")
TOKEN_REVIEWS = _Kind(
    "tokenreviews", "authentication.k8s.io", "TokenReview", "/apis/authentication.k8s.io/v1"
)
_KINDS: dict[str, _Kind] = {k.resource: k for k in (SECRETS, LEASES, PODS)}
_TOKEN_REVIEW_PATH = re.compile(r"^/apis/authentication\.k8s\.io/v1/tokenreviews/?$")
DEFAULT_API_AUDIENCE = "https://kubernetes.default.svc"
_ROUTE = re.compile(
    r"^(?P<prefix>/api/v1|/apis/coordination\.k8s\.io/v1)/namespaces/(?P<namespace>[^/]+)"
    r"/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?/?$"
)


def _go_quote(value: Any) -> str:
    """Go's %q for strings, plain numbers otherwise."""
    return json.dumps(value)


def _route(path: str) -> tuple[_Kind, str, str] | None:
    match = _ROUTE.match(path)
    if match is None:
        return None
    kind = _KINDS.get(match["resource"])
    if kind is None or kind.prefix != match["prefix"]:
        return None
    return kind, unquote(match["namespace"]), unquote(match["name"] or "")


def _verb(method: str, name: str, query: Mapping[str, list[str]]) -> str | None:
    """The verb a request is authorized as (None: the path does not allow the method).
    Raises ``ApiStatusError`` for a ``watch`` parameter that is not a boolean."""
    verbs = (
        {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        if name
        else {"GET": "list", "POST": "create"}
    )
    verb = verbs.get(method)
    if verb == "list" and _parse_bool("watch", query.get("watch", [""])[0]):
        verb = "watch"
    return verb


def _classify(
    method: str, path: str, query: Mapping[str, list[str]]
) -> tuple[str | None, str, str, str] | None:
    """(verb, resource, namespace, name) of a recorded request; None for an unknown path."""
    if _TOKEN_REVIEW_PATH.match(path):
        return ("create" if method == "POST" else None), TOKEN_REVIEWS.resource, "", ""
    route = _route(path)
    if route is None:
        return None
    kind, namespace, name = route
    try:
        verb = _verb(method, name, query)
    except ApiStatusError:
        verb = "list"  # the server answers 400; it was meant as a list or a watch
    return verb, kind.resource, namespace, name


def _default_pod_spec() -> JSONObject:
    return {"containers": [{"name": "app", "image": "registry.example/app:1"}]}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Stored state
# --------------------------------------------------------------------------------------------


@dataclass
class _Manager:
    """One ``metadata.managedFields`` entry: the leaf fields a manager owns."""

    manager: str
    operation: Literal["Apply", "Update"]
    time: str
    fields: set[FieldPath] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str]:
        return self.manager, self.operation

    def describe(self) -> str:
        """How a conflict message names this manager."""
        if self.operation == "Update":
            return f"{json.dumps(self.manager)} using v1"
        return json.dumps(self.manager)


@dataclass
class _Stored:
    obj: JSONObject  # without metadata.managedFields
    managers: list[_Manager]


def _ownership(managers: list[_Manager]) -> list[tuple[str, str, frozenset[FieldPath]]]:
    return [(m.manager, m.operation, frozenset(m.fields)) for m in managers]


def _collect_leaves(value: Any, path: FieldPath, out: dict[FieldPath, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _collect_leaves(child, (*path, str(key)), out)
    else:
        out[path] = value


def _tracked_leaves(obj: JSONObject) -> dict[FieldPath, Any]:
    """Leaf field paths of an object that field ownership applies to (lists are atomic)."""
    leaves: dict[FieldPath, Any] = {}
    for key, value in obj.items():
        if key in ("apiVersion", "kind"):
            continue
        if key == "metadata" and isinstance(value, dict):
            for meta_key, meta_value in value.items():
                if meta_key not in _UNTRACKED_METADATA:
                    _collect_leaves(meta_value, ("metadata", meta_key), leaves)
        else:
            _collect_leaves(value, (key,), leaves)
    return leaves


def _overlaps(a: FieldPath, b: FieldPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _fields_v1(paths: set[FieldPath]) -> JSONObject:
    root: JSONObject = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return root


def _delete_path(obj: JSONObject, path: FieldPath) -> None:
    """Remove a field and then any map it leaves empty."""
    parents: list[tuple[JSONObject, str]] = []
    node: Any = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return
        parents.append((node, part))
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, part in reversed(parents):
        if parent[part] == {} and part not in ("metadata", "spec"):
            del parent[part]


# --------------------------------------------------------------------------------------------
# Patch algorithms
# --------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JSONObject = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_DELETE = object()
# Lists with a patch strategy of "merge" (``patchStrategy:"merge"`` in k8s.io/api): the merge
# key, or None for sets of scalars.  A "*" stands for the items of a list.  Every other list is
# atomic (replaced as a whole), e.g. ``tolerations`` and ``envFrom``.
_CONTAINER_LISTS: dict[FieldPath, str | None] = {
    ("env",): "name",
    ("volumeMounts",): "mountPath",
    ("volumeDevices",): "devicePath",
    ("ports",): "containerPort",
}
_SMP_LIST_KEYS: dict[FieldPath, str | None] = {
    ("metadata", "ownerReferences"): "uid",
    ("metadata", "finalizers"): None,
    # Pod
    ("spec", "volumes"): "name",
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "ephemeralContainers"): "name",
    ("spec", "imagePullSecrets"): "name",
    ("spec", "hostAliases"): "ip",
    ("spec", "schedulingGates"): "name",
    ("spec", "resourceClaims"): "name",
    ("status", "conditions"): "type",
    ("status", "podIPs"): "ip",
    ("status", "hostIPs"): "ip",
    **{
        ("spec", containers, "*", *sub): key
        for containers in ("containers", "initContainers", "ephemeralContainers")
        for sub, key in _CONTAINER_LISTS.items()
    },
}


def strategic_merge_patch(target: Any, patch: Any, path: FieldPath = ()) -> Any:
    """Strategic merge patch for the schemas of Secret, Lease and Pod.

    Maps merge and ``null`` deletes, like a merge patch; in addition the ``$patch: replace`` /
    ``$patch: delete`` directives and ``$deleteFromPrimitiveList/<field>`` are understood, and
    the lists of ``_SMP_LIST_KEYS`` (``ownerReferences`` by ``uid``, ``finalizers`` as a set, a
    pod's ``containers`` and ``volumes`` by ``name``, a container's ``volumeMounts`` by
    ``mountPath``...) are merged item by item instead of replaced.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    body = {
        key: value
        for key, value in patch.items()
        if key != "$patch" and key != "$retainKeys" and not key.startswith("$setElementOrder/")
    }
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in body.items() if v is not None}
    if directive not in (None, "merge"):
        raise ApiStatusError(400, f"Unknown patch type: {directive}")
    result: JSONObject = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in body.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list) and isinstance(value, list):
                result[name] = [item for item in result[name] if item not in value]
            continue
        sub_path = (*path, key)
        if value is None:
            result.pop(key, None)
        elif sub_path in _SMP_LIST_KEYS and isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, _SMP_LIST_KEYS[sub_path], sub_path)
        else:
            merged = strategic_merge_patch(result.get(key), value, sub_path)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_list(
    current: Any, patch: list[Any], merge_key: str | None, path: FieldPath
) -> list[Any]:
    result = list(copy.deepcopy(current)) if isinstance(current, list) else []
    if merge_key is None:
        return result + [item for item in patch if item not in result]
    for item in patch:
        if not isinstance(item, dict):
            raise ApiStatusError(400, f"invalid list item for merge key {merge_key}: {item!r}")
        index = next(
            (
                i
                for i, old in enumerate(result)
                if isinstance(old, dict) and old.get(merge_key) == item.get(merge_key)
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
            continue
        merged = strategic_merge_patch({} if index is None else result[index], item, (*path, "*"))
        if index is None:
            result.append(merged)
        else:
            result[index] = merged
    return result


class _JSONPatchError(Exception):
    pass


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise _JSONPatchError(f"invalid path {path!r}")
    if path == "":
        return []
    if not path.startswith("/"):
        raise _JSONPatchError(f'JSON pointer must be empty or start with a "/": {path}')
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _resolve(doc: Any, tokens: list[str], path: str) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise _JSONPatchError(f'doc is missing path: "{path}": missing value')
    return node


def _json_patch_add(doc: Any, tokens: list[str], value: Any, path: str) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise _JSONPatchError(f"Unable to access invalid index: {last}: invalid index")
        parent.insert(index, value)
    else:
        raise _JSONPatchError(f'doc is missing path: "{path}": missing value')
    return doc


def _json_patch_remove(doc: Any, tokens: list[str], path: str) -> Any:
    if not tokens:
        raise _JSONPatchError("unable to remove the whole document")
    parent = _resolve(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise _JSONPatchError(f"Unable to remove nonexistent key: {last}: missing value")


def json_patch(doc: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict):
            raise _JSONPatchError(f"invalid operation {operation!r}")
        op = operation.get("op")
        path = operation.get("path")
        tokens = _pointer(path)
        if op in ("add", "replace", "test") and "value" not in operation:
            raise _JSONPatchError(f"missing value for {op} operation")
        if op == "add":
            doc = _json_patch_add(doc, tokens, copy.deepcopy(operation["value"]), str(path))
        elif op == "remove":
            _json_patch_remove(doc, tokens, str(path))
        elif op == "replace":
            if tokens:
                _json_patch_remove(doc, tokens, str(path))
            doc = _json_patch_add(doc, tokens, copy.deepcopy(operation["value"]), str(path))
        elif op in ("move", "copy"):
            source = operation.get("from")
            from_tokens = _pointer(source)
            if op == "move":
                value = _json_patch_remove(doc, from_tokens, str(source))
            else:
                value = copy.deepcopy(_resolve(doc, from_tokens, str(source)))
            doc = _json_patch_add(doc, tokens, value, str(path))
        elif op == "test":
            try:
                actual = _resolve(doc, tokens, str(path))
            except _JSONPatchError:
                actual = None
            if actual != operation["value"]:
                raise _JSONPatchError(f"testing value {path} failed: test failed")
        else:
            raise _JSONPatchError(f"Unexpected kind: {op}")
    return doc


def _apply_merge(target: Any, config: Any) -> Any:
    """Merge an apply configuration: maps merge, everything else is replaced."""
    if not isinstance(config, dict) or not isinstance(target, dict):
        return copy.deepcopy(config)
    result = copy.deepcopy(target)
    for key, value in config.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _apply_merge(result.get(key), value)
    return result


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings, like the API server's decoder."""


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# --------------------------------------------------------------------------------------------
# Object normalization and validation (what the registry strategies do)
# --------------------------------------------------------------------------------------------


def _base64_error(value: str) -> str | None:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        position = next((i for i, c in enumerate(value) if c not in _BASE64_ALPHABET), None)
        if position is None:
            position = len(value) - len(value) % 4 if len(value) % 4 else len(value)
        return f"illegal base64 data at input byte {position}"
    return None


def _microtime_error(value: str) -> str | None:
    """Why Go's ``time.Parse(RFC3339Micro)`` (metav1.MicroTime) rejects ``value``, if it does."""
    head = re.match(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", value)
    if head is None:
        return f'cannot parse "{value}" as "2006"'
    rest = value[head.end() :]
    if not re.match(r"[.,]\d{6}", rest):
        return f'cannot parse "{rest}" as ".000000"'
    zone = rest[7:]
    if not re.fullmatch(r"Z|[+-]\d{2}:\d{2}", zone):
        return f'cannot parse "{zone}" as "Z07:00"'
    return None


def _canonical_microtime(value: str) -> str:
    parsed = datetime.fromisoformat(value.replace(",", ".").replace("Z", "+00:00"))
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_GO_TYPES = {str: "string", int: "int32", bool: "bool", dict: "map", list: "slice"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def _expect(
    kind: _Kind, value: Any, expected: type, where: str, go_type: str | None = None
) -> None:
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise kind.undecodable(
            f"json: cannot unmarshal {_json_type(value)} into Go struct field {where} of type "
            f"{go_type or _GO_TYPES[expected]}"
        )


class _Normalizer:
    """Turns a decoded request object into the object the server stores.

    ``partial``: an apply configuration (no required fields, no server-set status);
    ``seeded``: a pod seeded by a test (``add_pod``) keeps the status it was given and may
    carry ephemeral containers.
    """

    def __init__(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        *,
        partial: bool = False,
        seeded: bool = False,
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.partial = partial
        self.seeded = seeded
        self.warnings: list[str] = []

    def _drop_unknown(self, obj: JSONObject, known: frozenset[str], prefix: str) -> None:
        for key in [k for k in obj if k not in known]:
            self.warnings.append(f'unknown field "{prefix}{key}"')
            del obj[key]

    def __call__(self, obj: JSONObject, old: JSONObject | None) -> JSONObject:
        kind = self.kind
        obj = copy.deepcopy(obj)
        meta = obj.get("metadata") or {}
        _expect(kind, meta, dict, f"{kind.kind}.metadata", "v1.ObjectMeta")
        self._drop_unknown(meta, _KNOWN_METADATA, "metadata.")
        for key in ("labels", "annotations"):
            value = meta.get(key)
            if value is None:
                meta.pop(key, None)
                continue
            _expect(kind, value, dict, f"{kind.kind}.metadata.{key}", "map[string]string")
            for item in value.values():
                _expect(kind, item, str, f"{kind.kind}.metadata.{key}", "map[string]string")
            if not value:
                del meta[key]
        for key in ("ownerReferences", "finalizers"):
            if key in meta and not meta[key]:
                del meta[key]
        for key in ("managedFields", "selfLink", "generateName", "generation"):
            meta.pop(key, None)
        meta["name"] = self.name
        meta["namespace"] = self.namespace
        meta["resourceVersion"] = old["metadata"]["resourceVersion"] if old else ""
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        if kind is SECRETS:
            body = self._secret(body, old)
        elif kind is PODS:
            body = self._pod(body, old)
        else:
            body = self._lease(body)
        ordered_meta = {k: meta[k] for k in _METADATA_ORDER if k in meta}
        return {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": ordered_meta, **body}

    def _secret(self, body: JSONObject, old: JSONObject | None) -> JSONObject:
        kind = self.kind
        self._drop_unknown(body, frozenset({"data", "stringData", "type", "immutable"}), "")
        data = body.get("data") or {}
        _expect(kind, data, dict, "Secret.data", "map[string][]uint8")
        errors: list[_FieldError] = []
        for key, value in list(data.items()):
            if value is None:
                data[key] = ""
                continue
            _expect(kind, value, str, "Secret.data", "[]uint8")
            problem = _base64_error(value)
            if problem:
                raise kind.undecodable(problem)
        string_data = body.pop("stringData", None) or {}
        _expect(kind, string_data, dict, "Secret.stringData", "map[string]string")
        for key, value in string_data.items():
            _expect(kind, value, str, "Secret.stringData", "string")
            data[key] = base64.b64encode(value.encode()).decode()
        for key in data:
            if len(key) > 253 or not _CONFIG_KEY.match(key):
                errors.append(_FieldError.invalid(f"data[{key}]", key, _CONFIG_KEY_MSG))
        secret_type = body.get("type") or "Opaque"
        _expect(kind, secret_type, str, "Secret.type", "v1.SecretType")
        immutable = body.get("immutable")
        if immutable is not None:
            _expect(kind, immutable, bool, "Secret.immutable")
        if old is not None:
            if secret_type != old.get("type"):
                errors.append(_FieldError.invalid("type", secret_type, "field is immutable"))
            if old.get("immutable"):
                if immutable is not True:
                    errors.append(
                        _FieldError.forbidden(
                            "immutable", "field is immutable when `immutable` is set"
                        )
                    )
                if data != (old.get("data") or {}):
                    errors.append(
                        _FieldError.forbidden("data", "field is immutable when `immutable` is set")
                    )
        if errors:
            raise kind.invalid(self.name, errors)
        result: JSONObject = {}
        if immutable is not None:
            result["immutable"] = immutable
        if data:
            result["data"] = data
        result["type"] = secret_type
        return result

    def _lease(self, body: JSONObject) -> JSONObject:
        kind = self.kind
        self._drop_unknown(body, frozenset({"spec"}), "")
        spec = body.get("spec") or {}
        _expect(kind, spec, dict, "Lease.spec", "v1.LeaseSpec")
        known = {
            "holderIdentity": str,
            "leaseDurationSeconds": int,
            "acquireTime": str,
            "renewTime": str,
            "leaseTransitions": int,
            "strategy": str,
            "preferredHolder": str,
        }
        self._drop_unknown(spec, frozenset(known), "spec.")
        errors: list[_FieldError] = []
        for key, expected in known.items():
            value = spec.get(key)
            if value is None:
                spec.pop(key, None)
                continue
            go_type = "v1.MicroTime" if key.endswith("Time") else None
            _expect(kind, value, expected, f"LeaseSpec.spec.{key}", go_type)
            if key.endswith("Time"):
                problem = _microtime_error(value)
                if problem:
                    raise kind.undecodable(
                        f'parsing time "{value}" as "{_MICROTIME_LAYOUT}": {problem}'
                    )
                spec[key] = _canonical_microtime(value)
        if spec.get("leaseDurationSeconds", 1) <= 0:
            errors.append(
                _FieldError.invalid(
                    "spec.leaseDurationSeconds",
                    spec["leaseDurationSeconds"],
                    "must be greater than 0",
                )
            )
        if spec.get("leaseTransitions", 0) < 0:
            errors.append(
                _FieldError.invalid(
                    "spec.leaseTransitions",
                    spec["leaseTransitions"],
                    "must be greater than or equal to 0",
                )
            )
        if errors:
            raise kind.invalid(self.name, errors)
        return {"spec": spec}

    def _pod(self, body: JSONObject, old: JSONObject | None) -> JSONObject:
        kind = self.kind
        self._drop_unknown(body, frozenset({"spec", "status"}), "")
        spec = body.get("spec")
        spec = {} if spec is None else spec
        _expect(kind, spec, dict, "Pod.spec", "v1.PodSpec")
        for key, go_type in _POD_SPEC_LISTS.items():
            items = spec.get(key)
            if items is None:
                spec.pop(key, None)
                continue
            _expect(kind, items, list, f"PodSpec.spec.{key}", f"[]{go_type}")
            for item in items:
                _expect(kind, item, dict, f"PodSpec.spec.{key}", go_type)
        for key in ("containers", "initContainers", "ephemeralContainers"):
            for container in spec.get(key) or []:
                for list_key in ("volumeMounts", "env", "envFrom"):
                    value = container.get(list_key)
                    if value is not None:
                        where = f"Container.spec.{key}.{list_key}"
                        _expect(kind, value, list, where, "[]interface {}")
                        for item in value:
                            _expect(kind, item, dict, where, "map[string]interface {}")
        status = body.get("status")
        status = {} if status is None else status
        _expect(kind, status, dict, "Pod.status", "v1.PodStatus")
        errors: list[_FieldError] = []
        if old is not None:
            # The main resource never writes status (that is the status subresource's job).
            status = copy.deepcopy(old.get("status") or {})
            errors = _pod_update_errors(spec, old.get("spec") or {})
        elif not self.partial:
            errors = _pod_create_errors(spec, seeded=self.seeded)
            if not self.seeded:
                status = {"phase": "Pending", "qosClass": _qos_class(spec)}
        if errors:
            raise kind.invalid(self.name, errors)
        return {"spec": spec, "status": status}


# --------------------------------------------------------------------------------------------
# Pods: what the registry's pod strategy validates
# --------------------------------------------------------------------------------------------

_POD_SPEC_LISTS = {
    "volumes": "v1.Volume",
    "initContainers": "v1.Container",
    "containers": "v1.Container",
    "ephemeralContainers": "v1.EphemeralContainer",
    "tolerations": "v1.Toleration",
    "schedulingGates": "v1.PodSchedulingGate",
}
_UPDATABLE_POD_SPEC_FIELDS = ",".join(
    (
        "`spec.containers[*].image`",
        "`spec.initContainers[*].image`",
        "`spec.activeDeadlineSeconds`",
        "`spec.tolerations` (only additions to existing tolerations)",
        "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously "
        "negative)",
    )
)
_MAX_INT32 = 2**31 - 1


def _pruned(value: Any) -> Any:
    """A value as Go's semantic equality sees it after decoding: nulls, empty lists and empty
    maps are the same as absent."""
    if isinstance(value, dict):
        pruned = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v is not None and v != [] and v != {}}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def _required(path: str) -> _FieldError:
    return _FieldError(path, "FieldValueRequired", "Required value")


def _duplicate(path: str, value: Any) -> _FieldError:
    return _FieldError(path, "FieldValueDuplicate", f"Duplicate value: {_go_quote(value)}")


def _pod_create_errors(spec: JSONObject, *, seeded: bool) -> list[_FieldError]:
    """ValidatePodCreate, for the fields a test builds: volumes, containers, their mounts."""
    errors: list[_FieldError] = []
    volumes: set[str] = set()
    for index, volume in enumerate(spec.get("volumes") or []):
        name = volume.get("name")
        if not name:
            errors.append(_required(f"spec.volumes[{index}].name"))
        elif name in volumes:
            errors.append(_duplicate(f"spec.volumes[{index}].name", name))
        volumes.add(str(name))
    if not spec.get("containers"):
        errors.append(_required("spec.containers"))
    if spec.get("ephemeralContainers") and not seeded:
        errors.append(_FieldError.forbidden("spec.ephemeralContainers", "cannot be set on create"))
    names: set[str] = set()
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for index, container in enumerate(spec.get(key) or []):
            where = f"spec.{key}[{index}]"
            name = container.get("name")
            if not name:
                errors.append(_required(f"{where}.name"))
            elif name in names:
                errors.append(_duplicate(f"{where}.name", name))
            names.add(str(name))
            if not container.get("image"):
                errors.append(_required(f"{where}.image"))
            for number, mount in enumerate(container.get("volumeMounts") or []):
                mount_name = mount.get("name")
                if not mount_name:
                    errors.append(_required(f"{where}.volumeMounts[{number}].name"))
                elif mount_name not in volumes:
                    errors.append(
                        _FieldError(
                            f"{where}.volumeMounts[{number}].name",
                            "FieldValueNotFound",
                            f"Not found: {_go_quote(mount_name)}",
                        )
                    )
                if not mount.get("mountPath"):
                    errors.append(_required(f"{where}.volumeMounts[{number}].mountPath"))
    return errors


def _pod_update_errors(new: JSONObject, old: JSONObject) -> list[_FieldError]:
    """ValidatePodUpdate: a pod's spec may change only in its images, a lower
    ``activeDeadlineSeconds``, added tolerations, removed scheduling gates and a negative
    ``terminationGracePeriodSeconds`` set to 1; everything else is the one ``spec`` Forbidden
    error, with a diff of the specs."""
    errors: list[_FieldError] = []
    for key in ("containers", "initContainers"):
        new_containers, old_containers = new.get(key) or [], old.get(key) or []
        if len(new_containers) != len(old_containers):
            errors.append(
                _FieldError.forbidden(f"spec.{key}", "pod updates may not add or remove containers")
            )
            return errors
        for index, container in enumerate(new_containers):
            image = container.get("image")
            if not image:
                errors.append(_required(f"spec.{key}[{index}].image"))
            elif isinstance(image, str) and image.strip() != image:
                errors.append(
                    _FieldError.invalid(
                        f"spec.{key}[{index}].image",
                        image,
                        "must not have leading or trailing whitespace",
                    )
                )
    new_deadline, old_deadline = new.get("activeDeadlineSeconds"), old.get("activeDeadlineSeconds")
    deadline_path = "spec.activeDeadlineSeconds"
    if new_deadline is not None:
        if not isinstance(new_deadline, int) or not 0 <= new_deadline <= _MAX_INT32:
            errors.append(
                _FieldError.invalid(
                    deadline_path, new_deadline, f"must be between 0 and {_MAX_INT32}, inclusive"
                )
            )
            return errors
        if isinstance(old_deadline, int) and old_deadline < new_deadline:
            errors.append(
                _FieldError.invalid(
                    deadline_path, new_deadline, "must be less than or equal to previous value"
                )
            )
            return errors
    elif old_deadline is not None:
        errors.append(
            _FieldError(
                deadline_path,
                "FieldValueInvalid",
                'Invalid value: "null": must not update from a positive integer to nil value',
            )
        )
    new_tolerations = [_pruned(t) for t in new.get("tolerations") or []]
    for toleration in old.get("tolerations") or []:
        if not any(
            _pruned({**toleration, "tolerationSeconds": candidate.get("tolerationSeconds")})
            == candidate
            for candidate in new_tolerations
        ):
            errors.append(
                _FieldError.forbidden(
                    "spec.tolerations",
                    "existing toleration can not be modified except its tolerationSeconds",
                )
            )
            break
    old_gates = {gate.get("name") for gate in old.get("schedulingGates") or []}
    for index, gate in enumerate(new.get("schedulingGates") or []):
        if gate.get("name") not in old_gates:
            errors.append(
                _FieldError.forbidden(
                    f"spec.schedulingGates[{index}].name",
                    f"only deletion is allowed, but found new scheduling gate '{gate.get('name')}'",
                )
            )
    if _pruned(new) == _pruned(old):
        return errors
    munged = copy.deepcopy(new)
    for key in ("containers", "initContainers"):
        for container, before in zip(munged.get(key) or [], old.get(key) or [], strict=True):
            container["image"] = before.get("image")
    for key in ("activeDeadlineSeconds", "schedulingGates", "tolerations"):
        munged[key] = copy.deepcopy(old.get(key))
    grace = old.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and grace < 0 and munged.get("terminationGracePeriodSeconds") == 1:
        munged["terminationGracePeriodSeconds"] = grace
    if _pruned(munged) != _pruned(old):
        errors.append(
            _FieldError.forbidden(
                "spec",
                f"pod updates may not change fields other than {_UPDATABLE_POD_SPEC_FIELDS}\n"
                + _spec_diff(_pruned(old), _pruned(munged)),
            )
        )
    return errors


def _spec_diff(old: JSONObject, new: JSONObject) -> str:
    """A readable stand-in for the ``cmp.Diff(oldPod.Spec, mungedPodSpec)`` the server appends
    (Go's cmp output is unstable by design): one ``-``/``+`` line per changed spec field."""
    lines = ["  core.PodSpec{"]
    for key in list(old) + [k for k in new if k not in old]:
        if old.get(key) == new.get(key):
            continue
        go_name = key[:1].upper() + key[1:]
        if key in old:
            lines.append(f"- \t{go_name}: {json.dumps(old[key], sort_keys=True)},")
        if key in new:
            lines.append(f"+ \t{go_name}: {json.dumps(new[key], sort_keys=True)},")
    lines.append("  }")
    return "\n".join(lines) + "\n"


def _qos_class(spec: JSONObject) -> str:
    """The QoS class the server puts in a new pod's status (GetPodQOS, for cpu and memory)."""
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        for name in ("cpu", "memory"):
            if name not in limits or requests.get(name, limits[name]) != limits[name]:
                return "Burstable"
    return "Guaranteed"


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------


def _label_matcher(selector: str) -> Any:
    requirements = [p.strip() for p in re.split(r",(?![^()]*\))", selector) if p.strip()]
    checks = []
    for requirement in requirements:
        if m := re.fullmatch(r"(\S+?)\s+(in|notin)\s+\((.*)\)", requirement):
            key, op, raw = m.groups()
            values = {v.strip() for v in raw.split(",")}
            checks.append((key, op, values))
        elif m := re.fullmatch(r"(\S+?)\s*(==|=|!=)\s*(\S*)", requirement):
            key, op, value = m.groups()
            checks.append((key, "!=" if op == "!=" else "=", {value}))
        elif m := re.fullmatch(r"!\s*(\S+)", requirement):
            checks.append((m.group(1), "!", set()))
        elif re.fullmatch(r"\S+", requirement):
            checks.append((requirement, "exists", set()))
        else:
            raise ApiStatusError(400, f"unable to parse requirement: {requirement!r}")

    def matches(labels: Mapping[str, str]) -> bool:
        for key, op, values in checks:
            present = key in labels
            if op in ("=", "in") and (not present or labels[key] not in values):
                return False
            if op in ("!=", "notin") and present and labels[key] in values:
                return False
            if op == "exists" and not present:
                return False
            if op == "!" and present:
                return False
        return True

    return matches


# The field labels a kind's field selectors may use (its AddFieldLabelConversionFunc); a kind
# without one (Lease) gets the default: metadata.name and metadata.namespace.
_POD_FIELD_LABELS = (
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)
_FIELD_LABELS: dict[str, tuple[str, ...]] = {
    SECRETS.resource: ("type", "metadata.namespace", "metadata.name"),
    PODS.resource: _POD_FIELD_LABELS,
}


def _field_requirements(kind: _Kind, selector: str) -> list[tuple[str, bool, str]]:
    allowed = _FIELD_LABELS.get(kind.resource)
    requirements = []
    for part in (p.strip() for p in selector.split(",") if p.strip()):
        m = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", part)
        if m is None:
            raise ApiStatusError(400, f"invalid selector: '{part}'; can't understand '{part}'")
        key, op, value = m.groups()
        if kind is PODS and key == "spec.host":
            key = "spec.nodeName"  # what the server still accepts from old clients
        if allowed is None and key not in ("metadata.name", "metadata.namespace"):
            raise ApiStatusError(
                400,
                f'"{key}" is not a known field selector: only "metadata.name", '
                '"metadata.namespace"',
            )
        if allowed is not None and key not in allowed:
            raise ApiStatusError(400, f"field label not supported: {key}")
        requirements.append((key, op == "!=", value))
    return requirements


def _field_value(obj: JSONObject, key: str) -> str:
    """The value of a field label, as the registry's selectable fields put it."""
    if key == "type":
        return str(obj.get("type", ""))
    if key.startswith("metadata."):
        return str(obj["metadata"].get(key.split(".", 1)[1], ""))
    section, _, name = key.partition(".")
    values = obj.get(section) or {}
    if key == "spec.hostNetwork":
        return "true" if values.get("hostNetwork") is True else "false"
    if key == "status.podIP":
        ips = values.get("podIPs") or []
        first = ips[0].get("ip") if ips and isinstance(ips[0], dict) else None
        return str(first or values.get("podIP") or "")
    value = values.get(name)
    return "" if value is None else str(value)


_Matcher = Callable[[JSONObject], bool]


def _object_matcher(kind: _Kind, namespace: str, query: dict[str, list[str]]) -> _Matcher:
    """What a list or watch request selects: its namespace, ``labelSelector``, ``fieldSelector``."""
    label_matches = _label_matcher(query.get("labelSelector", [""])[0])
    requirements = _field_requirements(kind, query.get("fieldSelector", [""])[0])

    def matches(obj: JSONObject) -> bool:
        meta = obj["metadata"]
        if meta.get("namespace") != namespace or not label_matches(meta.get("labels", {})):
            return False
        return all(
            (_field_value(obj, key) == value) != negated for key, negated, value in requirements
        )

    return matches


# --------------------------------------------------------------------------------------------
# Watches and service-account tokens
# --------------------------------------------------------------------------------------------

_WatchEnd = Literal["timeout", "expired", "drop"]


def _parse_bool(name: str, value: str) -> bool:
    """Go's strconv.ParseBool, which the server's query decoder uses."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("", "0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ApiStatusError(400, f'{name}: Invalid value: "{value}": invalid boolean')


def _parse_uint(name: str, value: str) -> int:
    if not value.isdigit():
        raise ApiStatusError(
            400,
            f'{name}: Invalid value: "{value}": strconv.ParseUint: parsing {json.dumps(value)}'
            ": invalid syntax",
        )
    return int(value)


def _go_quote_list(values: list[str]) -> str:
    """Go's %q of a []string: ``["a" "b"]``."""
    return "[" + " ".join(json.dumps(v) for v in values) + "]"


def _event_line(event_type: str, obj: JSONObject) -> bytes:
    return (json.dumps({"type": event_type, "object": obj}) + "\n").encode()


def _expired(since: int, floor: int) -> ApiStatusError:
    """The watch cache's answer to a resourceVersion older than its history."""
    return ApiStatusError(410, f"too old resource version: {since} ({floor})", reason="Expired")


def _expired_line(since: int, floor: int) -> bytes:
    return _event_line("ERROR", _expired(since, floor).status())


_CLIENT_GONE_POLL = 0.1  # seconds between checks that an idle watch's client is still there


def _client_gone(connection: socket.socket | None) -> bool:
    """Whether the client closed its end (readable, and nothing to read)."""
    if connection is None:
        return False
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


@dataclass(frozen=True)
class _Event:
    """One change in the watch history: the object after (``None`` once deleted) and before
    (``None`` when created), both rendered as the API shows them."""

    resource_version: int
    current: JSONObject | None
    previous: JSONObject | None


@dataclass(eq=False)
class _Watcher:
    """One open watch request.  Guarded by the server's lock; the handler thread drains it."""

    kind: _Kind
    matches: _Matcher
    bookmarks: bool
    deadline: float  # time.monotonic()
    resource_version: int  # the last one sent (or asked for)
    pending: list[bytes] = field(default_factory=list)
    end: _WatchEnd | None = None
    streaming: bool = False  # the response headers went out
    connection: socket.socket | None = None

    def line_for(self, event: _Event) -> bytes | None:
        """The event this watcher sees, as the server's cacheWatcher converts it, or None."""
        now_matches = event.current is not None and self.matches(event.current)
        was_matching = event.previous is not None and self.matches(event.previous)
        if now_matches and event.current is not None:
            return _event_line("MODIFIED" if was_matching else "ADDED", event.current)
        if was_matching and event.previous is not None:
            # The last state the watcher saw, at the resourceVersion of the change.
            gone = copy.deepcopy(event.previous)
            gone["metadata"]["resourceVersion"] = str(event.resource_version)
            return _event_line("DELETED", gone)
        return None

    def close(self, end: _WatchEnd) -> None:
        if self.end is None or end == "drop":
            self.end = end
        if end == "drop" and self.connection is not None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


@dataclass
class _ServiceAccountToken:
    namespace: str
    name: str
    uid: str
    audiences: list[str]
    expires_at: float  # time.time()
    credential_id: str
    revoked: bool = False


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


@dataclass
class _Response:
    code: int
    body: JSONObject
    headers: dict[str, str] = field(default_factory=dict)
    stream: _Watcher | None = None  # a watch: the handler streams its events instead of body


class FakeKubeAPI(LoopbackServer):
    """The fake API server.  Use as a context manager or call ``start()`` / ``stop()``.

    ``token`` and ``rbac`` are plain attributes and may be changed while running (e.g. to
    rotate the accepted token or revoke a permission).  ``stop()`` drops kept-alive client
    connections and open watches, so clients see the server go away; ``start()`` again serves
    the same port, with the same objects and resourceVersions.

    ``watch_history`` (events kept per resource for watches to resume from),
    ``default_watch_timeout`` (seconds a watch without ``timeoutSeconds`` lasts),
    ``expired_watch_as_http_410`` (answer an expired watch with an HTTP 410 instead of the real
    server's in-stream ERROR event) and ``api_audiences`` (what a TokenReview without
    ``spec.audiences`` checks against) are plain attributes too.
    """

    def __init__(
        self,
        *,
        token: str = "fake-sa-token",
        rbac: RBAC | None = None,
        watch_history: int = 100,
        default_watch_timeout: float = 1800.0,
        api_audiences: tuple[str, ...] = (DEFAULT_API_AUDIENCE,),
    ) -> None:
        super().__init__(_Handler, name="fake-kube-api")
        self.token = token
        self.rbac = rbac
        self.watch_history = watch_history
        self.default_watch_timeout = default_watch_timeout
        self.expired_watch_as_http_410 = False
        self.api_audiences = list(api_audiences)
        self._lock = threading.RLock()
        self._watch_changed = threading.Condition(self._lock)
        self._store: dict[tuple[str, str, str], _Stored] = {}
        self._revision = 1000  # etcd's global revision: every write bumps it
        # Per resource: the recent changes, and the oldest RV a watch may resume from.
        self._history: dict[str, deque[_Event]] = {resource: deque() for resource in _KINDS}
        self._history_floor: dict[str, int] = dict.fromkeys(_KINDS, self._revision)
        self._watchers: set[_Watcher] = set()
        self._sa_tokens: dict[str, _ServiceAccountToken] = {}
        self._token_reviews = 0
        self._requests: list[RecordedRequest] = []
        self._internal_errors: list[BaseException] = []
        self._conflicts_left = 0
        self._errors_left = 0
        self._error_status = 500
        self._error_resource: str | None = None
        self._delays_left = 0
        self._delay_seconds = 0.0
        self._delay_resource: str | None = None
        self._vanishing: dict[str, set[str]] = {}  # namespace -> pods deleted after a list

    # -- lifecycle (start, stop, context manager: refresher.loopback.LoopbackServer) -----------

    def stop(self) -> None:
        """Stop promptly; open watches break off (no last chunk), as when a server dies."""
        self.drop_watches()
        super().stop()

    @property
    def url(self) -> str:
        if not self.running:
            raise RuntimeError("FakeKubeAPI is not running")
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(
        self, path: Path, *, namespace: str = "default", context: str = "fake"
    ) -> Path:
        """Write a kubeconfig whose current context talks to this server with ``token``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": context, "namespace": namespace},
                }
            ],
            "current-context": context,
            "preferences": {},
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- direct state access (bypasses auth and RBAC) -------------------------------------------

    def get_object(self, resource: Resource, namespace: str, name: str) -> JSONObject | None:
        kind = _KINDS[resource]
        with self._lock:
            stored = self._store.get((resource, namespace, name))
            return None if stored is None else self._render(kind, stored)

    def put_object(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        obj: JSONObject,
        *,
        manager: str = "test-harness",
    ) -> JSONObject:
        """Create or unconditionally replace an object, as an ``Update`` by ``manager``.

        Runs the same normalization/validation as the API (raises ``ApiStatusError``).
        """
        kind = _KINDS[resource]
        with self._lock:
            stored = self._store.get((resource, namespace, name))
            body = copy.deepcopy(obj)
            body.setdefault("metadata", {})
            if stored is None:
                return self._create(kind, namespace, name, body, manager, dry_run=False).body
            body["metadata"].pop("resourceVersion", None)
            body["metadata"].pop("uid", None)
            candidate = _Normalizer(kind, namespace, name)(body, stored.obj)
            return self._commit_update(kind, namespace, name, stored, candidate, manager)

    def delete_object(self, resource: Resource, namespace: str, name: str) -> None:
        """Delete an object if it exists."""
        with self._lock:
            self._remove(_KINDS[resource], namespace, name)

    # -- pods (direct access) -------------------------------------------------------------------

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        spec: JSONObject | None = None,
        status: JSONObject | None = None,
        manager: str = "test-harness",
    ) -> JSONObject:
        """Create a pod as a test's fixture; returns it as the API shows it.

        The server fills ``uid``, ``resourceVersion`` and ``creationTimestamp``.  ``spec``
        defaults to one container (``app``, image ``registry.example/app:1``) and is validated
        as on create (containers need a name and an image, a ``volumeMount`` must name a volume:
        ``ApiStatusError`` 422 otherwise), except that ``ephemeralContainers`` are allowed here.
        ``status`` is stored as given (default: ``{"phase": "Running"}``), as if the kubelet
        had written it.  An existing pod is an ``ApiStatusError`` 409: ``delete_pod`` first.
        """
        body: JSONObject = {
            "metadata": {"name": name},
            "spec": copy.deepcopy(spec) if spec is not None else _default_pod_spec(),
            "status": copy.deepcopy(status) if status is not None else {"phase": "Running"},
        }
        if labels:
            body["metadata"]["labels"] = dict(labels)
        if annotations:
            body["metadata"]["annotations"] = dict(annotations)
        with self._lock:
            return self._create(PODS, namespace, name, body, manager, False, seeded=True).body

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod at once if it exists (no graceful termination)."""
        self.delete_object("pods", namespace, name)

    def pod(self, namespace: str, name: str) -> JSONObject | None:
        """A pod as the API shows it (``managedFields`` included), or None."""
        return self.get_object("pods", namespace, name)

    def vanish_after_next_list(self, namespace: str, names: Iterable[str]) -> None:
        """Right after the next pod LIST in ``namespace`` is answered (a successful list, not a
        watch), the pods ``names`` are deleted, as if they went away between the client's list
        and what it does next: the list shows them, a later GET or PATCH gets 404.  Names that
        do not exist then are ignored; calls before that list add up."""
        with self._lock:
            self._vanishing.setdefault(namespace, set()).update(names)

    # -- watches --------------------------------------------------------------------------------

    @property
    def open_watches(self) -> int:
        """Watch responses being streamed now (headers sent, stream not ended)."""
        with self._lock:
            return sum(1 for w in self._watchers if w.streaming)

    def wait_for_watches(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until exactly ``count`` watches are open; False if that took over ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._watch_changed:
            while self.open_watches != count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._watch_changed.wait(remaining)
            return True

    def drop_watches(self) -> int:
        """Shut down the connection of every watch, mid-stream: the client sees a broken
        chunked response (no last chunk).  Returns how many were dropped."""
        with self._lock:
            watchers = [w for w in self._watchers if w.end != "drop"]
            for watcher in watchers:
                watcher.close("drop")
            self._watch_changed.notify_all()
            return len(watchers)

    def compact_history(self) -> None:
        """Forget every watch event and advance the resourceVersion (as a write of some other
        object would): a watch from any resourceVersion obtained before this call is expired
        (410), while a list made after it returns a resourceVersion to watch from."""
        with self._lock:
            self._revision += 1
            for resource in self._history:
                self._history[resource].clear()
                self._history_floor[resource] = self._revision

    def expire_watches(self) -> int:
        """``compact_history()``, then end every open watch with the in-stream ERROR event
        (``410``, reason ``Expired``) a real server sends.  Returns how many were expired."""
        with self._lock:
            self.compact_history()
            watchers = [w for w in self._watchers if w.end is None]
            for watcher in watchers:
                floor = self._history_floor[watcher.kind.resource]
                watcher.pending.append(_expired_line(watcher.resource_version, floor))
                watcher.close("expired")
            self._watch_changed.notify_all()
            return len(watchers)

    def send_bookmarks(self) -> int:
        """Send a ``BOOKMARK`` event (the current resourceVersion) to every open watch that
        asked for them (``allowWatchBookmarks=true``).  Returns how many were sent."""
        with self._lock:
            watchers = [w for w in self._watchers if w.end is None and w.bookmarks]
            for watcher in watchers:
                bookmark = {
                    "kind": watcher.kind.kind,
                    "apiVersion": watcher.kind.api_version,
                    "metadata": {"resourceVersion": str(self._revision)},
                }
                watcher.pending.append(_event_line("BOOKMARK", bookmark))
                watcher.resource_version = self._revision
            self._watch_changed.notify_all()
            return len(watchers)

    # -- service-account tokens (TokenReview) ---------------------------------------------------

    def issue_service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: list[str] | None = None,
        expires_in: float = 3600,
    ) -> str:
        """A token for service account ``namespace/name`` that TokenReviews accept, as the
        TokenRequest API (a projected volume) would issue it: for ``audiences`` (default: the
        API server's, ``api_audiences``), valid for ``expires_in`` seconds (0 or less: already
        expired).  JWT-shaped, but only this server's memory makes it valid."""
        audiences = list(self.api_audiences if audiences is None else audiences)
        now = time.time()
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount/{namespace}/{name}"))
        credential_id = str(uuid.uuid4())
        claims = {
            "aud": audiences,
            "exp": int(now + expires_in),
            "iat": int(now),
            "iss": DEFAULT_API_AUDIENCE,
            "jti": credential_id,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": uid},
            },
            "nbf": int(now),
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        parts = [
            json.dumps({"alg": "RS256", "kid": "fake-kube-api"}, separators=(",", ":")).encode(),
            json.dumps(claims, separators=(",", ":")).encode(),
            _random.token_bytes(256),
        ]
        token = ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in parts)
        with self._lock:
            self._sa_tokens[token] = _ServiceAccountToken(
                namespace, name, uid, audiences, now + expires_in, credential_id
            )
        return token

    def revoke_token(self, token: str) -> None:
        """From now on TokenReviews refuse ``token`` (as when its pod or Secret is deleted)."""
        with self._lock:
            if token in self._sa_tokens:
                self._sa_tokens[token].revoked = True

    @property
    def token_reviews(self) -> int:
        """TokenReviews answered (authorized ones, whatever their verdict)."""
        with self._lock:
            return self._token_reviews

    # -- fault injection ------------------------------------------------------------------------

    def inject_conflicts(self, count: int) -> None:
        """Before each of the next ``count`` PUT/PATCH requests to an existing object, another
        writer modifies it (new resourceVersion, annotation ``other-writer/touched``)."""
        with self._lock:
            self._conflicts_left = count

    def inject_errors(self, count: int, status: int = 500, *, resource: str | None = None) -> None:
        """The next ``count`` requests (any verb, before authentication) answer ``status``;
        with ``resource`` (e.g. ``"pods"``) only requests for that resource count and fail."""
        with self._lock:
            self._errors_left = count
            self._error_status = status
            self._error_resource = resource

    def inject_delay(self, count: int, seconds: float, *, resource: str | None = None) -> None:
        """The next ``count`` requests are processed normally, but their responses are held
        back for ``seconds`` (a slow server / lost response, for client timeout tests); with
        ``resource`` (e.g. ``"pods"``) only requests for that resource count and wait."""
        with self._lock:
            self._delays_left = count
            self._delay_seconds = seconds
            self._delay_resource = resource

    # -- observation ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def request_count(
        self,
        verb: str | None = None,
        resource: str | None = None,
        *,
        namespace: str | None = None,
        name: str | None = None,
    ) -> int:
        """Requests received (whatever their answer, injected errors and 403s included) for
        ``verb`` on ``resource``; None matches any.  ``verb`` is what the server authorizes
        the request as (``get``, ``list``, ``watch``, ``create``, ``update``, ``patch``,
        ``delete``) or, in capitals, an HTTP method (``GET``, ``PATCH``...).  E.g. a nudge of
        50 pods is ``request_count("list", "pods") == 1`` and
        ``request_count("patch", "pods") == 50``.  ``requests`` has the same classification
        per request (``RecordedRequest.verb``, ``.resource``, ``.namespace``, ``.name``)."""
        with self._lock:
            recorded = list(self._requests)
        count = 0
        for request in recorded:
            target = _classify(request.method, request.path, request.query)
            if target is None:
                continue
            got_verb, got_resource, got_namespace, got_name = target
            if verb is not None and verb != (request.method if verb.isupper() else got_verb):
                continue
            if resource is not None and resource != got_resource:
                continue
            if namespace is not None and namespace != got_namespace:
                continue
            if name is not None and name != got_name:
                continue
            count += 1
        return count

    def write_count(self, resource: str | None = None) -> int:
        """Number of POST/PUT/PATCH/DELETE requests received (optionally for one resource);
        TokenReviews are not counted."""
        with self._lock:
            count = 0
            for request in self._requests:
                if request.method not in WRITE_METHODS or _TOKEN_REVIEW_PATH.match(request.path):
                    continue  # a TokenReview changes nothing
                route = _route(request.path)
                if resource is None or (route is not None and route[0].resource == resource):
                    count += 1
            return count

    @property
    def internal_errors(self) -> list[BaseException]:
        """Unexpected exceptions inside the fake (answered with 500); should stay empty."""
        with self._lock:
            return list(self._internal_errors)

    # -- request handling -----------------------------------------------------------------------

    def _serve(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Response:
        """Answer one HTTP request (called by the handler thread)."""
        split = urlsplit(target)
        query = parse_qs(split.query, keep_blank_values=True)
        request = RecordedRequest(method, split.path, query, headers, body, time.time())
        resource = request.resource
        with self._lock:
            self._requests.append(request)
        try:
            injected = self._injected_error(resource)
            if injected is not None:
                raise injected
            response = self._handle(method, split.path, query, headers, body)
        except ApiStatusError as error:
            response = _Response(error.code, error.status(), error.headers)
        except Exception as error:  # a bug in the fake: answer like the server would
            with self._lock:
                self._internal_errors.append(error)
            failure = ApiStatusError(500, f"Internal error occurred: {error!r}")
            response = _Response(500, failure.status())
        with self._lock:
            delay = 0.0
            if self._delays_left > 0 and self._delay_resource in (None, resource):
                delay = self._delay_seconds
                self._delays_left -= 1
        if delay:
            self.stopping.wait(delay)  # stop() wakes it
        return response

    def _injected_error(self, resource: str | None) -> ApiStatusError | None:
        with self._lock:
            if self._errors_left <= 0 or self._error_resource not in (None, resource):
                return None
            self._errors_left -= 1
            code = self._error_status
        headers: dict[str, str] = {}
        details: JSONObject | None = None
        if code == 429:
            message = "Too many requests, please try again later."
            headers["Retry-After"] = "1"
            details = {"retryAfterSeconds": 1}
        elif code == 500:
            message = "Internal error occurred: injected fault"
        elif code == 503:
            message = "the server is currently unable to handle the request"
        elif code == 504:
            message = (
                "the server was unable to return a response in the time allotted, but may "
                "still be processing the request"
            )
        else:
            message = f"injected fault: {HTTPStatus(code).phrase}"
        return ApiStatusError(code, message, details=details, headers=headers)

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or credential.strip() != self.token:
            raise ApiStatusError(401, "Unauthorized")

    def _authorize(self, verb: str, kind: _Kind, namespace: str, name: str) -> None:
        rbac = self.rbac
        if rbac is None or rbac.allows(verb, kind.resource, namespace, name):
            return
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        who = (
            f'User "{rbac.user}" cannot {verb} resource "{kind.resource}" in API group '
            f'"{kind.group}" {scope}'
        )
        target = f'{kind.qualified} "{name}"' if name else kind.qualified
        raise ApiStatusError(403, f"{target} is forbidden: {who}", details=kind.details(name))

    def _handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> _Response:
        self._authenticate(headers)
        if _TOKEN_REVIEW_PATH.match(path):
            if method != "POST":
                raise ApiStatusError(
                    405,
                    "the server does not allow this method on the requested resource",
                    details=TOKEN_REVIEWS.details(""),
                )
            self._authorize("create", TOKEN_REVIEWS, "", "")
            return self._token_review(body, headers.get("content-type", "application/json"))
        route = _route(path)
        if route is None:
            raise ApiStatusError(404, "the server could not find the requested resource")
        kind, namespace, name = route
        verb = _verb(method, name, query)
        if verb is None:
            raise ApiStatusError(
                405,
                "the server does not allow this method on the requested resource",
                details=kind.details(name),
            )
        field_selector = query.get("fieldSelector", [""])[0]
        auth_name = name
        if verb in ("list", "watch"):
            # The authorizer sees the name a field selector pins (RequestInfo.Name).
            requirements = _field_requirements(kind, field_selector)
            names = [v for k, negated, v in requirements if k == "metadata.name" and not negated]
            auth_name = names[0] if len(names) == 1 else ""
        self._authorize(verb, kind, namespace, auth_name)

        manager = self._field_manager(query, headers)
        dry_run = "All" in query.get("dryRun", [])
        content_type = headers.get("content-type", "application/json")
        with self._lock:
            if verb == "get":
                return _Response(200, self._render(kind, self._get(kind, namespace, name)))
            if verb == "list":
                return self._list(kind, namespace, query)
            if verb == "watch":
                return self._watch(kind, namespace, query)
            if verb == "create":
                obj = self._decode(kind, body, content_type)
                return self._post(kind, namespace, obj, manager, dry_run)
            if verb == "update":
                obj = self._decode(kind, body, content_type)
                return self._put(kind, namespace, name, obj, manager, dry_run)
            if verb == "patch":
                return self._patch(
                    kind, namespace, name, body, content_type, query, manager, dry_run
                )
            return self._delete(kind, namespace, name, body, dry_run)

    @staticmethod
    def _field_manager(query: dict[str, list[str]], headers: Mapping[str, str]) -> str:
        if query.get("fieldManager", [""])[0]:
            return query["fieldManager"][0]
        # The server names anonymous managers after the User-Agent up to its first "/".
        return headers.get("user-agent", "").split("/", 1)[0] or "unknown"

    # -- verbs (all called with the lock held) --------------------------------------------------

    def _get(self, kind: _Kind, namespace: str, name: str) -> _Stored:
        stored = self._store.get((kind.resource, namespace, name))
        if stored is None:
            raise kind.not_found(name)
        return stored

    def _render(self, kind: _Kind, stored: _Stored, *, in_list: bool = False) -> JSONObject:
        obj = copy.deepcopy(stored.obj)
        if stored.managers:
            obj["metadata"]["managedFields"] = [
                {
                    "manager": m.manager,
                    "operation": m.operation,
                    "apiVersion": kind.api_version,
                    "time": m.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": _fields_v1(m.fields),
                }
                for m in stored.managers
            ]
        if in_list:  # items of a typed list carry no kind/apiVersion
            obj.pop("kind", None)
            obj.pop("apiVersion", None)
        return obj

    def _list(self, kind: _Kind, namespace: str, query: dict[str, list[str]]) -> _Response:
        matches = _object_matcher(kind, namespace, query)
        items = [
            self._render(kind, stored, in_list=True)
            for (resource, _ns, _name), stored in sorted(self._store.items())
            if resource == kind.resource and matches(stored.obj)
        ]
        body = {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }
        if kind is PODS:
            for name in sorted(self._vanishing.pop(namespace, set())):
                self._remove(kind, namespace, name)
        return _Response(200, body)

    def _remove(self, kind: _Kind, namespace: str, name: str) -> None:
        """Delete an object at once, if it exists (a new resourceVersion, a watch event)."""
        stored = self._store.pop((kind.resource, namespace, name), None)
        if stored is not None:
            self._revision += 1
            self._record(kind, stored, None)

    def _watch(self, kind: _Kind, namespace: str, query: dict[str, list[str]]) -> _Response:
        """Register a watch; the handler streams what it collects (see ``_next_events``)."""
        matches = _object_matcher(kind, namespace, query)
        timeout = _parse_uint("timeoutSeconds", query.get("timeoutSeconds", ["0"])[0] or "0")
        bookmarks = _parse_bool("allowWatchBookmarks", query.get("allowWatchBookmarks", [""])[0])
        requested = query.get("resourceVersion", [""])[0]
        watcher = _Watcher(
            kind,
            matches,
            bookmarks,
            deadline=time.monotonic() + (timeout or self.default_watch_timeout),
            resource_version=self._revision,
        )
        if requested in ("", "0"):
            # "Get state and start at most recent": synthetic ADDED events first.
            for (resource, _ns, _name), stored in sorted(self._store.items()):
                if resource == kind.resource and matches(stored.obj):
                    watcher.pending.append(_event_line("ADDED", self._render(kind, stored)))
        else:
            since = _parse_uint("resourceVersion", requested)
            floor = self._history_floor[kind.resource]
            if since < floor:
                if self.expired_watch_as_http_410:
                    raise _expired(since, floor)
                watcher.pending.append(_expired_line(since, floor))
                watcher.end = "expired"
            elif since > self._revision:
                too_large = ApiStatusError(
                    504,
                    f"Timeout: Too large resource version: {since}, current: {self._revision}",
                    reason="Timeout",
                    details={
                        "causes": [
                            {
                                "reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version",
                            }
                        ],
                        "retryAfterSeconds": 1,
                    },
                )
                watcher.pending.append(_event_line("ERROR", too_large.status()))
                watcher.end = "expired"
            else:
                watcher.resource_version = since
                for event in self._history[kind.resource]:
                    if event.resource_version > since:
                        line = watcher.line_for(event)
                        if line is not None:
                            watcher.pending.append(line)
                            watcher.resource_version = event.resource_version
        self._watchers.add(watcher)
        return _Response(200, {}, stream=watcher)

    def _record(self, kind: _Kind, previous: _Stored | None, current: _Stored | None) -> None:
        """A write just took ``self._revision``: keep it in the history and tell the watches."""
        if kind.resource not in self._history:
            return
        event = _Event(
            self._revision,
            None if current is None else self._render(kind, current),
            None if previous is None else self._render(kind, previous),
        )
        history = self._history[kind.resource]
        history.append(event)
        if len(history) > max(self.watch_history, 0):
            while len(history) > max(self.watch_history, 0):
                history.popleft()
            # The real watch cache: a watch may resume from the oldest event kept, minus one.
            oldest = history[0].resource_version if history else self._revision + 1
            self._history_floor[kind.resource] = oldest - 1
        for watcher in self._watchers:
            if watcher.kind is kind and watcher.end is None:
                line = watcher.line_for(event)
                if line is not None:
                    watcher.pending.append(line)
                    watcher.resource_version = event.resource_version
        self._watch_changed.notify_all()

    def _next_events(self, watcher: _Watcher) -> tuple[list[bytes], _WatchEnd | None]:
        """Wait for a watch's next events, or its end (called by its handler thread)."""
        with self._watch_changed:
            while not watcher.pending and watcher.end is None:
                remaining = watcher.deadline - time.monotonic()
                if remaining <= 0:
                    watcher.end = "timeout"
                elif self.stopping.is_set() or _client_gone(watcher.connection):
                    watcher.end = "drop"  # as Go's server cancels a request whose client left
                else:
                    self._watch_changed.wait(min(remaining, _CLIENT_GONE_POLL))
            lines, watcher.pending = watcher.pending, []
            return ([] if watcher.end == "drop" else lines), watcher.end

    def _watch_streaming(self, watcher: _Watcher, connection: socket.socket) -> bool:
        """The handler is about to send the headers; False if the watch was dropped first."""
        with self._lock:
            watcher.connection = connection
            if watcher.end == "drop":
                return False
            watcher.streaming = True
            self._watch_changed.notify_all()
            return True

    def _watch_ended(self, watcher: _Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)
            watcher.streaming = False
            self._watch_changed.notify_all()

    def _token_review(self, body: bytes, content_type: str) -> _Response:
        """``POST tokenreviews``: what kube-apiserver's TokenReview storage and its
        service-account authenticator answer."""
        review = self._decode(TOKEN_REVIEWS, body, content_type)
        spec = review.get("spec")
        if spec is None:
            spec = {}
        _expect(TOKEN_REVIEWS, spec, dict, "TokenReview.spec", "v1.TokenReviewSpec")
        token = spec.get("token") or ""
        _expect(TOKEN_REVIEWS, token, str, "TokenReviewSpec.spec.token", "string")
        wanted = spec.get("audiences") or []
        _expect(TOKEN_REVIEWS, wanted, list, "TokenReviewSpec.spec.audiences", "[]string")
        for audience in wanted:
            _expect(TOKEN_REVIEWS, audience, str, "TokenReviewSpec.spec.audiences", "string")
        if not token:
            raise ApiStatusError(400, "token is required for TokenReview in authentication")
        targets = list(wanted) or list(self.api_audiences)
        with self._lock:
            self._token_reviews += 1
            known = self._sa_tokens.get(token)
            known = None if known is None else copy.deepcopy(known)
        status: JSONObject = {"user": {}}
        problem: str | None = None
        if known is None:
            problem = "token lookup failed"
        else:
            granted = [a for a in targets if a in known.audiences]  # Audiences.Intersect
            if not granted:
                problem = (
                    f"token audiences {_go_quote_list(known.audiences)} is invalid for the "
                    f"target audiences {_go_quote_list(targets)}"
                )
            elif time.time() >= known.expires_at:
                problem = "service account token has expired"
            elif known.revoked:
                problem = "service account token has been invalidated"
            else:
                status = {
                    "authenticated": True,
                    "user": {
                        "username": f"system:serviceaccount:{known.namespace}:{known.name}",
                        "uid": known.uid,
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{known.namespace}",
                            "system:authenticated",
                        ],
                        "extra": {
                            "authentication.kubernetes.io/credential-id": [
                                f"JTI={known.credential_id}"
                            ]
                        },
                    },
                    "audiences": granted,
                }
        if problem is not None:
            status["error"] = f"[invalid bearer token, {problem}]"
        answer_spec: JSONObject = {"token": token}
        if wanted:
            answer_spec["audiences"] = list(wanted)
        answer = {
            "kind": TOKEN_REVIEWS.kind,
            "apiVersion": TOKEN_REVIEWS.api_version,
            "metadata": review.get("metadata") or {},
            "spec": answer_spec,
            "status": status,
        }
        return _Response(201, answer)

    def _decode(self, kind: _Kind, body: bytes, content_type: str) -> JSONObject:
        media_type = content_type.split(";", 1)[0].strip().lower()
        try:
            if media_type in ("application/json", ""):
                obj = json.loads(body)
            elif media_type in ("application/yaml", "application/x-yaml", "text/yaml"):
                obj = yaml.load(body, Loader=_YAMLLoader)
            else:
                raise ApiStatusError(
                    415,
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json, application/yaml, "
                    "application/vnd.kubernetes.protobuf, application/cbor",
                )
        except (ValueError, yaml.YAMLError) as error:
            raise kind.undecodable(f"error decoding request body: {error}") from error
        if not isinstance(obj, dict):
            raise kind.undecodable(
                f"json: cannot unmarshal {_json_type(obj)} into Go value of type "
                f"struct {{ APIVersion string; Kind string }}"
            )
        self._check_type_meta(kind, obj, required=False)
        if obj.get("metadata") is None:
            obj["metadata"] = {}
        _expect(kind, obj["metadata"], dict, f"{kind.kind}.metadata", "v1.ObjectMeta")
        return obj

    @staticmethod
    def _check_type_meta(kind: _Kind, obj: JSONObject, *, required: bool) -> None:
        api_version, obj_kind = obj.get("apiVersion"), obj.get("kind")
        if required and (not api_version or not obj_kind):
            missing = "Kind" if not obj_kind else "Version"
            raise ApiStatusError(400, f"Object '{missing}' is missing in '{json.dumps(obj)}'")
        if api_version and api_version != kind.api_version:
            raise ApiStatusError(
                400,
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({kind.api_version})",
            )
        if obj_kind and obj_kind != kind.kind:
            raise ApiStatusError(
                400,
                f"the kind in the data ({obj_kind}) does not match the expected kind ({kind.kind})",
            )

    @staticmethod
    def _check_identity(kind: _Kind, obj: JSONObject, namespace: str, name: str | None) -> None:
        meta = obj.get("metadata") or {}
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise ApiStatusError(
                400,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        if name is not None and meta.get("name") != name:
            raise ApiStatusError(
                400,
                f"the name of the object ({meta.get('name') or ''}) does not match the name on "
                f"the URL ({name})",
            )

    def _post(
        self, kind: _Kind, namespace: str, obj: JSONObject, manager: str, dry_run: bool
    ) -> _Response:
        self._check_identity(kind, obj, namespace, None)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise ApiStatusError(400, "resourceVersion should not be set on objects to be created")
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            suffix = "".join(_random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
            name = f"{meta['generateName']}{suffix}"
        return self._create(kind, namespace, name, obj, manager, dry_run)

    def _create(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        obj: JSONObject,
        manager: str,
        dry_run: bool,
        *,
        apply_config: JSONObject | None = None,
        seeded: bool = False,
    ) -> _Response:
        if not name:
            raise kind.invalid(
                "", [_FieldError.required("metadata.name", "name or generateName is required")]
            )
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise kind.invalid(
                name, [_FieldError.invalid("metadata.name", name, _DNS_SUBDOMAIN_MSG)]
            )
        key = (kind.resource, namespace, name)
        if key in self._store:
            raise kind.already_exists(name)
        normalizer = _Normalizer(kind, namespace, name, seeded=seeded)
        candidate = normalizer(obj, None)
        now = _now()
        if apply_config is not None:
            applied = _tracked_leaves(_normalized_apply_config(kind, namespace, name, apply_config))
            managers = [_Manager(manager, "Apply", now, set(applied))]
        else:
            managers = [_Manager(manager, "Update", now, set(_tracked_leaves(candidate)))]
        managers = [m for m in managers if m.fields]
        if dry_run:
            return _Response(201, self._render(kind, _Stored(candidate, managers)))
        self._revision += 1
        candidate["metadata"]["resourceVersion"] = str(self._revision)
        stored = _Stored(candidate, managers)
        self._store[key] = stored
        self._record(kind, None, stored)
        return _Response(201, self._render(kind, stored), _warning_headers(normalizer.warnings))

    def _concurrent_write(self, kind: _Kind, namespace: str, name: str) -> None:
        """If a conflict is injected, let another writer modify the object first."""
        if self._conflicts_left <= 0:
            return
        self._conflicts_left -= 1
        stored = self._store[(kind.resource, namespace, name)]
        obj = copy.deepcopy(stored.obj)
        annotations = obj["metadata"].setdefault("annotations", {})
        annotations[CONFLICT_ANNOTATION] = str(self._revision + 1)
        self._commit_update(kind, namespace, name, stored, obj, CONFLICT_MANAGER)

    def _check_preconditions(
        self, kind: _Kind, name: str, candidate_meta: Mapping[str, Any], stored: _Stored
    ) -> None:
        current = stored.obj["metadata"]
        uid = candidate_meta.get("uid")
        if uid and uid != current["uid"]:
            raise kind.conflict(
                name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{current['uid']}",
            )
        resource_version = candidate_meta.get("resourceVersion")
        if resource_version and resource_version != current["resourceVersion"]:
            raise kind.stale(name)

    def _commit_update(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        stored: _Stored,
        candidate: JSONObject,
        manager: str,
        *,
        managers: list[_Manager] | None = None,
        dry_run: bool = False,
    ) -> JSONObject:
        """Store an updated object unless nothing changed (then, like the server, no write)."""
        if managers is None:
            managers = _update_ownership(stored.managers, stored.obj, candidate, manager)
        candidate["metadata"]["resourceVersion"] = stored.obj["metadata"]["resourceVersion"]
        if candidate == stored.obj and _ownership(managers) == _ownership(stored.managers):
            return self._render(kind, stored)
        if dry_run:
            return self._render(kind, _Stored(candidate, managers))
        self._revision += 1
        candidate["metadata"]["resourceVersion"] = str(self._revision)
        updated = _Stored(candidate, managers)
        self._store[(kind.resource, namespace, name)] = updated
        self._record(kind, stored, updated)
        return self._render(kind, updated)

    def _put(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        obj: JSONObject,
        manager: str,
        dry_run: bool,
    ) -> _Response:
        self._check_identity(kind, obj, namespace, name)
        stored = self._get(kind, namespace, name)
        self._concurrent_write(kind, namespace, name)
        stored = self._get(kind, namespace, name)
        return self._replace(kind, namespace, name, stored, obj, manager, dry_run)

    def _patch(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        body: bytes,
        content_type: str,
        query: dict[str, list[str]],
        manager: str,
        dry_run: bool,
    ) -> _Response:
        patch_type = content_type.split(";", 1)[0].strip().lower()
        if patch_type not in PATCH_TYPES:
            raise ApiStatusError(
                415,
                "the body of the request was in an unknown format - accepted media types "
                "include: " + ", ".join(PATCH_TYPES),
            )
        field_manager = query.get("fieldManager", [""])[0]
        if patch_type == APPLY_PATCH and not field_manager:
            raise _patch_options_invalid(
                "fieldManager", "FieldValueRequired", "Required value: is required for apply patch"
            )
        if patch_type != APPLY_PATCH and "force" in query:
            raise _patch_options_invalid(
                "force",
                "FieldValueForbidden",
                "Forbidden: may not be specified for non-apply patch",
            )
        try:
            if patch_type == APPLY_PATCH:
                patch = yaml.load(body, Loader=_YAMLLoader)
            else:
                patch = json.loads(body)
        except (ValueError, yaml.YAMLError) as error:
            raise ApiStatusError(400, f"error decoding patch: {error}") from error
        if patch_type == APPLY_PATCH:
            force = query.get("force", ["false"])[0].lower() == "true"
            return self._apply(kind, namespace, name, patch, manager, force, dry_run)

        stored = self._get(kind, namespace, name)
        self._concurrent_write(kind, namespace, name)
        stored = self._get(kind, namespace, name)
        current = copy.deepcopy(stored.obj)
        if patch_type == JSON_PATCH:
            if not isinstance(patch, list):
                raise ApiStatusError(
                    400,
                    f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
                    "jsonpatch.Patch",
                )
            try:
                patched = json_patch(current, patch)
            except _JSONPatchError as error:
                raise ApiStatusError(422, str(error)) from error
        else:
            if not isinstance(patch, dict):
                raise ApiStatusError(
                    400,
                    f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
                    "map[string]interface {}",
                )
            if patch_type == MERGE_PATCH:
                patched = merge_patch(current, patch)
            else:
                patched = strategic_merge_patch(current, patch)
        if not isinstance(patched, dict):
            raise kind.undecodable("patched object is not a JSON object")
        patched.setdefault("metadata", {})
        _expect(kind, patched["metadata"], dict, f"{kind.kind}.metadata", "v1.ObjectMeta")
        self._check_type_meta(kind, patched, required=False)
        self._check_identity(kind, patched, namespace, name)
        return self._replace(kind, namespace, name, stored, patched, manager, dry_run)

    def _replace(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        stored: _Stored,
        obj: JSONObject,
        manager: str,
        dry_run: bool,
    ) -> _Response:
        """An update or a patch's result replaces the stored object: preconditions checked,
        normalized as the API server would, committed."""
        self._check_preconditions(kind, name, obj["metadata"], stored)
        normalizer = _Normalizer(kind, namespace, name)
        candidate = normalizer(obj, stored.obj)
        result = self._commit_update(
            kind, namespace, name, stored, candidate, manager, dry_run=dry_run
        )
        return _Response(200, result, _warning_headers(normalizer.warnings))

    def _apply(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        config: Any,
        manager: str,
        force: bool,
        dry_run: bool,
    ) -> _Response:
        if not isinstance(config, dict):
            raise ApiStatusError(
                400, f"error decoding YAML: apply patch must be an object, got {config!r}"
            )
        self._check_type_meta(kind, config, required=True)
        meta = config.setdefault("metadata", {})
        _expect(kind, meta, dict, f"{kind.kind}.metadata", "v1.ObjectMeta")
        if meta.get("managedFields"):
            raise ApiStatusError(400, "metadata.managedFields must be nil")
        self._check_identity(kind, config, namespace, name if meta.get("name") else None)
        key = (kind.resource, namespace, name)
        if key not in self._store:
            # Server-side apply creates missing objects.
            return self._create(
                kind, namespace, name, copy.deepcopy(config), manager, dry_run, apply_config=config
            )
        self._concurrent_write(kind, namespace, name)
        stored = self._store[key]
        self._check_preconditions(kind, name, meta, stored)
        normalizer = _Normalizer(kind, namespace, name)
        normalized_config = _normalized_apply_config(kind, namespace, name, config)
        applied = _tracked_leaves(normalized_config)
        current = _tracked_leaves(stored.obj)

        changed: set[FieldPath] = set()
        for path, value in applied.items():
            for existing, existing_value in current.items():
                if _overlaps(path, existing) and (existing != path or existing_value != value):
                    changed.add(existing)
        me = (manager, "Apply")
        conflicts = [
            (other, path)
            for other in stored.managers
            if other.key != me
            for path in sorted(changed)
            if path in other.fields
        ]
        if conflicts and not force:
            raise _apply_conflict(conflicts)

        previous = next((m for m in stored.managers if m.key == me), None)
        result = copy.deepcopy(stored.obj)
        if previous is not None:
            for path in previous.fields - applied.keys():
                if not any(path in m.fields for m in stored.managers if m.key != me):
                    _delete_path(result, path)
        result = _apply_merge(result, normalized_config)
        candidate = normalizer(result, stored.obj)

        now = _now()
        remaining = _tracked_leaves(candidate)
        managers: list[_Manager] = []
        for m in stored.managers:
            if m.key == me:
                continue
            fields = {f for f in m.fields - changed if f in remaining}
            if fields:
                managers.append(_Manager(m.manager, m.operation, m.time, fields))
        mine = _Manager(manager, "Apply", now, {f for f in applied if f in remaining})
        position = next((i for i, m in enumerate(stored.managers) if m.key == me), None)
        if mine.fields:
            if previous is not None and previous.fields == mine.fields and position is not None:
                mine.time = previous.time
            managers.insert(len(managers) if position is None else position, mine)
        result_obj = self._commit_update(
            kind, namespace, name, stored, candidate, manager, managers=managers, dry_run=dry_run
        )
        return _Response(200, result_obj, _warning_headers(normalizer.warnings))

    def _delete(
        self, kind: _Kind, namespace: str, name: str, body: bytes, dry_run: bool
    ) -> _Response:
        stored = self._get(kind, namespace, name)
        options: Any = {}
        if body.strip():
            try:
                options = json.loads(body)
            except ValueError as error:
                raise ApiStatusError(400, f"error decoding DeleteOptions: {error}") from error
        preconditions = (options or {}).get("preconditions") or {}
        current = stored.obj["metadata"]
        if preconditions.get("uid") and preconditions["uid"] != current["uid"]:
            raise kind.conflict(
                name,
                f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in "
                f"object meta: {current['uid']}",
            )
        expected_rv = preconditions.get("resourceVersion")
        if expected_rv and expected_rv != current["resourceVersion"]:
            raise kind.conflict(
                name,
                f"Precondition failed: ResourceVersion in precondition: {expected_rv}, "
                f"ResourceVersion in object meta: {current['resourceVersion']}",
            )
        if not dry_run:
            self._remove(kind, namespace, name)
        if kind is PODS:
            # The pod registry returns the deleted object (ReturnDeletedObject), not a Status.
            return _Response(200, self._render(kind, stored))
        details = kind.details(name)
        details["uid"] = current["uid"]
        body_out = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }
        return _Response(200, body_out)


def _update_ownership(
    managers: list[_Manager], old: JSONObject, new: JSONObject, manager: str
) -> list[_Manager]:
    """Field ownership after an Update by ``manager``: it takes every field it changed."""
    old_leaves = _tracked_leaves(old)
    new_leaves = _tracked_leaves(new)
    changed = {
        path
        for path, value in new_leaves.items()
        if path not in old_leaves or old_leaves[path] != value
    }
    result: list[_Manager] = []
    mine: _Manager | None = None
    for m in managers:
        fields = {f for f in m.fields if f in new_leaves}
        if m.key == (manager, "Update"):
            mine = _Manager(m.manager, m.operation, m.time, fields)
            result.append(mine)
        else:
            result.append(_Manager(m.manager, m.operation, m.time, fields - changed))
    if changed:
        if mine is None:
            mine = _Manager(manager, "Update", _now())
            result.append(mine)
        mine.fields |= changed
        mine.time = _now()
    return [m for m in result if m.fields]


def _normalized_apply_config(
    kind: _Kind, namespace: str, name: str, config: JSONObject
) -> JSONObject:
    """An apply configuration as the fields it sets (``stringData`` becomes ``data``), without
    server-owned metadata and without defaults the configuration did not mention."""
    normalized = _Normalizer(kind, namespace, name, partial=True)(config, None)
    normalized.pop("kind")
    normalized.pop("apiVersion")
    meta = normalized["metadata"]
    for key in _UNTRACKED_METADATA:
        meta.pop(key, None)
    if not meta:
        del normalized["metadata"]
    if kind is SECRETS and "type" not in config:
        normalized.pop("type", None)
    if kind is LEASES and not config.get("spec"):
        normalized.pop("spec", None)
    if kind is PODS:
        normalized.pop("status", None)  # the main resource never writes status
        if not config.get("spec"):
            normalized.pop("spec", None)
    return normalized


def _patch_options_invalid(field_name: str, cause: str, text: str) -> ApiStatusError:
    return ApiStatusError(
        422,
        f'PatchOptions.meta.k8s.io "" is invalid: {field_name}: {text}',
        details={
            "group": "meta.k8s.io",
            "kind": "PatchOptions",
            "causes": [{"reason": cause, "message": text, "field": field_name}],
        },
    )


def _apply_conflict(conflicts: list[tuple[_Manager, FieldPath]]) -> ApiStatusError:
    def dotted(path: FieldPath) -> str:
        return "." + ".".join(path)

    if len(conflicts) == 1:
        manager, path = conflicts[0]
        text = f"conflict with {manager.describe()}: {dotted(path)}"
    else:
        lines: list[str] = []
        by_manager: dict[str, list[FieldPath]] = {}
        for manager, path in conflicts:
            by_manager.setdefault(manager.describe(), []).append(path)
        for described, paths in by_manager.items():
            lines.append(f"conflicts with {described}:")
            lines.extend(f"- {dotted(path)}" for path in paths)
        text = "\n".join(lines)
    count = len(conflicts)
    message = f"Apply failed with {count} conflict{'s' if count > 1 else ''}: {text}"
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f"conflict with {manager.describe()}",
            "field": dotted(path),
        }
        for manager, path in conflicts
    ]
    return ApiStatusError(409, message, details={"causes": causes})


def _warning_headers(warnings: list[str]) -> dict[str, str]:
    if not warnings:
        return {}
    return {"Warning": ", ".join(f"299 - {json.dumps(w)}" for w in warnings)}


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.1"
    # Like Go's net/http (the real API server): headers and body are separate writes, and
    # with Nagle on, the second waits ~40 ms for a delayed ACK (QuietHandler turns it off).
    server_version = "fake-kube-api"

    @property
    def api(self) -> FakeKubeAPI:
        return cast(FakeKubeAPI, owner_of(self))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.api._serve(self.command, self.path, headers, body)
        if response.stream is not None:
            self._stream(response.stream)
            return
        payload = (json.dumps(response.body) + "\n").encode()
        self.send_response(response.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _stream(self, watcher: _Watcher) -> None:
        """A watch response: one chunk per event, the last chunk when the watch ends cleanly
        (timeout, expiry), none when it is dropped (the connection is shut down instead)."""
        api = self.api
        clean = False
        try:
            if not api._watch_streaming(watcher, self.connection):
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Audit-Id", str(uuid.uuid4()))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:
                lines, end = api._next_events(watcher)
                if end == "drop":
                    return
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines)
                if end is not None:
                    chunks += b"0\r\n\r\n"
                if chunks:
                    self.wfile.write(chunks)
                if end is not None:
                    clean = True
                    return
        except OSError:
            return  # the client went away, or the watch was dropped mid-write
        finally:
            api._watch_ended(watcher)
            if not clean:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch
