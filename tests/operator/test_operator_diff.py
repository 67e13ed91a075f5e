"""Pure diff: idempotence (also over server-side defaults), drift, and which children a change touches."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from opkit import SMALL_SPEC, FakeKube

from disagg_operator.builders import Owner, build_children
from disagg_operator.diff import Action, diff, first_mismatch, sync_reason
from disagg_operator.spec import parse_spec

OWNER = Owner(name="demo", namespace="ns", uid="uid-demo", generation=1)


def desired(spec: dict[str, Any], observed: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    replicas = {o["metadata"]["name"].removeprefix("demo-"): o["spec"].get("replicas")
                for o in observed or [] if o["kind"] == "Deployment"}
    return build_children(parse_spec(spec, name="demo"), OWNER, replicas)


def applied(spec: dict[str, Any]) -> FakeKube:
    """A fake API server holding the children of ``spec`` (with server-side defaults added)."""
    kube = FakeKube()
    for action in diff(desired(spec), [], OWNER.uid):
        kube.create_child(action.obj)
    return kube


def observed(kube: FakeKube) -> list[dict[str, Any]]:
    return kube.list_children("ns", "demo", OWNER.uid)


def touched(actions: list[Action]) -> set[tuple[str, str, str]]:
    return {(a.verb, a.kind, a.name.removeprefix("demo-")) for a in actions}


def test_everything_is_created_at_first() -> None:
    actions = diff(desired(SMALL_SPEC), [], OWNER.uid)
    assert [a.verb for a in actions] == ["create"] * 10  # with a PodDisruptionBudget per component
    assert actions[0].kind == "ConfigMap"  # config before the pods that mount it


def test_second_diff_is_empty_despite_server_defaults() -> None:
    for spec in ({}, SMALL_SPEC, {**SMALL_SPEC, "prefill": {"resources": {"requests": {"cpu": "1000m"}}}}):
        kube = applied(spec)
        have = observed(kube)
        assert any("strategy" in o["spec"] for o in have if o["kind"] == "Deployment")  # defaults present
        assert diff(desired(spec, have), have, OWNER.uid) == []


def test_hand_edit_is_drift() -> None:
    kube = applied(SMALL_SPEC)
    kube.hand_edit("Deployment", "demo-decode",
                   lambda o: o["spec"]["template"]["spec"]["containers"][0].update(image="evil:latest"))
    have = observed(kube)
    [action] = diff(desired(SMALL_SPEC, have), have, OWNER.uid)
    assert (action.verb, action.name) == ("update", "demo-decode")
    assert action.reason == "drifted at spec.template.spec.containers[0].image"


def test_hand_deleted_child_is_recreated() -> None:
    kube = applied(SMALL_SPEC)
    del kube.objects[("Service", "ns", "demo-prefill")]
    have = observed(kube)
    assert touched(diff(desired(SMALL_SPEC, have), have, OWNER.uid)) == {("create", "Service", "prefill")}


def test_foreign_annotations_and_labels_are_not_drift() -> None:
    kube = applied(SMALL_SPEC)
    kube.hand_edit("Deployment", "demo-router", lambda o: (
        o["metadata"]["annotations"].update({"deployment.kubernetes.io/revision": "3"}),
        o["spec"]["template"]["metadata"]["annotations"].update({"kubectl.kubernetes.io/restartedAt": "now"})))
    have = observed(kube)
    assert diff(desired(SMALL_SPEC, have), have, OWNER.uid) == []


def test_router_change_touches_only_router_children() -> None:
    kube = applied(SMALL_SPEC)
    have = observed(kube)
    changed = {**SMALL_SPEC, "router": {"replicas": 2, "port": 9000}}  # the port is the Service's alone
    assert touched(diff(desired(changed, have), have, OWNER.uid)) == {
        ("update", "Deployment", "router"), ("update", "Service", "router")}


def test_a_privileged_router_port_is_the_services_and_the_container_keeps_8000() -> None:
    """The router runs as non-root with every capability dropped: a container on port 80 crash-looped
    where the runtime keeps ports below 1024 privileged."""
    kube = applied(SMALL_SPEC)
    have = observed(kube)
    changed = {**SMALL_SPEC, "router": {"replicas": 1, "port": 80}}
    assert touched(diff(desired(changed, have), have, OWNER.uid)) == {("update", "Service", "router")}


def test_decode_resources_change_touches_only_the_decode_deployment() -> None:
    kube = applied(SMALL_SPEC)
    have = observed(kube)
    changed = copy.deepcopy(SMALL_SPEC)
    changed["decode"]["resources"]["limits"] = {"memory": "8Gi"}
    assert touched(diff(desired(changed, have), have, OWNER.uid)) == {("update", "Deployment", "decode")}


@pytest.mark.parametrize(("section", "rolled"), [
    ({"splitPolicy": {"promptLengthThreshold": 300}}, {"prefill", "decode", "router"}),
    ({"cache": {"minCacheHitRatio": 0.5}}, {"prefill", "decode", "router"}),
    # read by the router only: the GPU workers, which would reload the model, keep running
    ({"qos": {"ttftSloMs": 350}}, {"router"}),
    ({"kvTransfer": {"chunkBytes": 1 << 20}}, {"prefill", "decode"}),
])
def test_a_policy_change_rolls_the_pods_that_read_it(section: dict[str, Any], rolled: set[str]) -> None:
    kube = applied(SMALL_SPEC)
    have = observed(kube)
    assert touched(diff(desired({**SMALL_SPEC, **section}, have), have, OWNER.uid)) == {
        ("update", "ConfigMap", "policy"), *(("update", "Deployment", name) for name in rolled)}


def test_autoscale_only_change_updates_configmap_without_rolling_pods() -> None:
    spec = {**SMALL_SPEC, "autoscale": {"mode": "builtin"}}
    kube = applied(spec)
    have = observed(kube)
    changed = {**SMALL_SPEC, "autoscale": {"mode": "builtin", "decode": {"minReplicas": 8, "maxReplicas": 30}}}
    assert touched(diff(desired(changed, have), have, OWNER.uid)) == {("update", "ConfigMap", "policy")}


def test_leaving_hpa_mode_deletes_the_hpas_and_keeps_the_running_replicas() -> None:
    hpa = {**SMALL_SPEC, "autoscale": {"mode": "hpa",
                                       "prefill": {"minReplicas": 1, "maxReplicas": 4, "scaleUp": {"queueLength": 8}},
                                       "decode": {"minReplicas": 1, "maxReplicas": 4, "scaleUp": {"queueLength": 8}}}}
    kube = applied(hpa)
    assert ("HorizontalPodAutoscaler", "ns", "demo-decode") in kube.objects
    kube.hand_edit("Deployment", "demo-decode", lambda o: o["spec"].update(replicas=3))  # the HPA scaled
    have = observed(kube)
    assert diff(desired(hpa, have), have, OWNER.uid) == []  # the HPA's count is not fought
    builtin = {**hpa, "autoscale": {**hpa["autoscale"], "mode": "builtin"}}
    actions = diff(desired(builtin, have), have, OWNER.uid)
    assert ("delete", "HorizontalPodAutoscaler", "decode") in touched(actions)
    assert ("delete", "HorizontalPodAutoscaler", "prefill") in touched(actions)
    assert not [a for a in actions if a.kind == "Deployment"]


@pytest.mark.parametrize(("before", "after"), [("hpa", "keda"), ("keda", "hpa")])
def test_switching_autoscaler_kinds_removes_the_old_ones_before_creating_the_new(before: str, after: str) -> None:
    """KEDA's admission webhook refuses a ScaledObject for a Deployment an HPA still scales, and two HPAs
    fight: the old autoscalers go first. Other deletes still come last (after what replaces them)."""
    def spec(mode: str) -> dict[str, Any]:
        role = {"minReplicas": 1, "maxReplicas": 4, "scaleUp": {"queueLength": 8}}
        return {**SMALL_SPEC, "autoscale": {"mode": mode, "prometheusUrl": "http://prometheus:9090",
                                            "prefill": role, "decode": role}}
    kinds = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}
    have = observed(applied(spec(before)))
    actions = diff(desired(spec(after), have), have, OWNER.uid)
    verbs = [(a.verb, a.kind) for a in actions if a.kind in kinds.values()]
    assert verbs == [("delete", kinds[before])] * 2 + [("create", kinds[after])] * 2
    assert [(a.verb, a.kind) for a in actions[:2]] == [("delete", kinds[before])] * 2  # before anything else


def test_builtin_mode_leaves_replicas_outside_new_bounds_to_the_planner() -> None:
    """Lowering maxReplicas below what runs: the reconciler scaled decode down itself, skipping the
    planner's deletion costs (pods with KV state went at random), its maxStep and its lastScale."""
    spec = {**SMALL_SPEC, "autoscale": {"mode": "builtin", "decode": {"minReplicas": 2, "maxReplicas": 5}}}
    kube = applied(spec)
    kube.hand_edit("Deployment", "demo-decode", lambda o: o["spec"].update(replicas=9))
    have = observed(kube)
    assert diff(desired(spec, have), have, OWNER.uid) == []


