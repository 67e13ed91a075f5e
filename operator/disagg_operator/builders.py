"""Pure builders: a validated spec -> the desired child objects of one DisaggDeployment.

Children (all in the resource's namespace, owned by it, labelled ``app.kubernetes.io/*`` plus a
component label):

- ConfigMap ``<name>-policy`` with ``policy.yaml`` (``Policy.to_camel_dict()``), read by every pod;
- Deployments ``<name>-prefill`` / ``<name>-decode`` + headless Services of the same names (worker
  discovery: the Service's DNS name resolves to the ready pods' IPs);
- Deployment + Service ``<name>-router``;
- per component a PodDisruptionBudget (unless its ``maxUnavailable`` is 0);
- optional: a PodMonitor, and per role an HPA (``autoscale.mode: hpa``) or a KEDA ScaledObject (``keda``).

Each child carries ``disagg.dev/spec-hash``, a hash of everything the builder sets except a
Deployment's ``replicas`` (which the autoscaler owns), so the diff can tell which children a spec
change affects. Pod templates carry ``disagg.dev/policy-hash`` of the part of the policy the data
plane reads, so a policy change rolls the pods (an autoscale-only change does not; the mounted file
is still refreshed by the kubelet).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml

from disagg_operator import API_VERSION, KIND
from disagg_operator.spec import DEFAULT_STARTUP_SECONDS, ParsedSpec, PodSettings, RouterSpec, WorkerSpec
from disagg_worker.policy import Policy, RoleAutoscale

ROLES = ("prefill", "decode")
COMPONENTS = ("prefill", "decode", "router")

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "disagg"
MANAGED_BY = "disagg-operator"

ANNOTATION_SPEC_HASH = "disagg.dev/spec-hash"
ANNOTATION_POLICY_HASH = "disagg.dev/policy-hash"
ANNOTATION_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

WORKER_GRPC_PORT = 50051
WORKER_HTTP_PORT = 8081
# the decode workers' KV receiver under kvTransfer.backend tcp: a fixed, declared port (not the worker's
# default of any free one), so a NetworkPolicy can let prefill pods reach it
WORKER_KV_PORT = 50052
# the router container's port whatever the Service's (router.port): the container runs as non-root with
# every capability dropped, so it cannot bind below 1024 where runtimes keep those ports privileged
ROUTER_CONTAINER_PORT = 8000
POLICY_DIR = "/etc/disagg"
POLICY_FILE = "policy.yaml"
POLICY_PATH = f"{POLICY_DIR}/{POLICY_FILE}"
RUN_AS_USER = 10001
DRAIN_GRACE_EXTRA_SECONDS = 30
# How long a leaving router pod keeps serving before its SIGTERM: kube-proxy and ingress controllers
# drop an endpoint within a few seconds of the pod's deletion.
ROUTER_PRESTOP_SECONDS = 5

# Prometheus metric behind each autoscale threshold, and the divisor from threshold to metric value
# (thresholds in percent, the ratio metrics in 0..1).
THRESHOLD_METRICS: dict[str, tuple[str, int]] = {
    "queue_length": ("disagg_requests_waiting", 1),
    "gpu_utilization": ("disagg_utilization_ratio", 100),
    "kv_cache_usage": ("disagg_kv_cache_usage_ratio", 100),
}
# Prometheus reads a time integral as its rate over this window (KEDA's triggers, the planner's queries)
RATE_WINDOW_SECONDS = 60
# each reading's time integral (a counter): its rate is the reading's mean over a window, which is what
# the builtin planner and KEDA read (the gauges are snapshots; the utilisation one of the last second)
TIME_INTEGRALS: dict[str, str] = {
    "queue_length": "disagg_requests_waiting_seconds_total",
    "gpu_utilization": "disagg_busy_seconds_total",
    "kv_cache_usage": "disagg_kv_cache_usage_seconds_total",
}


@dataclass(frozen=True)
class Owner:
    """The DisaggDeployment a child belongs to."""

    name: str
    namespace: str
    uid: str
    generation: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body.get("metadata", {})
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def child_name(owner: Owner, component: str) -> str:
    return f"{owner.name}-{component}"


def service_host(owner: Owner, component: str) -> str:
    """DNS name of a child Service (resolves to the ready pods' IPs for the headless worker Services)."""
    return f"{child_name(owner, component)}.{owner.namespace}.svc"


def router_endpoint(owner: Owner, port: int) -> str:
    return f"http://{service_host(owner, 'router')}:{port}"


def selector_labels(owner: Owner, component: str | None = None) -> dict[str, str]:
    labels = {LABEL_NAME: APP_NAME, LABEL_INSTANCE: owner.name}
    if component:
        labels[LABEL_COMPONENT] = component
    return labels


def child_labels(owner: Owner, component: str) -> dict[str, str]:
    return {**selector_labels(owner, component), LABEL_PART_OF: APP_NAME, LABEL_MANAGED_BY: MANAGED_BY}


def stable_hash(value: Any, length: int = 16) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def render_policy(policy: Policy) -> str:
    return yaml.safe_dump(policy.to_camel_dict(), sort_keys=True)


# The policy sections each component reads (``policy.<section>`` in worker/disagg_worker/server and
# router): a pod rolls when these change, and not for the others. A worker restart reloads the model,
# so a router-only knob (qos) must not restart the GPU pools. The operator's planner reads autoscale.
POLICY_SECTIONS_READ = {
    "router": ("model", "splitPolicy", "cache", "qos"),
    "worker": ("model", "splitPolicy", "cache", "kvTransfer"),
}


def data_plane_policy_hash(policy: Policy, component: str) -> str:
    """Hash of the policy sections ``component`` (prefill, decode or router) acts on."""
    data = policy.to_camel_dict()
    sections = POLICY_SECTIONS_READ["router" if component == "router" else "worker"]
    return stable_hash({section: data.get(section) for section in sections})


def spec_hash(obj: Mapping[str, Any]) -> str:
    """Hash of a desired child, excluding its own hash annotation and a Deployment's replicas."""
    body = json.loads(json.dumps(obj))
    body.get("metadata", {}).get("annotations", {}).pop(ANNOTATION_SPEC_HASH, None)
    if body.get("kind") == "Deployment":
        body.get("spec", {}).pop("replicas", None)
    return stable_hash(body)


def _metadata(
    owner: Owner, component: str, name: str | None = None, extra_labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    return {
        "name": name or child_name(owner, component),
        "namespace": owner.namespace,
        "labels": {**(extra_labels or {}), **child_labels(owner, component)},  # ours win: selectors use them
        "ownerReferences": [owner.reference()],
    }


def _finish(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"].setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = spec_hash(obj)
    return obj


def format_quantity(value: float) -> str:
    """A float as a Kubernetes quantity string: 8 -> "8", 0.75 -> "750m"."""
    dec = Decimal(repr(float(value)))
    if dec == dec.to_integral_value():
        return str(int(dec))
    milli = (dec * 1000).quantize(Decimal(1))
    return f"{int(milli)}m"


# ---- replicas ---------------------------------------------------------------------------------


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def role_replicas(parsed: ParsedSpec, role: str, observed: int | None) -> int:
    """The replicas the reconciler asks for; with an autoscaler, the current count is kept as it is."""
    pod: PodSettings = getattr(parsed.pods, role)
    mode = parsed.policy.autoscale.mode
    if role == "router" or mode == "off":
        return pod.replicas
    scaling: RoleAutoscale = getattr(parsed.policy.autoscale, role)
    if observed is None:
        return clamp(pod.replicas, scaling.min_replicas, scaling.max_replicas)
    # builtin, hpa, keda: the autoscaler owns the count, also when new bounds leave it outside them. The
    # planner brings it back within a round, and for decode it ranks the pods (deletion costs) first;
    # the reconciler lowering replicas itself would drop pods holding KV state at random.
    return observed


# ---- pods -------------------------------------------------------------------------------------


def _env(pod: PodSettings, platform_assigns_user: bool = False) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "TORCH_HOME", "value": "/cache/torch"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": "/cache/torch_extensions"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if platform_assigns_user:  # a uid with no passwd entry: getpass.getuser() (torch's caches) reads USER first
        env.append({"name": "USER", "value": "disagg"})
    for var in pod.env:
        env = [e for e in env if e["name"] != var.name]
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def _resources(pod: PodSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pod.resources.requests:
        out["requests"] = dict(pod.resources.requests)
    if pod.resources.limits:
        out["limits"] = dict(pod.resources.limits)
    return out


def _volumes(
    pod: PodSettings, owner: Owner, worker: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "policy", "configMap": {"name": child_name(owner, "policy")}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    if worker:  # torch / UCX shared-memory transports
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes.extend(dict(v) for v in pod.volumes)
    mounts.extend(
        m.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False) for m in pod.volume_mounts
    )
    for m in mounts:
        if m.get("readOnly") is False:
            m.pop("readOnly")
    return volumes, mounts


STARTUP_PROBE_PERIOD = 5


def _probes(port: str, startup_seconds: int) -> dict[str, Any]:
    return {
        "startupProbe": {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": STARTUP_PROBE_PERIOD,
            "failureThreshold": -(-startup_seconds // STARTUP_PROBE_PERIOD),
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": port},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
    }


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
PLATFORM_ASSIGNED = ("runAsUser", "runAsGroup", "fsGroup")


def pod_security(platform_assigns_user: bool) -> dict[str, Any]:
    """The pods' securityContext: the image's user 10001, or none named where the platform assigns one."""
    if not platform_assigns_user:
        return dict(POD_SECURITY)
    return {key: value for key, value in POD_SECURITY.items() if key not in PLATFORM_ASSIGNED}


def pause_command(seconds: int) -> list[str]:
    """The router's preStop hook: wait while the endpoint removal reaches every proxy."""
    return ["python3", "-c", f"import time; time.sleep({seconds})"]


def drain_command(wait_seconds: float) -> list[str]:
    """The decode preStop hook: POST /drain?wait=N (httpGet hooks cannot POST)."""
    wait = int(wait_seconds)
    script = (
        "import urllib.request as u; u.urlopen(u.Request("
        f"'http://127.0.0.1:{WORKER_HTTP_PORT}/drain?wait={wait}', method='POST'), timeout={wait + 5})"
    )
    return ["python3", "-c", script]  # python3: what every Python image has (some lack "python")


def _serve_args(parsed: ParsedSpec, port: int) -> list[str]:
    """The flags every serving process (worker or router) takes: model, policy file, listen address."""
    return ["--model", parsed.policy.model.ref, "--policy", POLICY_PATH, "--host", "0.0.0.0", "--port", str(port)]


def worker_args(parsed: ParsedSpec, owner: Owner, role: str) -> list[str]:
    pod: WorkerSpec = getattr(parsed.pods, role)
    args = ["worker", "--role", role, *_serve_args(parsed, WORKER_GRPC_PORT), "--http-port", str(WORKER_HTTP_PORT)]
    for flag, value in (
        ("--device", pod.device),
        ("--dtype", pod.dtype),
        ("--max-batch-tokens", pod.max_batch_tokens),
        ("--max-batch-size", pod.max_batch_size),
        ("--kv-cache-blocks", pod.kv_cache_blocks),
    ):
        if value is not None:
            args += [flag, str(value)]
    if role == "decode":
        args += ["--prefill-workers", f"{service_host(owner, 'prefill')}:{WORKER_GRPC_PORT}"]
        if receives_kv_on_its_own_port(parsed):
            args += ["--kv-port", str(WORKER_KV_PORT)]
    return args + list(pod.extra_args)


def receives_kv_on_its_own_port(parsed: ParsedSpec) -> bool:
    """Whether decode workers listen on ``WORKER_KV_PORT`` (the "tcp" KV transport)."""
    return parsed.policy.kv_transfer.backend == "tcp"


def router_args(parsed: ParsedSpec, owner: Owner) -> list[str]:
    pod: RouterSpec = parsed.pods.router
    model = parsed.policy.model
    # with a path, the model's name is the id clients send (else the router names it after the folder)
    named = ["--served-model-name", model.served_name] if model.served_name else []
    return [
        "router",
        *_serve_args(parsed, ROUTER_CONTAINER_PORT),
        *named,
        "--decode-workers",
        f"{service_host(owner, 'decode')}:{WORKER_GRPC_PORT}",
        "--prefill-workers",
        f"{service_host(owner, 'prefill')}:{WORKER_GRPC_PORT}",
        "--stream-idle-timeout",
        str(pod.stream_idle_timeout_seconds),
        "--shutdown-timeout",
        f"{parsed.policy.autoscale.drain_timeout_seconds:g}",
        *pod.extra_args,
    ]


def _pod_template(parsed: ParsedSpec, owner: Owner, component: str) -> dict[str, Any]:
    pods = parsed.pods
    pod: PodSettings = getattr(pods, component)
    worker = component in ROLES
    if worker:
        ports = [
            {"name": "grpc", "containerPort": WORKER_GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": WORKER_HTTP_PORT, "protocol": "TCP"},
        ]
        if component == "decode" and receives_kv_on_its_own_port(parsed):
            ports.append({"name": "kv", "containerPort": WORKER_KV_PORT, "protocol": "TCP"})
        args = worker_args(parsed, owner, component)
        metrics_port = WORKER_HTTP_PORT
    else:
        ports = [{"name": "http", "containerPort": ROUTER_CONTAINER_PORT, "protocol": "TCP"}]
        args = router_args(parsed, owner)
        metrics_port = ROUTER_CONTAINER_PORT
    volumes, mounts = _volumes(pod, owner, worker)
    container: dict[str, Any] = {
        "name": component,
        "image": pods.image,
        "imagePullPolicy": pods.image_pull_policy,
        "command": ["disagg"],
        "args": args,
        "ports": ports,
        "env": _env(pod, pods.platform_assigns_user),
        **_probes("http", pod.startup_timeout_seconds if isinstance(pod, WorkerSpec) else DEFAULT_STARTUP_SECONDS),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }
    if res := _resources(pod):
        container["resources"] = res
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security(pods.platform_assigns_user),
        "containers": [container],
        "volumes": volumes,
    }
    drain = parsed.policy.autoscale.drain_timeout_seconds
    if component in ("decode", "prefill"):
        # both drain on SIGTERM (finish what they hold); decode pods also drain before it (preStop)
        spec["terminationGracePeriodSeconds"] = int(drain) + DRAIN_GRACE_EXTRA_SECONDS
        if component == "decode":
            container["lifecycle"] = {"preStop": {"exec": {"command": drain_command(drain)}}}
    else:
        # The router keeps serving while the pod leaves the Service's endpoints (a preStop pause: until
        # then new connections still arrive and would be refused), then finishes the streams it holds
        # for up to the drain timeout (--shutdown-timeout), as long as a decode pod may take to drain.
        spec["terminationGracePeriodSeconds"] = ROUTER_PRESTOP_SECONDS + int(drain) + DRAIN_GRACE_EXTRA_SECONDS
        container["lifecycle"] = {"preStop": {"exec": {"command": pause_command(ROUTER_PRESTOP_SECONDS)}}}
    if pods.service_account_name:
        spec["serviceAccountName"] = pods.service_account_name
    if pods.image_pull_secrets:
        spec["imagePullSecrets"] = [s.model_dump(by_alias=True) for s in pods.image_pull_secrets]
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pod.tolerations]
    if pod.affinity:
        spec["affinity"] = dict(pod.affinity)
    if pod.priority_class_name:
        spec["priorityClassName"] = pod.priority_class_name
    annotations = {ANNOTATION_POLICY_HASH: data_plane_policy_hash(parsed.policy, component)}
    # not with a PodMonitor: a Prometheus that reads both would scrape every pod twice (sums doubled)
    if pods.monitoring.prometheus_annotations and not pods.monitoring.pod_monitor.enabled:
        annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
            }
        )
    annotations.update(pods.pod_annotations)
    labels = {**pods.pod_labels, **child_labels(owner, component)}
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


# How long past its startup probe's allowance a rollout may go without progress before the Deployment
# reports ProgressDeadlineExceeded (image pull, scheduling). The default 600 s is shorter than a big
# model's allowed load time: a healthy rollout was reported Degraded.
PROGRESS_DEADLINE_MARGIN_SECONDS = 600


def build_deployment(parsed: ParsedSpec, owner: Owner, component: str, replicas: int) -> dict[str, Any]:
    pod = getattr(parsed.pods, component)
    startup = pod.startup_timeout_seconds if isinstance(pod, WorkerSpec) else DEFAULT_STARTUP_SECONDS
    return _finish(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(owner, component),
            "spec": {
                "replicas": replicas,
                "progressDeadlineSeconds": int(startup) + PROGRESS_DEADLINE_MARGIN_SECONDS,
                "selector": {"matchLabels": selector_labels(owner, component)},
                "template": _pod_template(parsed, owner, component),
            },
        }
    )


def build_worker_service(owner: Owner, role: str) -> dict[str, Any]:
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(owner, role),
            "spec": {
                "clusterIP": "None",  # headless: DNS returns every ready worker
                "selector": selector_labels(owner, role),
                "ports": [
                    {"name": "grpc", "port": WORKER_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                    {"name": "http", "port": WORKER_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                ],
            },
        }
    )


def build_router_service(parsed: ParsedSpec, owner: Owner) -> dict[str, Any]:
    router = parsed.pods.router
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(owner, "router"),
            "spec": {
                "type": router.service_type,
                "selector": selector_labels(owner, "router"),
                "ports": [{"name": "http", "port": router.port, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def build_configmap(parsed: ParsedSpec, owner: Owner) -> dict[str, Any]:
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(owner, "policy"),
            "data": {POLICY_FILE: render_policy(parsed.policy)},
        }
    )


def build_pod_monitor(parsed: ParsedSpec, owner: Owner) -> dict[str, Any]:
    mon = parsed.pods.monitoring.pod_monitor
    return _finish(
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": _metadata(owner, "metrics", name=owner.name, extra_labels=mon.labels),
            "spec": {
                "selector": {"matchLabels": selector_labels(owner)},
                "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": mon.interval}],
            },
        }
    )


