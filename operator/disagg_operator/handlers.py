"""Thin kopf handlers: every trigger calls ``reconcile.reconcile`` for the DisaggDeployment.

Triggers: create / update / resume of a DisaggDeployment, a periodic timer, and changes to its
children (a Deployment, Service or ConfigMap edited or deleted by hand, or a Deployment whose
status changed) — found through the owner reference and an index of DisaggDeployments. One lock per
resource serialises them. The built-in autoscaler runs as a daemon per resource (``planner``).

Run with ``disagg operator``, ``python -m disagg_operator``, or
``kopf run -A operator/disagg_operator/handlers.py`` (imports are absolute for that reason).
Settings read from the environment at import: ``DISAGG_RECONCILE_INTERVAL_SECONDS`` (timer, 60),
``DISAGG_RETRY_DELAY_SECONDS`` (after a transient API error, 10).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from disagg_operator import API_VERSION, GROUP, KIND, PLURAL, VERSION, metrics, planner
from disagg_operator import kube as kube_mod
from disagg_operator.builders import LABEL_MANAGED_BY, MANAGED_BY
from disagg_operator.reconcile import reconcile

RECONCILE_INTERVAL = float(os.environ.get("DISAGG_RECONCILE_INTERVAL_SECONDS", "60"))
RETRY_DELAY = float(os.environ.get("DISAGG_RETRY_DELAY_SECONDS", "10"))
CHILDREN_LABELS = {LABEL_MANAGED_BY: MANAGED_BY}

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf keeps its state in annotations, so .status stays the operator's (and the CRD's schema's)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.posting.level = logging.WARNING  # our Events come from reconcile; kopf posts only problems
    settings.scanning.disabled = True  # no CRD/namespace scanning: no cluster-wide RBAC for them
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """Log kopf in with the same configuration ``kube`` uses (in-cluster, else $KUBECONFIG)."""
    config = kube_mod.load_configuration()
    kube_mod.reset_kube(kube_mod.Kube(config))
    token = kube_mod.bearer_token(config)
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        username=config.username or None,
        password=config.password or None,
    )


# The newest spec generation reconciled per resource: a child event reconciles with the index's copy
# of its owner, which may predate a spec change handled meanwhile; it must not roll that back.
_newest_generation: dict[str, int] = {}


def run_reconcile(body: Mapping[str, Any], logger: Any) -> None:
    """Reconcile one resource, serialised per resource; API errors become kopf retries."""
    uid = body.get("metadata", {}).get("uid", "")
    generation = int(body.get("metadata", {}).get("generation") or 0)
    with _lock(uid):
        if generation < _newest_generation.get(uid, 0):
            logger.debug("Skipping a reconcile of generation %s: %s is newer", generation, _newest_generation[uid])
            return
        _newest_generation[uid] = generation
        try:
            result = reconcile(body, kube_mod.get_kube(), logger=logger)
        except kube_mod.ApiError as exc:
            metrics.RECONCILES.labels("retry" if exc.transient else "error").inc()
            if exc.transient:
                raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY) from exc
            raise kopf.PermanentError(str(exc)) from exc
    for action in result.actions:
        metrics.CHILD_WRITES.labels(action.verb, action.kind).inc()
    outcome = "invalid" if result.invalid else "degraded" if result.apply_error else "ok"
    metrics.RECONCILES.labels(outcome).inc()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_change(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    run_reconcile(body, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL, initial_delay=RECONCILE_INTERVAL)
def on_timer(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    run_reconcile(body, logger)


@kopf.index(GROUP, VERSION, PLURAL)
def disagg_by_uid(body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {body.metadata.uid: copy.deepcopy(dict(body))}


@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN_LABELS)
@kopf.on.event("v1", "services", labels=CHILDREN_LABELS)
@kopf.on.event("v1", "configmaps", labels=CHILDREN_LABELS)
def on_child_event(
    event: Mapping[str, Any],
    body: kopf.Body,
    disagg_by_uid: kopf.Index[str, dict[str, Any]],
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A child was edited, deleted, or its status changed: reconcile its owner (not retried; the
    timer catches up after a failure)."""
    if event.get("type") not in ("MODIFIED", "DELETED"):
        return  # initial listing and our own creations
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("apiVersion") != API_VERSION or ref.get("kind") != KIND:
            continue
        for parent in disagg_by_uid.get(ref.get("uid"), []):
            if parent.get("metadata", {}).get("deletionTimestamp"):
                continue
            try:
                run_reconcile(parent, logger)
            except (kopf.TemporaryError, kopf.PermanentError) as exc:
                logger.warning("Reconcile after a child event failed: %s", exc)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def autoscaler(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
    """The built-in planner loop (idle unless ``autoscale.mode`` is ``builtin``); async so that stopping
    the operator cancels it at once."""
    uid = body.metadata.uid
    try:
        await planner.run_loop(body, stopped, logger, lock=_lock(uid))
    finally:  # the resource is gone (or the operator stops): nothing of it is kept per uid
        with _locks_guard:
            _locks.pop(uid, None)
        _newest_generation.pop(uid, None)
