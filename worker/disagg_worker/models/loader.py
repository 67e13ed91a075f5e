"""Resolve a model reference (built-in preset, local HF directory, or cached hub id) to a loaded model.

disagg never downloads at run time: a reference that is neither a preset, a directory nor already in
the local Hugging Face cache fails at once with a message that says what to do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg_worker.models.presets import DEFAULT_PRESET, PRESETS, build_model, build_tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(RuntimeError):
    """The model reference cannot be resolved or is not supported."""


# HF generate's logits processors that act on greedy decoding too (GenerationConfig field names)
UNAPPLIED_GENERATION_FIELDS = ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_length", "min_new_tokens",
                               "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                               "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty",
                               "forced_decoder_ids")


def model_fingerprint(model: Any, tokenizer: Any) -> str:
    """A short hash naming the weights and tokenizer a KV cache is computed with: the model's config, a
    sample of every weight tensor (its first and last values: a fine-tune, merged LoRA included, changes
    them) and the vocabulary. Two workers whose KV blocks have the same shape but come from different
    checkpoints must not exchange them: the output would be silently wrong."""
    import torch

    h = hashlib.sha256()
    # not what names or describes the checkpoint (save_pretrained adds "architectures": a preset and its
    # saved directory were told apart and refused to exchange KV)
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in sorted(model.state_dict().items()):
            flat = param.detach().reshape(-1)
            h.update(name.encode())
            h.update(torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float32).numpy().tobytes())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    device: Any
    dtype: Any

    @functools.cached_property
    def fingerprint(self) -> str:
        """``model_fingerprint``, computed once."""
        return model_fingerprint(self.model, self.tokenizer)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def max_model_len(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def repetition_penalty(self) -> float:
        """The model's default (``generation_config.json``), which HF ``generate`` applies even when greedy."""
        return float(getattr(self.model.generation_config, "repetition_penalty", None) or 1.0)

    def unapplied_generation_defaults(self) -> dict[str, Any]:
        """``generation_config`` settings that change even greedy output in HF ``generate`` and that the
        engine does not apply (it applies ``repetition_penalty`` and the EOS ids): its output then differs."""
        gc = self.model.generation_config
        found = {name: getattr(gc, name, None) for name in UNAPPLIED_GENERATION_FIELDS}
        return {k: v for k, v in found.items() if v not in (None, 0, [], {}, ())}

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _check_architecture(config: Any, ref: str) -> None:
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"model {ref!r} has architecture {config.model_type!r}; disagg runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (decoder-only, rotary, RMSNorm)"
        )
    for attr in ("rope_scaling", "rope_parameters"):  # the name depends on the transformers version
        rope = getattr(config, attr, None)
        kind = (rope.get("rope_type") or rope.get("type")) if isinstance(rope, dict) else None
        if kind in BATCH_DEPENDENT_ROPE:
            raise ModelLoadError(
                f"model {ref!r} uses rope_type {kind!r}, whose frequencies depend on the longest position "
                "in the forward pass: in a continuous batch one request would change another's output"
            )


def _load_pretrained(ref: str, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(ref, dtype="auto", local_files_only=local_only,
                                                       output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers only logs it and initialises them at random: the model would serve noise
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint lacks weights the causal LM needs ({shown}); a base model without "
                         "its LM head, or an embedding or reward model, cannot generate")
    tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=local_only)
    return model, tokenizer


def to_device_keeping_rotary_fp32(model: Any, device: Any, dtype: Any) -> Any:
    """``model.to(device, dtype)``, except the rotary frequencies (``inv_freq`` buffers), which stay in
    float32 as Hugging Face keeps them in a bf16/fp16 model: rounded to bf16 (1/sqrt(10) became 0.3164),
    every rotary angle drifted by about position x 2^-9, and greedy output parted from HF's the more,
    the longer the context (0 of 6 long bf16 prompts equal; 6 of 6 with float32 frequencies)."""
    frequencies = {name: buf.detach().float().clone() for name, buf in model.named_buffers()
                   if name.rsplit(".", 1)[-1].endswith("inv_freq")}
    model = model.to(device=device, dtype=dtype)
    for name, values in frequencies.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = values.to(device)
    return model


def load_model(ref: str | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``ref``: a preset name, a local HF model directory, or a hub id already in the local cache."""

    ref = ref or DEFAULT_PRESET
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if ref in PRESETS:
        model, tokenizer = build_model(PRESETS[ref]), build_tokenizer()
    elif Path(ref).is_dir():
        if not (Path(ref) / "config.json").exists():
            raise ModelLoadError(f"{ref!r} is a directory but has no config.json: not a Hugging Face model")
        try:
            model, tokenizer = _load_pretrained(ref, local_only=True)
        except (OSError, ValueError) as exc:  # no weights, no tokenizer, an unknown architecture, ...
            raise ModelLoadError(f"cannot load the model in {ref!r}: {exc}") from exc
    else:
        # Never touch the network: a hub id works only if it is already in the local HF cache.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            model, tokenizer = _load_pretrained(ref, local_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"model {ref!r} is not a built-in preset ({', '.join(PRESETS)}), not a local directory, "
                "and not in the local Hugging Face cache; disagg does not download models at run time: "
                "download it beforehand and pass its directory"
            ) from exc
    _check_architecture(model.config, ref)
    model = to_device_keeping_rotary_fp32(model, torch_device, torch_dtype).eval()
    return LoadedModel(name=ref, model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype)


def load_tokenizer(ref: str | None = None) -> tuple[Any, int]:
    """The tokenizer and context length of a model, without loading its weights (for the router)."""
    from transformers import AutoConfig, AutoTokenizer

    from disagg_worker.models.presets import build_config

    ref = ref or DEFAULT_PRESET
    if ref in PRESETS:
        return build_tokenizer(), int(build_config(PRESETS[ref]).max_position_embeddings)
    if not Path(ref).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, local_files_only=True)
        config = AutoConfig.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {ref!r} from local files: {exc}") from exc
    return tokenizer, int(config.max_position_embeddings)
