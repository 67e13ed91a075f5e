"""The router's request path, independent of HTTP: admit, pick a decode worker, stream its tokens.

Admission (``admit_request``) uses a live TTFT estimate from the workers' load reports, for the path
the request will take (``estimate_request_ttft``: remote prefill or local); the decode
worker is chosen by seed 001's multi-factor score. A worker that cannot take the request before any
token was produced (unreachable, draining) is skipped and the next best is tried; a worker that fails
after tokens were streamed ends the request with an explicit error. SLO attainment is tracked per
priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from disagg_worker import metrics as m
from disagg_worker.engine.prefix_hash import block_hashes
from disagg_worker.engine.request import MAX_TOKEN_ID, InvalidRequestError, SamplingParams
from disagg_worker.policy import Policy
from disagg_worker.router.openai_schema import APIError
from disagg_worker.routing import WorkerLoad, admit_request, estimate_request_ttft, pick_decode_worker
from disagg_worker.rpc import pb
from disagg_worker.server.peers import PeerPool
from disagg_worker.server.runtime import PARAM_METADATA_KEY, params_to_proto

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
# A prompt with more characters than the context's tokens times the longest token's spelling can never
# fit, and is refused before it is tokenized (a 12 MB prompt took the tokenizer 25 s and 3.4 GB). The
# slack covers normalisers that merge characters (NFC: a letter and its combining marks; Hangul jamo).
NORMALISATION_SLACK = 4
# A decode worker that sends nothing on a request for this long has failed it: a hung device or engine
# keeps its gRPC connection and health answers alive, so without this its clients would wait forever.
# Long enough for any queue admission lets in (and a first token behind it); 0 turns it off.
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Admitted:
    """One prompt of an admitted request: its block hashes (to route a retry by) and the decode worker
    admission counted it on (None when there was none), with the routing outcome."""

    hashes: list[bytes]
    worker: WorkerLoad | None = None
    outcome: str = ""


def _uncount(admitted: list[Admitted]) -> None:
    for a in admitted:
        if a.worker is not None:
            a.worker.pending = max(0, a.worker.pending - 1)


async def read_within(call: Any, seconds: float | None) -> Any:
    """``call.read()``, or TimeoutError after ``seconds`` (None: no limit).

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives just as the read
    completes and returns the message, so a router whose client had gone away read the stream on to
    max_tokens (the decode worker never saw the cancel). ``asyncio.timeout`` re-raises it."""
    async with asyncio.timeout(seconds):
        return await call.read()


def _worker_failed(worker: str, failure: str) -> APIError:
    """A 502 for a client: an id to find the worker and its error in the router's log, not their text
    (a worker's errors can carry device and library internals, and its address is the cluster's)."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s: decode worker %s %s", error_id, worker, failure)
    return APIError(502, f"a decode worker failed the request (error {error_id}: the router's log has the details)",
                    type_="server_error", code="worker_failed")


