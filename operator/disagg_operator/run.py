"""``disagg operator``: run the kopf operator (``main(argv)``), serving its metrics.

Equivalent to ``kopf run -A --standalone operator/disagg_operator/handlers.py`` plus a Prometheus
endpoint. Only one replica may run: ``--standalone`` (no kopf peering); the chart uses a single
replica with the Recreate strategy.
"""

from __future__ import annotations

import argparse
import logging
import os

from disagg_operator import metrics
from disagg_worker.argtypes import port, positive


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disagg operator", description="Run the DisaggDeployment operator.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); needs only namespaced RBAC",
    )
    p.add_argument("--metrics-port", type=port, default=8080, help="Prometheus /metrics port; 0 disables")
    p.add_argument("--metrics-addr", default="0.0.0.0", help="address the metrics server binds")
    p.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz",
    )
    p.add_argument(
        "--reconcile-interval",
        type=positive(float),
        default=None,
        help="seconds between periodic reconciles (default 60)",
    )
    p.add_argument("--verbose", action="store_true", help="log more (kopf's verbose mode)")
    p.add_argument("--debug", action="store_true", help="log everything (kopf's debug mode)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reconcile_interval is not None:
        os.environ["DISAGG_RECONCILE_INTERVAL_SECONDS"] = str(args.reconcile_interval)
    import kopf  # after the environment is set: handlers read it at import

    from disagg_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, debug=args.debug)
    logging.getLogger("disagg_operator").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_addr)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
