"""``disagg bench serve``: trace generation, SSE parsing, statistics, the client against a mock transport,
the cluster process manager against a fake launcher, and (e2e) the whole bench against ``disagg up``."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from disagg_worker.bench import serve_bench
from disagg_worker.bench.cluster import UpError, UpProcess, free_port, up_command
from disagg_worker.bench.latency_stats import SLO, RequestRecord, compare, meets_slo, percentile, summarize
from disagg_worker.bench.serve_sweep import plot_sweep, sweep_point, sweep_table
from disagg_worker.bench.sse import SSEParser, interpret
from disagg_worker.bench.trace import WORDS, LengthDist, TraceConfig, generate_trace, poisson_arrivals

# ---------------------------------------------------------------- trace


def test_trace_is_seeded_and_reproducible() -> None:
    cfg = TraceConfig(rate=5.0, duration_s=None, num_requests=200, long_fraction=0.3, low_priority_fraction=0.5,
                      seed=7)
    a, b = generate_trace(cfg), generate_trace(cfg)
    assert a == b
    assert generate_trace(TraceConfig(rate=5.0, duration_s=None, num_requests=200, seed=8)) != a
    assert [r.index for r in a] == list(range(200))
    assert all(x.arrival_s < y.arrival_s for x, y in itertools.pairwise(a))


def test_trace_mix_and_lengths() -> None:
    cfg = TraceConfig(rate=10.0, duration_s=None, num_requests=4000, long_fraction=0.25, low_priority_fraction=0.3,
                      short_prompt=LengthDist.parse("4-12"), short_output=LengthDist.parse("8"),
                      long_prompt=LengthDist.parse("lognormal:200,0.3,100-400"), long_output=LengthDist.parse("2-3"),
                      seed=1)
    trace = generate_trace(cfg)
    longs = [r for r in trace if r.kind == "long"]
    assert abs(len(longs) / len(trace) - 0.25) < 0.03
    assert abs(sum(r.priority == "low" for r in trace) / len(trace) - 0.3) < 0.03
    for r in trace:
        assert isinstance(r.prompt, str)
        words = r.prompt.split()
        assert len(words) == r.prompt_len and set(words) <= set(WORDS)
        if r.kind == "short":
            assert 4 <= r.prompt_len <= 12 and r.max_tokens == 8
        else:
            assert 100 <= r.prompt_len <= 400 and r.max_tokens in (2, 3)
    assert 170 < statistics.median(r.prompt_len for r in longs) < 230


def test_trace_poisson_interarrival_statistics() -> None:
    rate = 5.0
    trace = generate_trace(TraceConfig(rate=rate, duration_s=None, num_requests=5000, seed=3))
    gaps = np.diff([0.0] + [r.arrival_s for r in trace])
    assert abs(gaps.mean() - 1 / rate) < 0.05 / rate  # 5%: ~3.5 standard errors
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08  # exponential: coefficient of variation 1
    # duration-bounded: arrivals only before the end, about rate * duration of them
    timed = generate_trace(TraceConfig(rate=rate, duration_s=400.0, seed=3))
    assert timed and timed[-1].arrival_s < 400.0
    assert abs(len(timed) - 2000) < 4 * math.sqrt(2000)


def test_trace_streams_are_independent() -> None:
    """Changing the priority mix keeps arrivals, kinds, lengths and prompts unchanged."""
    base = dict(rate=3.0, duration_s=None, num_requests=100, long_fraction=0.2, seed=11)
    a = generate_trace(TraceConfig(**base, low_priority_fraction=0.0))
    b = generate_trace(TraceConfig(**base, low_priority_fraction=0.5))
    strip = [(r.arrival_s, r.kind, r.prompt_len, r.max_tokens, r.prompt) for r in a]
    assert strip == [(r.arrival_s, r.kind, r.prompt_len, r.max_tokens, r.prompt) for r in b]
    assert {r.priority for r in a} == {"high"} and {r.priority for r in b} == {"high", "low"}


def test_token_prompts() -> None:
    trace = generate_trace(TraceConfig(rate=1.0, duration_s=None, num_requests=50, token_prompts=True,
                                       token_id_range=(10, 20), seed=0))
    for r in trace:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len
        assert all(isinstance(t, int) and 10 <= t < 20 for t in r.prompt)


def test_poisson_arrivals_bounds() -> None:
    assert len(poisson_arrivals(2.0, random.Random(0), num_requests=17)) == 17
    assert all(t < 3.0 for t in poisson_arrivals(50.0, random.Random(0), duration_s=3.0))


@pytest.mark.parametrize(("spec", "kind", "low", "high"), [
    ("32", "const", 32, 32), ("16-64", "uniform", 16, 64), ("uniform:1-2", "uniform", 1, 2),
    ("lognormal:100,0.5", "lognormal", 1, 800), ("lognormal:100,0.5,50-150", "lognormal", 50, 150),
])
def test_length_dist_parse(spec: str, kind: str, low: int, high: int) -> None:
    d = LengthDist.parse(spec)
    assert (d.kind, d.low, d.high) == (kind, low, high)
    assert LengthDist.parse(d.spec()) == d
    rng = random.Random(0)
    assert all(low <= d.sample(rng) <= high for _ in range(500))


@pytest.mark.parametrize("spec", ["0", "10-5", "x", "-3", "lognormal:0,1", "lognormal:5", "uniform:4",
                                  "lognormal:inf,1", "lognormal:100,nan"])
def test_length_dist_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid length distribution"):
        LengthDist.parse(spec)


@pytest.mark.parametrize("kwargs", [
    {"rate": 0.0}, {"duration_s": None}, {"num_requests": 5}, {"long_fraction": 1.5},
    {"low_priority_fraction": -0.1}, {"token_id_range": (5, 5)}, {"duration_s": -1.0},
])
def test_trace_config_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate_trace(TraceConfig(**kwargs))


# ---------------------------------------------------------------- SSE


def _sse(*payloads: Any, end: str = "\n\n") -> bytes:
    return b"".join(f"data: {p if isinstance(p, str) else json.dumps(p)}{end}".encode() for p in payloads)


TOKEN = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "héllo", "finish_reason": None}]}
LAST = {"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
USAGE = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


@pytest.mark.parametrize("end", ["\n\n", "\r\n\r\n", "\r\r"])
def test_sse_parser_any_split(end: str) -> None:
    stream = b": keep-alive comment\n\n" + _sse(TOKEN, TOKEN, LAST, USAGE, "[DONE]", end=end)
    expected = [json.dumps(TOKEN), json.dumps(TOKEN), json.dumps(LAST), json.dumps(USAGE), "[DONE]"]
    whole = SSEParser()
    assert whole.feed(stream) + whole.close() == expected
    for cut in range(1, len(stream)):  # every two-piece split, including inside 'é' and inside '\r\n'
        p = SSEParser()
        assert p.feed(stream[:cut]) + p.feed(stream[cut:]) + p.close() == expected, cut
    p = SSEParser()
    assert [e for i in range(len(stream)) for e in p.feed(stream[i:i + 1])] + p.close() == expected


def test_sse_parser_multiline_fields_and_unterminated_event() -> None:
    p = SSEParser()
    assert p.feed(b"event: message\nid: 3\ndata: a\ndata:b\nretry: 10\n\n") == ["a\nb"]
    assert p.feed(b"data: [DONE]") == []
    assert p.close() == ["[DONE]"]


def test_interpret_events() -> None:
    tok = interpret(json.dumps(TOKEN))
    assert tok.type == "token" and tok.text == "héllo"
    assert interpret(json.dumps(LAST)).type == "other"  # finish-only chunk: not a token
    last_with_text = {"choices": [{"text": "x", "finish_reason": "length"}]}
    assert interpret(json.dumps(last_with_text)).type == "token"
    held_back = {"choices": [{"text": "", "finish_reason": None}]}
    assert interpret(json.dumps(held_back)).type == "token"
    usage = interpret(json.dumps(USAGE))
    assert (usage.type, usage.completion_tokens, usage.prompt_tokens) == ("usage", 3, 5)
    both = interpret(json.dumps({**TOKEN, "usage": USAGE["usage"]}))
    assert (both.type, both.completion_tokens) == ("token", 3)
    assert interpret("[DONE]").type == "done"
    err = interpret(json.dumps({"error": {"message": "decode worker lost", "type": "server_error"}}))
    assert (err.type, err.error) == ("error", "decode worker lost")
    assert interpret("{not json").type == "error"
    chat = interpret(json.dumps({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}))
    assert (chat.type, chat.text) == ("token", "hi")


# ---------------------------------------------------------------- statistics


def rec(i: int, status: str = "ok", *, ttft: float | None = 0.1, e2e: float | None = 1.0, tokens: int = 10,
        priority: str = "high", kind: str = "short", start: float = 0.0) -> RequestRecord:
    r = RequestRecord(index=i, kind=kind, priority=priority, prompt_len=10, max_tokens=tokens, arrival_s=start,
                      start_s=start, status=status)
    if status == "ok":
        r.ttft_s, r.e2e_s, r.output_tokens = ttft, e2e, tokens
        r.end_s = start + (e2e or 0.0)
        r.finish_timing()
    else:
        r.end_s = start + 0.5
    return r


def test_ttft_counts_requests_that_failed_after_their_first_token() -> None:
    late = rec(1, "timeout")
    late.ttft_s = 9.0  # a first token after 9 s, then the client gave up
    summary = summarize([rec(0, ttft=0.1), late], SLO())
    assert summary["ttft_ms"]["max"] == pytest.approx(9000.0)  # not hidden by the timeout
    assert summary["ttft_ms"]["count"] == 2 and summary["tpot_ms"]["count"] == 1


def test_percentile_matches_numpy() -> None:
    rng = random.Random(0)
    for n in (1, 2, 5, 101):
        xs = [rng.random() * 100 for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_definition() -> None:
    r = rec(0, ttft=0.2, e2e=1.1, tokens=10)
    assert r.tpot_s == pytest.approx(0.1)  # (1.1 - 0.2) / 9
    assert rec(1, tokens=1).tpot_s is None


def test_summarize_outcomes_goodput_and_attainment() -> None:
    slo = SLO(ttft_ms=200, tpot_ms=50)
    records = [
        rec(0, ttft=0.10, e2e=0.10 + 9 * 0.02, start=0.0),  # meets both
        rec(1, ttft=0.15, e2e=0.15 + 9 * 0.04, start=1.0, priority="low"),  # meets both
        rec(2, ttft=0.30, e2e=0.30 + 9 * 0.02, start=2.0),  # TTFT miss
        rec(3, ttft=0.10, e2e=0.10 + 9 * 0.06, start=3.0, kind="long"),  # TPOT miss
        rec(4, ttft=0.05, e2e=0.05, tokens=1, start=4.0),  # one token: no TPOT, meets
        rec(5, "rejected", priority="low", start=5.0),
        rec(6, "error", start=6.0),
        rec(7, "timeout", kind="long", start=7.0),
    ]
    records[7].end_s = 10.0  # the last outcome
    assert [meets_slo(r, slo) for r in records] == [True, True, False, False, True, False, False, False]
    s = summarize(records, slo)
    assert (s["sent"], s["ok"], s["rejected"], s["error"], s["timeout"]) == (8, 5, 1, 1, 1)
    assert s["wall_s"] == pytest.approx(10.0)
    assert s["slo_met"] == 3
    assert s["goodput_req_s"] == pytest.approx(0.3)
    assert s["goodput_fraction"] == pytest.approx(3 / 8)
    assert s["throughput_req_s"] == pytest.approx(0.5)
    assert s["output_tokens"] == 41 and s["output_tok_s"] == pytest.approx(4.1)
    assert s["ttft_ms"]["count"] == 5
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(float(np.percentile([100, 150, 300, 100, 50], 99)))
    assert s["tpot_ms"]["count"] == 4
    assert s["tpot_ms"]["p90"] == pytest.approx(float(np.percentile([20, 40, 20, 60], 90)))
    high, low = s["by_priority"]["high"], s["by_priority"]["low"]
    assert (high["sent"], high["met"], high["attainment"]) == (6, 2, pytest.approx(2 / 6))
    assert (low["sent"], low["met"], low["rejected"], low["attainment"]) == (2, 1, 1, 0.5)
    assert high["ttft_attainment"] == pytest.approx(3 / 6) and high["tpot_attainment"] == pytest.approx(3 / 6)
    assert s["by_kind"]["long"]["attainment"] == 0.0
    json.dumps(s)  # serialisable as is


def test_summarize_edge_cases() -> None:
    s = summarize([rec(0, "rejected"), rec(1, "rejected")], SLO())
    assert s["ok"] == 0 and s["ttft_ms"]["p99"] is None and s["goodput_req_s"] == 0.0
    assert s["goodput_fraction"] == 0.0
    assert summarize([], SLO())["goodput_fraction"] is None
    with pytest.raises(ValueError, match="unknown request status"):
        summarize([rec(0, "lost")], SLO())


def _summarized(records: list[RequestRecord]) -> dict[str, Any]:
    return summarize(records, SLO(ttft_ms=200, tpot_ms=50))


def test_compare_ratios() -> None:
    # TPOT 45 vs 15 ms on the same requests; goodput fractions 0.3 vs 0.8 by TTFT (the ratio of fractions:
    # disagg's slow tail gives it the longer wall clock, which must not count against its goodput)
    def run(fast: int, tpot: float) -> list[RequestRecord]:
        return [rec(i, ttft=ttft, e2e=ttft + 9 * tpot) for i in range(10) for ttft in [0.1 if i < fast else 0.3]]

    mono, dis = run(3, 0.045), run(8, 0.015)
    c = compare(_summarized(mono), _summarized(dis), mono, dis)
    assert c["paired"]["tpot_requests"] == 10
    assert c["tpot_p99_mono_over_disagg"] == pytest.approx(3.0) and c["tpot_target_met"]
    assert c["goodput_disagg_over_mono"] == pytest.approx(0.8 / 0.3) and c["goodput_target_met"]
    json.dumps(c)


def test_compare_pairs_latency_over_the_requests_both_served() -> None:
    """A run that rejects its slow requests must not win the TPOT comparison on the ones it kept."""
    mono = [rec(i, e2e=0.1 + 9 * 0.03) for i in range(100)]
    dis = [rec(i, e2e=0.1 + 9 * 0.005) if i < 10 else rec(i, "rejected") for i in range(100)]
    for r in mono[:10]:  # the same ten requests were fast on monolithic too
        r.e2e_s = 0.1 + 9 * 0.005
        r.finish_timing()
    c = compare(_summarized(mono), _summarized(dis), mono, dis)
    assert c["paired"]["tpot_requests"] == 10
    assert c["tpot_p99_mono_over_disagg"] == pytest.approx(1.0) and not c["tpot_target_met"]
    assert c["goodput_disagg_over_mono"] == pytest.approx(0.1) and not c["goodput_target_met"]


def test_compare_goodput_is_unbounded_when_monolithic_met_none() -> None:
    mono = [rec(i, ttft=1.0, e2e=1.09) for i in range(5)]  # every TTFT over the SLO
    dis = [rec(i, ttft=0.1, e2e=0.19) for i in range(5)]
    c = compare(_summarized(mono), _summarized(dis), mono, dis)
    assert c["goodput_disagg_over_mono"] is None and c["goodput_unbounded"] and c["goodput_target_met"]
    none = [rec(i, "error") for i in range(5)]
    c0 = compare(_summarized(none), _summarized(none), none, none)
    assert c0["goodput_disagg_over_mono"] is None and not c0["goodput_unbounded"]
    assert c0["tpot_p99_mono_over_disagg"] is None and not c0["tpot_target_met"] and not c0["goodput_target_met"]


def test_distributions_say_how_many_sent_requests_they_leave_out() -> None:
    records = [rec(i, ttft=0.05) for i in range(10)] + [rec(10 + i, "timeout") for i in range(90)]
    s = _summarized(records)
    assert s["ttft_ms"]["p99"] == pytest.approx(50.0)
    assert (s["ttft_ms"]["count"], s["ttft_ms"]["missing"]) == (10, 90)
    assert (s["e2e_ms"]["count"], s["e2e_ms"]["missing"]) == (10, 90)
    rows = dict((row[0], row[1]) for row in serve_bench.summary_rows([s]))
    assert rows["TTFT / TPOT / E2E samples"] == "10 / 10 / 10"


def test_records_round_trip_through_their_json() -> None:
    r = rec(3, "timeout")
    r.start_s = math.nan
    back = RequestRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert math.isnan(back.start_s) and back.to_dict() == r.to_dict()


def test_outputs_counted_by_chunks_are_flagged() -> None:
    r = rec(0)
    assert not r.usage_reported
    s = _summarized([r])
    assert s["tokens_from_chunks"] == 1
    assert "TPOT from stream chunks (no usage)" in [row[0] for row in serve_bench.summary_rows([s])]


def test_a_wide_lognormal_clips_instead_of_overflowing() -> None:
    d = LengthDist.parse("lognormal:100,1e6,1-500")
    rng = random.Random(0)
    assert all(1 <= d.sample(rng) <= 500 for _ in range(1000))


def test_loopback_urls_bypass_proxies() -> None:
    assert serve_bench.is_loopback("http://127.0.0.1:8000/v1") and serve_bench.is_loopback("http://localhost/v1")
    assert serve_bench.is_loopback("http://[::1]:8000/v1")
    assert not serve_bench.is_loopback("http://router.example:8000/v1")
    assert not serve_bench.is_loopback("http://10.0.0.5:8000/v1")


def test_summary_rows_and_plots(tmp_path: Path) -> None:
    slo = SLO()
    records = [rec(i, ttft=0.05 * (i + 1), e2e=1.0 + i, start=float(i)) for i in range(5)] + [rec(9, "rejected")]
    runs = [{"label": "a", "summary": summarize(records, slo), "requests": [r.to_dict() for r in records]},
            {"label": "b", "summary": summarize(records[:2], slo), "requests": [r.to_dict() for r in records[:2]]}]
    rows = serve_bench.summary_rows([r["summary"] for r in runs])
    names = [row[0] for row in rows]
    assert "TPOT p99 ms" in names and "goodput req/s" in names and "SLO attainment high" in names
    assert all(len(row) == 3 for row in rows)
    assert dict((row[0], row[1]) for row in rows)["rejected (429)"] == 1
    paths = serve_bench.plot_cdfs(runs, slo, tmp_path, "serve")
    assert [p.name for p in paths] == ["serve-ttft-cdf.png", "serve-tpot-cdf.png", "serve-e2e-cdf.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def _point(rate: float, mono: list[RequestRecord] | None, disagg: list[RequestRecord]) -> dict[str, Any]:
    slo = SLO()
    runs: list[dict[str, Any]] = []
    for label, records in (("monolithic", mono), ("disagg", disagg)):
        if records is None:
            runs.append({"label": label, "failed": "cluster did not start"})
        else:
            runs.append({"label": label, "summary": summarize(records, slo),
                         "requests": [r.to_dict() for r in records]})
    payload: dict[str, Any] = {"runs": runs}
    if mono is not None:
        payload["comparison"] = compare(runs[0]["summary"], runs[1]["summary"], mono, disagg)
    return sweep_point(rate, payload, Path(f"rate-{rate:g}/serve-compare.json"))


def test_sweep_table_and_plot(tmp_path: Path) -> None:
    fast = [rec(i, ttft=0.05, e2e=0.5) for i in range(4)]
    slow = [rec(i, ttft=0.5, e2e=5.0) for i in range(3)] + [rec(3, "timeout")]
    points = [_point(2.0, fast, fast), _point(8.0, slow, fast), _point(16.0, None, slow)]
    columns, rows = sweep_table(points)
    assert columns == ["rate (req/s)", "2", "8", "16"] and all(len(row) == 4 for row in rows)
    table = {row[0]: row[1:] for row in rows}
    assert table["requests"] == [4, 4, 4]
    assert table["monolithic not served"] == [0, 1, "failed"] and table["disagg not served"] == [0, 0, 1]
    assert table["monolithic goodput / sent"][2] == "failed"
    # the slow monolithic run met no SLO at rate 8; at 16 there is nothing to compare
    assert table["goodput disagg / mono (>= 2x)"][1:] == ["unbounded", "-"]
    assert table["TPOT p99 mono / disagg (>= 3x)"][0] == pytest.approx(1.0)
    assert points[2]["failed"] == {"monolithic": "cluster did not start"}
    path = plot_sweep(points, SLO(), tmp_path / "serve-compare-sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the client, against a mock transport


class FakeServer:
    """An httpx MockTransport handler behaving like the router, steered by the prompt's first word."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        mode = body["prompt"].split()[0] if isinstance(body["prompt"], str) else "ok"
        if mode == "reject":
            return httpx.Response(429, json={"error": {"message": "overloaded", "type": "rate_limit"}},
                                  headers={"Retry-After": "1"})
        if mode == "boom":
            return httpx.Response(500, json={"error": {"message": "internal", "type": "server_error"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=self._stream(mode, body["max_tokens"]))

    async def _stream(self, mode: str, n: int) -> AsyncIterator[bytes]:
        await asyncio.sleep(0.03)  # "prefill"
        for i in range(n):
            if i:
                await asyncio.sleep(0.005)
            if mode == "die" and i == 2:
                yield _sse({"error": {"message": "decode worker lost", "type": "server_error"}})
                return
            if mode == "slow" and i == 1:
                await asyncio.sleep(5)
            payload = _sse({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
            yield payload[:7]  # split each event across two network chunks
            yield payload[7:]
        if mode == "nodone":
            return
        yield _sse(LAST)
        yield _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
        yield b"data: [DONE]\n\n"


def _trace_with(modes: list[str], max_tokens: int = 6) -> list[Any]:
    from disagg_worker.bench.trace import TraceRequest

    return [TraceRequest(i, 0.01 * i, "short", "low" if i % 2 else "high", 2, max_tokens, f"{m} words")
            for i, m in enumerate(modes)]


async def test_run_trace_records_every_outcome() -> None:
    server = FakeServer()
    trace = _trace_with(["ok", "reject", "boom", "die", "slow", "nodone", "ok"])
    warm, records = await serve_bench.run_trace(trace, "http://test/v1", "tiny", timeout_s=0.5,
                                                warmup=_trace_with(["ok"])[:1], transport=httpx.MockTransport(server))
    assert [w.status for w in warm] == ["ok"]
    statuses = [r.status for r in records]
    assert statuses == ["ok", "rejected", "error", "error", "timeout", "error", "ok"]
    ok = records[0]
    assert ok.output_tokens == 6 and ok.token_chunks == 6 and ok.prompt_tokens == 3
    assert 0.02 < ok.ttft_s < 0.4 and ok.e2e_s > ok.ttft_s and ok.tpot_s == pytest.approx(
        (ok.e2e_s - ok.ttft_s) / 5)
    assert records[1].http_status == 429 and "overloaded" in records[1].error
    assert records[2].http_status == 500 and "internal" in records[2].error
    assert "decode worker lost" in records[3].error and records[3].token_chunks == 2
    assert records[4].ttft_s is not None and records[4].e2e_s is None  # partial data kept on a timeout
    assert "[DONE]" in records[5].error
    assert all(not math.isnan(r.start_s) and r.end_s >= r.start_s for r in records)
    body = server.bodies[1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["priority"] == "high"
    assert server.bodies[2]["priority"] == "low"
    s = summarize(records, SLO())
    assert (s["ok"], s["rejected"], s["error"], s["timeout"]) == (2, 1, 3, 1)


async def test_run_trace_is_open_loop() -> None:
    """Sends happen at the arrival times even while earlier requests are still streaming."""
    server = FakeServer()
    trace = _trace_with(["ok"] * 5, max_tokens=20)  # each takes > 0.1 s, arrivals every 10 ms
    _, records = await serve_bench.run_trace(trace, "http://test/v1", "tiny", transport=httpx.MockTransport(server))
    assert all(r.status == "ok" for r in records)
    assert all(r.start_s - r.arrival_s < 0.05 for r in records)
    assert records[-1].start_s < records[0].end_s


async def test_discover_model_and_body_options() -> None:
    assert await serve_bench.discover_model("http://test/v1", httpx.MockTransport(FakeServer())) == "tiny"
    req = _trace_with(["ok"])[0]
    body = serve_bench.request_body(req, "m", send_priority=False, extra={"top_p": 1.0})
    assert "priority" not in body and body["top_p"] == 1.0 and body["model"] == "m"


def test_cli_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--url", "http://x/v1", "--compare"], ["--url", "http://x/v1", "--long-prompt", "9-1"],
                 ["--url", "http://x/v1", "--duration", "1", "--num-requests", "3"],
                 ["--url", "http://x/v1", "--rate", "inf"], ["--url", "http://x/v1", "--duration", "inf"],
                 ["--url", "http://x/v1", "--timeout", "0"], ["--url", "http://x/v1", "--tpot-slo-ms", "nan"],
                 ["--url", "http://x/v1", "--rate", "2,2"], ["--url", "http://x/v1", "--rate", "2,0"],
                 ["--url", "http://x/v1", "--rate", "2,x"], ["--url", "http://x/v1", "--rate", "2,"]):
        with pytest.raises(SystemExit) as exc:
            serve_bench.main(argv)
        assert exc.value.code == 2


def test_up_command() -> None:
    dis = up_command("disagg", 9000, model="m", policy="p.yaml", extra=["--x", "1"])
    assert dis[:3] == [sys.executable, "-m", "disagg_worker.cli"]
    assert dis[3:] == ["up", "--host", "127.0.0.1", "--port", "9000", "--model", "m", "--policy", "p.yaml",
                       "--prefill", "1", "--decode", "1", "--cpu-affinity", "prefill=0", "--cpu-affinity", "decode=1",
                       "--x", "1"]
    mono = up_command("monolithic", 9001)
    assert mono[3:] == ["up", "--host", "127.0.0.1", "--port", "9001", "--monolithic", "--workers", "1",
                        "--cpu-affinity", "both=0,1"]


# ---------------------------------------------------------------- the process manager, against a fake launcher

FAKE_LAUNCHER = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, threading, time
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "crash":
        print("starting", flush=True); sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a 'worker'
    print(f"child {child.pid}", flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"disagg is up at http://127.0.0.1:{port}/v1", flush=True)
    if mode == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True: time.sleep(1)
    try:
        while True: time.sleep(0.1)
    except KeyboardInterrupt:
        child.terminate(); child.wait(); print("stopped", flush=True)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["clean", "stubborn"])
def test_local_cluster_start_stop(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "fake_up.py"
    script.write_text(FAKE_LAUNCHER)
    port = free_port()
    log = tmp_path / "up.log"
    cluster = UpProcess([sys.executable, str(script), str(port), mode], port, log_path=log, ready_timeout_s=30,
                           stop_timeout_s=1.0)
    try:
        with cluster:
            assert cluster.base_url == f"http://127.0.0.1:{port}/v1"
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            child = int(next(line for line in log.read_text().splitlines() if line.startswith("child")).split()[1])
            assert _alive(child)
        assert cluster.proc is not None and cluster.proc.poll() is not None
        assert not _alive(child)  # the whole process group is gone, even when the launcher ignored signals
        if mode == "clean":
            assert "stopped" in log.read_text()
    finally:
        cluster.stop()


@pytest.mark.e2e
def test_local_cluster_reports_a_crash(tmp_path: Path) -> None:
    script = tmp_path / "fake_up.py"
    script.write_text(FAKE_LAUNCHER)
    port = free_port()
    cluster = UpProcess([sys.executable, str(script), str(port), "crash"], port, ready_timeout_s=30)
    with pytest.raises(UpError, match=r"exited with code 3[\s\S]*starting"), cluster:
        pass


# ---------------------------------------------------------------- end to end against `disagg up`


def _require_launcher() -> None:
    try:
        import disagg_worker.launcher  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"disagg_worker.launcher is not available yet ({exc}); `disagg up` is still being built")


SMALL_TRACE = ["--num-requests", "8", "--rate", "8", "--seed", "1", "--short-prompt", "4-12", "--short-output", "4-8",
               "--long-prompt", "60-120", "--long-output", "4-8", "--long-fraction", "0.25",
               "--low-priority-fraction", "0.25", "--warmup", "1", "--timeout", "60", "--no-progress"]


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_serve_against_disagg_up(tmp_path: Path) -> None:
    _require_launcher()
    port = free_port()
    cmd = [sys.executable, "-m", "disagg_worker.cli", "up", "--host", "127.0.0.1", "--port", str(port),
           "--prefill", "1", "--decode", "1"]
    with UpProcess(cmd, port, log_path=tmp_path / "up.log", ready_timeout_s=300) as cluster:
        rc = serve_bench.main(["--url", cluster.base_url, *SMALL_TRACE, "--out", str(tmp_path)])
        # a load sweep: the same trace at two rates, one run each
        sweep_rc = serve_bench.main(["--url", cluster.base_url, *SMALL_TRACE, "--rate", "8,16",
                                     "--out", str(tmp_path / "sweep")])
    assert rc == 0 and sweep_rc == 0
    sweep = json.loads((tmp_path / "sweep" / "serve-sweep.json").read_text())
    assert [p["rate"] for p in sweep["points"]] == [8.0, 16.0] and sweep["mode"] == "sweep"
    for point in sweep["points"]:
        assert point["requests"] == 8 and point["summaries"]["endpoint"]["sent"] == 8
        point_json = json.loads(Path(point["json"]).read_text())
        assert point_json["trace"]["rate"] == point["rate"] and len(point_json["runs"][0]["requests"]) == 8
    assert (tmp_path / "sweep" / "serve-sweep.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "serve.json").read_text())
    (run,) = data["runs"]
    assert len(run["requests"]) == 8
    outcomes = [(r["priority"], r["status"], r["error"]) for r in run["requests"]]
    # high priority is always admitted; QoS may reject low priority early (429), which the bench counts
    assert all(r["status"] == "ok" or (r["priority"] == "low" and r["status"] == "rejected")
               for r in run["requests"]), outcomes
    assert sum(r["status"] == "ok" for r in run["requests"]) >= 6, outcomes
    ok = [r for r in run["requests"] if r["status"] == "ok"]
    assert all(r["output_tokens"] == r["max_tokens"] and r["ttft_s"] > 0 for r in ok), outcomes
    assert run["summary"]["ttft_ms"]["p99"] is not None
    for key in ("ttft", "tpot", "e2e"):
        assert (tmp_path / f"serve-{key}-cdf.png").stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.slow
def test_bench_serve_compare_mode(tmp_path: Path) -> None:
    _require_launcher()
    rc = serve_bench.main(["--compare", *SMALL_TRACE, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serve-compare.json").read_text())
    assert rc == 0, [r.get("failed") for r in data["runs"]]
    assert [r["label"] for r in data["runs"]] == ["monolithic", "disagg"]
    for run in data["runs"]:
        outcomes = [(r["priority"], r["status"], r["error"]) for r in run["requests"]]
        assert all(r["status"] == "ok" or (r["priority"] == "low" and r["status"] == "rejected")
                   for r in run["requests"]), (run["label"], outcomes)
    assert "tpot_p99_mono_over_disagg" in data["comparison"]
