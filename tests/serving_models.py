"""Tiny models the serving tests share: a random decoder with a chat-templated BPE tokenizer, and
LoRA / IA3 adapters on it that really change its output."""

from __future__ import annotations

from pathlib import Path

import torch

import lmforge
from lmforge import ModelConfig, Transformer, peft
from lmforge.chat_template import BUILTIN_TEMPLATES
from lmforge.files import BASE_MODEL_KEY, atomic_write_yaml
from lmforge.tokenizers import Tokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a customer asks about a refund for a late order",
    "my card was charged twice, please help",
    "what time does the store open on sunday",
    "hello there, how can I help you today?",
] * 20


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE (300 tokens) with ChatML special tokens and template."""
    roles = {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}
    trained = Tokenizer.train(
        iter(TEXTS), kind="bpe", vocab_size=300, show_progress=False, special_tokens=roles
    )
    return Tokenizer(trained.backend, trained.special_tokens, chat_template=BUILTIN_TEMPLATES["chatml"])


def tiny_decoder(
    vocab_size: int, *, position: str = "rope", seed: int = 0, max_seq_len: int = 512
) -> Transformer:
    """A random 2-layer decoder whose logits are spread wide (init_std 0.3): greedy choices are
    far from ties, so batched and single decoding pick the same tokens despite summation order."""
    torch.manual_seed(seed)
    preset = "tiny-llama" if position == "rope" else "tiny-decoder"
    config = ModelConfig.from_name(
        preset, vocab_size=vocab_size, max_seq_len=max_seq_len, position=position, init_std=0.3
    )
    return Transformer(config).eval()


def add_adapter(model: Transformer, name: str, method: str = "lora", *, seed: int = 1) -> None:
    """Add adapter ``name`` with random (not zero) weights, so it changes the output."""
    options = {"r": 4, "target_modules": "all-linear"} if method == "lora" else {}
    peft.apply(model, method, adapter_name=name, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft.base.adapter_parameters(model, name).values():
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator) * 0.5 + (1.0 if method == "ia3" else 0.0)
            )
    peft.set_adapter(model, None)


def save_tiny_runs(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A base run and two LoRA adapter runs on it (``billing``, ``support``) under ``folder``."""
    tokenizer = tiny_tokenizer()
    base = lmforge.save_run(folder / "base", model=tiny_decoder(tokenizer.vocab_size), tokenizer=tokenizer)
    adapters = {}
    for index, name in enumerate(("billing", "support")):
        model = lmforge.load(base).model
        add_adapter(model, name, seed=index + 1)
        run = folder / name
        peft.save_adapter(model, run, name)
        config = {"model": model.config.to_dict(), BASE_MODEL_KEY: str(base)}
        atomic_write_yaml(run / "config.yaml", config)
        adapters[name] = run
    return base, adapters