def _behavior(scaling: RoleAutoscale) -> dict[str, Any]:
    period = clamp(int(scaling.cooldown_seconds) or 1, 1, 1800)
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": clamp(int(scaling.scale_up_stabilization_seconds), 0, 3600),
            "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": scaling.max_step, "periodSeconds": period}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": clamp(int(scaling.scale_down_stabilization_seconds), 0, 3600),
            "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": scaling.max_step, "periodSeconds": period}],
        },
    }


def build_hpa(parsed: ParsedSpec, owner: Owner, role: str) -> dict[str, Any]:
    scaling: RoleAutoscale = getattr(parsed.policy.autoscale, role)
    metrics = []
    for key, threshold in scaling.scale_up.items().items():
        metric, divisor = THRESHOLD_METRICS[key]
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": metric},
                    "target": {"type": "AverageValue", "averageValue": format_quantity(threshold / divisor)},
                },
            }
        )
    return _finish(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": _metadata(owner, role),
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": child_name(owner, role),
                },
                "minReplicas": max(1, scaling.min_replicas),
                "maxReplicas": scaling.max_replicas,
                "metrics": metrics,
                "behavior": _behavior(scaling),
            },
        }
    )


# The API server cuts a generated name's base (here "DEPLOYMENT-HASH-") to this many characters before
# it adds 5 random ones.
GENERATED_NAME_BASE_MAX = 58
POD_TEMPLATE_HASH_MAX = 10  # the ReplicaSet's pod-template-hash: a uint32, safe-encoded


