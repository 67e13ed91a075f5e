"""Built-in model presets: small random-weight causal LMs with an offline-built tokenizer.

A preset needs no download: its config is fixed here, its weights come from a fixed seed, and its
tokenizer is a byte-level BPE trained (deterministically) on the corpus shipped in ``data/``. Every
process that builds the same preset gets the same weights and the same tokenizer, which is what
lets a router tokenize and separate prefill/decode workers compute on one model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
TOKENIZER_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """A named, reproducible model: architecture, shape and seed."""

    name: str
    architecture: str  # "llama" | "qwen2" | "mistral"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llama", "llama"),
        Preset("tiny-qwen2", "qwen2", seed=1),
        Preset("tiny-mistral", "mistral", seed=2, extra={"sliding_window": 4096}),
    )
}
DEFAULT_PRESET = "tiny-llama"


@functools.lru_cache(maxsize=1)
def build_tokenizer() -> Any:
    """Train the byte-level BPE on the shipped corpus and wrap it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = (DATA_DIR / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(preset: Preset) -> Any:
    """The transformers config of a preset (vocabulary sized to the offline tokenizer)."""
    from transformers import AutoConfig

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return AutoConfig.for_model(
        preset.architecture,
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        # 0.2 rather than the default 0.02: a random model then produces varied text, which keeps
        # token-for-token equality tests meaningful.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=[eos, im_end],
        pad_token_id=eos,
        **preset.extra,
    )


def build_model(preset: Preset) -> Any:
    """Instantiate the preset with weights drawn from its fixed seed (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = build_config(preset)
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(preset.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model.eval()


def save_preset(name: str, directory: Path) -> Path:
    """Write a preset as an ordinary Hugging Face model directory (config, safetensors, tokenizer)."""
    preset = PRESETS[name]
    directory.mkdir(parents=True, exist_ok=True)
    build_model(preset).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
