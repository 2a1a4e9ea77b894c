"""A conversation with a chat model: its history, trimmed to the context, rendered through the
model's chat template; and loading a model with adapters to talk to or serve.

    messages (system + turns) ──chat template──► prompt ids ──too long? drop the oldest turns──►
    lmforge.generation.stream ──► the answer's text as it comes ──► appended to the history

``lmforge chat`` reads lines and prints what :class:`Conversation` returns; a notebook, a test or
a bot can drive the same object. The server (:mod:`lmforge.serving`) renders its requests'
``messages`` with the same template (:func:`render_prompt`). Reference: the chat-templating guide
of Hugging Face ``transformers`` (a conversation as a list of role/content messages), and
llama.cpp's ``llama-cli -cnv`` for the terminal commands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..chat_template import ChatTemplate, special_token_variables, template_for
from ..errors import LMForgeError
from ..files import atomic_write_json
from ..generation import IncrementalDecoder, stream
from ..peft import load_adapter, set_adapter
from ..quant import for_decoding
from ..runs import LoadedRun, load
from .generation import Sampling, choosing

Message = dict[str, str]


@dataclass
class Reply:
    """What :meth:`Conversation.reply` returns."""

    text: str  # the answer (as far as it went)
    new_ids: list[int]
    dropped_turns: int  # oldest turns left out of the prompt to fit the context
    finish_reason: str  # "stop" (end of turn), "length" (max_new_tokens) or "interrupted"
    prompt_tokens: int


def load_with_adapters(
    path: str | Path,
    adapters: Mapping[str, str | Path] | None = None,
    *,
    active: str | None = None,
    device: str | torch.device | None = None,
) -> LoadedRun:
    """Load a model (run folder, Hugging Face folder, GGUF file) and put each adapter run of
    ``adapters`` (name -> run folder) on it under its name; ``active`` names the one to answer
    with (default: the model as loaded, e.g. a PEFT run's own adapter). The model comes in the
    form decoding reads fastest (:func:`lmforge.quant.for_decoding`, fp32: on a CPU each linear
    weight stored transposed), for ``lmforge chat`` and ``lmforge serve``.

    Raises:
        LMForgeError: a model or adapter that cannot be loaded, or an adapter trained on another base.
    """
    run = load(path, device=device)
    if run.tokenizer is None:
        raise LMForgeError(
            "the model has no tokenizer (tokenizer.json) to read and write text with", file=path
        )
    for name, adapter in (adapters or {}).items():
        load_adapter(run.model, adapter, name=name, activate=False)
    if active is not None:
        set_adapter(run.model, active)
    for_decoding(run.model, "fp32")  # on a CPU, the weights in the layout decoding reads fastest
    return run


def render_prompt(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], template: ChatTemplate
) -> tuple[list[int], list[int]]:
    """The ids of ``messages`` rendered with the generation prompt, and the ids that end the answer."""
    text = template.render(
        messages, add_generation_prompt=True, special_tokens=special_token_variables(tokenizer)
    )
    return tokenizer.encode(text), template.stop_tokens(tokenizer)


class Conversation:
    """A chat with ``model``: send a user message, get the answer (streamed), keep the history.

    Args:
        model: a decoder with an LM head, in eval mode.
        tokenizer: its tokenizer (with a chat template, or name one with ``template``).
        system: a system message before the turns.
        sampling: how to choose tokens (``max_new_tokens``: the most tokens of one answer).
        template: a built-in template name or Jinja source (default: the tokenizer's own).
        context: positions the prompt and answer may take (default: the model's ``max_seq_len``).

    Raises:
        LMForgeError: not a decoder, no chat template, or beam search asked (answers stream).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        system: str | None = None,
        sampling: Sampling | None = None,
        template: str | None = None,
        context: int | None = None,
    ) -> None:
        if model.config.arch != "decoder":
            raise LMForgeError(f"chat needs a decoder model, this one is an {model.config.arch}", key="model")
        self.sampling = sampling or Sampling()
        if self.sampling.num_beams != 1:
            raise LMForgeError("chat streams its answers: num_beams must be 1", key="num_beams")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template_for(tokenizer, template)
        self.context = context or model.config.max_seq_len
        self.system = system
        self.turns: list[Message] = []  # user and assistant messages, oldest first
        self.first_kept = 0  # turns before this one no longer fit the context

    @property
    def messages(self) -> list[Message]:
        """The conversation as the model sees it now: the system message and the kept turns."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns[self.first_kept :]

    def reset(self) -> None:
        """Forget the turns (the system message stays)."""
        self.turns, self.first_kept = [], 0

    def set_system(self, text: str | None) -> None:
        """Change (or, with None or an empty text, remove) the system message."""
        self.system = text or None

    def prompt_ids(self, user: str) -> tuple[list[int], list[int], int]:
        """The prompt for the next answer to ``user``: its ids, the ids that end the answer, and how
        many of the oldest turns had to be left out so that it and ``max_new_tokens`` fit.

        Raises:
            LMForgeError: the system message and ``user`` alone do not fit the context.
        """
        room = self.context - self.sampling.max_new_tokens
        dropped = 0
        while True:
            kept = self.turns[self.first_kept + dropped :]
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids, stop = render_prompt(
                self.tokenizer, system + kept + [{"role": "user", "content": user}], self.template
            )
            if len(ids) <= room:
                return ids, stop, dropped
            if not kept:
                raise LMForgeError(
                    f"the message takes {len(ids)} tokens with the system message; with {self.sampling.max_new_tokens} "
                    f"new tokens that is past the context of {self.context}: shorten it (or --max_new_tokens)",
                    key="message",
                )
            dropped += 2 if len(kept) > 1 and kept[0]["role"] == "user" else 1  # a user turn and its answer

    def reply(
        self,
        user: str,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Reply:
        """Answer ``user``: the answer's text goes to ``on_text`` as it grows; ``should_stop``
        (checked after every token, e.g. a Ctrl-C flag) ends it early. The user message and the
        answer (as far as it went) join the history; turns that no longer fit are dropped."""
        ids, stop, dropped = self.prompt_ids(user)
        self.first_kept += dropped
        sampling = self.sampling
        options = choosing(
            sampling,
            self.tokenizer,
            next(self.model.parameters()).device,
            seed_offset=len(self.turns),
            stop=stop,
        )
        options.pop("pad_token_id")
        decoder = IncrementalDecoder(self.tokenizer, prompt_ids=ids[-8:])
        new: list[int] = []
        text = ""
        finish = "length"
        tokens = stream(self.model, ids, max_new_tokens=sampling.max_new_tokens, **options)
        try:
            for token in tokens:
                new.append(token)
                if token in stop:
                    finish = "stop"
                    break
                piece = decoder.push(token)
                text += piece
                if piece and on_text is not None:
                    on_text(piece)
                if should_stop is not None and should_stop():
                    finish = "interrupted"
                    break
        finally:
            tokens.close()
        rest = decoder.flush() if finish != "interrupted" else ""
        if rest and on_text is not None:
            on_text(rest)
        text += rest
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return Reply(text, new, dropped, finish, len(ids))

    def save(self, path: str | Path) -> Path:
        """Write the whole conversation (turns dropped from the context too) as JSON:
        ``{"messages": [...]}``, the shape the chat template and the OpenAI API read."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return atomic_write_json(Path(path), {"messages": system + self.turns})
