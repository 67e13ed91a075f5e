"""The DisaggDeployment resource's schema, and the semantic checks the API server cannot make.

A spec has two parts. The *pod fields* (``POD_FIELDS`` of ``disagg_worker.policy``: image, the three
roles, monitoring, ...) say how pods run; they are modelled here. Everything else is the serving
*policy*, modelled by ``disagg_worker.policy.Policy`` (the schema the router and workers read).
``SpecSchema`` joins both into one pydantic model; the CRD's openAPIV3Schema is generated from it
(``crd.py``), so the API server and the operator validate with the same types, bounds and defaults.

The cross-field rules are written twice on purpose: as CEL (``x-kubernetes-validations``, enforced
by the API server, listed in ``crd.CEL_RULES``) and as pydantic validators / ``semantic_errors``
here (enforced by the operator, which also runs against servers that skip CEL). Tests evaluate both
on the same inputs and require the same verdicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from kubernetes.utils.quantity import parse_quantity
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model
from pydantic.alias_generators import to_camel

from disagg_operator import DEFAULT_IMAGE
from disagg_worker.policy import POD_FIELDS, Policy, PolicyError, describe, extract_policy, parse_policy

# Longest suffix added to the resource name for a child ("-prefill"); Service names are DNS-1035
# labels of at most 63 characters.
CHILD_SUFFIX_MAX = len("-prefill")
MAX_NAME_LENGTH = 63 - CHILD_SUFFIX_MAX
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RESERVED_MOUNTS = ("/etc/disagg", "/tmp", "/cache", "/dev/shm")
RESERVED_VOLUMES = ("policy", "tmp", "cache", "dshm")

# A Kubernetes quantity: 1, "500m", "16Gi".
Quantity = Annotated[
    int | str,
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]
# A Kubernetes object the API server validates when the child is written (volumes, affinity, ...).
K8sObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

# A core/v1 Volume. ``name`` is declared so that the CRD's CEL rule matching volumeMounts to volumes
# can read it (CEL cannot see preserved unknown fields) and bounded so that the rule's estimated cost
# fits the API server's budget.
VOLUME_NAME_MAX = 63
K8sVolume = Annotated[
    dict[str, Any],
    WithJsonSchema({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": VOLUME_NAME_MAX}},
    }),
]


class SpecError(ValueError):
    """The spec is invalid; ``errors`` lists one message per problem, each naming its field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class EnvVar(_Model):
    name: str = Field(min_length=1, description="environment variable name")
    value: str | None = Field(None, description="literal value")
    value_from: K8sObject | None = Field(
        None, description="a core/v1 EnvVarSource (secretKeyRef, fieldRef, ...)"
    )


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class VolumeMount(_Model):
    name: str = Field(
        min_length=1, max_length=VOLUME_NAME_MAX, description="name of a volume listed in this role's volumes"
    )
    mount_path: str = Field(min_length=1, pattern=r"^/", description="absolute path in the container")
    read_only: bool = False
    sub_path: str | None = None


class Resources(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict, description="e.g. {cpu: 2, memory: 8Gi}")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="e.g. {nvidia.com/gpu: 1}")


class PodSettings(_Model):
    replicas: int = Field(
        1,
        ge=0,
        le=1000,
        description=(
            "replicas with autoscale.mode off; otherwise the initial count, clamped to min/maxReplicas"
        ),
    )
    resources: Resources = Field(default_factory=Resources, description="container requests and limits")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: K8sObject | None = Field(None, description="a core/v1 Affinity")
    priority_class_name: str | None = None
    env: list[EnvVar] = Field(default_factory=list, max_length=128, description="extra environment variables")
    volumes: list[K8sVolume] = Field(
        default_factory=list,
        max_length=32,
        description=("extra core/v1 Volumes, e.g. a PVC holding the model"),
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=32, description="mounts of the extra volumes"
    )
    extra_args: list[str] = Field(
        default_factory=list, max_length=64, description="appended to the container's command line"
    )
    # 0, not null, for "none": the API server fills a null with the schema's default
    max_unavailable: int = Field(
        1, ge=0, le=1000,
        description="a PodDisruptionBudget's maxUnavailable: the most pods of this role a voluntary disruption "
                    "(a node drain, a cluster upgrade) may take at once; 0 renders no budget")


DEFAULT_STARTUP_SECONDS = 600  # what a pod may take to start serving (the router: always this)


class WorkerSpec(PodSettings):
    device: Literal["auto", "cpu", "cuda"] | None = Field(None, description="passed as --device")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        None, description="passed as --dtype"
    )
    max_batch_tokens: int | None = Field(None, ge=1, description="passed as --max-batch-tokens")
    max_batch_size: int | None = Field(None, ge=1, description="passed as --max-batch-size")
    kv_cache_blocks: int | None = Field(None, ge=1, description="passed as --kv-cache-blocks")
    startup_timeout_seconds: int = Field(
        DEFAULT_STARTUP_SECONDS, ge=30, le=86400,
        description="how long a worker may take to load its model and warm up before the kubelet restarts it "
                    "(its startup probe); a large model read from a network volume may need more")


