"""The real kopf operator (``disagg_operator.handlers``) against kmock's Kubernetes emulator over HTTP
on 127.0.0.1, logged in through a kubeconfig exactly as in a cluster.

What the emulator does not do, and so what this test does not prove (a real API server does it;
see ``kmock_cluster.py``): garbage collection (deleting the DisaggDeployment leaves its children;
the test only checks the owner references the garbage collector follows), server-side defaulting and
schema/CEL validation (an invalid spec reaches the operator, which is how ``InvalidSpec`` is tested),
label selectors, server-side-apply field ownership (an apply is a plain merge), and controllers
(Deployments never get pods or status: the test plays the Deployment controller once to see Ready).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
from kmock_cluster import Emulator, kubeconfig
from opkit import SMALL_SPEC

import disagg_operator.handlers as handlers
from disagg_operator.kube import reset_kube

pytestmark = pytest.mark.slow

NS = "ns"
DD_PATH = f"/apis/disagg.dev/v1alpha1/namespaces/{NS}/disaggdeployments"
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (KeyError, IndexError, TypeError, ValueError, AssertionError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.1)


def objects(emu: Emulator, plural: str) -> dict[str, dict[str, Any]]:
    return {name: obj.raw for (res, ns, name), obj in emu.objects.items()
            if res.plural == plural and ns == NS and not obj.deleted}


def children(emu: Emulator) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for plural in ("configmaps", "services", "deployments", "poddisruptionbudgets", "horizontalpodautoscalers"):
        for name, obj in objects(emu, plural).items():
            out[(plural, name)] = obj
    return out


def child_writes(emu: Emulator, since: int) -> list[str]:
    """Writes to anything but the DisaggDeployment itself (kopf keeps its own state there) and Events."""
    reqs = emu.request_log[since:]
    return [f"{r.method.value} {r.url.path}" for r in reqs if r.method in WRITE_METHODS
            and "/disaggdeployments" not in r.url.path and "/events" not in r.url.path]


def all_writes(emu: Emulator, since: int) -> list[str]:
    return [f"{r.method.value} {r.url.path}" for r in emu.request_log[since:] if r.method in WRITE_METHODS]


def dd_body(emu: Emulator) -> dict[str, Any]:
    return objects(emu, "disaggdeployments")["demo"]


def condition(emu: Emulator, type_: str) -> dict[str, Any]:
    for cond in dd_body(emu).get("status", {}).get("conditions", []):
        if cond["type"] == type_:
            return cond
    return {}


async def test_operator_reconciles_against_the_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert handlers.RECONCILE_INTERVAL <= 2, "conftest sets a 1 s reconcile timer before handlers are imported"
    async with Emulator() as emu, kmock.Server(emu, host="127.0.0.1") as server:
        emu.declare_resources()
        (tmp_path / "kubeconfig").write_text(kubeconfig(str(server.url).rstrip("/")))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop,
                                                 ready_flag=ready))
        try:
            await asyncio.wait_for(ready.wait(), 20)
            spec = copy.deepcopy(SMALL_SPEC)
            body = {"apiVersion": "disagg.dev/v1alpha1", "kind": "DisaggDeployment",
                    "metadata": {"name": "demo", "namespace": NS}, "spec": spec}
            resp = await emu.post(DD_PATH, json=body)
            assert resp.status == 201

            # 1. children appear, owned by the resource
            kids = await eventually(lambda: len(children(emu)) == 10 and children(emu), what="10 children")
            uid = dd_body(emu)["metadata"]["uid"]
            for obj in kids.values():
                [ref] = obj["metadata"]["ownerReferences"]
                assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("DisaggDeployment", "demo",
                                                                                     uid, True)
            await eventually(lambda: condition(emu, "Progressing").get("reason") == "RollingOut",
                             what="status RollingOut")
            status = dd_body(emu)["status"]
            assert status["observedGeneration"] == 1
            assert status["router"]["endpoint"] == "http://demo-router.ns.svc:8000"
            assert condition(emu, "Ready")["status"] == "False"  # no Deployment controller here
            events = objects(emu, "events")
            assert any(e["reason"] == "Created" and e["involvedObject"]["uid"] == uid for e in events.values())

            # 2. further reconciles (a 1 s timer) make no write at all
            await asyncio.sleep(0.5)
            mark = len(emu.request_log)
            await asyncio.sleep(2.5)
            timer_reads = [r for r in emu.request_log[mark:] if r.method == "GET" and "labelSelector" in r.params]
            assert timer_reads, "the timer did reconcile"
            assert all_writes(emu, mark) == []

            # 3. a spec change touches only the affected children
            mark = len(emu.request_log)
            before = children(emu)
            spec["router"] = {"replicas": 2, "port": 9000}
            resp = await emu.patch(f"{DD_PATH}/demo", json={"spec": spec},
                                   headers={"Content-Type": "application/merge-patch+json"})
            assert resp.status == 200
            await eventually(lambda: dd_body(emu)["status"]["observedGeneration"] == 2, what="generation 2")
            writes = child_writes(emu, mark)
            assert sorted(writes) == sorted([f"PATCH /apis/apps/v1/namespaces/{NS}/deployments/demo-router",
                                             f"PATCH /api/v1/namespaces/{NS}/services/demo-router"])
            after = children(emu)
            unchanged = [k for k in before if k[1] != "demo-router"]
            assert all(before[k]["metadata"]["resourceVersion"] == after[k]["metadata"]["resourceVersion"]
                       for k in unchanged)
            assert after[("services", "demo-router")]["spec"]["ports"][0]["port"] == 9000

            # 4. a child deleted by hand is restored; one edited by hand is put back
            old_uid = after[("deployments", "demo-decode")]["metadata"]["uid"]
            resp = await emu.delete(f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode")
            assert resp.status == 200
            restored = await eventually(lambda: children(emu)[("deployments", "demo-decode")], what="restored")
            assert restored["metadata"]["uid"] != old_uid
            await emu.patch(f"/api/v1/namespaces/{NS}/configmaps/demo-policy", json={"data": {"policy.yaml": "{}"}},
                            headers={"Content-Type": "application/merge-patch+json"})
            await eventually(lambda: "splitPolicy" in children(emu)[("configmaps", "demo-policy")]["data"]
                             ["policy.yaml"], what="policy restored")

            # 5. the Deployment controller reports ready pods: the resource becomes Ready
            for name in ("demo-prefill", "demo-decode", "demo-router"):
                dep = children(emu)[("deployments", name)]
                n = dep["spec"]["replicas"]
                await emu.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", json={"status": {
                    "observedGeneration": dep["metadata"]["generation"], "replicas": n, "readyReplicas": n,
                    "updatedReplicas": n, "availableReplicas": n}},
                    headers={"Content-Type": "application/merge-patch+json"})
            await eventually(lambda: condition(emu, "Ready").get("status") == "True", what="Ready")
            assert dd_body(emu)["status"]["decode"]["ready"] == "1/1"

            # 6. an invalid spec: InvalidSpec, a Warning Event, and no child touched
            await asyncio.sleep(1.2)
            mark = len(emu.request_log)
            bad = copy.deepcopy(spec)
            bad["autoscale"] = {"mode": "off", "decode": {"minReplicas": 5, "maxReplicas": 2}}
            await emu.patch(f"{DD_PATH}/demo", json={"spec": bad},
                            headers={"Content-Type": "application/merge-patch+json"})
            await eventually(lambda: condition(emu, "InvalidSpec").get("status") == "True", what="InvalidSpec")
            assert "minReplicas (5) must not exceed maxReplicas (2)" in condition(emu, "InvalidSpec")["message"]
            assert condition(emu, "Ready")["status"] == "False"
            await asyncio.sleep(1.5)
            assert child_writes(emu, mark) == []
            assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in objects(emu, "events").values())
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=20)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=5)
            reset_kube(None)
        assert task.done() and not task.cancelled(), "the operator did not stop on its stop flag"
        assert task.exception() is None
