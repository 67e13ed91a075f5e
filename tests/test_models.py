"""Model loading: presets are reproducible across processes, HF directories load, bad refs fail fast."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from disagg_worker.models.loader import ModelLoadError, load_model
from disagg_worker.models.presets import PRESETS, build_tokenizer, save_preset

FINGERPRINT = """
import hashlib, torch
from disagg_worker.models.loader import load_model
lm = load_model("{name}", "cpu", "float32")
h = hashlib.sha256()
for k, v in sorted(lm.model.state_dict().items()):
    h.update(k.encode()); h.update(v.numpy().tobytes())
h.update(lm.tokenizer.backend_tokenizer.to_str().encode())
print(h.hexdigest())
"""


def test_preset_weights_and_tokenizer_are_identical_across_processes() -> None:
    digests = {subprocess.run([sys.executable, "-c", FINGERPRINT.format(name="tiny-llama")],
                              capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)}
    assert len(digests) == 1


def test_tokenizer_round_trip_and_chat_template() -> None:
    tok = build_tokenizer()
    text = "Disaggregated serving: prefill, then decode! 200 ms."
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_gqa(name: str) -> None:
    cfg = load_model(name, "cpu", "float32").config
    assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_saved_preset_loads_as_a_hf_directory(tmp_path: Path) -> None:
    save_preset("tiny-qwen2", tmp_path / "m")
    a = load_model("tiny-qwen2", "cpu", "float32")
    b = load_model(str(tmp_path / "m"), "cpu", "float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    assert b.tokenizer("hello")["input_ids"] == a.tokenizer("hello")["input_ids"]
    assert b.eos_token_ids == a.eos_token_ids
    # same weights, same KV: workers started on either exchange it (save_pretrained's "architectures" split them)
    assert b.fingerprint == a.fingerprint


def test_unknown_hub_id_fails_fast_with_a_clear_message() -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="does not download"):
        load_model("meta-llama/Llama-3.1-8B-Instruct", "cpu", "float32")
    assert time.monotonic() - t0 < 30


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path), "cpu", "float32")


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1024)).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'"):
        load_model(str(tmp_path), "cpu", "float32")


def test_a_checkpoint_without_its_lm_head_is_rejected(tmp_path: Path) -> None:
    """A base model saved without its head (an embedding model's shape) loaded with a random LM head
    that transformers only logged, and the worker served noise."""
    from transformers import MistralConfig, MistralModel

    MistralModel(MistralConfig(vocab_size=1027, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"lacks weights .*lm_head\.weight"):
        load_model(str(tmp_path), "cpu", "float32")


def test_batch_dependent_rope_is_rejected(tmp_path: Path) -> None:
    """transformers' dynamic/longrope rotary takes its scale from the longest position in the call: in
    a continuous batch one request's output would depend on its neighbours'."""
    import json

    save_preset("tiny-llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="rope_type 'dynamic'"):
        load_model(str(tmp_path), "cpu", "float32")


@pytest.mark.parametrize(("device", "dtype", "match"), [("tpu", "float32", "unknown device"),
                                                        ("cpu", "float8", "unknown dtype")])
def test_bad_device_or_dtype(device: str, dtype: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_model("tiny-llama", device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model("tiny-llama", "cuda", "float32")


def test_the_model_fingerprint_tells_checkpoints_apart() -> None:
    """What a prefill and a decode worker compare before exchanging KV: a fine-tune of the same shape (one
    changed weight in one layer here) must not pass for the model it came from."""
    import copy

    from disagg_worker.models.loader import model_fingerprint
    from tests.conftest import get_model

    lm = get_model("tiny-llama")
    assert model_fingerprint(lm.model, lm.tokenizer) == lm.fingerprint  # stable
    tuned = copy.deepcopy(lm.model)
    with torch.no_grad():
        tuned.model.layers[2].self_attn.q_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(tuned, lm.tokenizer) != lm.fingerprint
    assert get_model("tiny-qwen2").fingerprint != lm.fingerprint


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_the_rotary_frequencies_in_float32(dtype: str) -> None:
    """As Hugging Face does: ``.to(bf16)`` rounded them (1/sqrt(10) to 0.3164), each rotary angle drifted
    by about position x 2^-9, and greedy output parted from HF's more the longer the context (0 of 6
    bf16 prompts of 1,500-3,000 tokens equal to HF generate; 6 of 6 with float32 frequencies)."""
    half, full = load_model("tiny-llama", device="cpu", dtype=dtype), load_model("tiny-llama", device="cpu")
    assert next(half.model.parameters()).dtype == getattr(torch, dtype)
    frequencies = {n: b for n, b in half.model.named_buffers() if n.endswith("inv_freq")}
    reference = dict(full.model.named_buffers())
    assert frequencies and all(b.dtype == torch.float32 and torch.equal(b, reference[n])
                               for n, b in frequencies.items())