class RouterSpec(PodSettings):
    port: int = Field(8000, ge=1, le=65535,
                      description="HTTP port of the router Service (the container listens on 8000: it runs as "
                                  "non-root, so it cannot bind a privileged port such as 80)")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="type of the router Service"
    )
    stream_idle_timeout_seconds: int = Field(
        300, ge=0, le=86400,
        description="a decode worker that sends nothing on a request for this long has failed it (a hung device "
                    "keeps its connection alive): the router tries another worker if no token was sent yet, "
                    "else ends the request with a 502; 0 waits forever")


class PodMonitorSpec(_Model):
    enabled: bool = Field(False, description="render a monitoring.coreos.com/v1 PodMonitor")
    interval: str = Field("15s", pattern=r"^([0-9]+(ms|s|m|h|d|w|y))+$", description="scrape interval (a Prometheus "
                                                                                  "duration, e.g. 1m30s)")
    labels: dict[str, str] = Field(default_factory=dict, description="labels the Prometheus selects on")


class Monitoring(_Model):
    prometheus_annotations: bool = Field(
        True, description="add prometheus.io/scrape|port|path pod annotations (left out while podMonitor is "
                          "enabled: a Prometheus that reads both would scrape every pod twice)"
    )
    pod_monitor: PodMonitorSpec = Field(default_factory=PodMonitorSpec)


class LocalObjectReference(_Model):
    name: str = Field(min_length=1)


class PodFields(_Model):
    """How the pods run (``POD_FIELDS``); the rest of the spec is the policy."""

    image: str = Field(DEFAULT_IMAGE, min_length=1, pattern=r"^\S+$", description="worker and router image")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    service_account_name: str | None = Field(
        None, description="service account of the worker and router pods"
    )
    platform_assigns_user: bool = Field(
        False, description="leave runAsUser, runAsGroup and fsGroup out of the pods so that the platform assigns "
                           "them (OpenShift's restricted SCC refuses any uid outside the namespace's range); "
                           "false: uid and gid 10001, the image's user"
    )
    monitoring: Monitoring = Field(default_factory=Monitoring)
    pod_labels: dict[str, str] = Field(default_factory=dict, description="extra labels on every pod")
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="extra annotations on every pod"
    )
    prefill: WorkerSpec = Field(default_factory=WorkerSpec, description="the prefill worker pool")
    decode: WorkerSpec = Field(default_factory=WorkerSpec, description="the decode worker pool")
    router: RouterSpec = Field(default_factory=RouterSpec, description="the OpenAI-compatible router")


# The whole spec as one model: the pod fields above plus every field of the policy, with the
# policy's own types. Used for the CRD schema; parsing goes through ``parse_spec``.
SpecSchema: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "DisaggDeploymentSpec",
    __base__=PodFields,
    __doc__="Desired state of a disaggregated serving deployment: pods (image, roles) and the policy.",
    **{name: (info.annotation, info) for name, info in Policy.model_fields.items()},
)


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str = Field(description="RFC 3339 time of the last change of status")
    observed_generation: int | None = None


class RoleStatus(_Model):
    replicas: int = Field(0, description="pods of the role (Deployment status.replicas)")
    ready_replicas: int = Field(0, description="ready pods of the role")
    desired_replicas: int = Field(0, description="replicas the operator (or planner / HPA) asks for")
    ready: str = Field("0/0", description="readyReplicas/desiredReplicas, for kubectl get")


class RouterStatus(RoleStatus):
    endpoint: str | None = Field(None, description="URL of the router's OpenAI-compatible API")


class LastScale(_Model):
    role: Literal["prefill", "decode"]
    from_replicas: int = Field(alias="from")
    to: int
    reason: str
    time: str


class StatusSchema(_Model):
    """What the operator reports (``.status``)."""

    observed_generation: int | None = Field(None, description="metadata.generation this status describes")
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Ready, Progressing, Degraded, InvalidSpec"
    )
    prefill: RoleStatus | None = None
    decode: RoleStatus | None = None
    router: RouterStatus | None = None
    last_scale: LastScale | None = Field(None, description="the planner's last scaling decision")
    policy_hash: str | None = Field(None, description="hash of the rendered policy.yaml")


@dataclass(frozen=True)
class ParsedSpec:
    """A validated spec: how pods run, and the policy they read."""

    pods: PodFields
    policy: Policy


def _pod_part(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k in POD_FIELDS}


def parse_spec(spec: dict[str, Any] | None, *, name: str = "x") -> ParsedSpec:
    """Validate a DisaggDeployment spec (schema, cross-field and semantic rules); raise ``SpecError``."""
    spec = dict(spec or {})
    errors: list[str] = []
    pods: PodFields | None = None
    policy: Policy | None = None
    try:
        pods = PodFields.model_validate(_pod_part(spec))
    except ValidationError as exc:
        errors.extend(f"spec.{line}" for line in describe(exc).split("; "))
    try:
        policy = parse_policy(extract_policy(spec))
    except PolicyError as exc:
        errors.extend(f"spec.{line}" for line in str(exc).removeprefix("invalid policy: ").split("; "))
    if pods is not None and policy is not None:
        errors.extend(semantic_errors(pods, policy, name=name))
    if errors:
        raise SpecError(errors)
    assert pods is not None and policy is not None
    return ParsedSpec(pods=pods, policy=policy)


