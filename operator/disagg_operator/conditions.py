"""Pure status logic: role observations -> the ``.status`` block with its conditions.

Conditions follow the Kubernetes convention (``metav1.Condition``): ``type``, ``status``
("True"/"False"/"Unknown"), a CamelCase ``reason``, a human ``message``, ``observedGeneration``, and
``lastTransitionTime``, which changes only when ``status`` flips. The operator writes the status only
when this module returns something different from what is stored.

- ``Ready``: spec valid, every role has as many ready pods as desired, nothing degraded.
- ``Progressing``: children were just written, or a rollout / scale is not finished.
- ``Degraded``: a child could not be written, or a Deployment reports a failure
  (``ReplicaFailure``, ``ProgressDeadlineExceeded``).
- ``InvalidSpec``: the spec failed validation; no child was changed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "InvalidSpec")
ROLE_ORDER = ("prefill", "decode", "router")
OWNED_STATUS_KEYS = ("observedGeneration", "conditions", "prefill", "decode", "router", "policyHash")


def timestamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RoleObservation:
    """What a role's Deployment reports (all zero when it does not exist yet)."""

    desired: int = 0
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    exists: bool = False
    up_to_date: bool = True  # the Deployment controller has seen the latest template
    failure: str | None = None

    @property
    def rolled_out(self) -> bool:
        return (
            self.exists
            and self.up_to_date
            and self.ready >= self.desired
            and self.updated >= self.desired
            and self.replicas <= self.desired
        )

    def as_status(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "readyReplicas": self.ready,
            "desiredReplicas": self.desired,
            "ready": f"{self.ready}/{self.desired}",
        }


def observe_deployment(obj: Mapping[str, Any] | None) -> RoleObservation:
    if not obj:
        return RoleObservation()
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    failure = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            failure = f"{cond.get('reason', 'ReplicaFailure')}: {cond.get('message', '')}".strip(": ")
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            failure = f"ProgressDeadlineExceeded: {cond.get('message', '')}".strip(": ")
    generation = obj.get("metadata", {}).get("generation")
    observed_generation = status.get("observedGeneration")
    up_to_date = generation is None or observed_generation is None or observed_generation >= generation
    return RoleObservation(
        desired=int(spec.get("replicas") if spec.get("replicas") is not None else 1),
        replicas=int(status.get("replicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        exists=True,
        up_to_date=bool(up_to_date) and observed_generation is not None,
        failure=failure,
    )


def get_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """A new list with ``type_`` set; ``lastTransitionTime`` is kept unless the status flips."""
    status_str = status if isinstance(status, str) else ("True" if status else "False")
    old = get_condition(conditions, type_)
    new: dict[str, Any] = {
        "type": type_,
        "status": status_str,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == status_str and old.get("lastTransitionTime")
        else now,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [dict(c) for c in conditions or [] if c.get("type") != type_]
    out.append(new)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def _roles_summary(roles: Mapping[str, RoleObservation]) -> str:
    return ", ".join(f"{r} {roles[r].ready}/{roles[r].desired} ready" for r in ROLE_ORDER if r in roles)


def compute_status(
    previous: Mapping[str, Any] | None,
    *,
    generation: int | None,
    roles: Mapping[str, RoleObservation],
    now: str,
    invalid: str | None = None,
    apply_error: str | None = None,
    changed: Sequence[str] = (),
    router_endpoint: str | None = None,
    policy_hash: str | None = None,
    ignored: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole status block the operator owns (``lastScale`` is carried over unchanged). ``ignored``:
    the settings the autoscale mode cannot carry out (``ignored.ignored_settings``); an invalid spec
    keeps the condition as it was."""
    previous = previous or {}
    conds: list[dict[str, Any]] = [dict(c) for c in previous.get("conditions") or []]

    failures = [f"{r}: {roles[r].failure}" for r in ROLE_ORDER if r in roles and roles[r].failure]
    if apply_error:
        conds = set_condition(conds, "Degraded", True, "ApplyFailed", apply_error, generation, now)
    elif failures:
        conds = set_condition(
            conds, "Degraded", True, "DeploymentFailed", "; ".join(failures), generation, now
        )
    else:
        conds = set_condition(conds, "Degraded", False, "AsExpected", "", generation, now)

    if invalid:
        conds = set_condition(conds, "InvalidSpec", True, "InvalidSpec", invalid, generation, now)
        conds = set_condition(
            conds,
            "Ready",
            False,
            "InvalidSpec",
            "the spec is invalid; children were left unchanged",
            generation,
            now,
        )
        conds = set_condition(
            conds, "Progressing", False, "InvalidSpec", "waiting for a valid spec", generation, now
        )
    else:
        conds = set_condition(conds, "InvalidSpec", False, "SpecValid", "", generation, now)
        if ignored:
            conds = set_condition(conds, "SettingsIgnored", True, "ModeCannotApply", "; ".join(ignored),
                                  generation, now)
        else:
            conds = set_condition(conds, "SettingsIgnored", False, "AllApplied", "", generation, now)
        not_rolled = [r for r in ROLE_ORDER if r in roles and not roles[r].rolled_out]
        if changed:
            conds = set_condition(
                conds, "Progressing", True, "Reconciling", "; ".join(changed), generation, now
            )
        elif not_rolled:
            conds = set_condition(
                conds, "Progressing", True, "RollingOut", _roles_summary(roles), generation, now
            )
        else:
            conds = set_condition(
                conds, "Progressing", False, "RolloutComplete", _roles_summary(roles), generation, now
            )
        if apply_error or failures:
            conds = set_condition(
                conds, "Ready", False, "Degraded", apply_error or "; ".join(failures), generation, now
            )
        elif not_rolled or changed:
            conds = set_condition(
                conds, "Ready", False, "ReplicasNotReady", _roles_summary(roles), generation, now
            )
        else:
            conds = set_condition(
                conds, "Ready", True, "AllReplicasReady", _roles_summary(roles), generation, now
            )

    status: dict[str, Any] = {"observedGeneration": generation, "conditions": conds}
    for role in ROLE_ORDER:
        if role in roles:
            status[role] = roles[role].as_status()
    if "router" in status and router_endpoint:
        status["router"]["endpoint"] = router_endpoint
    if policy_hash:
        status["policyHash"] = policy_hash
    elif previous.get("policyHash"):
        status["policyHash"] = previous["policyHash"]
    if previous.get("lastScale"):
        status["lastScale"] = copy.deepcopy(previous["lastScale"])
    return status


def merge_patch(previous: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``previous`` into ``new``: maps are merged key by key,
    so a key that is gone must be sent as null (else the server keeps it and the next diff sees it
    again); anything else is replaced whole."""
    if not isinstance(previous, Mapping) or not isinstance(new, Mapping):
        return copy.deepcopy(new)
    patch = {k: merge_patch(previous.get(k), v) for k, v in new.items() if previous.get(k) != v}
    patch.update({k: None for k in previous if k not in new})
    return patch


def status_patch(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that turns ``previous`` into ``new`` for the keys the operator owns; None if equal."""
    previous = previous or {}
    owned = (*OWNED_STATUS_KEYS, "lastScale")
    patch = merge_patch({k: v for k, v in previous.items() if k in owned},
                        {k: v for k, v in new.items() if k in owned and v is not None})
    return patch or None
