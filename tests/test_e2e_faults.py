"""Faults with real processes: a broken KV transfer falls back to local prefill (the request completes,
token-exact); a killed decode worker ends its in-flight streams with an explicit error, and new
requests go to the survivors.

Faults are injected into the prefill worker through ``DISAGG_FAULT`` (see ``prefill_service``).
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import pytest

from disagg_worker.launcher import LocalCluster, free_port
from tests.conftest import get_model, hf_greedy, random_prompts
from tests.test_e2e_serving import SMALL_POOL, complete, metric_value, text_of, worker_metrics, write_policy

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("kv_port_reachable", [True, False])
def test_tcp_transport_matches_hf(tmp_path: Path, kv_port_reachable: bool) -> None:
    """Unreachable: the decode worker advertises its KV port at an address where nothing listens (as a
    NetworkPolicy that lets only gRPC through would look), so the KV comes on the Prefill stream."""
    policy = write_policy(tmp_path / "p.yaml", splitPolicy={"promptLengthThreshold": 48},
                          kvTransfer={"backend": "tcp", "chunkBytes": 65536})
    advertise = [] if kv_port_reachable else ["--advertise-host", "127.0.0.2"]  # the receiver binds 127.0.0.1
    cluster = LocalCluster(policy=policy, port=free_port(), log_dir=tmp_path / "logs",
                           worker_args=[*SMALL_POOL, *advertise])
    cluster.start()
    try:
        lm = get_model("tiny-llama")
        base = random_prompts(1, 300, 300, 53)[0]
        for prompt in (base, [*base, 3, 4, 5]):  # the second one also hits the decode worker's prefix cache
            body = complete(cluster, prompt, 16)
            assert body["choices"][0]["text"] == text_of(hf_greedy(lm, prompt, 16))
        metrics = worker_metrics(cluster, "decode-0")
        assert metric_value(metrics, "disagg_prefill_decisions_total", 'outcome="remote"') >= 1
        assert metric_value(metrics, "disagg_prefill_decisions_total", 'outcome="fallback"') == 0
        assert metric_value(metrics, "disagg_kv_transfer_bytes_total", 'direction="received"') > 0
        on_stream = metric_value(worker_metrics(cluster, "prefill-0"), "disagg_kv_transfer_on_stream_total")
        assert on_stream == (0 if kv_port_reachable else metric_value(
            metrics, "disagg_prefill_decisions_total", 'outcome="remote"'))
    finally:
        cluster.stop()


@pytest.mark.parametrize(("backend", "fault", "timeout_s", "reason"), [
    ("grpc", "corrupt_chunk", 30, "checksum"),
    ("grpc", "slow_transfer:4", 1, "deadline"),
    ("grpc", "die_mid_transfer", 30, None),
    ("tcp", "corrupt_chunk", 30, "checksum"),
    # the deadline cuts the socket too: its "closed mid-frame" was counted as the reason (invalid_chunk)
    ("tcp", "slow_transfer:4", 1, "deadline"),
    ("tcp", "die_mid_transfer", 30, None),
])
def test_broken_kv_transfer_falls_back_to_local_prefill(tmp_path: Path, backend: str, fault: str, timeout_s: float,
                                                        reason: str | None) -> None:
    policy = write_policy(tmp_path / "p.yaml", splitPolicy={"promptLengthThreshold": 48},
                          kvTransfer={"timeoutSeconds": timeout_s, "chunkBytes": 65536, "backend": backend})
    cluster = LocalCluster(policy=policy, port=free_port(), log_dir=tmp_path / "logs", worker_args=SMALL_POOL,
                           worker_env={"prefill-0": {"DISAGG_FAULT": fault}})
    cluster.start()
    try:
        lm = get_model("tiny-llama")
        for seed in (51, 52):  # the second request runs after the fault too
            prompt = random_prompts(1, 300, 300, seed)[0]
            body = complete(cluster, prompt, 12)
            assert body["choices"][0]["text"] == text_of(hf_greedy(lm, prompt, 12))
        metrics = worker_metrics(cluster, "decode-0")
        assert metric_value(metrics, "disagg_prefill_decisions_total", 'outcome="fallback"') >= 1
        if reason is not None:
            assert metric_value(metrics, "disagg_kv_transfer_failures_total", f'reason="{reason}"') >= 1
        else:
            assert not cluster.get("prefill-0").alive  # it really died mid-transfer
    finally:
        cluster.stop()


def test_killed_decode_worker_errors_its_streams_and_survivors_serve(tmp_path: Path) -> None:
    cluster = LocalCluster(monolithic=True, num_workers=2, port=free_port(), log_dir=tmp_path / "logs",
                           worker_args=SMALL_POOL)
    cluster.start()
    try:
        prompts = random_prompts(6, 10, 30, 61)

        async def stream(client: httpx.AsyncClient, prompt: list[int], started: asyncio.Event) -> str:
            async with client.stream("POST", f"{cluster.base_url}/v1/completions", json={
                    "model": "tiny-llama", "prompt": prompt, "max_tokens": 600, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        return "done"
                    if line.startswith("data: "):
                        started.set()
                        if "error" in json.loads(line[6:]):
                            return "error"
            return "cut"

        async def scenario() -> list[str]:
            async with httpx.AsyncClient(timeout=60) as client:
                events = [asyncio.Event() for _ in prompts]
                tasks = [asyncio.create_task(stream(client, p, e)) for p, e in zip(prompts, events, strict=True)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                cluster.get("both-0").signal(signal.SIGKILL)
                return await asyncio.wait_for(asyncio.gather(*tasks), 300)

        outcomes = asyncio.run(scenario())
        assert "error" in outcomes  # the killed worker's streams end with an explicit error, not a hang
        assert set(outcomes) <= {"error", "done"}
        lm = get_model("tiny-llama")
        for prompt in random_prompts(4, 5, 40, 62):  # new requests go to the survivor
            assert complete(cluster, prompt, 8)["choices"][0]["text"] == text_of(hf_greedy(lm, prompt, 8))
    finally:
        cluster.stop()
