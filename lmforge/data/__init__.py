"""Data: text sources → token shards (memory-mapped) → batch sources → batches.

    files / JSONL / directories / texts ──Corpus──► pieces ──Tokenizer──► token shards (memmap)
    token shards ──RandomWindows | DocumentChunks + collator | EvalWindows──► batches

A batch is ``dict[str, Tensor]``: ``input_ids`` (B, T) long, ``attention_mask`` (B, T) bool
(True = real token), ``labels`` with -100 = ignored; encoder-decoder batches add
``decoder_input_ids`` and ``decoder_attention_mask``. Causal-LM labels are already shifted
(``labels[:, t]`` is the token after position t).
"""

from ..corpus import Corpus, as_corpus
from .collate import CausalLMCollator, MaskedLMCollator, SpanCorruptionCollator, pad_rows
from .python_docs import python_docs_corpus
from .samplers import DocumentChunks, EvalWindows, RandomWindows, pretraining_batches
from .shards import ShardSplit, TokenShards, token_dtype, write_shards

__all__ = [
    "CausalLMCollator",
    "Corpus",
    "DocumentChunks",
    "EvalWindows",
    "MaskedLMCollator",
    "RandomWindows",
    "ShardSplit",
    "SpanCorruptionCollator",
    "TokenShards",
    "as_corpus",
    "pad_rows",
    "pretraining_batches",
    "python_docs_corpus",
    "token_dtype",
    "write_shards",
]
