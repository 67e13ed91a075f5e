"""Pure builders: every rendered child validates against real Kubernetes schemas and follows the
data-plane contract (args, ports, probes, drain hook), the labelling and the security rules."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml
from opkit import EXAMPLES, SMALL_SPEC

from disagg_operator.builders import (
    ANNOTATION_POLICY_HASH,
    ANNOTATION_SPEC_HASH,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    Owner,
    build_children,
    child_name,
    format_quantity,
    pod_name_pattern,
    role_replicas,
)
from disagg_operator.spec import parse_spec
from disagg_worker.policy import parse_policy

OWNER = Owner(name="demo", namespace="ns", uid="uid-demo", generation=1)
K8S_VERSION = "1.30"
PRODUCTION = yaml.safe_load((EXAMPLES / "production.yaml").read_text())["spec"]

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "small": SMALL_SPEC,
    "production": PRODUCTION,
    "platform-assigned user": {**SMALL_SPEC, "platformAssignsUser": True},
    "tcp kv transport": {**SMALL_SPEC, "kvTransfer": {"backend": "tcp"}},
    "hpa": {**SMALL_SPEC, "autoscale": {"mode": "hpa", "prefill": {"minReplicas": 1, "maxReplicas": 3,
                                        "scaleUp": {"queueLength": 8, "gpuUtilization": 80}},
                                        "decode": {"minReplicas": 2, "maxReplicas": 6,
                                                   "scaleUp": {"queueLength": 16, "kvCacheUsage": 75}}}},
    "keda": {**SMALL_SPEC, "autoscale": {"mode": "keda", "prometheusUrl": "http://prometheus.monitoring:9090",
                                         "prefill": {"minReplicas": 1, "maxReplicas": 3,
                                                     "scaleUp": {"queueLength": 8}},
                                         "decode": {"minReplicas": 1, "maxReplicas": 6,
                                                    "scaleUp": {"kvCacheUsage": 75}}}},
}


def children(spec: dict[str, Any], observed: dict[str, int | None] | None = None) -> list[dict[str, Any]]:
    return build_children(parse_spec(spec, name=OWNER.name), OWNER, observed)


def by(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def container(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return by(objs, "Deployment", f"demo-{component}")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_child_validates_against_kubernetes_schemas(scenario: str) -> None:
    for obj in children(SCENARIOS[scenario]):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # CRD kinds (PodMonitor, ScaledObject) have no upstream schema: check their core shape
            assert obj["kind"] in ("PodMonitor", "ScaledObject")
            assert obj["spec"] and obj["metadata"]["ownerReferences"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_children_are_owned_labelled_and_hashed(scenario: str) -> None:
    for obj in children(SCENARIOS[scenario]):
        meta = obj["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["ownerReferences"] == [{"apiVersion": "disagg.dev/v1alpha1", "kind": "DisaggDeployment",
                                            "name": "demo", "uid": "uid-demo", "controller": True,
                                            "blockOwnerDeletion": True}]
        labels = meta["labels"]
        assert labels[LABEL_NAME] == "disagg" and labels[LABEL_INSTANCE] == "demo"
        assert labels[LABEL_MANAGED_BY] == "disagg-operator" and labels[LABEL_COMPONENT]
        assert len(meta["annotations"][ANNOTATION_SPEC_HASH]) == 16
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            assert set(selector) == {LABEL_NAME, LABEL_INSTANCE, LABEL_COMPONENT}
            template_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= template_labels.items()


def test_worker_and_router_command_lines_follow_the_contract() -> None:
    objs = children({**SMALL_SPEC, "prefill": {"device": "cpu", "dtype": "float32", "maxBatchTokens": 1024},
                     "decode": {"maxBatchSize": 32, "kvCacheBlocks": 512},
                     "router": {"port": 9000, "streamIdleTimeoutSeconds": 60}})
    common = ["--model", "tiny-llama", "--policy", "/etc/disagg/policy.yaml", "--host", "0.0.0.0"]
    assert container(objs, "prefill")["command"] == ["disagg"]
    assert container(objs, "prefill")["args"] == [
        "worker", "--role", "prefill", *common, "--port", "50051", "--http-port", "8081",
        "--device", "cpu", "--dtype", "float32", "--max-batch-tokens", "1024"]
    assert container(objs, "decode")["args"] == [
        "worker", "--role", "decode", *common, "--port", "50051", "--http-port", "8081",
        "--max-batch-size", "32", "--kv-cache-blocks", "512", "--prefill-workers", "demo-prefill.ns.svc:50051"]
    assert container(objs, "router")["args"] == [
        "router", *common, "--port", "8000", "--decode-workers", "demo-decode.ns.svc:50051",
        "--prefill-workers", "demo-prefill.ns.svc:50051", "--stream-idle-timeout", "60", "--shutdown-timeout", "120"]
    assert children({"model": {"name": "x", "path": "/models/x"}})[4]["spec"]["template"]["spec"][
        "containers"][0]["args"][4] == "/models/x"


def test_the_tcp_kv_transport_gives_decode_pods_a_declared_kv_port() -> None:
    """Left to the worker's default (any free port), the KV port could not be named by a NetworkPolicy."""
    objs = children({**SMALL_SPEC, "kvTransfer": {"backend": "tcp"}})
    decode = container(objs, "decode")
    assert decode["args"][-2:] == ["--kv-port", "50052"]
    assert {"name": "kv", "containerPort": 50052, "protocol": "TCP"} in decode["ports"]
    assert "--kv-port" not in container(objs, "prefill")["args"]  # only decode workers receive KV
    assert [p["name"] for p in container(objs, "prefill")["ports"]] == ["grpc", "http"]
    default = children(SMALL_SPEC)  # grpc: the KV rides the gRPC port
    assert "--kv-port" not in container(default, "decode")["args"]
    assert [p["name"] for p in container(default, "decode")["ports"]] == ["grpc", "http"]
    from disagg_worker.worker_main import build_parser

    assert build_parser().parse_args(decode["args"][1:]).kv_port == 50052


