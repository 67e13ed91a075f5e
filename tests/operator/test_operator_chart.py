"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk, Helm v4's Go SDK)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from opkit import CHART_DIR

from disagg_operator.kube import required_permissions

NAMESPACE = "disagg-system"
VALUES_FILES = ["default", *sorted(p.name for p in (CHART_DIR / "ci").glob("*.yaml"))]


def values_for(name: str) -> dict[str, Any]:
    return {} if name == "default" else yaml.safe_load((CHART_DIR / "ci" / name).read_text()) or {}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name="disagg", namespace=NAMESPACE)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_there_are_at_least_two_other_values_files() -> None:
    assert len(VALUES_FILES) >= 3


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_lints_clean(values_file: str) -> None:
    report = helm_python.lint(CHART_DIR, values_for(values_file), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_manifests_validate_against_kubernetes_schemas(values_file: str) -> None:
    docs = render(values_for(values_file))
    assert any(d["kind"] == "Deployment" for d in docs)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.30", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] == "ServiceMonitor"  # a Prometheus-operator CRD: no upstream schema
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "disagg-operator"
        assert labels["app.kubernetes.io/instance"] == "disagg"


@pytest.mark.parametrize("bad", [{"imageTag": "x"}, {"image": {"repository": "r", "pullPolicy": "Sometimes"}},
                                 {"watchNamespaces": ["Not_A_Namespace"]}, {"operator": {"logLevel": "loud"}}])
def test_values_schema_refuses_typos_and_bad_values(bad: dict[str, Any]) -> None:
    with helm_python.Chart.load(CHART_DIR) as chart, pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(bad)


def _granted(docs: list[dict[str, Any]], kind: str) -> set[tuple[str, str, str]]:
    granted = set()
    for doc in docs:
        if doc["kind"] == kind:
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for res in rule["resources"]:
                        for verb in rule["verbs"]:
                            granted.add((group, res, verb))
    return granted


def _needed() -> set[tuple[str, str, str]]:
    return {(g, r, v) for (g, r), verbs in required_permissions().items() for v in verbs}


def test_cluster_rbac_grants_exactly_what_the_operator_uses() -> None:
    granted = _granted(render({}), "ClusterRole")
    assert granted == _needed()
    assert not [g for g in granted if g[1] == "secrets" or "*" in g]


def test_namespaced_mode_uses_roles_and_namespace_flags() -> None:
    docs = render(values_for("namespaced-values.yaml"))
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["inference", "staging"]
    assert _granted(roles[:1], "Role") == _needed()
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {NAMESPACE}
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=inference" in args and "--namespace=staging" in args and "--all-namespaces" not in args
    assert "--verbose" in args


def test_operator_pod_is_locked_down_and_probed() -> None:
    [dep] = [d for d in render({}) if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"] == ["python", "-m", "disagg_operator"]
    assert "--all-namespaces" in c["args"] and "--metrics-port=8080" in c["args"]
    assert c["livenessProbe"]["httpGet"]["port"] == "health"
    assert c["image"] == "ghcr.io/disagg/disagg-operator:0.1.0"
    selector = dep["spec"]["selector"]["matchLabels"]
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}


def test_monitoring_values_render_service_monitor_and_dashboard() -> None:
    docs = render(values_for("monitoring-values.yaml"))
    kinds = {d["kind"] for d in docs}
    assert "ServiceMonitor" in kinds
    # one scrape of the operator, not two: no scrape annotations beside the ServiceMonitor
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert "prometheus.io/scrape" not in (service["metadata"].get("annotations") or {})
    [plain] = [d for d in render({}) if d["kind"] == "Service"]
    assert plain["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    [dash] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert dash["metadata"]["namespace"] == "monitoring"
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dash["data"]["disagg.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    # the planner's readings as it reads them: means over a window, from the time integrals
    for metric in ("disagg_requests_waiting_seconds_total", "disagg_requests_running",
                   "disagg_kv_cache_usage_seconds_total", "disagg_prefix_cache_hit_tokens_total",
                   "disagg_busy_seconds_total", "disagg_draining",
                   "disagg_scale_decisions_total", "disagg_desired_replicas"):
        assert metric in exprs
    # the operator labels its series with the DisaggDeployment's namespace, which the dashboard
    # filters on; Prometheus keeps that label only with honorLabels
    [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert all(e["honorLabels"] is True for e in monitor["spec"]["endpoints"])
    assert 'namespace=~"$namespace"' in exprs


def test_minimal_values_use_an_existing_service_account() -> None:
    docs = render(values_for("minimal-values.yaml"))
    assert {d["kind"] for d in docs} == {"Deployment"}
    [dep] = docs
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "disagg-operator"


def test_every_values_key_has_a_comment() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9_]*):")
    missing = []
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].lstrip().startswith("# --"):
            j -= 1  # continuation lines of a multi-line comment
        if j < 0 or not lines[j].lstrip().startswith("# --"):
            missing.append(m.group(2))
    assert missing == []


def test_chart_files_are_complete() -> None:
    for rel in ("Chart.yaml", "values.yaml", "values.schema.json", "templates/_helpers.tpl", "templates/NOTES.txt",
                "crds/disaggdeployments.disagg.dev.yaml", "files/grafana-dashboard.json"):
        assert (CHART_DIR / rel).is_file(), rel
    helpers = Path(CHART_DIR / "templates" / "_helpers.tpl").read_text()
    for name in ("name", "fullname", "chart", "labels", "selectorLabels", "serviceAccountName"):
        assert f'define "disagg-operator.{name}"' in helpers


def _exported_series() -> dict[str, str]:
    """Every series name the processes export, with its family's type (counter, gauge, histogram)."""
    from prometheus_client import REGISTRY as WORKER_REGISTRY

    import disagg_worker.metrics as worker_metrics
    from disagg_operator.metrics import REGISTRY as OPERATOR_REGISTRY

    series: dict[str, str] = {}
    families = [*WORKER_REGISTRY.collect(), *OPERATOR_REGISTRY.collect(), *worker_metrics.ESTIMATED_TTFT.collect()]
    for family in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            series[family.name + suffix] = family.type
    return series


def test_every_dashboard_query_reads_series_that_exist_with_functions_their_type_allows() -> None:
    dashboard = json.loads((CHART_DIR / "files" / "grafana-dashboard.json").read_text())
    exported = _exported_series()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    for expr in exprs:
        for name in re.findall(r"\b(disagg_[a-z_]+)\b", expr):
            assert name in exported, (name, expr)
        for name in re.findall(r"\brate\((disagg_[a-z_]+)", expr):
            assert exported[name] != "gauge", f"rate() of the gauge {name}: {expr}"
        for name in re.findall(r"histogram_quantile\([^,]+,[^()]*\(rate\((disagg_[a-z_]+)", expr):
            assert name.endswith("_bucket"), expr


@pytest.mark.parametrize(("values", "message"), [
    ({"metrics": {"port": 8081}, "operator": {"healthPort": 8081}}, "both 8081"),  # the operator exited 1
    ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, "needs metrics.service"),
])
def test_values_that_would_break_the_install_fail_to_render(values: dict[str, Any], message: str) -> None:
    with helm_python.Chart.load(CHART_DIR) as chart, pytest.raises(helm_python.HelmRenderError, match=message):
        chart.render(values, name="disagg", namespace=NAMESPACE)


def test_prometheus_durations_and_notes_for_namespaced_mode() -> None:
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema({"metrics": {"serviceMonitor": {"interval": "1m30s"}}})
        notes = chart.render({"watchNamespaces": ["team-a", "team-b"]}, name="disagg", namespace=NAMESPACE)
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    # a DisaggDeployment applied to the current namespace is never reconciled in namespaced mode
    assert "kubectl -n team-a apply -f examples/small.yaml" in text
