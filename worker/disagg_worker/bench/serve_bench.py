"""``disagg bench serve``: open-loop Poisson load from a synthetic mixed trace against an OpenAI endpoint.

Sends a seeded trace (many short chats plus long-prompt arrivals, see :mod:`.trace`) to
``POST {url}/completions`` with ``"stream": true`` at the trace's arrival times, whatever the server's
state (open loop), and records per request TTFT, TPOT, end-to-end latency, output tokens and the
outcome (ok / rejected (429) / error / timeout). Prints a table, writes ``serve.json`` with every
request and the summary, and PNG CDFs of TTFT, TPOT and E2E.

``--compare`` starts two local clusters with ``disagg up`` one after the other, monolithic (one
role-``both`` worker on both cores) and disaggregated (1 prefill + 1 decode, one core each), runs the
same trace against both and reports the monolithic/disagg TPOT p99 and disagg/monolithic goodput
ratios (issue targets: >= 3x and >= 2x; reported, never asserted).

``--rate 2,4,6`` (several rates) is a load sweep: one such run per rate, summarised by
:mod:`.serve_sweep`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import resource
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from disagg_worker.bench.cluster import UpError, UpProcess, free_port, up_command
from disagg_worker.bench.latency_stats import SLO, RequestRecord, compare, summarize
from disagg_worker.bench.report import print_table, write_json
from disagg_worker.bench.serve_sweep import plot_sweep, sweep_point, sweep_table
from disagg_worker.bench.sse import SSEParser, interpret
from disagg_worker.bench.trace import LengthDist, TraceConfig, TraceRequest, generate_trace, warmup_requests

METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))


# ---------------------------------------------------------------- one request


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine: a proxy from the environment must not stand in between."""
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_open_file_limit() -> None:
    """Each request in flight holds a socket: an open loop at a high rate against a slow server needs
    more than the usual soft limit of 1,024, and running out would be counted as the server's errors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def request_body(req: TraceRequest, model: str, *, send_priority: bool = True,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if send_priority:
        body["priority"] = req.priority
    body.update(extra or {})
    return body


def _error_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
    except (json.JSONDecodeError, AttributeError):
        pass
    return f"HTTP {status}: {text.strip()[:300]}"


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord,
                      t_send: float) -> None:
    """Send one streaming completion and fill ``rec`` as the stream goes (so a timeout keeps partial data)."""
    async with client.stream("POST", url, json=body) as resp:
        rec.http_status = resp.status_code
        if resp.status_code != 200:
            rec.status = "rejected" if resp.status_code == 429 else "error"
            rec.error = _error_message(resp.status_code, await resp.aread())
            return
        parser = SSEParser()
        last_token: float | None = None
        done = False
        completion_tokens: int | None = None
        async for chunk in resp.aiter_bytes():
            now = time.perf_counter()
            for data in parser.feed(chunk):
                ev = interpret(data)
                if ev.type == "token":
                    if rec.ttft_s is None:
                        rec.ttft_s = now - t_send
                    elif last_token is not None:
                        rec.max_itl_s = max(rec.max_itl_s or 0.0, now - last_token)
                    last_token = now
                    rec.token_chunks += 1
                elif ev.type == "error":
                    rec.status, rec.error = "error", f"in-stream error: {ev.error}"
                    return
                elif ev.type == "done":
                    done = True
                if ev.completion_tokens is not None:
                    completion_tokens = ev.completion_tokens
                if ev.prompt_tokens is not None:
                    rec.prompt_tokens = ev.prompt_tokens
            if done:
                break
        end = time.perf_counter()
        for data in ([] if done else parser.close()):
            done = done or interpret(data).type == "done"
        rec.usage_reported = completion_tokens is not None
        rec.output_tokens = completion_tokens if completion_tokens is not None else rec.token_chunks
        if not done:
            rec.status, rec.error = "error", "stream ended without data: [DONE]"
        elif rec.ttft_s is None:
            rec.status, rec.error = "error", "stream finished without any token"
        else:
            rec.status = "ok"
            rec.e2e_s = end - t_send
            rec.finish_timing()


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord,
                       t0: float, timeout_s: float) -> RequestRecord:
    """Send one request; whatever happens, ``rec`` ends with a status and an end time."""
    t_send = time.perf_counter()
    rec.start_s = t_send - t0
    # latency counts from the scheduled arrival: time the client lost before sending is the system's
    # wait too (open loop; otherwise a saturated client would hide queueing)
    t_arrival = min(t_send, t0 + rec.arrival_s)
    try:
        await asyncio.wait_for(_stream_one(client, url, body, rec, t_arrival), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        rec.status = "timeout"
        rec.error = f"no complete answer within {timeout_s:g} s" + (f" ({type(exc).__name__})"
                                                                    if isinstance(exc, httpx.TimeoutException) else "")
        rec.output_tokens = rec.output_tokens or rec.token_chunks
    except Exception as exc:
        rec.status, rec.error = "error", f"{type(exc).__name__}: {exc}"[:500]
    rec.end_s = time.perf_counter() - t0
    return rec


# ---------------------------------------------------------------- one run


def new_record(req: TraceRequest) -> RequestRecord:
    return RequestRecord(index=req.index, kind=req.kind, priority=req.priority, prompt_len=req.prompt_len,
                         max_tokens=req.max_tokens, arrival_s=req.arrival_s)


async def run_trace(trace: list[TraceRequest], base_url: str, model: str, *, timeout_s: float = 120.0,
                    warmup: list[TraceRequest] | None = None, send_priority: bool = True,
                    extra_body: dict[str, Any] | None = None, transport: httpx.AsyncBaseTransport | None = None,
                    on_sent: Callable[[RequestRecord], None] | None = None,
                    on_done: Callable[[RequestRecord], None] | None = None,
                    ) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """Replay ``trace`` open-loop against ``base_url``; returns (warm-up records, measured records).

    Each request is sent at its arrival time in its own task, regardless of how many are in flight.
    """
    url = base_url.rstrip("/") + "/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport,
                                 trust_env=not is_loopback(base_url)) as client:
        def body(req: TraceRequest) -> dict[str, Any]:
            return request_body(req, model, send_priority=send_priority, extra=extra_body)

        warm = [await send_request(client, url, body(req), new_record(req), time.perf_counter(), timeout_s)
                for req in warmup or []]
        records = [new_record(req) for req in trace]

        async def one(req: TraceRequest, rec: RequestRecord) -> None:
            await send_request(client, url, body(req), rec, t0, timeout_s)
            if on_done is not None:
                on_done(rec)

        tasks: list[asyncio.Task[None]] = []
        t0 = time.perf_counter()
        try:
            for req, rec in zip(trace, records, strict=True):
                delay = t0 + req.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(req, rec)))
                if on_sent is not None:
                    on_sent(rec)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    return warm, records


async def discover_model(base_url: str, transport: httpx.AsyncBaseTransport | None = None) -> str:
    async with httpx.AsyncClient(timeout=30.0, transport=transport, trust_env=not is_loopback(base_url)) as client:
        resp = await client.get(base_url.rstrip("/") + "/models")
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if not data:
            raise RuntimeError(f"{base_url}/models lists no model")
        return str(data[0]["id"])


class _Progress:
    """A rich progress bar over one run: completed / total, with live outcome counts."""

    def __init__(self, console: Console, label: str, total: int, enabled: bool = True):
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.task = self.progress.add_task(label, total=total, stats="")
        self.sent = 0
        self.counts: dict[str, int] = {}

    def _refresh(self, advance: int = 0) -> None:
        stats = f"sent {self.sent}  " + "  ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        self.progress.update(self.task, advance=advance, stats=stats)

    def sent_one(self, rec: RequestRecord) -> None:
        self.sent += 1
        self._refresh()

    def done_one(self, rec: RequestRecord) -> None:
        self.counts[rec.status] = self.counts.get(rec.status, 0) + 1
        self._refresh(advance=1)


def run_one(trace: list[TraceRequest], base_url: str, model: str | None, args: argparse.Namespace,
            console: Console, label: str) -> dict[str, Any]:
    """Discover the model if needed, replay the trace with a progress bar, summarise."""
    if model is None:
        model = asyncio.run(discover_model(base_url))
    warm = warmup_requests(args.warmup, args.seed, args.token_prompts, _id_range(args.token_id_range))
    bar = _Progress(console, f"{label}: {len(trace)} requests", len(trace), enabled=not args.no_progress)
    console.print(f"{label}: {base_url} model={model!r}: {len(warm)} warm-up request(s), then {len(trace)} "
                  f"requests over {trace[-1].arrival_s:.1f} s")
    with bar.progress:
        warm_recs, records = asyncio.run(run_trace(
            trace, base_url, model, timeout_s=args.timeout, warmup=warm, send_priority=not args.no_priority_field,
            extra_body=args.extra_body, on_sent=bar.sent_one, on_done=bar.done_one))
    for r in warm_recs:
        if r.status != "ok":
            console.print(f"[yellow]{label}: a warm-up request failed ({r.status}): {r.error}[/yellow]")
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    return {
        "label": label,
        "url": base_url,
        "model": model,
        "warmup": [{"status": r.status, "error": r.error} for r in warm_recs],
        "summary": summarize(records, slo),
        "requests": [r.to_dict() for r in records],
    }


# ---------------------------------------------------------------- reporting


def _v(x: Any) -> Any:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return x


def summary_rows(summaries: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the summary table: one column per run."""
    def row(name: str, get: Callable[[dict[str, Any]], Any]) -> list[Any]:
        return [name, *(_v(get(s)) for s in summaries)]

    rows = [
        row("sent", lambda s: s["sent"]),
        row("ok", lambda s: s["ok"]),
        row("rejected (429)", lambda s: s["rejected"]),
        row("errors", lambda s: s["error"]),
        row("timeouts", lambda s: s["timeout"]),
    ]
    for key, name in METRICS:
        for q in ("p50", "p90", "p99"):
            rows.append(row(f"{name} {q} ms", lambda s, key=key, q=q: s[f"{key}_ms"][q]))
    # percentiles over few of the sent requests are fast for the wrong reason: show how many they cover
    rows.append(row("TTFT / TPOT / E2E samples",
                    lambda s: " / ".join(str(s[f"{key}_ms"]["count"]) for key, _ in METRICS)))
    rows += [
        row("throughput req/s", lambda s: s["throughput_req_s"]),
        row("output tok/s", lambda s: s["output_tok_s"]),
        row("goodput req/s", lambda s: s["goodput_req_s"]),
        row("goodput / sent", lambda s: s["goodput_fraction"]),
    ]
    groups = sorted({(g, k) for s in summaries for g in ("by_priority", "by_kind") for k in s[g]})
    for g, k in groups:
        rows.append(row(f"SLO attainment {k}", lambda s, g=g, k=k: s[g].get(k, {}).get("attainment")))
    rows.append(row("max send lateness ms", lambda s: s["max_send_lateness_ms"]))
    rows.append(row("outputs shorter than max_tokens", lambda s: s["short_outputs"]))
    if any(s.get("tokens_from_chunks") for s in summaries):
        rows.append(row("TPOT from stream chunks (no usage)", lambda s: s.get("tokens_from_chunks")))
    return rows


