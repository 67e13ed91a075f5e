"""``disagg generate``: run prompts through the engine in-process and print the completions."""

from __future__ import annotations

import argparse
import sys

from disagg_worker.engine.request import InvalidRequestError, SamplingParams
from disagg_worker.models.loader import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disagg generate", description=__doc__)
    ap.add_argument("prompts", nargs="+", help="prompt texts (each one is a request)")
    ap.add_argument("--model", default=None, help="preset name or local HF directory (default tiny-llama)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[])
    args = ap.parse_args(argv)

    from disagg_worker.engine.engine import EngineConfig, LLMEngine

    try:
        params = SamplingParams.parse(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                      top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        prompts = [engine.tokenizer(p)["input_ids"] for p in args.prompts]
        requests = engine.generate(prompts, params)
    except (InvalidRequestError, ModelLoadError) as exc:
        print(f"disagg generate: {exc}", file=sys.stderr)
        return 2
    for text, req in zip(args.prompts, requests, strict=True):
        completion = engine.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        print(f"--- {text!r} ({req.num_prompt_tokens} prompt tokens, {req.num_output_tokens} generated, "
              f"finish: {req.finish_reason.value if req.finish_reason else '?'})")
        print(completion)
    return 0
