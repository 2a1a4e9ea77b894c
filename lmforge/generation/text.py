"""Turning a stream of token ids into text as it grows.

Decoding token by token and joining the pieces is wrong in two ways: a byte-level BPE token can
hold part of a multi-byte UTF-8 character (a Chinese character is often split over two or three
tokens), and some decoders render a token differently depending on its left neighbour
(WordPiece's ``##`` continuations, SentencePiece's leading-space marker). So the text is decoded
over a short window that starts a little before the new tokens, and only the part past the window's
already-printed text is emitted; while the end of the text is an incomplete character (decoded as
U+FFFD) nothing is emitted until the next token completes it. The same idea as the incremental
detokenizers of text-generation servers (vLLM, TGI).
"""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from torch import Tensor

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class Decodes(Protocol):
    """Anything with a ``decode(ids, skip_special_tokens=...)``: lmforge's or Hugging Face's tokenizer."""

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class IncrementalDecoder:
    """Feed token ids one at a time; get back the text they complete.

    >>> decoder = IncrementalDecoder(tokenizer)
    >>> "".join(decoder.push(i) for i in ids) + decoder.flush() == tokenizer.decode(ids)
    True

    Args:
        tokenizer: decodes a list of ids to text.
        skip_special_tokens: leave out special tokens (eos, pad, …) as ``decode`` does.
        prompt_ids: ids already shown (the prompt): context for the first new tokens, not emitted.
    """

    def __init__(
        self, tokenizer: Decodes, *, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(i) for i in prompt_ids or []]
        self.window_start = 0  # first id of the decoding window (context for the new tokens)
        self.printed_end = len(self.ids)  # ids[window_start:printed_end] have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        printed = self._decode(self.ids[self.window_start : self.printed_end])
        text = self._decode(self.ids[self.window_start :])
        if len(text) <= len(printed) or (text.endswith(REPLACEMENT) and not final):
            return ""  # nothing new, or the last character is not complete yet
        new_text = text[len(printed) :]
        self.window_start = self.printed_end
        self.printed_end = len(self.ids)
        return new_text


class TextStreamer:
    """A ``streamer`` for :func:`~lmforge.generation.generate` (batch 1) that writes the text
    to a file (the terminal by default) as tokens arrive.

    The streamer protocol: ``put(tokens)`` with the new token of each row (a tensor of shape
    (1,)) after every step, then ``end()`` once. ``prompt_ids`` give the first new tokens their
    left context, so spacing at the join is right; they are shown too with ``show_prompt``.
    """

    def __init__(
        self,
        tokenizer: Decodes,
        *,
        file: TextIO | None = None,
        skip_special_tokens: bool = True,
        prompt_ids: list[int] | None = None,
        show_prompt: bool = False,
    ) -> None:
        self.decoder = IncrementalDecoder(
            tokenizer, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids
        )
        self.file = file
        self.text = ""  # everything written so far
        # The prompt's text, written just before the first new text (not before generation has
        # checked its settings and run the prompt, which may fail).
        self.pending = (
            tokenizer.decode(prompt_ids or [], skip_special_tokens=skip_special_tokens) if show_prompt else ""
        )

    def _write(self, text: str) -> None:
        text, self.pending = self.pending + text, ""
        if text:
            out = self.file or sys.stdout
            out.write(text)
            out.flush()
            self.text += text

    def put(self, tokens: Tensor) -> None:
        if tokens.numel() != 1:
            raise ValueError(f"TextStreamer streams one sequence; got {tokens.numel()} tokens per step")
        self._write(self.decoder.push(int(tokens.reshape(-1)[0])))

    def end(self) -> None:
        self._write(self.decoder.flush())
