"""Pure diff: desired children vs observed children -> the actions that make them equal.

A desired child is *in sync* with its observed twin when

1. the observed ``disagg.dev/spec-hash`` annotation equals the desired one (no spec change), and
2. every field the builder sets has the same value in the observed object (no hand edit). Fields the
   builder does not set (server-side defaults, ``status``, other controllers' annotations) are
   ignored, empty maps/lists equal absent ones, and quantities (resource requests and limits, an
   emptyDir's ``sizeLimit``, an HPA target's value) compare by value ("1000m" == "1", "1024Mi" ==
   "1Gi"), as the API server normalises them.

Observed children not desired any more (e.g. the HPAs after ``autoscale.mode`` left ``hpa``) are
deleted, but only those owned by this DisaggDeployment (owner reference uid).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kubernetes.utils.quantity import parse_quantity

from disagg_operator.builders import ANNOTATION_SPEC_HASH

Verb = Literal["create", "update", "delete"]
Key = tuple[str, str, str]  # apiVersion, kind, name

# where a Kubernetes resource.Quantity sits: the API server stores it canonically ("1024Mi" -> "1Gi")
_QUANTITY_PARENTS = ("requests", "limits")
_QUANTITY_FIELDS = ("sizeLimit", "averageValue", "divisor")


def _is_quantity_field(path: Sequence[str]) -> bool:
    if not path:
        return False
    parent = path[-2] if len(path) >= 2 else ""
    return parent in _QUANTITY_PARENTS or path[-1] in _QUANTITY_FIELDS or (parent == "target" and path[-1] == "value")
_MISSING = object()


@dataclass(frozen=True)
class Action:
    verb: Verb
    obj: Mapping[str, Any]  # the desired object (create/update) or the observed one (delete)
    reason: str

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    def describe(self) -> str:
        """Kubernetes log style: past tense, the kind and the name, no period."""
        past = {"create": "Created", "update": "Updated", "delete": "Deleted"}[self.verb]
        return f"{past} {self.kind} {self.name}" + (f" ({self.reason})" if self.verb == "update" else "")


def key(obj: Mapping[str, Any]) -> Key:
    return (str(obj["apiVersion"]), str(obj["kind"]), str(obj["metadata"]["name"]))


def is_owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid and ref.get("controller") for ref in refs)


def _empty(value: Any) -> bool:
    """Values the API server leaves out when it stores an object (Go's ``omitempty`` zero values), so an
    absent field carries them: wanting ``false``, ``""`` or ``0`` is no drift from nothing."""
    return value is None or value == {} or value == [] or value is False or value == "" or (
        type(value) in (int, float) and value == 0)


def _same_scalar(want: Any, have: Any, path: Sequence[str]) -> bool:
    if want == have and type(want) is type(have):
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return False
    if isinstance(want, int | float) and isinstance(have, int | float):
        return float(want) == float(have)
    if _is_quantity_field(path):
        try:
            return parse_quantity(want) == parse_quantity(have)
        except (ValueError, TypeError):
            return False
    return False


# The keys of the lists server-side apply merges entry by entry (containers, env, volumes, ports...):
# there another field manager's entries live beside ours, and applying ours never removes them.
MERGE_KEYS = ("name", "mountPath", "containerPort", "port")


def _merge_key(items: list[Any]) -> str | None:
    """The key a list of objects is merged by, if every entry has it; None for an atomic list."""
    if not items or not all(isinstance(item, Mapping) for item in items):
        return None
    return next((k for k in MERGE_KEYS if all(k in item for item in items)), None)


def first_mismatch(want: Any, have: Any, path: tuple[str, ...] = ()) -> str | None:
    """The first path where ``have`` does not carry ``want`` (None: ``want`` is a subset of ``have``)."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return ".".join(path) or "."
        for k, v in want.items():
            sub = have.get(k, _MISSING)
            if sub is _MISSING or sub is None:
                if _empty(v):
                    continue
                return ".".join((*path, k))
            found = first_mismatch(v, sub, (*path, k))
            if found:
                return found
        return None
    if isinstance(want, list):
        if not isinstance(have, list):
            return ".".join(path)
        merge_key = _merge_key(want)
        if merge_key is not None:  # a keyed list: entries others added (kubectl set env, a webhook) stay
            have_by_key = {h.get(merge_key): h for h in have if isinstance(h, Mapping)}
            for i, w in enumerate(want):
                h = have_by_key.get(w[merge_key])
                found = (".".join(path) if h is None else
                         first_mismatch(w, h, (*path[:-1], f"{path[-1] if path else ''}[{i}]")))
                if found:
                    return found
            return None
        if len(want) != len(have):
            return ".".join(path)
        for i, (w, h) in enumerate(zip(want, have, strict=True)):
            found = first_mismatch(w, h, (*path[:-1], f"{path[-1] if path else ''}[{i}]"))
            if found:
                return found
        return None
    return None if _same_scalar(want, have, path) else ".".join(path)


def sync_reason(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> str | None:
    """Why ``observed`` must be updated to ``desired``; None when it is in sync."""
    want_hash = desired.get("metadata", {}).get("annotations", {}).get(ANNOTATION_SPEC_HASH)
    have_hash = (observed.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if want_hash != have_hash:
        return "spec changed"
    want_replicas = desired.get("spec", {}).get("replicas") if desired.get("kind") == "Deployment" else None
    have_replicas = (observed.get("spec") or {}).get("replicas")
    if want_replicas is not None and want_replicas != have_replicas:
        return f"replicas {have_replicas} -> {want_replicas}"
    path = first_mismatch(desired, observed)
    if path:
        return f"drifted at {path}"
    return None


AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")


def diff(
    desired: Iterable[Mapping[str, Any]], observed: Iterable[Mapping[str, Any]], owner_uid: str
) -> list[Action]:
    """Actions in apply order: deletes of autoscalers no longer wanted, creates/updates in the order of
    ``desired``, then the other deletes.

    A Deployment takes one autoscaler at a time: KEDA's admission webhook refuses a ScaledObject for a
    Deployment that an HPA still scales, and two HPAs would fight. So on a switch of
    ``autoscale.mode`` the old one goes first (the first attempt used to fail with a warning event and
    succeed on the next reconcile); every other delete waits until what replaces it is in place.
    """
    have = {key(o): o for o in observed if is_owned_by(o, owner_uid)}
    actions: list[Action] = []
    want_keys = {key(obj) for obj in desired}
    for k, obj in have.items():
        if k not in want_keys and obj.get("kind") in AUTOSCALER_KINDS:
            actions.append(Action("delete", obj, "no longer desired"))
    for obj in desired:
        k = key(obj)
        current = have.get(k)
        if current is None:
            actions.append(Action("create", obj, "missing"))
        elif (reason := sync_reason(obj, current)) is not None:
            actions.append(Action("update", obj, reason))
    for k, obj in have.items():
        if k not in want_keys and obj.get("kind") not in AUTOSCALER_KINDS:
            actions.append(Action("delete", obj, "no longer desired"))
    return actions
