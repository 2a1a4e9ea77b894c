"""A helper the task tests share: a run directory holding a freshly initialized tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.tokenizers import Tokenizer


def tiny_base(folder: Path, preset: str, tokenizer: Tokenizer) -> Path:
    """Save a random ``preset`` model (seed 0) sized to ``tokenizer`` with it as a run directory."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=tokenizer.vocab_size))
    return lmforge.save_run(folder, model=model, tokenizer=tokenizer)
