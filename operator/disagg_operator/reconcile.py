"""The one reconcile path: read the children, compute (pure), write only the differences.

Create, update, resume, the periodic timer and child events all call ``reconcile(body, api)``. It
is level-based: it looks at what exists, not at what changed, so running it twice in a row makes
no API write the second time (no child action, no status patch, no Event).

Writes, in order: children (config, services, workloads, scalers; then deletions of children no
longer desired), Events for each, then the status if it changed. An invalid spec writes no child:
only the ``InvalidSpec`` condition, and one Warning Event when the condition or its message changes.
Transient API errors propagate as ``kube.ApiError`` (the handlers turn them into kopf retries);
permanent ones (e.g. 422 from validating a child) become the ``Degraded`` condition.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from disagg_operator import API_VERSION, KIND
from disagg_operator.builders import (
    COMPONENTS,
    Owner,
    build_children,
    child_name,
    render_policy,
    router_endpoint,
    stable_hash,
)
from disagg_operator.conditions import (
    RoleObservation,
    compute_status,
    get_condition,
    observe_deployment,
    status_patch,
    timestamp,
)
from disagg_operator.diff import Action, diff, key
from disagg_operator.ignored import ignored_settings
from disagg_operator.kube import ApiError
from disagg_operator.spec import SpecError, parse_spec

log = logging.getLogger(__name__)


class KubeAPI(Protocol):
    """The part of ``kube.Kube`` the reconciler uses (tests pass an in-memory fake)."""

    def list_children(self, namespace: str, owner_name: str, owner_uid: str) -> list[dict[str, Any]]: ...
    def create_child(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def apply_child(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def delete_child(self, obj: Mapping[str, Any]) -> None: ...
    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]: ...
    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...


@dataclass
class ReconcileResult:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_written: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
    invalid: str | None = None
    apply_error: str | None = None

    @property
    def writes(self) -> int:
        return len(self.actions) + len(self.events) + int(self.status_written)


def involved_object(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
    }


def _execute(api: KubeAPI, action: Action) -> dict[str, Any] | None:
    if action.verb == "create":
        return api.create_child(action.obj)
    if action.verb == "update":
        return api.apply_child(action.obj)
    api.delete_child(action.obj)
    return None


def _roles(
    current: Mapping[tuple[str, str, str], Mapping[str, Any]], owner: Owner
) -> dict[str, RoleObservation]:
    return {
        c: observe_deployment(current.get(("apps/v1", "Deployment", child_name(owner, c))))
        for c in COMPONENTS
    }


def reconcile(
    body: Mapping[str, Any],
    api: KubeAPI,
    *,
    now: datetime | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
) -> ReconcileResult:
    owner = Owner.from_body(body)
    previous = dict(body.get("status") or {})
    ts = timestamp(now)
    result = ReconcileResult()
    involved = involved_object(body)

    def event(type_: str, reason: str, message: str) -> None:
        api.post_event(involved, type_, reason, message)
        result.events.append((type_, reason, message))

    observed = api.list_children(owner.namespace, owner.name, owner.uid)
    current: dict[tuple[str, str, str], Mapping[str, Any]] = {key(o): o for o in observed}

    try:
        parsed = parse_spec(body.get("spec"), name=owner.name)
    except SpecError as exc:
        result.invalid = str(exc)
        status = compute_status(
            previous,
            generation=owner.generation,
            roles=_roles(current, owner),
            now=ts,
            invalid=result.invalid,
        )
        before = get_condition(previous.get("conditions"), "InvalidSpec") or {}
        if before.get("status") != "True" or before.get("message") != result.invalid:
            logger.warning("Rejected spec: %s", result.invalid)
            event("Warning", "InvalidSpec", result.invalid)
        return _write_status(api, owner, previous, status, result)

    deployments = {c: current.get(("apps/v1", "Deployment", child_name(owner, c))) for c in COMPONENTS}
    observed_replicas = {
        c: (d.get("spec") or {}).get("replicas") if d else None for c, d in deployments.items()
    }
    desired = build_children(parsed, owner, observed_replicas)
    result.actions = diff(desired, observed, owner.uid)

    errors: list[str] = []
    done: list[str] = []
    for action in result.actions:
        try:
            obj = _execute(api, action)
        except ApiError as exc:
            if exc.transient:
                raise
            message = f"{action.verb} {action.kind} {action.name}: {exc.status} {exc.reason}: {exc.message}"
            logger.error("Failed to %s", message)
            errors.append(message)
            continue
        done.append(action.describe())
        logger.info("%s", action.describe())
        event(
            "Normal",
            {"create": "Created", "update": "Updated", "delete": "Deleted"}[action.verb],
            action.describe(),
        )
        if obj is None:
            current.pop(key(action.obj), None)
        else:
            current[key(action.obj)] = obj
    result.apply_error = "; ".join(errors) or None
    if result.apply_error:
        before = get_condition(previous.get("conditions"), "Degraded") or {}
        if before.get("message") != result.apply_error:
            event("Warning", "ApplyFailed", result.apply_error)

    ignored = ignored_settings(parsed.policy.autoscale)
    if ignored:
        message = "; ".join(ignored)  # as compute_status words the condition
        before = get_condition(previous.get("conditions"), "SettingsIgnored") or {}
        if before.get("status") != "True" or before.get("message") != message:
            logger.warning("Settings the autoscale mode ignores: %s", message)
            event("Warning", "SettingsIgnored", message)
    status = compute_status(
        previous,
        generation=owner.generation,
        roles=_roles(current, owner),
        now=ts,
        apply_error=result.apply_error,
        changed=done,
        router_endpoint=router_endpoint(owner, parsed.pods.router.port),
        policy_hash=stable_hash(render_policy(parsed.policy)),
        ignored=ignored,
    )
    return _write_status(api, owner, previous, status, result)


def _write_status(
    api: KubeAPI, owner: Owner, previous: Mapping[str, Any], status: dict[str, Any], result: ReconcileResult
) -> ReconcileResult:
    result.status = status
    patch = status_patch(previous, status)
    if patch:
        api.patch_status(owner.namespace, owner.name, patch)
        result.status_written = True
    return result