def plot_cdfs(runs: list[dict[str, Any]], slo: SLO, out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per metric (TTFT, TPOT, E2E): the CDF over the requests the table's percentiles use, as a
    fraction of those sent, one line per run, SLO marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for key, name in METRICS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lo_hi: list[float] = []
        for run in runs:
            # the table's set (TTFT: every request with a first token; TPOT, E2E: ok ones), as a fraction of
            # the requests sent, so a run that lost requests tops out below 1 instead of looking complete
            xs = sorted(r[f"{key}_s"] * 1000.0 for r in run["requests"]
                        if r[f"{key}_s"] is not None and (key == "ttft" or r["status"] == "ok"))
            if not xs:
                continue
            sent = len(run["requests"])
            ys = [(i + 1) / sent for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{run['label']} ({len(xs)} of {sent})")
            lo_hi += [xs[0], xs[-1]]
        limit = {"ttft": slo.ttft_ms, "tpot": slo.tpot_ms}.get(key)
        if limit is not None:
            ax.axvline(limit, color="red", linestyle="--", linewidth=1, label=f"SLO {limit:g} ms")
        if lo_hi and min(lo_hi) > 0 and max(lo_hi) / min(lo_hi) > 100:
            ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests sent")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name} CDF")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
        path = out_dir / f"{prefix}-{key}-cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- CLI


def _id_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, got {text!r}")
    return int(lo), int(hi)


def _dist(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_obj(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return obj


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="disagg bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_argument_group("target")
    target.add_argument("--url", default=None, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    target.add_argument("--model", default=None, help="model name to request (default: first id of GET /v1/models)")
    target.add_argument("--timeout", type=float, default=120.0,
                        help="client deadline per request, seconds (default %(default)s)")
    target.add_argument("--warmup", type=int, default=2,
                        help="short unmeasured requests sent first (default %(default)s)")
    target.add_argument("--no-priority-field", action="store_true",
                        help="do not send the 'priority' field (for servers that reject it)")
    target.add_argument("--extra-body", type=_json_obj, default=None, metavar="JSON",
                        help="JSON object merged into every request body")

    tr = ap.add_argument_group("trace (seeded, reproducible)")
    d = TraceConfig()  # the defaults live there
    tr.add_argument("--seed", type=int, default=d.seed)
    tr.add_argument("--rate", type=_rates, default=(d.rate,), metavar="RATE[,RATE...]",
                    help=f"mean arrival rate, requests/s (Poisson; default {d.rate:g}); several, comma-separated: "
                         "a load sweep, one run (in --compare, freshly started clusters) per rate")
    bound = tr.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=None,
                       help=f"arrivals within this many seconds (default {d.duration_s:g})")
    bound.add_argument("--num-requests", type=int, default=None, help="exactly this many arrivals")
    tr.add_argument("--long-fraction", type=float, default=d.long_fraction,
                    help="fraction of arrivals with a long prompt (default %(default)s)")
    tr.add_argument("--low-priority-fraction", type=float, default=d.low_priority_fraction,
                    help="fraction sent with priority=low (default %(default)s)")
    dist_help = "N | MIN-MAX | lognormal:MEDIAN,SIGMA[,MIN-MAX]"
    for name, what in (("short-prompt", "short-chat prompt length"), ("short-output", "short-chat max_tokens"),
                       ("long-prompt", "long-prompt length"), ("long-output", "long-prompt max_tokens")):
        default = getattr(d, name.replace("-", "_"))
        tr.add_argument(f"--{name}", type=_dist, default=default, metavar="DIST",
                        help=f"{what}: {dist_help} (default {default.spec()})")
    tr.add_argument("--token-prompts", action="store_true",
                    help="send prompts as token-id lists (lengths in tokens); default: text of random words "
                         "(lengths in words; ~2.2 tokens a word with the built-in presets)")
    tr.add_argument("--token-id-range", default="-".join(map(str, d.token_id_range)),
                    help="ids for --token-prompts, LOW-HIGH (HIGH excluded; default %(default)s)")

    slo = ap.add_argument_group("SLO")
    slo.add_argument("--ttft-slo-ms", type=float, default=SLO().ttft_ms, help="default %(default)s")
    slo.add_argument("--tpot-slo-ms", type=float, default=SLO().tpot_ms, help="default %(default)s")

    cmp_ = ap.add_argument_group("compare mode (starts local clusters with `disagg up`)")
    cmp_.add_argument("--compare", action="store_true",
                      help="run the trace against a monolithic and a disaggregated local cluster, one after the other")
    cmp_.add_argument("--up-model", default=None, help="--model REF passed to `disagg up` (default: its own)")
    cmp_.add_argument("--policy", default=None, help="--policy FILE passed to `disagg up`")
    cmp_.add_argument("--up-args", default="", help="extra arguments for `disagg up`, as one shell-quoted string")
    cmp_.add_argument("--port", type=int, default=None, help="router port for the clusters (default: a free one)")
    cmp_.add_argument("--up-timeout", type=float, default=300.0, help="seconds to wait for a cluster to be up")
    cmp_.add_argument("--only", choices=("monolithic", "disagg"), default=None,
                      help="compare mode with one of the two clusters only")

    out = ap.add_argument_group("output")
    out.add_argument("--out", default="benchmarks/out", help="directory for serve.json / serve-compare.json and PNGs")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    return ap


def trace_config(args: argparse.Namespace, rate: float) -> TraceConfig:
    duration = args.duration
    if duration is None and args.num_requests is None:
        duration = TraceConfig().duration_s
    return TraceConfig(rate=rate, duration_s=duration, num_requests=args.num_requests,
                       long_fraction=args.long_fraction, low_priority_fraction=args.low_priority_fraction,
                       short_prompt=args.short_prompt, short_output=args.short_output,
                       long_prompt=args.long_prompt, long_output=args.long_output,
                       token_prompts=args.token_prompts, token_id_range=_id_range(args.token_id_range),
                       seed=args.seed)


def _compare_runs(trace: list[TraceRequest], args: argparse.Namespace, console: Console, out_dir: Path
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    extra = shlex.split(args.up_args)
    modes = [m for m in ("monolithic", "disagg") if args.only in (None, m)]
    for mode in modes:
        port = args.port or free_port()
        cmd = up_command(mode, port, model=args.up_model, policy=args.policy, extra=extra)  # type: ignore[arg-type]
        log = out_dir / f"serve-compare-{mode}-up.log"
        console.print(f"[bold]{mode}[/bold]: starting {shlex.join(cmd[1:])} (log: {log})")
        cluster = UpProcess(cmd, port, log_path=log, ready_timeout_s=args.up_timeout)
        try:
            with console.status(f"waiting for the {mode} cluster"):
                cluster.start()
            run = run_one(trace, cluster.base_url, args.model, args, console, mode)
            run["cluster_command"] = cmd[1:]
            runs.append(run)
        except (UpError, httpx.HTTPError, RuntimeError) as exc:
            console.print(f"[red]{mode}: {exc}[/red]")
            failures.append(f"{mode}: {exc}")
            runs.append({"label": mode, "failed": str(exc), "cluster_command": cmd[1:]})
        finally:
            with console.status(f"stopping the {mode} cluster"):
                code = cluster.stop()
            console.print(f"{mode}: cluster stopped (exit code {code})")
    return runs, failures


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: the clusters --compare started are stopped


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate or a comma-separated list of rates, got {text!r}") from None
    for rate in rates:
        if not (math.isfinite(rate) and rate > 0):
            raise argparse.ArgumentTypeError(f"rates must be positive numbers of requests/s, got {rate:g}")
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"a rate is listed twice: {text!r}")
    return rates


def _run_point(trace: list[TraceRequest], cfg: TraceConfig, args: argparse.Namespace, argv: list[str],
               console: Console, out_dir: Path) -> tuple[str, dict[str, Any], list[str]]:
    """Run one trace (against ``--url``, or ``--compare``'s two clusters), print its tables, and return the
    JSON name, its payload and the failures."""
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    n_long, n_low = sum(r.kind == "long" for r in trace), sum(r.priority == "low" for r in trace)
    console.print(f"trace: {len(trace)} requests ({n_long} long-prompt, {n_low} low priority), "
                  f"Poisson {cfg.rate:g} req/s, seed {cfg.seed}")
    failures: list[str] = []
    if args.compare:
        runs, failures = _compare_runs(trace, args, console, out_dir)
        name = "serve-compare"
    else:
        runs = [run_one(trace, args.url, args.model, args, console, "endpoint")]  # main reports its errors
        name = "serve"

    ok_runs = [r for r in runs if "summary" in r]
    payload: dict[str, Any] = {
        "mode": "compare" if args.compare else "single",
        "trace": cfg.to_dict(),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "timeout_s": args.timeout,
        "argv": argv,
        "runs": runs,
    }
    if ok_runs:
        print_table(f"disagg bench serve: {len(trace)} requests, Poisson {cfg.rate:g} req/s, "
                    f"SLO TTFT <= {slo.ttft_ms:g} ms, TPOT <= {slo.tpot_ms:g} ms",
                    ["metric", *(r["label"] for r in ok_runs)], summary_rows([r["summary"] for r in ok_runs]),
                    console)
    by_label = {r["label"]: r for r in ok_runs}
    if "monolithic" in by_label and "disagg" in by_label:
        mono, dis = by_label["monolithic"], by_label["disagg"]
        comp = compare(mono["summary"], dis["summary"], [RequestRecord.from_dict(r) for r in mono["requests"]],
                       [RequestRecord.from_dict(r) for r in dis["requests"]])
        payload["comparison"] = comp
        goodput = ("unbounded (monolithic met none)" if comp["goodput_unbounded"]
                   else _v(comp["goodput_disagg_over_mono"]))
        pairs = comp["paired"]
        print_table("monolithic vs disaggregated (targets are reported, not asserted)",
                    ["ratio", "measured", "target"],
                    [[f"TPOT p99 monolithic / disagg (the {pairs['tpot_requests']} requests both served)",
                      _v(comp["tpot_p99_mono_over_disagg"]), ">= 3x"],
                     ["goodput disagg / monolithic", goodput, ">= 2x"],
                     [f"TTFT p99 monolithic / disagg (the {pairs['ttft_requests']} requests both served)",
                      _v(comp["ttft_p99_mono_over_disagg"]), "-"]], console)
    return name, payload, failures


def _write_point(name: str, payload: dict[str, Any], args: argparse.Namespace, console: Console,
                 out_dir: Path) -> Path:
    path = write_json(out_dir, name, payload)
    console.print(f"wrote {path}")
    ok_runs = [r for r in payload["runs"] if "summary" in r]
    if ok_runs and not args.no_plots:
        slo = SLO(payload["slo"]["ttft_ms"], payload["slo"]["tpot_ms"])
        for p in plot_cdfs(ok_runs, slo, out_dir, name):
            console.print(f"wrote {p}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    if args.compare == bool(args.url):
        ap.error("give --url URL (an existing endpoint) or --compare (start local clusters), not both")
    for flag in ("timeout", "ttft_slo_ms", "tpot_slo_ms", "up_timeout"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            ap.error(f"--{flag.replace('_', '-')} must be a positive number, got {value:g}")
    raise_open_file_limit()
    try:
        cfgs = [trace_config(args, rate) for rate in args.rate]
        traces = [generate_trace(cfg) for cfg in cfgs]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        ap.error(str(exc))
    if not all(traces):
        ap.error("the trace is empty: raise --rate or --duration")
    console = Console()
    out_dir = Path(args.out)
    argv_list = list(sys.argv[1:] if argv is None else argv)

    try:
        failures = _run(cfgs, traces, args, argv_list, console, out_dir)
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
        if args.compare:
            raise
        console.print(f"[red]disagg bench serve: cannot use {args.url}: {exc}[/red]")
        return 2
    for f in failures:
        console.print(f"[red]failed: {f}[/red]")
    return 1 if failures else 0


def _run(cfgs: list[TraceConfig], traces: list[list[TraceRequest]], args: argparse.Namespace, argv: list[str],
         console: Console, out_dir: Path) -> list[str]:
    """One point, or a sweep over the rates; returns the failures."""
    if len(cfgs) == 1:
        name, payload, failures = _run_point(traces[0], cfgs[0], args, argv, console, out_dir)
        _write_point(name, payload, args, console, out_dir)
    else:
        points: list[dict[str, Any]] = []
        failures = []
        for i, (cfg, trace) in enumerate(zip(cfgs, traces, strict=True)):
            console.rule(f"rate {cfg.rate:g} req/s ({i + 1} of {len(cfgs)})")
            point_dir = out_dir / f"rate-{cfg.rate:g}"
            name, payload, point_failures = _run_point(trace, cfg, args, argv, console, point_dir)
            points.append(sweep_point(cfg.rate, payload, _write_point(name, payload, args, console, point_dir)))
            failures += [f"rate {cfg.rate:g}: {f}" for f in point_failures]
        slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
        columns, rows = sweep_table(points)
        print_table(f"disagg bench serve: load sweep, SLO TTFT <= {slo.ttft_ms:g} ms, TPOT <= {slo.tpot_ms:g} ms",
                    columns, rows, console)
        name = f"{name}-sweep"
        path = write_json(out_dir, name, {"mode": "compare-sweep" if args.compare else "sweep",
                                          "trace": {**cfgs[0].to_dict(), "rate": list(args.rate)},
                                          "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
                                          "argv": argv, "points": points})
        console.print(f"wrote {path}")
        if not args.no_plots:
            console.print(f"wrote {plot_sweep(points, slo, out_dir / f'{name}.png')}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