@dataclass
class StreamResult:
    """What the caller learns as tokens arrive (filled in place while streaming)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    worker: str = ""
    remote_prefill: bool = False


class SloTracker:
    def __init__(self, policy: Policy) -> None:
        self.qos = policy.qos
        self.counts: dict[str, dict[str, int]] = {}

    def record(self, priority: str, ttft: float | None, tpot: float | None, *, failed: bool = False) -> None:
        """One finished request; ``failed`` (rejected, or no worker could serve it) misses every SLO."""
        c = self.counts.setdefault(priority, {"n": 0, "ttft_ok": 0, "tpot_ok": 0, "both_ok": 0})
        c["n"] += 1
        m.SLO_REQUESTS.labels(priority).inc()
        ttft_ok = not failed and ttft is not None and ttft * 1000 <= self.qos.ttft_slo_ms
        tpot_ok = not failed and (tpot is None or tpot * 1000 <= self.qos.tpot_slo_ms)
        c["ttft_ok"] += ttft_ok
        c["tpot_ok"] += tpot_ok
        c["both_ok"] += ttft_ok and tpot_ok
        if not ttft_ok:
            m.SLO_VIOLATIONS.labels("ttft", priority).inc()
        if not tpot_ok:
            m.SLO_VIOLATIONS.labels("tpot", priority).inc()
        if not (ttft_ok and tpot_ok):
            m.SLO_VIOLATIONS.labels("both", priority).inc()
        for slo, key in (("ttft", "ttft_ok"), ("tpot", "tpot_ok"), ("both", "both_ok")):
            m.SLO_ATTAINMENT.labels(slo, priority).set(c[key] / c["n"])


class RouterService:
    def __init__(self, policy: Policy, tokenizer: Any, model_name: str, max_model_len: int,
                 decode_pool: PeerPool, prefill_pool: PeerPool, *,
                 stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT) -> None:
        self.policy = policy
        self.stream_idle_timeout = stream_idle_timeout or None
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.decode_pool = decode_pool
        self.prefill_pool = prefill_pool
        self.slo = SloTracker(policy)
        self.block_size = policy.cache.block_size
        # a token's raw spelling (byte-level: one character per byte) is at least as long as its text
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1)

    # ---- admission -------------------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self.decode_pool.healthy())

    def context_limit(self) -> int:
        """Tokens a request may hold (prompt + output): the model's, or the smallest a healthy decode
        worker was started with (``--max-model-len``), so a request fits whichever worker it lands on."""
        workers = [p.max_model_len for p in self.decode_pool.healthy() if p.max_model_len > 0]
        return min([self.max_model_len, *workers])

    def check_text_fits(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the context whatever it tokenizes to, before tokenizing it."""
        limit = self.context_limit()
        if chars > NORMALISATION_SLACK * limit * self.max_token_chars:
            raise APIError(400, f"the {param} ({chars} characters) is longer than this model's context of {limit} "
                                f"tokens can hold", param=param, code="context_length_exceeded")

    # ---- the request path ------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], sampling: dict[str, Any], prompt_param: str = "prompt") -> SamplingParams:
        """``prompt_param``: what the client sent the prompt as (``prompt``, or chat's ``messages``)."""
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if not all(0 <= t <= MAX_TOKEN_ID for t in prompt_ids):
            raise APIError(400, "prompt token ids must be between 0 and the vocabulary size", param="prompt")
        try:
            params = SamplingParams.parse(**sampling)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        limit = self.context_limit()
        if len(prompt_ids) >= limit:  # too long on its own, whatever max_tokens said (or defaulted to)
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the {prompt_param} has "
                                f"{len(prompt_ids)} tokens, which leaves none to generate", param=prompt_param,
                           code="context_length_exceeded")
        if len(prompt_ids) + params.max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request "
                                f"asks for {len(prompt_ids) + params.max_tokens} ({len(prompt_ids)} in the prompt + "
                                f"{params.max_tokens} max_tokens)", param="max_tokens",
                           code="context_length_exceeded")
        return params

    def admit(self, prompts: list[list[int]], priority: str) -> list[Admitted]:
        """QoS admission, once for a whole HTTP request (each of its prompts is a generation of its own):
        the estimate is its slowest prompt's, each on the decode worker it is routed to. A rejection
        raises a 429 and counts once; every prompt of it misses its SLO.

        Admission is the routing decision: each admitted prompt is counted on its worker at once, so
        the next prompt, and a request arriving in the same event-loop pass, is estimated behind it
        (counted only when its stream started, a burst of requests all saw the same idle queue and
        all got in). ``generate`` sends each prompt where it was counted."""
        hashes_of = [block_hashes(p, self.block_size) for p in prompts]
        loads = [p.load for p in self.decode_pool.healthy()]
        prefill = [p.load for p in self.prefill_pool.healthy()]
        estimates: list[float] = []
        admitted: list[Admitted] = []
        for prompt, hashes in zip(prompts, hashes_of, strict=True):
            choice = pick_decode_worker(loads, hashes, len(prompt), self.policy.split_policy, self.policy.cache)
            if choice is None:  # no worker: generate() answers 503
                _uncount(admitted)
                return [Admitted(h) for h in hashes_of]
            # as the decode worker counts its hit: never the block holding the last prompt token
            reusable = min(choice.cached_blocks, (len(prompt) - 1) // self.block_size)
            estimates.append(estimate_request_ttft(len(prompt), reusable * self.block_size, choice.worker, prefill,
                                                   self.policy.split_policy, loads))
            choice.worker.pending += 1  # routed here until its next load report says so
            admitted.append(Admitted(hashes, choice.worker, choice.outcome))
        est = max(estimates)
        m.ESTIMATED_TTFT.set(est)
        admission = admit_request(priority, est, self.policy.qos)
        if admission.admitted:
            return admitted
        _uncount(admitted)
        m.REJECTIONS.labels(admission.reason, priority).inc()
        for _ in prompts:
            self.slo.record(priority, None, None, failed=True)
        raise APIError(429, f"server overloaded: estimated time to first token {est * 1000:.0f} ms is over the "
                            f"limit for {priority}-priority requests; retry later", type_="rate_limit_error",
                       code=admission.reason, headers={"Retry-After": str(self.policy.qos.retry_after_seconds)})

    async def generate(self, prompt_ids: list[int], admitted: Admitted, params: SamplingParams, priority: str,
                       result: StreamResult, prompt_param: str = "prompt") -> AsyncIterator[pb.GenerateResponse]:
        """Yield the chosen worker's responses (after ``admit``); raises APIError for anything the client
        must see.

        A request the system failed (no worker, a worker that died) counts as an SLO violation:
        attainment must not look better for the requests it did not serve."""
        async with contextlib.aclosing(self._generate(prompt_ids, admitted, params, priority, result,
                                                      prompt_param)) as responses:
            try:
                async for msg in responses:
                    yield msg
            except APIError as exc:
                if exc.status >= 429:  # not the client's own mistake (400, 404)
                    self.slo.record(priority, None, None, failed=True)
                raise

    async def _generate(self, prompt_ids: list[int], admitted: Admitted, params: SamplingParams, priority: str,
                        result: StreamResult, prompt_param: str) -> AsyncIterator[pb.GenerateResponse]:
        t0 = time.monotonic()
        request_id = uuid.uuid4().hex  # + the attempt: a retry is a new request to the workers
        tried: set[str] = set()
        first_token_at: float | None = None
        last_failure = ""
        for attempt in range(MAX_ATTEMPTS):
            peers = {p.endpoint: p for p in self.decode_pool.healthy() if p.endpoint not in tried}
            counted = admitted.worker if attempt == 0 else None
            if counted is not None and counted.endpoint in peers and peers[counted.endpoint].load is counted:
                peer, outcome = peers[counted.endpoint], admitted.outcome  # admission counted it there
            else:
                choice = pick_decode_worker([p.load for p in peers.values()], admitted.hashes, len(prompt_ids),
                                            self.policy.split_policy, self.policy.cache)
                if choice is None:
                    if last_failure:  # a worker failed it, not merely went away: the request may be what fails
                        raise _worker_failed("each decode worker tried", last_failure)
                    raise APIError(503, "no decode worker is available", type_="service_unavailable",
                                   code="no_workers")
                peer, outcome = peers[choice.worker.endpoint], choice.outcome
                peer.load.pending += 1
            m.ROUTING_DECISIONS.labels("retry" if attempt else outcome).inc()
            result.worker = peer.endpoint
            req = pb.GenerateRequest(request_id=f"{request_id}-{attempt}", prompt_token_ids=prompt_ids,
                                     params=params_to_proto(params),
                                     priority=pb.PRIORITY_LOW if priority == "low" else pb.PRIORITY_HIGH,
                                     prefill_mode="auto")
            call = peer.decode.Generate(req)
            failure = ""  # why this worker did not finish the request, when it ended the stream itself
            try:
                while True:
                    try:
                        msg = await read_within(call, self.stream_idle_timeout)
                    except TimeoutError:
                        failure = f"sent nothing on the request for {self.stream_idle_timeout:g} s"
                        break
                    if msg is grpc.aio.EOF:  # a stream that ends without its final message is not finished
                        failure = "ended the stream before the request finished"
                        break
                    if msg.error:
                        failure = f"failed the request: {msg.error}"
                        break
                    if msg.token_ids and first_token_at is None:
                        first_token_at = time.monotonic()
                        result.remote_prefill = msg.remote_prefill
                    result.prompt_tokens, result.cached_tokens = msg.prompt_tokens, msg.cached_tokens
                    result.output_tokens = msg.output_tokens
                    if msg.finished:
                        result.finish_reason = msg.finish_reason
                    yield msg
                    if msg.finished:
                        break
                if not failure:
                    break
                if first_token_at is None:  # the client has seen nothing: another worker may serve it
                    log.warning("decode worker %s %s; trying another", peer.endpoint, failure)
                    tried.add(peer.endpoint)
                    last_failure = failure
                    continue
                raise _worker_failed(peer.endpoint, failure)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:  # the worker names the field at fault, if one is
                    param = dict(exc.trailing_metadata() or ()).get(PARAM_METADATA_KEY)
                    param = prompt_param if param == "prompt" else param  # chat's prompt is its messages
                    raise APIError(400, exc.details() or "invalid request", param=param) from None
                if first_token_at is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    log.warning("decode worker %s unavailable (%s); trying another", peer.endpoint, exc.details())
                    tried.add(peer.endpoint)
                    self.decode_pool.mark_unhealthy(peer.endpoint)
                    continue
                raise _worker_failed(peer.endpoint, f"failed mid-request: {code.name}: {exc.details()}") from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not call.cancelled() or (task is not None and task.cancelling()):
                    raise  # our caller cancelled us (a client that went away): not the worker's doing
                # the channel was closed under the call (the router stopped, or the worker was retired
                # past its grace): the same as a worker that went away
                if first_token_at is None:
                    tried.add(peer.endpoint)
                    continue
                raise _worker_failed(peer.endpoint, "had the call cancelled mid-request") from None
            finally:
                call.cancel()
        else:
            if last_failure:
                raise _worker_failed("each decode worker tried", last_failure)
            raise APIError(503, "every decode worker tried was unavailable", type_="service_unavailable",
                           code="no_workers")
        end = time.monotonic()
        ttft = None if first_token_at is None else first_token_at - t0
        tpot = ((end - first_token_at) / (result.output_tokens - 1)
                if first_token_at is not None and result.output_tokens > 1 else None)
        if ttft is not None:
            m.ROUTER_TTFT.labels(priority).observe(ttft)
        if tpot is not None:
            m.ROUTER_TPOT.labels(priority).observe(tpot)
        m.ROUTER_E2E.labels(priority).observe(end - t0)
        self.slo.record(priority, ttft, tpot)
