"""Data: text sources -> token shards (memory-mapped) -> samplers -> batches.

files / JSONL / directories / texts ──Corpus──► pieces ──Tokenizer──► token shards (memmap)
token shards ──RandomWindows | DocumentChunks | EvalWindows──► {input_ids, attention_mask, labels}
"""

from .sources import Corpus, as_corpus

__all__ = ["Corpus", "as_corpus"]
