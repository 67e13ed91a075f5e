"""The reconcile path over an in-memory API server: zero writes the second time, drift restored,
invalid specs rejected without touching children, errors as conditions; plus the pure conditions."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opkit import SMALL_SPEC, FakeKube, dd, merge_status

from disagg_operator.conditions import (
    RoleObservation,
    compute_status,
    get_condition,
    observe_deployment,
    set_condition,
    status_patch,
)
from disagg_operator.ignored import ignored_settings
from disagg_operator.kube import ApiError
from disagg_operator.reconcile import reconcile
from disagg_worker.policy import Autoscale

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Cluster:
    """A DisaggDeployment body plus a fake API server; ``run`` reconciles and stores the status."""

    def __init__(self, spec: dict[str, Any]):
        self.body = dd(spec=copy.deepcopy(spec))
        self.kube = FakeKube()
        self.now = T0

    def run(self, advance: float = 10.0):
        self.now += timedelta(seconds=advance)
        before = len(self.kube.writes)
        result = reconcile(copy.deepcopy(self.body), self.kube, now=self.now)
        for patch in self.kube.statuses[len(self.kube.statuses) - int(result.status_written):]:
            merge_status(self.body, patch)
        result.new_writes = self.kube.writes[before:]  # type: ignore[attr-defined]
        return result

    def edit_spec(self, spec: dict[str, Any]) -> None:
        self.body["spec"] = copy.deepcopy(spec)
        self.body["metadata"]["generation"] += 1

    def condition(self, type_: str) -> dict[str, Any]:
        return dict(get_condition(self.body["status"]["conditions"], type_) or {})

    def make_ready(self) -> None:
        """Play the Deployment controller: every Deployment fully rolled out."""
        for (kind, _, _), obj in self.kube.objects.items():
            if kind == "Deployment":
                n = obj["spec"]["replicas"]
                obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "replicas": n,
                                 "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}


def test_first_reconcile_creates_children_events_and_status() -> None:
    c = Cluster(SMALL_SPEC)
    result = c.run()
    assert sorted(w[1] for w in result.new_writes if w[0] == "create") == [
        "ConfigMap", "Deployment", "Deployment", "Deployment", "PodDisruptionBudget", "PodDisruptionBudget",
        "PodDisruptionBudget", "Service", "Service", "Service"]
    assert [e[1] for e in c.kube.events] == ["Created"] * 10
    assert ("Normal", "Created", "Created Deployment demo-decode") in c.kube.events
    status = c.body["status"]
    assert status["observedGeneration"] == 1
    assert status["router"]["endpoint"] == "http://demo-router.ns.svc:8000"
    assert status["decode"] == {"replicas": 0, "readyReplicas": 0, "desiredReplicas": 1, "ready": "0/1"}
    assert c.condition("Progressing")["status"] == "True"
    assert c.condition("Ready")["status"] == "False"
    assert c.condition("InvalidSpec")["status"] == "False"


def test_second_reconcile_makes_no_write() -> None:
    c = Cluster(SMALL_SPEC)
    c.run()
    c.run()  # Progressing: Reconciling -> RollingOut (a status write)
    assert c.run().new_writes == []
    assert c.run().new_writes == []


def test_ready_once_the_deployments_are_rolled_out_and_transition_time_only_on_flips() -> None:
    c = Cluster(SMALL_SPEC)
    c.run()
    c.run()
    not_ready_since = c.condition("Ready")["lastTransitionTime"]
    c.run()
    assert c.condition("Ready")["lastTransitionTime"] == not_ready_since
    c.make_ready()
    result = c.run()
    assert [w[0] for w in result.new_writes] == ["status"]
    ready = c.condition("Ready")
    assert ready["status"] == "True" and ready["reason"] == "AllReplicasReady"
    assert ready["lastTransitionTime"] != not_ready_since
    assert c.condition("Progressing")["status"] == "False"
    assert c.body["status"]["prefill"]["ready"] == "1/1"
    assert c.run().new_writes == []


def test_hand_deleted_and_hand_edited_children_are_restored() -> None:
    c = Cluster(SMALL_SPEC)
    c.run()
    c.run()
    del c.kube.objects[("Deployment", "ns", "demo-decode")]
    c.kube.hand_edit("ConfigMap", "demo-policy", lambda o: o["data"].update({"policy.yaml": "{}"}))
    result = c.run()
    assert {(w[0], w[1], w[2]) for w in result.new_writes if w[0] in ("create", "apply")} == {
        ("create", "Deployment", "demo-decode"), ("apply", "ConfigMap", "demo-policy")}
    assert "drifted at data.policy.yaml" in " ".join(e[2] for e in c.kube.events)


def test_spec_change_touches_only_affected_children() -> None:
    c = Cluster(SMALL_SPEC)
    c.run()
    c.run()
    c.edit_spec({**SMALL_SPEC, "router": {"replicas": 2}})
    result = c.run()
    assert [(w[0], w[2]) for w in result.new_writes if w[0] in ("create", "apply", "delete")] == [
        ("apply", "demo-router")]
    assert c.body["status"]["observedGeneration"] == 2


def test_invalid_spec_changes_no_child_and_warns_once() -> None:
    c = Cluster(SMALL_SPEC)
    c.run()
    children_before = copy.deepcopy(c.kube.objects)
    c.edit_spec({**SMALL_SPEC, "autoscale": {"mode": "off", "prefill": {"minReplicas": 3, "maxReplicas": 1}}})
    result = c.run()
    assert result.invalid and "minReplicas" in result.invalid
    assert [w[0] for w in result.new_writes] == ["event", "status"]
    assert c.kube.objects == children_before
    invalid = c.condition("InvalidSpec")
    assert invalid["status"] == "True" and "minReplicas (3) must not exceed maxReplicas (1)" in invalid["message"]
    assert c.condition("Ready")["reason"] == "InvalidSpec"
    assert c.kube.events[-1][:2] == ("Warning", "InvalidSpec")
    assert c.run().new_writes == []  # no repeated warning, no status rewrite
    c.edit_spec(SMALL_SPEC)
    c.run()
    assert c.condition("InvalidSpec")["status"] == "False"


def test_permanent_apply_error_is_degraded_and_transient_one_raises() -> None:
    c = Cluster(SMALL_SPEC)
    c.kube.fail[("create", "Service")] = ApiError(422, "Invalid", "spec.ports: bad")
    result = c.run()
    assert result.apply_error and "Service" in result.apply_error
    degraded = c.condition("Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ApplyFailed"
    assert ("Deployment", "ns", "demo-decode") in c.kube.objects  # the rest went on
    assert [e for e in c.kube.events if e[1] == "ApplyFailed"]
    del c.kube.fail[("create", "Service")]
    c.run()
    assert c.condition("Degraded")["status"] == "False"
    c.kube.fail[("apply", "ConfigMap")] = ApiError(503, "ServiceUnavailable", "etcd")
    c.edit_spec({**SMALL_SPEC, "qos": {"ttftSloMs": 999}})
    with pytest.raises(ApiError):
        c.run()


# ---- pure conditions ---------------------------------------------------------------------------


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    conds = set_condition([], "Ready", False, "A", "m1", 1, "t1")
    conds = set_condition(conds, "Ready", False, "B", "m2", 2, "t2")
    assert conds == [{"type": "Ready", "status": "False", "reason": "B", "message": "m2",
                      "lastTransitionTime": "t1", "observedGeneration": 2}]
    conds = set_condition(conds, "Ready", True, "C", "", 2, "t3")
    assert conds[0]["lastTransitionTime"] == "t3"
    conds = set_condition(conds, "Degraded", False, "AsExpected", "", 2, "t3")
    assert [c["type"] for c in conds] == ["Ready", "Degraded"]


def test_observe_deployment() -> None:
    assert observe_deployment(None) == RoleObservation()
    obs = observe_deployment({"metadata": {"generation": 3}, "spec": {"replicas": 4},
                              "status": {"observedGeneration": 3, "replicas": 5, "readyReplicas": 4,
                                         "updatedReplicas": 4}})
    assert (obs.desired, obs.ready, obs.replicas, obs.up_to_date) == (4, 4, 5, True)
    assert not obs.rolled_out  # an old pod is still terminating
    failed = observe_deployment({"spec": {"replicas": 1}, "status": {"conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "slow"}]}})
    assert failed.failure == "ProgressDeadlineExceeded: slow"


def test_deployment_failure_is_degraded_not_ready() -> None:
    roles = {"prefill": RoleObservation(1, 1, 1, 1, True), "decode": RoleObservation(2, 2, 0, 2, True,
                                                                                     failure="ReplicaFailure: quota"),
             "router": RoleObservation(1, 1, 1, 1, True)}
    status = compute_status({}, generation=1, roles=roles, now="t")
    assert get_condition(status["conditions"], "Degraded")["reason"] == "DeploymentFailed"
    assert get_condition(status["conditions"], "Ready")["status"] == "False"


def test_status_patch_only_when_changed_and_keeps_last_scale() -> None:
    previous = {"lastScale": {"role": "decode", "from": 2, "to": 3, "reason": "queueLength", "time": "t"}}
    status = compute_status(previous, generation=1, roles={}, now="t")
    assert status["lastScale"] == previous["lastScale"]
    assert status_patch(status, status) is None
    assert status_patch({}, status)["conditions"]


def test_status_patch_removes_nested_keys_that_are_gone() -> None:
    """A merge patch merges maps key by key: a nested key the new status lacks must be sent as null."""
    previous = {"router": {"ready": "1/1", "endpoint": "http://demo-router.ns:8000"}, "policyHash": "h"}
    new = {"router": {"ready": "0/1"}, "policyHash": "h"}
    patch = status_patch(previous, new)
    assert patch == {"router": {"ready": "0/1", "endpoint": None}}
    assert merge_status({"status": previous}, patch)["status"] == new


def test_an_invalid_spec_after_a_valid_one_settles_without_writes() -> None:
    """The invalid path reports the router without its endpoint; the status write that dropped it was a
    merge patch that kept it, so every reconcile wrote the status again."""
    c = Cluster({"autoscale": {"mode": "off"}})
    c.run()
    c.make_ready()
    c.run()
    assert c.run().new_writes == []
    c.edit_spec({"autoscale": {"mode": "off"}, "prefill": {"replicas": -1}})
    c.run()
    assert c.run().new_writes == []


def test_a_stale_copy_of_the_resource_never_rolls_back_a_newer_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child event reconciles with the index's copy of its owner; when that copy predates a spec change
    already handled, it must not re-apply the old spec."""
    import logging

    from disagg_operator import handlers
    from disagg_operator import kube as kube_mod

    c = Cluster(SMALL_SPEC)
    monkeypatch.setattr(kube_mod, "get_kube", lambda: c.kube)
    monkeypatch.setattr(handlers, "_newest_generation", {})
    stale = copy.deepcopy(c.body)
    c.edit_spec({**SMALL_SPEC, "router": {"replicas": 2}})
    handlers.run_reconcile(copy.deepcopy(c.body), logging.getLogger("test"))
    assert c.kube.objects["Deployment", "ns", "demo-router"]["spec"]["replicas"] == 2
    before = len(c.kube.writes)
    handlers.run_reconcile(stale, logging.getLogger("test"))  # generation 1 after generation 2
    assert len(c.kube.writes) == before
    assert c.kube.objects["Deployment", "ns", "demo-router"]["spec"]["replicas"] == 2


