"""The DisaggDeployment CustomResourceDefinition, generated from the pydantic models in ``spec``.

``build_crd()`` turns pydantic's JSON schema into a Kubernetes *structural* schema: ``$ref`` inlined,
``Optional`` unwrapped, JSON-Schema-2020 ``exclusiveMinimum`` rewritten to OpenAPI v3.0's boolean
form, ``title``/``additionalProperties: false`` dropped (the API server prunes unknown fields),
``null`` removed from defaults, and ``default: {}`` on nested objects so the API server materialises
their defaults. CEL rules (``x-kubernetes-validations``) are attached per model from ``CEL_RULES``;
each mirrors a pydantic validator or a check in ``spec.semantic_errors``.

``crds/disaggdeployments.disagg.dev.yaml`` and the chart's copy are this function's output; a test
keeps them equal. Regenerate both (e.g. after a change to ``disagg_worker.policy``) with
``python -m disagg_operator.crd --write``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from disagg_operator import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from disagg_operator.spec import MAX_NAME_LENGTH, spec_schema_json, status_schema_json
from disagg_worker.policy import ROLE_DEFAULTS

_METRICS = ("queueLength", "gpuUtilization", "kvCacheUsage")


def _threshold_rule(metric: str) -> dict[str, str]:
    return {
        "rule": (
            f"!has(self.scaleUp) || !has(self.scaleDown) || !has(self.scaleUp.{metric}) || "
            f"!has(self.scaleDown.{metric}) || self.scaleDown.{metric} < self.scaleUp.{metric}"
        ),
        "message": f"scaleDown.{metric} must be below scaleUp.{metric}",
        "fieldPath": f".scaleDown.{metric}",
    }


# Cross-field rules, by pydantic model name. Each has a twin in pydantic (policy.RoleAutoscale /
# policy.Autoscale validators) or in spec.semantic_errors; tests check that the twins agree.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "RoleAutoscale": [
        {
            "rule": "self.minReplicas <= self.maxReplicas",
            "message": "minReplicas must not exceed maxReplicas",
            "fieldPath": ".minReplicas",
        },
        *[_threshold_rule(m) for m in _METRICS],
    ],
    "Autoscale": [
        {
            "rule": "self.metricsSource != 'prometheus' || has(self.prometheusUrl)",
            "message": "metricsSource prometheus needs prometheusUrl",
            "fieldPath": ".prometheusUrl",
        },
        {
            "rule": "self.mode != 'keda' || has(self.prometheusUrl)",
            "message": "mode keda needs prometheusUrl (the ScaledObject queries it)",
            "fieldPath": ".prometheusUrl",
        },
        {
            "rule": "self.mode == 'off' || (self.prefill.minReplicas >= 1 && self.decode.minReplicas >= 1)",
            "message": "autoscaling needs minReplicas >= 1: a role with no pods reports no metrics, so nothing "
                       "would scale it back up",
            "fieldPath": ".mode",
        },
        *[
            {
                "rule": (
                    f"!(self.mode in ['hpa', 'keda']) || (has(self.{role}.scaleUp) && ("
                    + " || ".join(f"has(self.{role}.scaleUp.{m})" for m in _METRICS)
                    + "))"
                ),
                "message": f"mode hpa/keda needs a {role}.scaleUp threshold (it becomes the target)",
                "fieldPath": f".{role}.scaleUp",
            }
            for role in ("prefill", "decode")
        ],
    ],
    "WorkerSpec": [
        {
            "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
            "self.volumes.exists(v, has(v.name) && v.name == m.name))",
            "message": "every volumeMounts[].name must name a volume in volumes",
            "fieldPath": ".volumeMounts",
        },
    ],
    "RouterSpec": [
        {
            "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
            "self.volumes.exists(v, has(v.name) && v.name == m.name))",
            "message": "every volumeMounts[].name must name a volume in volumes",
            "fieldPath": ".volumeMounts",
        },
    ],
}
ROOT_RULES: list[dict[str, str]] = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (children append '-prefill')",
    },
]

# Descriptions for policy fields that ``disagg_worker.policy`` leaves undocumented (kubectl explain).
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("DisaggDeploymentSpec", "model"): "the model: a built-in preset name, or a path to a local HF directory",
    (
        "DisaggDeploymentSpec",
        "splitPolicy",
    ): "how the router picks decode workers and when prefill is offloaded",
    ("DisaggDeploymentSpec", "cache"): "prefix-cache reuse settings",
    ("DisaggDeploymentSpec", "autoscale"): "per-role autoscaling (builtin planner, HPA, KEDA or off)",
    ("DisaggDeploymentSpec", "qos"): "admission control, priorities and SLOs",
    ("DisaggDeploymentSpec", "kvTransfer"): "KV-cache transfer between prefill and decode workers",
    ("Autoscale", "mode"): "builtin: the operator's planner; hpa / keda: render an HPA / ScaledObject; "
    "off: static replicas from the role's replicas",
    ("Autoscale", "intervalSeconds"): "how often the builtin planner reads metrics and decides",
    ("Autoscale", "metricsSource"): "pods: scrape each ready pod's /metrics; prometheus: query prometheusUrl",
    ("Autoscale", "prometheusUrl"): "base URL of a Prometheus HTTP API (metricsSource prometheus, mode keda)",
    ("Autoscale", "drainTimeoutSeconds"): "how long a decode pod may finish running requests before it stops",
    ("RoleAutoscale", "minReplicas"): "fewest replicas the autoscaler keeps",
    ("RoleAutoscale", "maxReplicas"): "most replicas the autoscaler creates",
    ("RoleAutoscale", "scaleUp"): "scale up when ANY of these per-pod averages is exceeded",
    ("RoleAutoscale", "scaleDown"): "scale down only when ALL of these per-pod averages hold (are below)",
    ("RoleAutoscale", "scaleUpStabilizationSeconds"): "a scale-up signal must last this long",
    ("RoleAutoscale", "scaleDownStabilizationSeconds"): "a scale-down signal must last this long",
    ("RoleAutoscale", "cooldownSeconds"): "no further change for this long after a change, except a "
    "further scale-up after a scale-up (builtin planner)",
    ("RoleAutoscale", "scaleDownForecastSeconds"): "builtin planner: while the load trends up (over the "
    "last 15 min), a scale-down keeps the pods the trend needs this many seconds ahead, and until 5 min of "
    "history give a trend, scale-downs hold; 0 turns it off",
    ("Thresholds", "queueLength"): "waiting requests per pod, a mean over the interval "
    "(rate of disagg_requests_waiting_seconds_total)",
    ("Thresholds", "gpuUtilization"): "percent busy, a mean over the interval "
    "(100 x rate of disagg_busy_seconds_total)",
    ("Thresholds", "kvCacheUsage"): "percent of KV blocks in use, a mean over the interval "
    "(100 x rate of disagg_kv_cache_usage_seconds_total)",
}


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _structural(node: dict[str, Any], defs: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and its children) into a structural-schema node."""
    node = dict(node)
    ref_name = None
    if "$ref" in node:  # {"$ref": ..., "description": ..., "default": ...}: inline, siblings win
        ref_name = node.pop("$ref").rsplit("/", 1)[-1]
        node = {**defs[ref_name], **node}
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express anyOf {branches} structurally")
        if node.get("default", ...) is None:
            node.pop("default")
        inner = _structural(branches[0], defs)
        node = {**inner, **{k: v for k, v in node.items() if k != "title"}}
        ref_name = ref_name or inner.pop("x-model", None)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs", "x-model"):
            continue
        if key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _structural(value, defs)
            continue
        if key == "properties":
            props = {}
            for name, sub in value.items():
                prop = _structural(sub, defs)
                model_name = ref_name or node.get("title")
                if (model_name, name) in DESCRIPTIONS:
                    prop["description"] = DESCRIPTIONS[(model_name, name)]
                props[name] = prop
            out[key] = props
            continue
        if key == "items":
            out[key] = _structural(value, defs)
            continue
        if key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "default":
            out[key] = _strip_nulls(value)
            continue
        out[key] = value
    if out.get("type") == "object" and "properties" in out:
        for name, prop in out["properties"].items():  # materialise nested defaults
            # an object with required fields has no valid empty default (the API server checks every
            # default against its node and refuses the CRD): it stays absent until it is written whole
            if prop.get("type") == "object" and "properties" in prop and "default" not in prop \
                    and not prop.get("required"):
                prop["default"] = {}
            if name in out.get("required", []):
                prop.pop("default", None)
    model_name = ref_name or model
    if model_name and model_name in CEL_RULES:
        out["x-kubernetes-validations"] = copy.deepcopy(CEL_RULES[model_name])
    if ref_name:
        out["x-model"] = ref_name  # consumed by the caller (anyOf unwrapping); removed below
    first = [k for k in ("type", "description") if k in out]
    return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _clean(v) for k, v in node.items() if k != "x-model"}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def structural_schema(pydantic_schema: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    defs = pydantic_schema.get("$defs", {})
    return _clean(_structural(pydantic_schema, defs, model))


def _with_role_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """Each autoscale role's fields default to that role's values (``ROLE_DEFAULTS``), not to the generic
    ``RoleAutoscale``'s: the API server then fills ``prefill: {maxReplicas: 6}`` as the policy does."""
    roles = spec["properties"]["autoscale"]["properties"]
    for role, default in ROLE_DEFAULTS.items():
        props = roles[role]["properties"]
        values = default.model_dump(by_alias=True, exclude_none=True)
        roles[role]["default"] = values
        for name, value in values.items():
            props[name]["default"] = value
        for thresholds in ("scaleUp", "scaleDown"):  # given, it replaces the default's whole
            for sub in props[thresholds]["properties"].values():
                sub.pop("default", None)
    return spec


def open_api_schema() -> dict[str, Any]:
    spec = _with_role_defaults(structural_schema(spec_schema_json(), "DisaggDeploymentSpec"))
    spec["description"] = (
        "Desired state: the model, how the prefill/decode/router pods run, and the serving "
        "policy they read (rendered into the <name>-policy ConfigMap)."
    )
    status = structural_schema(status_schema_json(), "StatusSchema")
    status["description"] = "Observed state, written by the operator."
    return {
        "type": "object",
        "description": "A disaggregated LLM serving deployment: prefill and decode pools and a router.",
        "required": ["spec"],
        "x-kubernetes-validations": copy.deepcopy(ROOT_RULES),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Prefill",
        "type": "string",
        "jsonPath": ".status.prefill.ready",
        "description": "ready/desired prefill workers",
    },
    {
        "name": "Decode",
        "type": "string",
        "jsonPath": ".status.decode.ready",
        "description": "ready/desired decode workers",
    },
    {
        "name": "Router",
        "type": "string",
        "jsonPath": ".status.router.endpoint",
        "description": "the router's OpenAI-compatible endpoint",
    },
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {
        "name": "Mode",
        "type": "string",
        "jsonPath": ".spec.autoscale.mode",
        "priority": 1,
        "description": "autoscale mode",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "disagg", "app.kubernetes.io/part-of": "disagg"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["disagg"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m disagg_operator.crd` from operator/disagg_operator/spec.py; do not edit.\n"
    "# Requires Kubernetes >= 1.25 (CEL validation rules).\n"
)


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


CRD_FILE = f"{PLURAL}.{GROUP}.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render_crd_yaml()
    if "--write" not in argv:
        sys.stdout.write(text)
        return 0
    root = Path(__file__).resolve().parents[2]
    for target in (root / "crds" / CRD_FILE, root / "charts" / "disagg-operator" / "crds" / CRD_FILE):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"Wrote {target.relative_to(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