def _quantity(value: int | str) -> Decimal | None:
    try:
        return parse_quantity(value)
    except (ValueError, TypeError):
        return None


def _resource_errors(role: str, res: Resources) -> list[str]:
    errors = []
    for kind, values in (("requests", res.requests), ("limits", res.limits)):
        for key, value in values.items():
            if _quantity(value) is None:
                errors.append(f"spec.{role}.resources.{kind}.{key}: {value!r} is not a Kubernetes quantity")
    for key in res.requests.keys() & res.limits.keys():
        req, lim = _quantity(res.requests[key]), _quantity(res.limits[key])
        if req is not None and lim is not None and req > lim:
            errors.append(
                f"spec.{role}.resources.requests.{key}: {res.requests[key]} exceeds the limit "
                f"{res.limits[key]}"
            )
    for key, value in res.requests.items():
        # extended resources (nvidia.com/gpu, ...) cannot be overcommitted: limit required and equal
        if "/" in key and not key.startswith(("kubernetes.io/", "hugepages-")):
            if key not in res.limits:
                errors.append(f"spec.{role}.resources.limits.{key}: required when {key} is requested")
            elif _quantity(value) != _quantity(res.limits[key]):
                errors.append(
                    f"spec.{role}.resources.requests.{key}: must equal the limit for an extended resource"
                )
    return errors


def _volume_errors(role: str, pod: PodSettings) -> list[str]:
    errors = []
    names = [v.get("name") for v in pod.volumes]
    for i, vol_name in enumerate(names):
        if not isinstance(vol_name, str) or not vol_name:
            errors.append(f"spec.{role}.volumes[{i}].name: required")
        elif len(vol_name) > VOLUME_NAME_MAX:
            errors.append(f"spec.{role}.volumes[{i}].name: at most {VOLUME_NAME_MAX} characters")
        elif vol_name in RESERVED_VOLUMES:
            errors.append(f"spec.{role}.volumes[{i}].name: {vol_name!r} is reserved by the operator")
    if len(set(names)) != len(names):
        errors.append(f"spec.{role}.volumes: names must be unique")
    for i, mount in enumerate(pod.volume_mounts):
        if mount.name not in names:
            errors.append(
                f"spec.{role}.volumeMounts[{i}].name: no volume named {mount.name!r} in spec.{role}.volumes"
            )
        path = mount.mount_path.rstrip("/") or "/"
        if any(
            path == r or path.startswith(r + "/") or r.startswith(path + "/") or path == "/"
            for r in RESERVED_MOUNTS
        ):
            errors.append(
                f"spec.{role}.volumeMounts[{i}].mountPath: {mount.mount_path} overlaps a path the "
                f"operator mounts ({', '.join(RESERVED_MOUNTS)})"
            )
    return errors


def semantic_errors(pods: PodFields, policy: Policy, *, name: str) -> list[str]:
    """Rules that span the pod fields and the policy, or that the schema cannot state."""
    errors: list[str] = []
    if len(name) > MAX_NAME_LENGTH:
        errors.append(f"metadata.name: at most {MAX_NAME_LENGTH} characters (children append '-prefill')")
    if not DNS1035.match(name):
        errors.append(
            "metadata.name: must be a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter), as the router and worker Services are named after it"
        )
    if policy.autoscale.mode == "keda" and not policy.autoscale.prometheus_url:
        errors.append("spec.autoscale.prometheusUrl: required with mode keda (the ScaledObject queries it)")
    if policy.autoscale.mode in ("hpa", "keda"):
        for role in ("prefill", "decode"):
            scaling = getattr(policy.autoscale, role)
            if not scaling.scale_up.items():
                errors.append(
                    f"spec.autoscale.{role}.scaleUp: mode {policy.autoscale.mode} needs at least one "
                    f"threshold (it becomes the {policy.autoscale.mode.upper()} target)"
                )
    if policy.autoscale.mode != "off":
        for role in ("prefill", "decode"):
            if getattr(policy.autoscale, role).min_replicas < 1:
                # the planner and the HPA/KEDA triggers read the role's own pods: at zero there is no
                # signal left to scale up on (decode at zero is also an outage: the router has no worker)
                errors.append(
                    f"spec.autoscale.{role}.minReplicas: mode {policy.autoscale.mode} needs at least 1: a "
                    f"role with no pods reports no metrics, so nothing would scale it back up"
                )
    for role in ("prefill", "decode", "router"):
        pod = getattr(pods, role)
        errors.extend(_resource_errors(role, pod.resources))
        errors.extend(_volume_errors(role, pod))
    return errors


def spec_schema_json() -> dict[str, Any]:
    """The pydantic JSON schema of the whole spec (by alias), input of ``crd.build_crd``."""
    return SpecSchema.model_json_schema(by_alias=True, mode="validation")


def status_schema_json() -> dict[str, Any]:
    return StatusSchema.model_json_schema(by_alias=True, mode="validation")
