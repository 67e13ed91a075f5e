"""The spec schema, the generated CRD, CEL rules vs their pydantic twins, and the examples."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from opkit import CHART_DIR, CRD_PATH, EXAMPLES, ROOT, api_server_errors, apply_defaults, cel_errors, crd_schema, dd

from disagg_operator.crd import build_crd, render_crd_yaml
from disagg_operator.spec import MAX_NAME_LENGTH, SpecError, parse_spec
from disagg_worker.policy import Autoscale, PolicyError, load_policy


def test_import_operator_is_the_standard_library_from_the_repo_root() -> None:
    out = subprocess.run([sys.executable, "-c", "import operator, sys; print(operator.__file__); "
                          "assert operator.itemgetter(0)([7]) == 7"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert str(ROOT / "operator") not in out.stdout
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_operator_imports_stay_light() -> None:
    """The operator image installs only kopf, kubernetes, pydantic, pyyaml and prometheus-client."""
    code = ("import sys, disagg_operator.handlers, disagg_operator.run, disagg_operator.crd; "
            "heavy = [m for m in ('torch', 'transformers', 'grpc', 'numpy', 'fastapi', 'matplotlib', 'rich') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_committed_crd_is_generated_from_the_models() -> None:
    assert CRD_PATH.read_text() == render_crd_yaml(), "regenerate: python -m disagg_operator.crd > " + str(CRD_PATH)


def test_chart_ships_the_same_crd() -> None:
    assert (CHART_DIR / "crds" / CRD_PATH.name).read_text() == CRD_PATH.read_text()


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_crd_is_a_valid_customresourcedefinition(version: str) -> None:
    kubernetes_validate.validate(build_crd(), version, strict=True)


def test_crd_shape() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["dd"] and names["kind"] == "DisaggDeployment"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Prefill": ".status.prefill.ready", "Decode": ".status.decode.ready",
                       "Router": ".status.router.endpoint", "Ready": '.status.conditions[?(@.type=="Ready")].status',
                       "Mode": ".spec.autoscale.mode", "Age": ".metadata.creationTimestamp"}


def _walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, prop in (schema.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_every_node_typed_and_every_scalar_bounded_or_enumerated() -> None:
    spec = crd_schema()["properties"]["spec"]
    for path, node in _walk(spec):
        assert "$ref" not in node and "title" not in node and "allOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is None, path
    leaves = [(p, n) for p, n in _walk(spec) if n.get("type") in ("integer", "number") and "{}" not in p]
    assert leaves
    for path, node in leaves:
        assert "minimum" in node, f"{path} has no lower bound"


def test_every_default_in_the_crd_is_valid_for_its_own_node() -> None:
    """The API server checks each ``default`` against the schema node it sits on (types, bounds,
    ``required``, CEL rules) and refuses the whole CRD otherwise: ``status.lastScale: default {}`` with
    required fields once made ``kubectl apply -f crds/`` fail."""
    checked = 0
    for path, node in _walk(crd_schema()):
        if "default" not in node:
            continue
        checked += 1
        errors = [e.message for e in jsonschema.Draft4Validator(node).iter_errors(node["default"])]
        assert errors == [] and cel_errors(node, node["default"]) == [], (path, node["default"], errors)
    assert checked > 20


def test_api_server_defaults_and_pydantic_defaults_agree() -> None:
    schema = crd_schema()
    for spec in ({}, {"autoscale": {"decode": {"minReplicas": 2}}}, {"prefill": {"replicas": 3}},
                 {"autoscale": {"prefill": {}, "decode": {"maxReplicas": 30, "scaleDown": {"queueLength": 1}}}}):
        defaulted = apply_defaults(schema, dd(spec=copy.deepcopy(spec)))["spec"]
        assert parse_spec(defaulted) == parse_spec(spec), spec


@pytest.mark.parametrize("path", sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name != "policy-local.yaml"))
def test_examples_pass_the_api_server_and_the_operator(path: str) -> None:
    obj = yaml.safe_load((EXAMPLES / path).read_text())
    assert api_server_errors(obj) == []
    parsed = parse_spec(obj["spec"], name=obj["metadata"]["name"])
    assert parsed.policy == load_policy(EXAMPLES / path)


def test_local_policy_example_loads() -> None:
    policy = load_policy(EXAMPLES / "policy-local.yaml")
    assert policy.model.name == "tiny-llama"
    assert parse_spec(yaml.safe_load((EXAMPLES / "policy-local.yaml").read_text())).policy == policy


INVALID = [
    ({"autoscale": {"prefill": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
    ({"autoscale": {"decode": {"scaleUp": {"queueLength": 4}, "scaleDown": {"queueLength": 4}}}}, "queueLength"),
    ({"autoscale": {"metricsSource": "prometheus"}}, "prometheusUrl"),
    ({"autoscale": {"mode": "keda"}}, "prometheusUrl"),
    ({"autoscale": {"mode": "hpa", "prefill": {"minReplicas": 0, "maxReplicas": 2,
                                               "scaleUp": {"queueLength": 3}}}}, "minReplicas"),
    # (a role written in part keeps its default thresholds: here they are written away)
    ({"autoscale": {"mode": "hpa", "decode": {"minReplicas": 1, "maxReplicas": 2, "scaleUp": {}}}}, "scaleUp"),
    # at zero pods there are no metrics: nothing would ever scale the role back up
    ({"autoscale": {"decode": {"minReplicas": 0, "maxReplicas": 2}}}, "minReplicas"),
    ({"autoscale": {"mode": "keda", "prometheusUrl": "http://p:9090", "prefill": {
        "minReplicas": 0, "maxReplicas": 2, "scaleUp": {"queueLength": 3}}}}, "minReplicas"),
    ({"decode": {"volumeMounts": [{"name": "models", "mountPath": "/models"}]}}, "volumeMounts"),
    ({"prefill": {"replicas": -1}}, "replicas"),
    ({"router": {"port": 70000}}, "port"),
    ({"autoscale": {"mode": "sometimes"}}, "mode"),
    ({"qos": {"ttftSloMs": 0}}, "ttftSloMs"),
    ({"prefill": {"dtype": "int3"}}, "dtype"),
    ({"prefill": {"gpus": 2}}, "gpus"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID, ids=[f for _, f in INVALID])
def test_invalid_specs_are_refused_by_both_with_the_field_named(spec: dict[str, Any], field: str) -> None:
    errors = api_server_errors(dd(spec=spec))
    assert errors and any(field in e for e in errors), errors
    with pytest.raises(SpecError) as exc:
        parse_spec(spec)
    assert field in str(exc.value)


SEMANTIC_ONLY = [
    ({"prefill": {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}}, "exceeds the limit"),
    ({"decode": {"resources": {"requests": {"nvidia.com/gpu": 1}}}}, "limits.nvidia.com/gpu"),
    ({"decode": {"resources": {"requests": {"memory": "lots"}}}}, "not a Kubernetes quantity"),
    ({"decode": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "reserved"),
    ({"decode": {"volumes": [{"name": "m", "emptyDir": {}}], "volumeMounts": [{"name": "m", "mountPath": "/tmp"}]}},
     "overlaps"),
]


@pytest.mark.parametrize(("spec", "message"), SEMANTIC_ONLY, ids=[m for _, m in SEMANTIC_ONLY])
def test_semantic_errors_the_schema_cannot_express(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(spec)
    assert message in str(exc.value)


def test_names_must_fit_children_and_dns() -> None:
    parse_spec({}, name="a" * MAX_NAME_LENGTH)
    with pytest.raises(SpecError, match="at most"):
        parse_spec({}, name="a" * (MAX_NAME_LENGTH + 1))
    assert any("at most" in e for e in api_server_errors(dd(name="a" * (MAX_NAME_LENGTH + 1))))
    with pytest.raises(SpecError, match="DNS-1035"):
        parse_spec({}, name="9lives")


# ---- CEL rules and their pydantic twins agree --------------------------------------------------

thresholds = st.fixed_dictionaries({}, optional={
    "queueLength": st.integers(1, 20), "gpuUtilization": st.integers(1, 100), "kvCacheUsage": st.integers(1, 100)})
role_autoscale = st.fixed_dictionaries({}, optional={
    "minReplicas": st.integers(0, 6), "maxReplicas": st.integers(1, 6), "scaleUp": thresholds, "scaleDown": thresholds})


def _role_schema() -> dict[str, Any]:
    return crd_schema()["properties"]["spec"]["properties"]["autoscale"]["properties"]["prefill"]


@settings(max_examples=300, deadline=None)
@given(role_autoscale)
def test_role_autoscale_cel_matches_pydantic(data: dict[str, Any]) -> None:
    schema = _role_schema()
    cel_ok = not cel_errors(schema, apply_defaults(schema, copy.deepcopy(data)))
    try:
        Autoscale.model_validate({"prefill": data})  # a role written in part: the rest from its defaults
        pydantic_ok = True
    except ValueError:
        pydantic_ok = False
    assert cel_ok == pydantic_ok, data


autoscale_top = st.fixed_dictionaries({
    "mode": st.sampled_from(["builtin", "hpa", "keda", "off"]),
    "metricsSource": st.sampled_from(["pods", "prometheus"]),
}, optional={
    "prometheusUrl": st.just("http://prometheus:9090"),
    "prefill": st.fixed_dictionaries({"minReplicas": st.integers(0, 2), "maxReplicas": st.just(4)},
                                     optional={"scaleUp": st.sampled_from([{}, {"queueLength": 8}])}),
})


@settings(max_examples=200, deadline=None)
@given(autoscale_top)
def test_autoscale_cel_matches_the_operator(data: dict[str, Any]) -> None:
    spec = {"autoscale": data}
    cel_ok = not api_server_errors(dd(spec=copy.deepcopy(spec)))
    try:
        parse_spec(spec)
        ok = True
    except (SpecError, PolicyError):
        ok = False
    assert cel_ok == ok, data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=3, unique=True),
       st.lists(st.sampled_from(["a", "b", "c"]), max_size=3))
def test_volume_mount_cel_matches_the_operator(volumes: list[str], mounts: list[str]) -> None:
    role = {"volumes": [{"name": v, "emptyDir": {}} for v in volumes],
            "volumeMounts": [{"name": m, "mountPath": f"/data/{i}"} for i, m in enumerate(mounts)]}
    spec = {"decode": role}
    cel_ok = not api_server_errors(dd(spec=spec))
    try:
        parse_spec(spec)
        ok = True
    except SpecError:
        ok = False
    assert cel_ok == ok == set(mounts).issubset(volumes)


_MACRO = re.compile(r"(self(?:\.\w+)+)\.(?:all|exists|exists_one|filter|map)\((\w+),")
_CHAIN = re.compile(r"\b(\w+)((?:\.\w+)+)")
_FUNCTIONS = {"all", "exists", "exists_one", "filter", "map", "size", "startsWith", "endsWith", "matches"}


def _resolve(schema: dict[str, Any], fields: list[str]) -> str | None:
    """Follow declared properties (and list items); the first field CEL could not see, if any."""
    for name in fields:
        if name in _FUNCTIONS:
            return None
        if schema.get("type") == "array":
            schema = schema["items"]
        props = schema.get("properties") or {}
        if name not in props:
            return name
        schema = props[name]
    return None


def _rules(schema: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    out = [(schema, r["rule"]) for r in schema.get("x-kubernetes-validations", [])]
    for prop in (schema.get("properties") or {}).values():
        out += _rules(prop)
    if "items" in schema:
        out += _rules(schema["items"])
    return out


def test_cel_rules_read_only_declared_fields() -> None:
    """The API server compiles CEL against the declared schema: a field kept by
    x-kubernetes-preserve-unknown-fields is invisible to it, and a rule naming one makes the CRD
    itself fail to install ("undefined field"). cel-python (used above) is untyped and cannot see that."""
    problems = []
    for scope, rule in _rules(crd_schema()):
        bound = {var: path.split(".")[1:] for path, var in _MACRO.findall(rule)}
        for head, tail in _CHAIN.findall(rule):
            fields = tail.split(".")[1:]
            if head == "self":
                if fields[:1] == ["metadata"] and fields[1:2] in (["name"], ["generateName"]):
                    continue
                missing = _resolve(scope, fields)
            elif head in bound:
                items_of = _resolve(scope, bound[head])
                assert items_of is None, (rule, head)
                node = scope
                for name in bound[head]:
                    node = node["properties"][name]
                missing = _resolve(node["items"], fields)
            else:
                continue
            if missing is not None:
                problems.append(f"{rule!r}: {head}{tail} reads undeclared field {missing!r}")
    assert not problems, problems