def test_children_of_others_are_never_deleted() -> None:
    kube = applied(SMALL_SPEC)
    stranger = copy.deepcopy(kube.get("ConfigMap", "demo-policy"))
    stranger["metadata"]["name"] = "someone-else"
    stranger["metadata"]["ownerReferences"][0]["uid"] = "uid-other"
    actions = diff(desired(SMALL_SPEC, observed(kube)), [*observed(kube), stranger], OWNER.uid)
    assert actions == []


def test_entries_another_manager_added_to_a_keyed_list_are_not_drift() -> None:
    """Server-side apply merges keyed lists (env, containers, volumes) entry by entry, so an env var added
    with ``kubectl set env`` or by a webhook stays whatever the operator applies. Lists of unequal length
    used to read as drift: an update and an Event every pass, and Ready never True."""
    kube = applied(SMALL_SPEC)
    kube.hand_edit("Deployment", "demo-decode", lambda o: o["spec"]["template"]["spec"]["containers"][0]
                   .setdefault("env", []).append({"name": "NCCL_DEBUG", "value": "INFO"}))
    have = observed(kube)
    assert diff(desired(SMALL_SPEC, have), have, OWNER.uid) == []
    # an entry of ours that changed, or went, still is drift
    assert first_mismatch({"env": [{"name": "A", "value": "1"}]},
                          {"env": [{"name": "B", "value": "x"}, {"name": "A", "value": "2"}]}) == "env[0].value"
    assert first_mismatch({"env": [{"name": "A", "value": "1"}]}, {"env": [{"name": "B", "value": "x"}]}) == "env"
    assert first_mismatch({"args": ["--a", "1"]}, {"args": ["--a", "1", "--b"]}) == "args"  # atomic: replaced


