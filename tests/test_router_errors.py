"""The router's answer to a bug of its own: a 500 with an id to look up, never the exception's text."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from disagg_worker.router.app import build_app


class BrokenService:
    """Stands in for RouterService (which needs live workers): every attribute read fails like a bug."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"secret detail: /srv/models/private reading {name}")


def test_an_unexpected_error_is_a_500_with_an_id_and_the_details_stay_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(build_app(BrokenService()), raise_server_exceptions=False)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="disagg_worker.router.app"):
        resp = client.get("/v1/models")
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]
    error_id = error["message"].split()[2].rstrip(":")
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