@pytest.mark.parametrize(("owner_uid", "verbs"), [("uid-demo", ["get", "patch"]), ("uid-other", ["get"])])
def test_create_child_applies_its_own_child_the_selector_missed(owner_uid: str, verbs: list[str]) -> None:
    """A child whose labels were edited by hand is not listed, so the diff creates it: one this resource
    owns is applied (which restores the labels); a stranger's of that name is refused, never adopted."""
    from disagg_operator import kube as kube_mod

    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "demo-policy", "namespace": "ns",
        "ownerReferences": [{"kind": "DisaggDeployment", "name": "demo", "uid": "uid-demo", "controller": True}]}}
    existing = copy.deepcopy(child)
    existing["metadata"]["ownerReferences"][0]["uid"] = owner_uid
    calls: list[str] = []

    def request(verb: str, resource: Any, **kw: Any) -> dict[str, Any]:  # the HTTP transport, faked
        calls.append(verb)
        return existing if verb == "get" else {**child, "applied": True}

    api = kube_mod.Kube.__new__(kube_mod.Kube)
    api.request = request  # type: ignore[method-assign]
    if owner_uid == "uid-demo":
        assert api.create_child(child)["applied"]
    else:
        with pytest.raises(kube_mod.ApiError, match="not owned"):
            api.create_child(child)
    assert calls == verbs


