"""A worker's small HTTP side: Prometheus ``/metrics``, ``/health``, ``/ready`` and ``/drain``.

``/health`` is liveness (the engine thread runs, and no step has run for over ``STUCK_STEP_SECONDS``).
``/ready`` is readiness (model loaded, not draining).
``POST /drain?wait=SECONDS`` stops new requests and, with ``wait``, blocks until the running ones are
done: the decode pods' preStop hook, so a scale-down never cuts a stream.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from disagg_worker.server.runtime import WorkerRuntime


def build_app(runtime: WorkerRuntime) -> FastAPI:
    app = FastAPI(title="disagg worker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:  # on the event loop, like the refresh loop: no racing read-modify-write
        runtime.refresh_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    def health() -> JSONResponse:
        engine = runtime.engine
        status = ("engine stopped" if not engine.running else
                  f"engine step running for {engine.step_seconds:.0f} s" if engine.stuck else "ok")
        return JSONResponse({"status": status, "role": runtime.role}, status_code=200 if status == "ok" else 503)

    @app.get("/ready")
    def ready() -> JSONResponse:
        ok = runtime.engine.running and not runtime.draining
        return JSONResponse({"ready": ok, "draining": runtime.draining, "role": runtime.role},
                            status_code=200 if ok else 503)

    @app.post("/drain")
    async def drain(wait: float = 0.0) -> JSONResponse:
        idle = await runtime.drain(max(0.0, wait))
        return JSONResponse({"draining": True, "idle": idle, "active": runtime.num_active})

    return app
