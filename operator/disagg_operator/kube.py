"""The one module that talks to the Kubernetes API (besides kopf's own watching).

Dicts in, dicts out, over the ``kubernetes`` client's REST layer (auth, TLS, kubeconfig / in-cluster
config), with no typed models. Writes:

- children are written with server-side apply (``fieldManager=disagg-operator``, ``force``), so a
  field dropped from the desired object is removed and hand edits are taken back; a child that does
  not exist yet is checked first (an object of that name not owned by us is an error, never
  adopted), then applied; servers that do not create on apply (the kmock emulator in the tests)
  get a POST instead;
- the planner scales with a merge patch of ``spec.replicas`` under its own manager (``disagg-planner``),
  so it never clobbers the reconciler's applied fields;
- status is a merge patch on the ``status`` subresource; Events are core/v1 Events.

``PERMISSIONS`` lists every (API group, resource) -> verbs this module uses, plus what kopf itself
needs; every request is checked against it, and the chart's RBAC is tested to grant exactly it.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes.config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from disagg_operator import FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION
from disagg_operator.builders import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY
from disagg_operator.diff import is_owned_by

PLANNER_FIELD_MANAGER = "disagg-planner"


class ApiError(Exception):
    """A failed API call; ``transient`` ones are worth retrying (5xx, 409 conflicts, 429, no connection)."""

    def __init__(self, status: int, reason: str, message: str, *, method: str = "", path: str = ""):
        self.status, self.reason, self.message, self.method, self.path = status, reason, message, method, path
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())

    @property
    def transient(self) -> bool:
        return (self.status in (0, 409, 429) or self.status >= 500) and self.reason != "NotOwned"

    @property
    def not_found(self) -> bool:
        return self.status == 404


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        Resource("", "v1", "configmaps", "ConfigMap"),
        Resource("", "v1", "services", "Service"),
        Resource("", "v1", "pods", "Pod"),
        Resource("", "v1", "events", "Event"),
        Resource("apps", "v1", "deployments", "Deployment"),
        Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
        Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
        Resource("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor"),
        Resource("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject"),
        Resource(GROUP, VERSION, PLURAL, KIND),
    )
}
CHILD_KINDS = ("ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PodMonitor",
               "ScaledObject")
OPTIONAL_KINDS = ("PodMonitor", "ScaledObject")  # their CRDs may not be installed

_CHILD_VERBS = frozenset({"list", "get", "create", "patch", "delete"})
# What this module does: (API group, resource) -> verbs.
PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    ("", "configmaps"): _CHILD_VERBS,
    ("", "services"): _CHILD_VERBS,
    ("apps", "deployments"): _CHILD_VERBS,
    ("autoscaling", "horizontalpodautoscalers"): _CHILD_VERBS,
    ("policy", "poddisruptionbudgets"): _CHILD_VERBS,
    ("monitoring.coreos.com", "podmonitors"): _CHILD_VERBS,
    ("keda.sh", "scaledobjects"): _CHILD_VERBS,
    ("", "pods"): frozenset({"list", "patch"}),  # planner: find ready pods, set pod-deletion-cost
    ("", "events"): frozenset({"create"}),
    (GROUP, PLURAL): frozenset(),
    (GROUP, f"{PLURAL}/status"): frozenset({"patch"}),
    # children carry ownerReferences with blockOwnerDeletion: clusters that enforce owner-reference
    # permissions (OwnerReferencesPermissionEnforcement, on in OpenShift) require this
    (GROUP, f"{PLURAL}/finalizers"): frozenset({"update"}),
}
# What kopf needs on top: watch the resource and the children it reacts to, patch its annotations
# (progress and last-handled state), post its own warning Events.
KOPF_PERMISSIONS: dict[tuple[str, str], frozenset[str]] = {
    (GROUP, PLURAL): frozenset({"list", "watch", "patch"}),
    ("", "configmaps"): frozenset({"list", "watch"}),
    ("", "services"): frozenset({"list", "watch"}),
    ("apps", "deployments"): frozenset({"list", "watch"}),
    ("", "events"): frozenset({"create"}),
}


def required_permissions() -> dict[tuple[str, str], frozenset[str]]:
    out = dict(PERMISSIONS)
    for k, verbs in KOPF_PERMISSIONS.items():
        out[k] = out.get(k, frozenset()) | verbs
    return {k: v for k, v in out.items() if v}


def load_configuration() -> Configuration:
    """In-cluster service account if there is one, else the kubeconfig ($KUBECONFIG, ~/.kube/config)."""
    config = Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    return config


def bearer_token(config: Configuration) -> str | None:
    header = config.get_api_key_with_prefix("BearerToken", alias="authorization")
    if not header:
        return None
    return header.split(" ", 1)[1] if " " in header else header


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kube:
    """A thin, thread-safe client; one per process (see ``get_kube``)."""

    def __init__(self, configuration: Configuration | None = None, *, timeout: float = 30.0):
        self.configuration = configuration or load_configuration()
        self._client = ApiClient(self.configuration)
        self._timeout = timeout

    def close(self) -> None:
        self._client.close()

    # ---- transport ----------------------------------------------------------------------------

    def request(
        self,
        verb: str,
        resource: Resource,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
        allowed = PERMISSIONS.get((resource.group, plural), frozenset())
        if verb not in allowed:
            raise RuntimeError(f"{verb} {resource.group or 'core'}/{plural} is not in kube.PERMISSIONS")
        method = {"get": "GET", "list": "GET", "create": "POST", "patch": "PATCH", "delete": "DELETE"}[verb]
        path = resource.path(namespace, name, subresource)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        url = self.configuration.host + path + (f"?{urlencode(query)}" if query else "")
        auth = self.configuration.auth_settings().get("BearerToken")
        if auth and auth.get("value"):
            headers["authorization"] = auth["value"]
        try:
            resp = self._client.rest_client.request(
                method, url, headers=headers, body=body, _request_timeout=self._timeout
            )
            resp.read()
        except Exception as exc:  # urllib3 connection errors and the like
            if isinstance(exc, ApiException):
                raise ApiError(
                    exc.status or 0, str(exc.reason), str(exc.body), method=method, path=path
                ) from exc
            raise ApiError(0, type(exc).__name__, str(exc), method=method, path=path) from exc
        data = resp.data.decode("utf-8") if resp.data else ""
        if not 200 <= resp.status < 300:
            reason, message = str(resp.reason), data
            try:
                payload = json.loads(data)
                reason, message = payload.get("reason") or reason, payload.get("message") or message
            except ValueError:
                pass
            raise ApiError(resp.status, reason, message[:500], method=method, path=path)
        return json.loads(data) if data else {}

    # ---- children -----------------------------------------------------------------------------

    def list_children(self, namespace: str, owner_name: str, owner_uid: str) -> list[dict[str, Any]]:
        """Every child of every kind owned by the resource (absent optional CRDs count as empty)."""
        selector = f"{LABEL_INSTANCE}={owner_name},{LABEL_MANAGED_BY}={MANAGED_BY}"
        found: list[dict[str, Any]] = []
        for kind in CHILD_KINDS:
            res = RESOURCES[kind]
            try:
                items = self.request("list", res, namespace=namespace, query={"labelSelector": selector})[
                    "items"
                ]
            except ApiError as exc:
                if kind in OPTIONAL_KINDS and exc.status in (403, 404):
                    continue
                raise
            for item in items or []:
                item.setdefault("apiVersion", res.api_version)
                item.setdefault("kind", kind)
                if is_owned_by(item, owner_uid):
                    found.append(item)
        return found

    def create_child(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create a child that we did not observe: refuse to adopt a foreign object of that name. One of
        our own that the label selector missed (its labels edited by hand) is applied, which restores them."""
        res = RESOURCES[obj["kind"]]
        meta = obj["metadata"]
        try:
            existing = self.request("get", res, namespace=meta["namespace"], name=meta["name"])
        except ApiError as exc:
            if not exc.not_found:
                raise
        else:
            ours = [r["uid"] for r in meta.get("ownerReferences") or [] if r.get("controller") and r.get("uid")]
            if ours and is_owned_by(existing, ours[0]):
                return self.apply_child(obj)
            owners = [
                f"{r.get('kind')}/{r.get('name')}" for r in existing["metadata"].get("ownerReferences") or []
            ]
            raise ApiError(
                409,
                "NotOwned",
                f"{obj['kind']} {meta['name']} exists and is not owned by this "
                f"{KIND} (owners: {', '.join(owners) or 'none'}); delete or rename it",
                method="POST",
                path=res.path(meta["namespace"], meta["name"]),
            )
        try:
            return self.apply_child(obj)
        except ApiError as exc:
            if not exc.not_found:
                raise
        # the server does not create on apply
        return self.request(
            "create", res, namespace=meta["namespace"], body=dict(obj), query={"fieldManager": FIELD_MANAGER}
        )

    def apply_child(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        res = RESOURCES[obj["kind"]]
        meta = obj["metadata"]
        return self.request(
            "patch",
            res,
            namespace=meta["namespace"],
            name=meta["name"],
            body=dict(obj),
            content_type="application/apply-patch+yaml",
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
        )

    def delete_child(self, obj: Mapping[str, Any]) -> None:
        res = RESOURCES[obj["kind"]]
        meta = obj["metadata"]
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if meta.get("uid"):
            body["preconditions"] = {"uid": meta["uid"]}
        try:
            self.request("delete", res, namespace=meta["namespace"], name=meta["name"], body=body)
        except ApiError as exc:
            if not exc.not_found:
                raise

    # ---- the resource -------------------------------------------------------------------------

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return self.request(
            "patch",
            RESOURCES[KIND],
            namespace=namespace,
            name=name,
            subresource="status",
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
        )

    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid)."""
        namespace = involved.get("namespace") or "default"
        now = _now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                k: involved[k] for k in ("apiVersion", "kind", "name", "namespace", "uid") if involved.get(k)
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("create", RESOURCES["Event"], namespace=namespace, body=event)

    # ---- planner ------------------------------------------------------------------------------

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items = self.request("list", RESOURCES["Pod"], namespace=namespace, query={"labelSelector": selector})
        # filter again: label selectors are a server feature some test servers ignore
        return [
            p
            for p in items.get("items") or []
            if all((p.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("get", RESOURCES["Deployment"], namespace=namespace, name=name)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def _planner_merge_patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request(
            "patch",
            RESOURCES[kind],
            namespace=namespace,
            name=name,
            body=body,
            content_type="application/merge-patch+json",
            query={"fieldManager": PLANNER_FIELD_MANAGER},
        )

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str | None]) -> None:
        self._planner_merge_patch("Pod", namespace, name, {"metadata": {"annotations": dict(annotations)}})

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        return self._planner_merge_patch("Deployment", namespace, name, {"spec": {"replicas": int(replicas)}})


_KUBE: Kube | None = None


def get_kube() -> Kube:
    """The process-wide client (created on first use, after kopf's login handler ran)."""
    global _KUBE
    if _KUBE is None:
        _KUBE = Kube()
    return _KUBE


def reset_kube(kube: Kube | None = None) -> None:
    global _KUBE
    if _KUBE is not None and _KUBE is not kube:
        _KUBE.close()
    _KUBE = kube