def test_settings_the_autoscale_mode_cannot_carry_out_are_named() -> None:
    def policy(mode: str, **role: Any) -> Autoscale:
        return Autoscale.model_validate({"mode": mode, "prometheusUrl": "http://prom:9090",
                                         "prefill": {"minReplicas": 0, "maxReplicas": 4, **role}})
    forecast = {"scaleDownForecastSeconds": 600}
    hpa = ignored_settings(policy("hpa", **forecast))
    assert [line.split(" ")[0].rstrip(":") for line in hpa] == [
        "autoscale.prefill.scaleDownForecastSeconds", "autoscale.prefill.minReplicas", "autoscale.prometheusUrl"]
    assert [line.split(" ")[0] for line in ignored_settings(policy("keda", **forecast))] == [
        "autoscale.prefill.scaleDownForecastSeconds"]  # keda scales to 0 and reads the URL
    assert ignored_settings(policy("builtin", **forecast)) == []
    assert ignored_settings(policy("keda")) == []  # defaults are no one's choice


def test_ignored_settings_are_a_condition_and_one_warning() -> None:
    spec = {**SMALL_SPEC, "autoscale": {"mode": "hpa", "decode": {"maxReplicas": 12, "scaleDownForecastSeconds": 600}}}
    c = Cluster(spec)
    c.run()
    cond = c.condition("SettingsIgnored")
    assert cond["status"] == "True" and "autoscale.decode.scaleDownForecastSeconds (600)" in cond["message"]
    warnings = [e for e in c.kube.events if e[0] == "Warning"]
    assert [e[1] for e in warnings] == ["SettingsIgnored"] and warnings[0][2] == cond["message"]
    c.run()
    assert c.run().new_writes == []  # no repeated warning, no status rewrite
    c.edit_spec({**spec, "autoscale": {"mode": "builtin", "decode": {"maxReplicas": 12,
                                                                     "scaleDownForecastSeconds": 600}}})
    c.run()
    assert c.condition("SettingsIgnored")["status"] == "False"
    assert [e[1] for e in c.kube.events if e[0] == "Warning"] == ["SettingsIgnored"]