def test_first_mismatch_semantics() -> None:
    assert first_mismatch({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}, "d": 3}) is None
    assert first_mismatch({"a": {"b": 1}}, {"a": {"b": 2}}) == "a.b"
    assert first_mismatch({"a": []}, {}) is None  # empty == absent (the API server drops them)
    assert first_mismatch({"l": [1, 2]}, {"l": [1]}) == "l"
    assert first_mismatch({"requests": {"cpu": "1000m"}}, {"requests": {"cpu": "1"}}) is None
    assert first_mismatch({"requests": {"cpu": "2"}}, {"requests": {"cpu": "1"}}) == "requests.cpu"
    assert first_mismatch({"x": True}, {"x": 1}) == "x"
    assert first_mismatch({"x": 1}, {"x": 1.0}) is None


def test_quantities_the_server_stores_canonically_compare_by_value() -> None:
    """A user's ``emptyDir: {sizeLimit: 1024Mi}`` comes back as ``1Gi``: comparing strings re-applied the
    Deployment on every reconcile, and Ready never became True."""
    volume = {"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1024Mi"}}]}
    assert first_mismatch(volume, {"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}]}) is None
    assert first_mismatch(volume, {"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "2Gi"}}]}) \
        == "volumes[0].emptyDir.sizeLimit"
    assert first_mismatch({"target": {"averageValue": "1000"}}, {"target": {"averageValue": "1k"}}) is None
    assert first_mismatch({"target": {"value": "1500m"}}, {"target": {"value": "1.5"}}) is None
    # a string that only looks like a quantity is compared as a string
    assert first_mismatch({"env": [{"name": "N", "value": "1000"}]}, {"env": [{"name": "N", "value": "1k"}]}) \
        == "env[0].value"


def test_sync_reason_prefers_the_hash() -> None:
    obj = desired(SMALL_SPEC)[0]
    other = copy.deepcopy(obj)
    other["metadata"]["annotations"]["disagg.dev/spec-hash"] = "0" * 16
    assert sync_reason(obj, other) == "spec changed"
    assert sync_reason(obj, copy.deepcopy(obj)) is None


def test_zero_values_the_server_omits_are_not_drift() -> None:
    """The API server drops false, "" and 0 (Go omitempty) when it stores an object; wanting one of them
    from an absent field must not re-apply the child on every reconcile."""
    want = {"spec": {"publishNotReadyAddresses": False, "env": [{"name": "X", "value": ""}], "weight": 0}}
    have = {"spec": {"env": [{"name": "X"}]}}
    assert first_mismatch(want, have) is None
    assert first_mismatch(want, {"spec": {"publishNotReadyAddresses": True, "env": [{"name": "X"}]}}) \
        == "spec.publishNotReadyAddresses"
    assert first_mismatch({"spec": {"replicas": 3}}, {"spec": {}}) == "spec.replicas"
