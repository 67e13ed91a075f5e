"""``disagg router``: the OpenAI-compatible front door (default port 8000)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvicorn

from disagg_worker.argtypes import log_level, port, positive
from disagg_worker.models.loader import ModelLoadError, load_tokenizer
from disagg_worker.policy import Policy, PolicyError, load_policy
from disagg_worker.router.app import DEFAULT_MAX_BODY_BYTES, build_app
from disagg_worker.router.service import DEFAULT_STREAM_IDLE_TIMEOUT, RouterService
from disagg_worker.server.peers import PeerPool

log = logging.getLogger("disagg.router")
# Locally a Ctrl-C should not wait long; the operator passes the pool's drain timeout instead.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="disagg router", description=__doc__)
    ap.add_argument("--model", default=None, help="preset name or local HF dir (for the tokenizer)")
    ap.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model)")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=port, default=8000)
    ap.add_argument("--decode-workers", required=True, help="comma list host:port (names may resolve to many)")
    ap.add_argument("--prefill-workers", default=None, help="comma list host:port, for the TTFT estimate")
    ap.add_argument("--max-request-bytes", type=positive(int), default=DEFAULT_MAX_BODY_BYTES,
                    help="largest request body accepted; larger ones get a 413 (default %(default)s)")
    ap.add_argument("--stream-idle-timeout", type=positive(float, zero=True), default=DEFAULT_STREAM_IDLE_TIMEOUT,
                    metavar="SECONDS",
                    help="a decode worker that sends nothing on a request for this long has failed it: the request "
                         "goes to another worker if no token was sent yet, else ends with a 502 (default "
                         "%(default)g; 0: wait forever)")
    ap.add_argument("--shutdown-timeout", type=positive(float, zero=True), default=DEFAULT_SHUTDOWN_TIMEOUT,
                    metavar="SECONDS",
                    help="after SIGTERM or Ctrl-C the router takes no new connection and lets the requests it holds "
                         "run this long before it cuts them (default %(default)g)")
    ap.add_argument("--log-level", type=log_level, default="INFO")
    return ap


def served_name(policy: Policy, model_flag: str | None, ref: str) -> str:
    """The model id clients send: a policy's ``model: {name, path}`` names the model at its path (as the
    operator passes it with --served-model-name); otherwise the folder's name, or the preset's."""
    if model_flag is None and policy.model.served_name:
        return policy.model.served_name
    return Path(ref).name if Path(ref).is_dir() else ref


async def serve(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    ref = args.model or policy.model.ref
    tokenizer, max_model_len = await asyncio.to_thread(load_tokenizer, ref)
    name = args.served_model_name or served_name(policy, args.model, ref)
    decode_pool = PeerPool("decode", args.decode_workers, include_prefix_hashes=policy.cache.reuse_prefix)
    prefill_pool = PeerPool("prefill", args.prefill_workers)
    await decode_pool.start()
    await prefill_pool.start()
    service = RouterService(policy, tokenizer, name, max_model_len, decode_pool, prefill_pool,
                            stream_idle_timeout=args.stream_idle_timeout)
    app = build_app(service, args.max_request_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    log.info("router on http://%s:%d/v1 serving %s (%d decode, %d prefill workers known)", args.host, args.port,
             name, len(decode_pool.peers), len(prefill_pool.peers))
    try:
        await server.serve()
    finally:
        await decode_pool.stop()
        await prefill_pool.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not [w for w in args.decode_workers.split(",") if w.strip()]:
        parser.error("--decode-workers lists no worker")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s router[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except (PolicyError, ModelLoadError, ValueError) as exc:
        print(f"disagg router: {exc}", file=sys.stderr)
        return 2
