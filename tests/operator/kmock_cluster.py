"""A kmock 0.8 ``KubernetesEmulator`` with the fixes a real operator needs (see shared FACTS.md).

Fixed here (each in a few lines, against kmock's private internals; kmock is pinned to 0.8):

- created objects get ``uid``, ``resourceVersion``, ``generation`` and ``creationTimestamp``; the
  namespace from the URL; ``generateName`` is honoured; a create answers 201, not 200;
- every write bumps ``resourceVersion``; a change of ``spec`` bumps ``generation``;
- a PATCH of the ``status`` subresource changes only ``status``, and a PATCH of the object leaves its
  ``status`` alone (as for resources with a status subresource);
- a failed JSON-patch ``test`` op answers 422, not 500;
- list answers carry the current ``resourceVersion``, and a watch started from it replays only the
  later events; the watch subscribes before it takes its snapshot, so no event is lost in between.

NOT fixed, and therefore not exercised by the tests (a real API server does these): garbage
collection of owned objects, server-side defaulting and schema/CEL validation (the tests check the
CRD schema separately), label/field selectors (ignored: the operator filters by owner reference
itself), server-side-apply field ownership (an apply is a plain merge here), and every controller
(a Deployment's status stays empty, so the DisaggDeployment is never Ready unless a test plays the
Deployment controller), ``kubectl apply`` (no OpenAPI), PUT, paging.
"""

from __future__ import annotations

import copy
import itertools
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import apps, dicts, enums, k8s, references, rendering


def NOW() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

RESOURCES: dict[str, dict[str, Any]] = {
    "disagg.dev/v1alpha1/disaggdeployments": dict(kind="DisaggDeployment", shortnames={"dd"},
                                                  subresources={"status"}),
    "apps/v1/deployments": dict(kind="Deployment", subresources={"status", "scale"}),
    "v1/services": dict(kind="Service", subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap"),
    "v1/pods": dict(kind="Pod", subresources={"status"}),
    "v1/events": dict(kind="Event"),
    "autoscaling/v2/horizontalpodautoscalers": dict(kind="HorizontalPodAutoscaler", subresources={"status"}),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", subresources={"status"}),
}
WITH_STATUS = {"disaggdeployments", "deployments", "services", "pods", "horizontalpodautoscalers"}


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _rv_counter: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, references.resource, dict[str, Any]]] = attrs.field(factory=list, init=False)

    def declare_resources(self) -> None:
        verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(namespaced=True, verbs=verbs, **info)
        # kopf waits for namespaces to be discoverable; running cluster-wide it never lists them
        self.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)

    @property
    def request_log(self) -> list[rendering.Request]:
        return list(self._requests)

    def _next_rv(self) -> str:
        self._rv = next(self._rv_counter)
        return str(self._rv)

    async def _emit(self, resource: references.resource, type_: str, raw: dict[str, Any]) -> None:
        event = {"type": type_, "object": copy.deepcopy(raw)}
        self._log.append((self._rv, resource, event))
        await self._buses[resource].put(event)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        delete_key = None
        created = False
        if request.resource is not None:
            async with self._lock:
                delete_key, created = await self._mutate(request)
        try:
            response = await apps.RawHandler._handle(self, request)
            if created and response.status == 200:
                response.set_status(201)
            return response
        finally:
            if delete_key is not None:
                async with self._lock:
                    raw = self._objects[delete_key].raw
                    self._objects[delete_key].delete()
                    self._next_rv()
                    await self._emit(request.resource, "DELETED", raw)

    async def _mutate(self, request: rendering.Request) -> tuple[Any, bool]:
        resource = request.resource
        if request.action == enums.action.CREATE:
            obj = request.data
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)
            namespace = request.namespace or meta.get("namespace")
            if namespace:
                meta["namespace"] = namespace
            key = (resource, namespace, meta.get("name"))
            if key in self._objects and not self._objects[key].deleted:
                raise k8s.KubernetesObjectConflictError()
            meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1,
                        creationTimestamp=NOW())
            if key in self._objects:
                self._objects[key].create(obj)
            else:
                self._objects[key] = obj
            await self._emit(resource, "ADDED", self._objects[key].raw)
            return None, True
        if request.name is None:
            return None, False
        key = (resource, request.namespace, request.name)
        if request.action == enums.action.DELETE:
            if key not in self._objects or self._objects[key].deleted:
                raise k8s.KubernetesObjectNotFoundError()
            meta = self._objects[key].get("metadata", {})
            if meta.get("deletionTimestamp"):
                return None, False
            if meta.get("finalizers"):
                self._objects[key].patch({"metadata": {"deletionTimestamp": NOW(), "resourceVersion": self._next_rv()}})
                await self._emit(resource, "MODIFIED", self._objects[key].raw)
                return None, False
            self._objects[key].delete()
            self._next_rv()
            await self._emit(resource, "DELETED", self._objects[key].last.raw)
            return None, False
        if request.action == enums.action.UPDATE:
            if key not in self._objects or self._objects[key].deleted:
                raise k8s.KubernetesObjectNotFoundError()
            old = copy.deepcopy(self._objects[key].raw)
            data = request.data
            if isinstance(data, dict) and resource.plural in WITH_STATUS:
                if request.subresource == "status":
                    data = {"status": data.get("status")}
                else:
                    data = {k: v for k, v in data.items() if k != "status"}
            try:
                new = dicts.patch_dict(old, data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise k8s.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
            new = copy.deepcopy(dict(new))
            new.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
            if new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = int(old.get("metadata", {}).get("generation") or 0) + 1
            self._objects[key].history.append(new)
            await self._emit(resource, "MODIFIED", new)
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                return key, False
        return None, False

    def _matches(self, request: rendering.Request, resource: Any, namespace: str | None, name: str | None) -> bool:
        return bool(resource == request.resource and (request.namespace is None or namespace == request.namespace)
                    and (request.name is None or name == request.name))

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if not any(r == request.resource for r in self._get_resources()):
            raise k8s.KubernetesResourceNotFoundError()
        async with self._lock:
            items = [o.raw for (res, ns, name), o in self._objects.items()
                     if not o.deleted and self._matches(request, res, ns, name)]
            rv = str(self._rv)
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        since = request.params.get("resourceVersion", "")
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()  # under the lock: no write can slip between snapshot and stream
            if since.isdigit():
                replay = [ev for rv, res, ev in self._log if res == request.resource and rv > int(since)]
            else:
                replay = [{"type": "ADDED", "object": o.raw} for (res, ns, name), o in self._objects.items()
                          if res == request.resource and not o.deleted]
        try:
            for event in replay:
                meta = event["object"].get("metadata", {})
                if self._matches(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._matches(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)


def kubeconfig(url: str) -> str:
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {url}\n"
        "users:\n- name: tester\n  user:\n    token: test-token\n"
        "contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: tester\n"
        "current-context: kmock\n"
    )