def test_the_router_serves_a_model_directory_under_the_name_given_for_it() -> None:
    from disagg_worker.router.main import build_parser

    def served_name(model: dict[str, str]) -> str | None:
        args = build_parser().parse_args(container(children({"model": model}), "router")["args"][1:])
        return args.served_model_name

    assert served_name({"name": "llama-3-8b", "path": "/models/l3"}) == "llama-3-8b"
    assert served_name({"path": "/models/l3"}) is None  # no name given: the router names it after the folder
    # as the API server stores it: the CRD's default name filled in (it was served as "tiny-llama")
    assert served_name({"name": "tiny-llama", "path": "/models/l3"}) is None
    assert served_name({"name": "tiny-qwen2"}) is None  # a preset is served under its own name


def test_worker_services_are_headless_and_select_their_role() -> None:
    objs = children(SMALL_SPEC)
    for role in ("prefill", "decode"):
        svc = by(objs, "Service", f"demo-{role}")
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"][LABEL_COMPONENT] == role
        assert {p["port"] for p in svc["spec"]["ports"]} == {50051, 8081}
    router = by(objs, "Service", "demo-router")
    assert router["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


@pytest.mark.parametrize("component", ["prefill", "decode", "router"])
def test_probes_security_and_writable_dirs(component: str) -> None:
    objs = children(PRODUCTION)
    pod = by(objs, "Deployment", f"demo-{component}")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/cache"]]
    assert volumes[mounts["/etc/disagg"]]["configMap"]["name"] == "demo-policy"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"] == "/tmp" and env["HF_HOME"].startswith("/cache")
    assert "/models" in mounts  # the production example's PVC
    assert c["resources"]["limits"]["memory"] == "96Gi" if component != "router" else True


@pytest.mark.parametrize("component", ["prefill", "decode", "router"])
def test_where_the_platform_assigns_the_user_the_pods_name_none(component: str) -> None:
    """OpenShift's restricted SCC refuses a pod whose runAsUser/fsGroup lie outside the namespace's range
    (10001 does); with ``platformAssignsUser`` the pods leave all three to it and stay non-root."""
    plain = by(children(SMALL_SPEC), "Deployment", f"demo-{component}")["spec"]["template"]["spec"]
    assert {plain["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")} == {10001}
    assert "USER" not in {e["name"] for e in plain["containers"][0]["env"]}
    objs = children({**copy.deepcopy(SMALL_SPEC), "platformAssignsUser": True})
    pod = by(objs, "Deployment", f"demo-{component}")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["containers"][0]["securityContext"] == plain["containers"][0]["securityContext"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["USER"] == "disagg"  # getpass.getuser() without a passwd entry for the uid
    assert "platformAssignsUser" not in str(by(objs, "ConfigMap", "demo-policy")["data"])  # a pod field


def test_a_worker_may_take_as_long_to_start_as_its_spec_allows() -> None:
    def startup(spec: dict[str, Any], component: str) -> int:
        probe = container(children(spec), component)["startupProbe"]
        return probe["periodSeconds"] * probe["failureThreshold"]

    assert startup(SMALL_SPEC, "decode") == 600
    slow = {**SMALL_SPEC, "decode": {"startupTimeoutSeconds": 1801}}
    assert startup(slow, "decode") >= 1801 and startup(slow, "prefill") == 600 and startup(slow, "router") == 600
    # a rollout waiting out a slow load is not reported stalled (ProgressDeadlineExceeded: Degraded) first
    deadline = {name: by(children(slow), "Deployment", f"demo-{name}")["spec"]["progressDeadlineSeconds"]
                for name in ("decode", "prefill", "router")}
    assert deadline["decode"] > 1801 and deadline["prefill"] > 600 and deadline["router"] > 600


def test_decode_drains_before_it_stops() -> None:
    objs = children({**SMALL_SPEC, "autoscale": {"mode": "off", "drainTimeoutSeconds": 90}})
    pod = by(objs, "Deployment", "demo-decode")["spec"]["template"]["spec"]
    hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert "drain?wait=90" in hook[-1] and "method='POST'" in hook[-1]
    assert pod["terminationGracePeriodSeconds"] > 90
    assert "lifecycle" not in container(objs, "prefill")


def test_the_router_leaves_the_endpoints_first_and_then_finishes_its_streams() -> None:
    objs = children({**SMALL_SPEC, "autoscale": {"mode": "off", "drainTimeoutSeconds": 90}})
    router = by(objs, "Deployment", "demo-router")["spec"]["template"]["spec"]
    hook = router["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[0] == "python3" and "time.sleep(5)" in hook[-1]
    args = router["containers"][0]["args"]
    assert args[args.index("--shutdown-timeout") + 1] == "90"
    assert router["terminationGracePeriodSeconds"] > 5 + 90  # the pause, then the streams, then the margin


def test_policy_configmap_round_trips() -> None:
    parsed = parse_spec(PRODUCTION)
    cm = by(build_children(parsed, OWNER), "ConfigMap", "demo-policy")
    assert parse_policy(yaml.safe_load(cm["data"]["policy.yaml"])) == parsed.policy


def test_policy_hash_rolls_pods_on_data_plane_changes_only() -> None:
    def hashes(spec: dict[str, Any]) -> dict[str, str]:
        return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"][ANNOTATION_POLICY_HASH]
                for o in children(spec) if o["kind"] == "Deployment"}

    base = hashes(SMALL_SPEC)
    assert base["demo-prefill"] == base["demo-decode"] != base["demo-router"]  # the sections each reads
    qos = hashes({**SMALL_SPEC, "qos": {"ttftSloMs": 300}})
    assert qos["demo-router"] != base["demo-router"] and qos["demo-decode"] == base["demo-decode"]
    assert hashes({**SMALL_SPEC, "autoscale": {"mode": "off", "prefill": {"maxReplicas": 9}}}) == base


def test_monitoring_toggles() -> None:
    objs = children(SMALL_SPEC)
    annotations = by(objs, "Deployment", "demo-decode")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8081"
    assert not [o for o in objs if o["kind"] == "PodMonitor"]
    objs = children(PRODUCTION)
    annotations = by(objs, "Deployment", "demo-router")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations
    [mon] = [o for o in objs if o["kind"] == "PodMonitor"]
    assert mon["metadata"]["labels"]["release"] == "prometheus"
    assert mon["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    # a user's labels never replace the ones the operator finds its children by
    clash = copy.deepcopy(PRODUCTION)
    clash["monitoring"]["podMonitor"]["labels"] = {"app.kubernetes.io/instance": "x", "release": "prometheus"}
    [mon] = [o for o in children(clash) if o["kind"] == "PodMonitor"]
    assert mon["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"
    # a PodMonitor with the annotations left on (their default): one scrape per pod, not two
    both = {**SMALL_SPEC, "monitoring": {"prometheusAnnotations": True, "podMonitor": {"enabled": True}}}
    objs = children(both)
    assert [o for o in objs if o["kind"] == "PodMonitor"]
    for component in ("prefill", "decode", "router"):
        meta = by(objs, "Deployment", f"demo-{component}")["spec"]["template"]["metadata"]
        assert "prometheus.io/scrape" not in meta["annotations"]


def test_hpa_maps_thresholds_to_pods_metrics() -> None:
    hpa = by(children(SCENARIOS["hpa"]), "HorizontalPodAutoscaler", "demo-prefill")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo-prefill"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3)
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"] for m in hpa["metrics"]}
    assert targets == {"disagg_requests_waiting": "8", "disagg_utilization_ratio": "800m"}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_keda_scaled_object_queries_prometheus() -> None:
    so = by(children(SCENARIOS["keda"]), "ScaledObject", "demo-decode")["spec"]
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (1, 6)
    [trigger] = so["triggers"]
    assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
    pods = pod_name_pattern("demo-decode")
    # each reading's mean over a minute (its time integral's rate), as the builtin planner reads it
    # (the gauge where no worker exports the integral: an empty query reads as 0 and scales down)
    assert trigger["metadata"]["query"] == (
        f'sum(rate(disagg_kv_cache_usage_seconds_total{{namespace="ns",pod=~"{pods}"}}[60s])) or '
        f'sum(disagg_kv_cache_usage_ratio{{namespace="ns",pod=~"{pods}"}})')
    assert trigger["metadata"]["threshold"] == "0.75"
    spec = {**SCENARIOS["keda"], "autoscale": {**SCENARIOS["keda"]["autoscale"], "prefill": {
        "minReplicas": 1, "maxReplicas": 3, "scaleUp": {"queueLength": 8, "gpuUtilization": 80}}}}
    prefill = by(children(spec), "ScaledObject", "demo-prefill")["spec"]
    queries = {t["name"]: t["metadata"]["query"] for t in prefill["triggers"]}
    pattern = pod_name_pattern("demo-prefill")
    assert queries["gpu-utilization"] == (
        f'sum(rate(disagg_busy_seconds_total{{namespace="ns",pod=~"{pattern}"}}[60s]))'
        f' or sum(disagg_utilization_ratio{{namespace="ns",pod=~"{pattern}"}})')
    assert queries["queue-length"].startswith(
        f'sum(rate(disagg_requests_waiting_seconds_total{{namespace="ns",pod=~"{pattern}"}}[60s])) or ')


@pytest.mark.parametrize("name_length", [4, 20, 38, 39, 45, 50, 55])
def test_the_pod_pattern_matches_the_names_the_api_server_generates(name_length: int) -> None:
    """A pod is named (DEPLOYMENT-HASH-)[:58] + 5 random characters. The pattern used to require
    "-HASH-SUFFIX", which the cut removed from 39-character DisaggDeployment names on: KEDA then saw no
    pods and kept the pool at its minimum under any load."""
    name = ("d" * name_length)[:name_length]
    for role in ("prefill", "decode"):
        deployment = child_name(Owner(name, "ns", "u", 1), role)
        pattern = re.compile(pod_name_pattern(deployment))  # PromQL's =~ is anchored at both ends
        for template_hash in ("5d8f7b9c64", "7c9d4b6f8", "b5"):
            pod = f"{deployment}-{template_hash}-"[:58] + "x7k2p"
            assert pattern.fullmatch(pod), (pod, pattern.pattern)
        # ...and not those of a DisaggDeployment whose name extends this one's (``demo`` vs ``demo-decode``),
        # where the names tell them apart: cut to 58 characters, longer ones cannot
        other = child_name(Owner(f"{name}-{role}", "ns", "u", 1), role)
        if len(deployment) + 12 <= 58:
            assert not pattern.fullmatch(f"{other}-5d8f7b9c64-"[:58] + "x7k2p")


def test_replicas_by_mode() -> None:
    off, builtin = parse_spec(SMALL_SPEC), parse_spec(PRODUCTION)
    hpa = parse_spec(SCENARIOS["hpa"])
    assert role_replicas(off, "decode", 7) == 1  # static: the spec wins over what runs
    assert role_replicas(builtin, "decode", None) == 8  # initial, clamped to [8, 24]
    assert role_replicas(builtin, "decode", 13) == 13  # the planner's count is kept
    assert role_replicas(builtin, "decode", 30) == 30  # even outside the bounds: the planner clamps it
    assert role_replicas(hpa, "decode", 5) == 5  # the HPA owns it
    assert role_replicas(builtin, "router", 5) == 2


@pytest.mark.parametrize(("value", "text"), [(8, "8"), (8.0, "8"), (0.75, "750m"), (0.8, "800m"), (2.5, "2500m")])
def test_format_quantity(value: float, text: str) -> None:
    assert format_quantity(value) == text


def test_every_component_gets_a_disruption_budget_unless_it_opts_out() -> None:
    """Without one a node drain evicts every pod of a pool on the drained nodes at once."""
    objs = children({**SMALL_SPEC, "decode": {"maxUnavailable": 2}, "router": {"maxUnavailable": 0}})
    budgets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert sorted(budgets) == ["demo-decode", "demo-prefill"]
    assert budgets["demo-decode"]["spec"]["maxUnavailable"] == 2
    assert budgets["demo-prefill"]["spec"]["maxUnavailable"] == 1
    assert budgets["demo-decode"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "decode"