def pod_name_pattern(deployment: str) -> str:
    """A regex for the names of a Deployment's pods: DEPLOYMENT-<template hash>-<5 random>, the base cut
    to 58 characters. ".*" would also match the pods of a DisaggDeployment whose name extends this one's
    (``chat`` vs ``chat-decode``); a fixed "-HASH-SUFFIX" matched nothing once the cut took the dash
    (deployment names from 46 characters on: a DisaggDeployment name of 39 or more)."""
    base = deployment.replace(".", "[.]") + "-"
    if len(deployment) + 1 >= GENERATED_NAME_BASE_MAX:
        return f"{base[:GENERATED_NAME_BASE_MAX]}[a-z0-9]{{5}}"
    if len(deployment) + 1 + POD_TEMPLATE_HASH_MAX + 1 <= GENERATED_NAME_BASE_MAX:
        return f"{base}[a-z0-9]{{1,{POD_TEMPLATE_HASH_MAX}}}-[a-z0-9]{{5}}"
    return f"{base}[a-z0-9]{{0,{POD_TEMPLATE_HASH_MAX}}}-?[a-z0-9]{{5}}"


def promql(metric: str, owner: Owner, role: str, agg: str = "avg", rate_seconds: int | None = None) -> str:
    """``agg`` of ``metric`` over the role's pods; of its per-second rate over ``rate_seconds`` when given."""
    pods = pod_name_pattern(child_name(owner, role))
    series = f'{metric}{{namespace="{owner.namespace}",pod=~"{pods}"}}'
    return f"{agg}({series})" if rate_seconds is None else f"{agg}(rate({series}[{rate_seconds}s]))"


