"""End to end with real processes on 127.0.0.1: router + prefill + decode workers (``LocalCluster``).

Greedy output through the router equals HF ``generate`` token for token via remote prefill + KV
transfer, via local prefill, and on a prefix-cache hit; streaming and non-streaming; the official
``openai`` client works unchanged; bad input gets OpenAI-format errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from disagg_worker.launcher import LocalCluster, free_port
from tests.conftest import WORKER_MODEL_ARGS, LogitBias, OpenAIPenalties, get_model, hf_greedy, random_prompts

pytestmark = pytest.mark.e2e
SMALL_POOL = ["--kv-cache-blocks", "1024", *WORKER_MODEL_ARGS]
PROMPT_LENGTH_THRESHOLD = 48  # prompts longer than this are prefilled remotely


def write_policy(path: Path, **sections: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(sections))
    return str(path)


def worker_metrics(cluster: LocalCluster, name: str) -> str:
    url = cluster.get(name).ready_url.replace("/ready", "/metrics")
    return httpx.get(url, timeout=5).text


def metric_value(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (the first of ``name`` whose labels contain ``labels``); 0 if none."""
    for line in text.splitlines():
        if (line.startswith(f"{name}{{") and labels in line) or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("e2e")
    policy = write_policy(tmp / "policy.yaml", splitPolicy={"promptLengthThreshold": PROMPT_LENGTH_THRESHOLD})
    c = LocalCluster(policy=policy, port=free_port(), log_dir=tmp / "logs", worker_args=SMALL_POOL)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def complete(cluster: LocalCluster, prompt: list[int] | str, n: int, **extra: object) -> dict:
    r = httpx.post(f"{cluster.base_url}/v1/completions", timeout=120,
                   json={"model": "tiny-llama", "prompt": prompt, "max_tokens": n, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def post_json(url: str, body: dict) -> httpx.Response:
    """JSON with non-ASCII escaped (\\uXXXX), so that a lone surrogate reaches the server as a client may
    send it (httpx's own encoder refuses one)."""
    return httpx.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30)


def text_of(tokens: list[int]) -> str:
    return get_model("tiny-llama").tokenizer.decode(tokens, skip_special_tokens=True)


def test_remote_prefill_with_kv_transfer_matches_hf(cluster: LocalCluster) -> None:
    prompt = random_prompts(1, 200, 200, 41)[0]
    body = completed_on_path(cluster, prompt, 24)  # remote: one more remote decision
    assert body["choices"][0]["text"] == text_of(hf_greedy(get_model("tiny-llama"), prompt, 24))
    decode = worker_metrics(cluster, "decode-0")
    assert metric_value(decode, "disagg_kv_transfer_bytes_total", 'direction="received"') > 0


@pytest.mark.parametrize("prompt_len", [200, 20], ids=["remote-prefill", "local-prefill"])
def test_repetition_penalty_matches_hf_on_both_paths(cluster: LocalCluster, prompt_len: int) -> None:
    """The first token is sampled where the prompt is prefilled (the prefill worker, on the remote path):
    the penalty must travel with the request to both workers."""
    prompt = random_prompts(1, prompt_len, prompt_len, 45)[0]
    if prompt_len < 48:  # a prompt that holds its own continuation, so that the penalty bites early
        prompt += hf_greedy(get_model("tiny-llama"), prompt, 24)
    body = completed_on_path(cluster, prompt, 24, repetition_penalty=2.0)
    expected = hf_greedy(get_model("tiny-llama"), prompt, 24, repetition_penalty=2.0)
    assert body["choices"][0]["text"] == text_of(expected)
    assert expected != hf_greedy(get_model("tiny-llama"), prompt, 24)


def completed_on_path(cluster: LocalCluster, prompt: list[int], n: int, **extra: object) -> dict:
    """``complete``, checking that the decode worker took the path the prompt's length asks for (remote
    prefill past ``PROMPT_LENGTH_THRESHOLD``): a test of "both paths" must not run one of them twice."""
    outcome = "remote" if len(prompt) > PROMPT_LENGTH_THRESHOLD else "local"
    before = metric_value(worker_metrics(cluster, "decode-0"), "disagg_prefill_decisions_total", f'outcome="{outcome}"')
    body = complete(cluster, prompt, n, **extra)
    after = metric_value(worker_metrics(cluster, "decode-0"), "disagg_prefill_decisions_total", f'outcome="{outcome}"')
    assert after == before + 1, outcome
    return body


@pytest.mark.parametrize("prompt_len", [200, 20], ids=["remote-prefill", "local-prefill"])
def test_presence_and_frequency_penalties_match_hf_on_both_paths(cluster: LocalCluster, prompt_len: int) -> None:
    """OpenAI's penalties travel with the request to both workers and equal HF ``generate`` with their
    formula as a logits processor (the first token, sampled before any output, is unpenalised)."""
    from transformers import LogitsProcessorList

    lm = get_model("tiny-llama")
    prompt = random_prompts(1, prompt_len, prompt_len, 47)[0]  # one whose output they change
    body = completed_on_path(cluster, prompt, 48, presence_penalty=0.5, frequency_penalty=1.5)
    expected = hf_greedy(lm, prompt, 48, logits_processor=LogitsProcessorList([OpenAIPenalties(len(prompt), 0.5, 1.5)]))
    assert body["choices"][0]["text"] == text_of(expected)
    assert expected != hf_greedy(lm, prompt, 48)


@pytest.mark.parametrize("prompt_len", [200, 20], ids=["remote-prefill", "local-prefill"])
def test_logit_bias_matches_hf_on_both_paths(cluster: LocalCluster, prompt_len: int) -> None:
    """The first token too: on the remote path the prefill worker samples it, so the bias must reach it.
    Banning the greedy first and third tokens changes the output from the first token on."""
    from transformers import LogitsProcessorList

    lm = get_model("tiny-llama")
    prompt = random_prompts(1, prompt_len, prompt_len, 48)[0]
    free = hf_greedy(lm, prompt, 16)
    bias = {free[0]: -100.0, free[2]: -100.0, 17: 3.5}
    body = completed_on_path(cluster, prompt, 16, logit_bias={str(t): b for t, b in bias.items()})
    expected = hf_greedy(lm, prompt, 16, logits_processor=LogitsProcessorList([LogitBias(bias)]))
    assert body["choices"][0]["text"] == text_of(expected)
    assert expected[0] != free[0] and free[0] not in expected and free[2] not in expected


def test_local_prefill_matches_hf(cluster: LocalCluster) -> None:
    prompt = random_prompts(1, 20, 20, 42)[0]
    body = completed_on_path(cluster, prompt, 30)  # local: one more local decision
    assert body["choices"][0]["text"] == text_of(hf_greedy(get_model("tiny-llama"), prompt, 30))


def test_prefix_cache_hit_matches_hf(cluster: LocalCluster) -> None:
    base = random_prompts(1, 160, 160, 43)[0]
    complete(cluster, base, 2)
    prompt = [*base, 7, 8, 9]
    body = complete(cluster, prompt, 20)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 144
    assert body["choices"][0]["text"] == text_of(hf_greedy(get_model("tiny-llama"), prompt, 20))


def test_streaming_equals_non_streaming_and_concurrency(cluster: LocalCluster) -> None:
    prompts = random_prompts(8, 5, 150, 44)

    async def stream_one(client: httpx.AsyncClient, prompt: list[int]) -> tuple[str, dict]:
        parts, usage = [], {}
        async with client.stream("POST", f"{cluster.base_url}/v1/completions", json={
                "model": "tiny-llama", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
                for c in data["choices"]:
                    parts.append(c["text"])
        return "".join(parts), usage

    async def run() -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    results = asyncio.run(run())
    lm = get_model("tiny-llama")
    for p, (text, usage) in zip(prompts, results, strict=True):
        assert text == text_of(hf_greedy(lm, p, 16))
        assert usage["completion_tokens"] == 16


def test_official_openai_client(cluster: LocalCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    lm = get_model("tiny-llama")
    messages = [{"role": "user", "content": "Tell me about disaggregated serving."}]
    chat = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, temperature=0)
    prompt = lm.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    expected = text_of(hf_greedy(lm, prompt, 12))
    assert chat.choices[0].message.content == expected
    assert chat.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    done = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=8, temperature=0,
                                     extra_body={"priority": "low"})
    assert done.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=5000)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": [], "max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "logprobs": 3}, "logprobs"),
    ({"prompt": [5, 99999], "max_tokens": 2}, None),
    ({"max_tokens": 2}, "prompt"),
    ({"prompt": [-1], "max_tokens": 1}, "prompt"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "top_k": 2**32}, "top_k"),
    ({"prompt": "hi", "min_tokens": 4}, "min_tokens"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "hi", "logprobs": 0}, "logprobs"),  # legacy completions: 0 still asks for logprobs
    ({"prompt": ["hi"] * 257, "max_tokens": 1}, "prompt"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    # no Unicode text: a lone surrogate (it was a 500 from the tokenizer or from protobuf)
    ({"prompt": "\ud800", "max_tokens": 2}, "prompt"),
    ({"prompt": ["a", "\udfff"], "max_tokens": 2}, "prompt"),
    ({"prompt": "hi", "stop": ["\ud800"]}, "stop"),
    # OpenAI's types, not lax coercion ("3" -> 3, true -> 1, "yes" -> true, [true] -> [1])
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 3.0}, "max_tokens"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": [True, False], "max_tokens": 2}, "prompt"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "no"}}, "stream_options"),
    ({"prompt": "hi", "stop": ["x" * 1025]}, "stop"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),  # OpenAI's range is [-2, 2]
    ({"prompt": "hi", "frequency_penalty": -2.01}, "frequency_penalty"),
    ({"prompt": "hi", "frequency_penalty": "1"}, "frequency_penalty"),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),  # not a token id
    ({"prompt": "hi", "logit_bias": {"5": 100.5}}, "logit_bias"),  # OpenAI's range is [-100, 100]
    ({"prompt": "hi", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"+5": 1}}, "logit_bias"),  # int() reads these; OpenAI's ids are digits
    ({"prompt": "hi", "logit_bias": {"1_0": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"\u0663": 1}}, "logit_bias"),  # an Arabic-Indic 3
    ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"prompt": "hi", "repetition_penalty": 1e-45}, "repetition_penalty"),  # every seen logit would be inf
    ({"prompt": "hi", "stop_token_ids": list(range(1025))}, "stop_token_ids"),  # copied per prompt and call
    # longer than the context can hold whatever it tokenizes to: refused before it is tokenized
    ({"prompt": "hi " * 50_000, "max_tokens": 2}, "prompt"),
    # refused by the worker, which knows the vocabulary: the 400 still names the field
    ({"prompt": [1_000_000], "max_tokens": 2}, "prompt"),
    ({"prompt": "hi", "max_tokens": 2, "stop_token_ids": [1_000_000]}, "stop_token_ids"),
    ({"prompt": "hi", "max_tokens": 2, "logit_bias": {"1000000": -100}}, "logit_bias"),
])
def test_bad_input_gets_an_openai_error(cluster: LocalCluster, body: dict, param: str | None) -> None:
    r = post_json(f"{cluster.base_url}/v1/completions", {"model": "tiny-llama", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param
    assert httpx.post(f"{cluster.base_url}/v1/completions", timeout=30, json={
        "model": "tiny-llama", "prompt": "still fine", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "function_call": "auto"}, "function_call"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": "\ud800x"}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"]}, "modalities"),
    # megabytes of template to render, though no message has content: refused, not rendered on the loop
    ({"messages": [{"role": "user", "content": ""}] * 100_000}, "messages"),
])
def test_unsupported_chat_features_are_refused_not_ignored(cluster: LocalCluster, body: dict, param: str) -> None:
    r = post_json(f"{cluster.base_url}/v1/chat/completions", {"model": "tiny-llama", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_body_that_is_not_json_or_too_large_gets_an_openai_error(cluster: LocalCluster) -> None:
    url = f"{cluster.base_url}/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] is None
    # told by Content-Length, before a byte of the body is read
    host, port = cluster.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\n\r\n{")
        answer = b""
        while b"}}" not in answer and (part := conn.recv(65536)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-llama", "prompt": "'
        for _ in range(17):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert complete(cluster, "still fine", 2)["choices"]


def test_openai_defaults_and_spellings_are_accepted(cluster: LocalCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused")
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    missing = httpx.get(f"{cluster.base_url}/v1/no-such-thing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    metrics = httpx.get(f"{cluster.base_url}/metrics", timeout=30).text
    assert "gpt-4" not in metrics and "no-such-thing" not in metrics  # labels by route, not by URL
    url = f"{cluster.base_url}/v1/completions"
    greedy = httpx.post(url, json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                   "stream": None, "echo": None}, timeout=30)
    assert greedy.status_code == 200, greedy.text
    top_p_zero = httpx.post(url, json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 6, "top_p": 0,
                                       "seed": -7}, timeout=30)
    assert top_p_zero.status_code == 200, top_p_zero.text
    assert top_p_zero.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]

    def chat(role: str) -> str:
        reply = client.chat.completions.create(model="tiny-llama", max_tokens=8, temperature=0, messages=[
            {"role": role, "content": "Be terse."}, {"role": "user", "content": "Hello"}])
        return reply.choices[0].message.content or ""

    assert chat("developer") == chat("system")  # OpenAI's newer name for the system role
    # vLLM's spelling of "no top-k", and null for include_usage (null is the default for any field)
    no_top_k = httpx.post(url, json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                     "top_k": -1}, timeout=30)
    assert no_top_k.status_code == 200 and no_top_k.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    streamed = httpx.post(url, json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2, "stream": True,
                                     "stream_options": {"include_usage": None}}, timeout=30)
    assert streamed.status_code == 200 and '"usage"' not in streamed.text.split("[DONE]")[0].splitlines()[-3]
    # a chat prompt too long on its own names the messages, not the max_tokens the client never sent
    too_long = post_json(f"{cluster.base_url}/v1/chat/completions", {
        "model": "tiny-llama", "messages": [{"role": "user", "content": "hello " * 2500}]})
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["param"] == "messages"
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_router_and_worker_metrics_are_exported(cluster: LocalCluster) -> None:
    complete(cluster, "hi", 2)  # labelled series appear once used (this test may run first)
    text = httpx.get(f"{cluster.base_url}/metrics", timeout=5).text
    for name in ("disagg_routing_decisions_total", "disagg_router_ttft_seconds_bucket", "disagg_slo_attainment_ratio",
                 "disagg_estimated_ttft_seconds"):
        assert name in text
    worker = worker_metrics(cluster, "decode-0")
    for name in ("disagg_requests_waiting", "disagg_kv_cache_usage_ratio", "disagg_prefix_cache_hit_ratio",
                 "disagg_utilization_ratio", "disagg_ttft_seconds_bucket", "disagg_request_phase_seconds_bucket",
                 "disagg_busy_seconds_total", "disagg_requests_waiting_seconds_total",
                 "disagg_kv_cache_usage_seconds_total"):
        assert name in worker
    # the planner reads the time integrals it averages over its interval from this exposition
    from disagg_operator.metrics import parse_worker_metrics

    sample = parse_worker_metrics(worker, "decode")
    assert sample is not None and None not in (sample.busy_seconds, sample.waiting_seconds, sample.kv_seconds)
    assert sample.kv_seconds > 0  # the request above held KV blocks for a while
    assert "disagg_estimated_ttft_seconds" not in worker  # the router's: a worker's 0 skewed max() and avg()


def test_workers_answer_the_standard_grpc_health_check(cluster: LocalCluster) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for addr in cluster.decode_addresses + cluster.prefill_addresses:
        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_watchers_do_not_starve_a_workers_threads(cluster: LocalCluster) -> None:
    """The blocking health servicer held a thread of the worker's default executor per Watch stream:
    past a few dozen watchers (a service mesh, client-side health checking) new ones got no answer, and
    everything else run in a thread (peer DNS polling, KV chunk encoding) stalled with them."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    addrs = cluster.prefill_addresses + cluster.decode_addresses
    channels = [grpc.insecure_channel(addr) for addr in addrs for _ in range(40)]
    try:
        request = health_pb2.HealthCheckRequest(service="")
        watches = [health_pb2_grpc.HealthStub(c).Watch(request, timeout=20) for c in channels]  # fails, not hangs
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        prompt = random_prompts(1, 200, 200, 43)[0]
        body = complete(cluster, prompt, 8)
        assert body["choices"][0]["text"] == text_of(hf_greedy(get_model("tiny-llama"), prompt, 8))
    finally:
        for c in channels:
            c.close()


def test_a_client_that_gives_up_stops_its_generation(cluster: LocalCluster) -> None:
    """A non-streaming client that times out must not leave its request decoding to max_tokens."""
    names = [f"decode-{i}" for i in range(len(cluster.decode_addresses))]

    def aborted() -> float:
        return sum(metric_value(worker_metrics(cluster, n), "disagg_requests_finished_total", 'reason="abort"')
                   for n in names)

    def finished_latencies() -> float:  # end-to-end and TPOT: for requests that finished, not gave up
        return sum(metric_value(worker_metrics(cluster, n), f"disagg_{h}_seconds_count", "role=")
                   for n in names for h in ("e2e", "tpot"))

    def running() -> float:
        return sum(metric_value(worker_metrics(cluster, n), "disagg_requests_running", 'role="decode"') for n in names)

    before, latencies = aborted(), finished_latencies()
    body = json.dumps({"model": "tiny-llama", "prompt": "tell me everything", "max_tokens": 1900,
                       "ignore_eos": True, "temperature": 0}).encode()
    # the client leaves once its request is generating: a fixed read timeout (0.5 s) sometimes left
    # before the request reached a worker on a loaded host, and then nothing was there to abort
    with socket.create_connection((cluster.host, cluster.port), timeout=30) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while running() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running() == 1, "the request never started generating"
    deadline = time.monotonic() + 15
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    router = httpx.get(f"{cluster.base_url}/metrics", timeout=5).text
    seen = {line for n in names for line in worker_metrics(cluster, n).splitlines()
            if line.startswith("disagg_requests_finished_total")}
    assert aborted() == before + 1, (f"router 499s: {metric_value(router, 'disagg_router_requests_total', '499')}; "
                                     f"decode finished: {sorted(seen)}")
    assert finished_latencies() == latencies


def test_transfer_metrics_count_remote_prefills_and_commit_finishes(cluster: LocalCluster) -> None:
    """The kv_transfer phase is observed for requests whose KV moved, not as 0 for local ones; a
    request that ends at commit (max_tokens 1 after a remote prefill) is still counted as finished."""
    def value(name: str, labels: str) -> float:
        return metric_value(worker_metrics(cluster, "decode-0"), name, labels)

    finished = value("disagg_requests_finished_total", 'reason="length"')
    complete(cluster, random_prompts(1, 10, 10, 41)[0], 3)  # local prefill
    complete(cluster, random_prompts(1, 100, 100, 42)[0], 1)  # remote, finished at commit
    transfers = value("disagg_request_phase_seconds_count", 'phase="kv_transfer"')
    assert transfers == value("disagg_prefill_decisions_total", 'outcome="remote"') > 0
    assert value("disagg_requests_finished_total", 'reason="length"') == finished + 2
