"""Test helpers for the operator: an API-server-like validator for the CRD, an in-memory fake of
``kube.Kube`` with server-side defaulting, and sample specs.

(No ``__init__.py`` in this folder on purpose: a package here would be importable as ``operator``.)
"""

from __future__ import annotations

import copy
import functools
import itertools
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from kubernetes.utils.quantity import parse_quantity

from disagg_operator.builders import ANNOTATION_SPEC_HASH
from disagg_operator.diff import is_owned_by
from disagg_operator.kube import ApiError

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "disaggdeployments.disagg.dev.yaml"
CHART_DIR = ROOT / "charts" / "disagg-operator"
EXAMPLES = ROOT / "examples"


@functools.cache
def _load_crd_text(text: str) -> dict[str, Any]:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_crd() -> dict[str, Any]:
    """The committed CRD (parsed once; treat as read-only)."""
    return _load_crd_text(CRD_PATH.read_text())


def crd_schema(crd: Mapping[str, Any] | None = None) -> dict[str, Any]:
    crd = crd or load_crd()
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ---- what the API server does with a structural schema: default, prune-check, validate, CEL ----


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does it (top-down, recursively)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, prop in (schema.get("properties") or {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                apply_defaults(prop, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for v in value.values():
                apply_defaults(extra, v)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def unknown_fields(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields the API server would prune (kubectl's strict field validation rejects them)."""
    out: list[str] = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                out += unknown_fields(props[k], v, f"{path}.{k}")
            elif isinstance(extra, dict):
                out += unknown_fields(extra, v, f"{path}.{k}")
            elif props is not None and path != ".metadata":
                out.append(f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(schema["items"], item, f"{path}[{i}]")
    return out


_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _cel(rule: str, value: Any) -> bool:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _CEL.program(_CEL.compile(rule))
    result = _PROGRAMS[rule].evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, Exception):
        raise result
    return bool(result)


def _as_cel_sees_it(schema: Mapping[str, Any], value: Any) -> Any:
    """``value`` with the numbers of ``type: number`` fields as doubles, as the API server's CEL sees
    them: a user's 1 beside a default's 8.0 compare (celpy alone has no int-double overloads)."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: _as_cel_sees_it(props[k], v) if k in props else v for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_as_cel_sees_it(schema["items"], v) for v in value]
    return value


def cel_errors(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    value = _as_cel_sees_it(schema, value)
    out: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if not _cel(rule["rule"], value):
            out.append(f"{path or '.'}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in value:
                out += cel_errors(prop, value[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += cel_errors(schema["items"], item, f"{path}[{i}]")
    return out


_VALIDATORS: dict[int, tuple[Mapping[str, Any], Any]] = {}  # id -> (schema kept alive, validator)


def _validator(key: int, schema: Mapping[str, Any]) -> Any:
    """OpenAPI v3.0 bounds (boolean exclusiveMinimum) are Draft 4 semantics."""
    if key not in _VALIDATORS:
        _VALIDATORS[key] = (schema, jsonschema.Draft4Validator(schema))
    return _VALIDATORS[key][1]


def api_server_errors(obj: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> list[str]:
    """What ``kubectl apply`` of ``obj`` would be refused for (schema, unknown fields, CEL rules)."""
    schema = schema or crd_schema()
    obj = apply_defaults(schema, copy.deepcopy(dict(obj)))
    errors = [f"unknown field {p}" for p in unknown_fields(schema, obj)]
    validator = _validator(id(schema), schema)
    for err in validator.iter_errors(obj):
        errors.append(f".{'.'.join(str(p) for p in err.absolute_path)}: {err.message}")
    if not errors:
        errors += cel_errors(schema, obj)
    return errors


def dd(name: str = "demo", spec: Mapping[str, Any] | None = None, *, namespace: str = "ns",
       uid: str = "uid-demo", generation: int = 1, status: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "disagg.dev/v1alpha1",
        "kind": "DisaggDeployment",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation},
        "spec": dict(spec or {}),
    }
    if status is not None:
        body["status"] = dict(status)
    return body


SMALL_SPEC: dict[str, Any] = {
    "model": {"name": "tiny-llama"},
    "prefill": {"replicas": 1, "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}},
    "decode": {"replicas": 1, "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}},
    "router": {"replicas": 1},
    "autoscale": {"mode": "off"},
}


# ---- an in-memory API server for the reconciler ---------------------------------------------------


def _server_defaults(obj: dict[str, Any]) -> None:
    """A few of the defaults a real API server adds, so tests prove they are not seen as drift."""
    kind = obj["kind"]
    spec = obj.get("spec")
    if kind == "Deployment":
        spec.setdefault("strategy", {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        pod = spec["template"]["spec"]
        pod.setdefault("restartPolicy", "Always")
        pod.setdefault("dnsPolicy", "ClusterFirst")
        pod.setdefault("schedulerName", "default-scheduler")
        for c in pod["containers"]:
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    c[probe].setdefault("successThreshold", 1)
                    c[probe].setdefault("timeoutSeconds", 1)
                    c[probe]["httpGet"].setdefault("scheme", "HTTP")
            for kind_ in ("requests", "limits"):  # the API server canonicalises quantities
                for k, v in (c.get("resources", {}).get(kind_) or {}).items():
                    q = parse_quantity(v)
                    c["resources"][kind_][k] = str(int(q)) if q == int(q) else f"{int(q * 1000)}m"
        for v in pod.get("volumes", []):
            if "configMap" in v:
                v["configMap"].setdefault("defaultMode", 420)
    elif kind == "Service":
        if spec.get("clusterIP") != "None":
            spec.setdefault("clusterIP", "10.0.0.7")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("ipFamilies", ["IPv4"])


class FakeKube:
    """``kube.Kube``'s reconciler-facing methods over a dict, counting every write."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []  # (verb, kind, name)
        self.events: list[tuple[str, str, str]] = []
        self.statuses: list[dict[str, Any]] = []
        self.fail: dict[tuple[str, str], ApiError] = {}  # (verb, kind) -> error to raise
        self._rv = itertools.count(1)

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
        return (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])

    def _check(self, verb: str, kind: str) -> None:
        if (verb, kind) in self.fail:
            raise self.fail[(verb, kind)]

    def list_children(self, namespace: str, owner_name: str, owner_uid: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (_, ns, _), o in self.objects.items() if ns == namespace
                and any(r.get("uid") == owner_uid for r in o["metadata"].get("ownerReferences") or [])]

    def _store(self, obj: Mapping[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
        new = copy.deepcopy(dict(obj))
        meta = new["metadata"]
        old_meta = (previous or {}).get("metadata", {})
        meta["uid"] = old_meta.get("uid") or str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._rv))
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or "2026-01-01T00:00:00Z"
        old_gen = old_meta.get("generation", 0)
        changed = previous is None or previous.get("spec") != new.get("spec")
        meta["generation"] = old_gen + 1 if changed else old_gen
        if previous and "status" in previous:
            new["status"] = copy.deepcopy(previous["status"])
        _server_defaults(new)
        self.objects[self._key(new)] = new
        return copy.deepcopy(new)

    def create_child(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._check("create", obj["kind"])
        existing = self.objects.get(self._key(obj))
        if existing is not None:  # as Kube.create_child: one of ours that the selector missed is applied
            uid = obj["metadata"]["ownerReferences"][0]["uid"]
            if not is_owned_by(existing, uid):
                raise ApiError(409, "NotOwned", f"{obj['kind']} {obj['metadata']['name']} exists")
            return self.apply_child(obj)
        self.writes.append(("create", obj["kind"], obj["metadata"]["name"]))
        return self._store(obj, None)

    def apply_child(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._check("apply", obj["kind"])
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return self._store(obj, self.objects.get(self._key(obj)))

    def delete_child(self, obj: Mapping[str, Any]) -> None:
        self._check("delete", obj["kind"])
        self.writes.append(("delete", obj["kind"], obj["metadata"]["name"]))
        self.objects.pop(self._key(obj), None)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        self.writes.append(("status", "DisaggDeployment", name))
        self.statuses.append(copy.deepcopy(dict(status)))
        return {}

    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.writes.append(("event", reason, message))
        self.events.append((type_, reason, message))

    # helpers for tests
    def get(self, kind: str, name: str, namespace: str = "ns") -> dict[str, Any]:
        return self.objects[(kind, namespace, name)]

    def hand_edit(self, kind: str, name: str, fn: Any, namespace: str = "ns") -> None:
        obj = self.objects[(kind, namespace, name)]
        fn(obj)

    def spec_hash(self, kind: str, name: str) -> str:
        return self.get(kind, name)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, what the API server does with application/merge-patch+json: maps
    merge key by key (null deletes), anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def merge_status(body: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a status merge patch to a body (what the API server does)."""
    body["status"] = merge(body.get("status") or {}, patch)
    return body