def build_scaled_object(parsed: ParsedSpec, owner: Owner, role: str) -> dict[str, Any]:
    auto = parsed.policy.autoscale
    scaling: RoleAutoscale = getattr(auto, role)
    triggers = []
    for key, threshold in scaling.scale_up.items().items():
        gauge, divisor = THRESHOLD_METRICS[key]
        # the reading's mean over a minute (its time integral's rate), as the builtin planner reads it;
        # the gauge where no worker exports the integral (an older image: an empty query reads as 0)
        query = (f"{promql(TIME_INTEGRALS[key], owner, role, agg='sum', rate_seconds=RATE_WINDOW_SECONDS)} or "
                 f"{promql(gauge, owner, role, agg='sum')}")
        # sum over pods / per-pod threshold = desired replicas (KEDA's AverageValue semantics)
        triggers.append(
            {
                "type": "prometheus",
                "name": key.replace("_", "-"),
                "metadata": {
                    "serverAddress": auto.prometheus_url or "",
                    "query": query,
                    "threshold": f"{threshold / divisor:g}",
                },
            }
        )
    return _finish(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": _metadata(owner, role),
            "spec": {
                "scaleTargetRef": {"name": child_name(owner, role)},
                "minReplicaCount": scaling.min_replicas,
                "maxReplicaCount": scaling.max_replicas,
                "pollingInterval": max(1, int(auto.interval_seconds)),
                "cooldownPeriod": max(1, int(scaling.scale_down_stabilization_seconds)),
                "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(scaling)}},
                "triggers": triggers,
            },
        }
    )


def build_disruption_budget(parsed: ParsedSpec, owner: Owner, component: str) -> dict[str, Any] | None:
    """A PodDisruptionBudget per component: without one a node drain evicts every pod of a pool on the
    drained nodes at once (each decode pod drains its requests, but the pool's capacity drops to 0)."""
    pod: PodSettings = getattr(parsed.pods, component)
    if not pod.max_unavailable:
        return None
    return _finish(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _metadata(owner, component),
            "spec": {"maxUnavailable": pod.max_unavailable,
                     "selector": {"matchLabels": selector_labels(owner, component)}},
        }
    )


def build_children(
    parsed: ParsedSpec, owner: Owner, observed_replicas: Mapping[str, int | None] | None = None
) -> list[dict[str, Any]]:
    """Every desired child, in apply order (config first, then services, workloads, scalers)."""
    observed_replicas = observed_replicas or {}
    children = [build_configmap(parsed, owner)]
    children += [build_worker_service(owner, role) for role in ROLES]
    children.append(build_router_service(parsed, owner))
    for component in COMPONENTS:
        replicas = role_replicas(parsed, component, observed_replicas.get(component))
        children.append(build_deployment(parsed, owner, component, replicas))
    children += [b for b in (build_disruption_budget(parsed, owner, c) for c in COMPONENTS) if b is not None]
    if parsed.pods.monitoring.pod_monitor.enabled:
        children.append(build_pod_monitor(parsed, owner))
    mode = parsed.policy.autoscale.mode
    if mode == "hpa":
        children += [build_hpa(parsed, owner, role) for role in ROLES]
    elif mode == "keda":
        children += [build_scaled_object(parsed, owner, role) for role in ROLES]
    return children
