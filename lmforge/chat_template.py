"""Chat templates: a conversation (``messages``) rendered to the exact text a chat model was
trained on, as Hugging Face ``transformers``' ``apply_chat_template`` renders it.

A chat template is a Jinja program shipped with the model: ``chat_template`` in
``tokenizer_config.json`` (or a ``chat_template.jinja`` file beside it), or
``tokenizer.chat_template`` in a GGUF file's metadata. It is rendered in Jinja's sandbox
(``ImmutableSandboxedEnvironment``: a template is untrusted code from the internet and may not
reach Python internals), with the settings and helpers templates expect from Hugging Face:
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception(msg)``,
``strftime_now(fmt)``, a ``tojson`` that leaves non-ASCII characters as they are, and the
special tokens as variables (``bos_token``, ``eos_token``, …). Reference: the chat-templating
guide of ``transformers`` (docs/source/en/chat_templating.md) and Jinja's sandbox
documentation.

Built-in templates for models that have none: ``chatml`` (``<|im_start|>role … <|im_end|>``),
``llama-2`` (``[INST] … [/INST]``, the system prompt inside ``<<SYS>>``) and ``plain``
(``User: …`` lines).

For supervised fine-tuning, :func:`encode_chat` renders a conversation and marks which tokens
belong to assistant turns (the loss goes on those only). It needs no ``{% generation %}`` markers
in the template: each assistant turn is the text between the conversation rendered up to it with
the generation prompt and the conversation rendered through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .errors import LMForgeError

if TYPE_CHECKING:
    from .tokenizers import Tokenizer

Message = Mapping[str, Any]

# Named templates for models that ship none. Newlines are written as '\n' inside expressions:
# with trim_blocks a newline right after a block tag would be dropped.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('llama-2 conversations alternate user and assistant turns, starting with user') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ (bos_token or '') + '[INST] ' }}"
        "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        "{{ message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + (eos_token or '') }}{% endif %}"
        "{% endfor %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{{ message['role'] | capitalize + ': ' + message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}"
        "{{ '\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}

# Tokens that close a turn in common templates: generation stops at any of them that the
# tokenizer knows and the template writes (besides the tokenizer's eos).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
TOKEN_VARIABLES = ("bos", "eos", "unk", "pad", "cls", "sep", "mask")


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja source of the template.
        name: where it came from (a built-in's name, "tokenizer_config.json", "gguf"), for messages.

    Raises:
        LMForgeError: the source is not valid Jinja (with the line of the error).
    """

    def __init__(self, source: str, *, name: str = "chat template") -> None:
        if not isinstance(source, str) or not source.strip():
            raise LMForgeError(f"{name}: empty chat template", key="chat_template")
        self.source = source
        self.name = name
        self._template = _compile(source, name)

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """One of the named templates: ``chatml``, ``llama-2`` or ``plain``."""
        if name not in BUILTIN_TEMPLATES:
            raise LMForgeError(
                f"unknown chat template {name!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})",
                key="chat_template",
            )
        return cls(BUILTIN_TEMPLATES[name], name=name)

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        special_tokens: Mapping[str, str] | None = None,
        **variables: Any,
    ) -> str:
        """The conversation as text.

        Args:
            messages: dicts with ``role`` (system, user, assistant, …) and ``content``.
            add_generation_prompt: end with the header of an assistant turn, for the model to answer.
            special_tokens: role -> token string; each becomes ``{role}_token`` in the template.
            variables: more template variables (``tools``, ``documents``, ``enable_thinking``, …).

        Raises:
            LMForgeError: malformed messages, or the template itself refused them
                (``raise_exception``), one line.
        """
        import jinja2

        checked = check_messages(messages)
        context: dict[str, Any] = {f"{role}_token": token for role, token in (special_tokens or {}).items()}
        context.update(variables)
        try:
            return self._template.render(
                messages=checked, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as err:
            raise LMForgeError(f"{self.name}: {err}", key="chat_template") from None

    def stop_tokens(self, tokenizer: Tokenizer) -> list[int]:
        """Ids that end an assistant turn: the tokenizer's eos and the end-of-turn tokens that this
        template writes (``<|im_end|>``, ``<|eot_id|>``, …) and the tokenizer knows."""
        ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        for token in END_OF_TURN_TOKENS:
            token_id = tokenizer.token_to_id(token)
            if token in self.source and token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.source)} characters)"


@lru_cache(maxsize=16)
def _compile(source: str, name: str) -> Any:
    """The template compiled in a sandboxed environment with Hugging Face's helpers (cached: a
    model's template is compiled once)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise LMForgeError("chat templates need jinja2: pip install jinja2") from None

    class GenerationTag(Extension):
        """``{% generation %}…{% endgeneration %}`` (Hugging Face's marker of assistant text):
        rendered as its content; :func:`encode_chat` finds assistant turns without it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise LMForgeError(
            f"{name}: invalid Jinja: {err.message}", line=err.lineno, key="chat_template"
        ) from None


def check_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain dict copies of the messages; each needs a string ``role`` and a ``content``."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise LMForgeError("messages must be a list of {'role': ..., 'content': ...} dicts", key="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise LMForgeError(f"message {index} is not a dict: {message!r}", key="messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise LMForgeError(f"message {index} has no 'role' string", key="messages")
        if content is None and role != "assistant":
            raise LMForgeError(f"message {index} ({role}) has no 'content'", key="messages")
        out.append(dict(message))
    return out


def template_for(tokenizer: Tokenizer | None, name: str | None = None) -> ChatTemplate:
    """The chat template to use: the named built-in (or Jinja source) when ``name`` is given,
    else the tokenizer's own.

    Raises:
        LMForgeError: no template given and the tokenizer has none (one line naming the built-ins).
    """
    if name:
        if name in BUILTIN_TEMPLATES:
            return ChatTemplate.builtin(name)
        if "{{" in name or "{%" in name:
            return ChatTemplate(name, name="the given chat template")
        return ChatTemplate.builtin(name)  # unknown name: the error lists the built-ins
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise LMForgeError(
            "the model's tokenizer has no chat template: name one "
            f"({', '.join(BUILTIN_TEMPLATES)}) or pass its Jinja source",
            key="chat_template",
        )
    return ChatTemplate(source, name="the model's chat template")


def special_token_variables(tokenizer: Tokenizer | None) -> dict[str, str]:
    """The tokenizer's special tokens by role, as a template sees them (``bos`` → ``bos_token``)."""
    if tokenizer is None:
        return {}
    return {role: token for role, token in tokenizer.special_tokens.items() if role in TOKEN_VARIABLES}


def render_chat(
    tokenizer: Tokenizer | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    template: str | ChatTemplate | None = None,
    **variables: Any,
) -> str:
    """The conversation rendered with ``template`` (a built-in's name, Jinja source or a
    :class:`ChatTemplate`; default: the tokenizer's own), the tokenizer's special tokens filled in."""
    chat = template if isinstance(template, ChatTemplate) else template_for(tokenizer, template)
    return chat.render(
        messages,
        add_generation_prompt=add_generation_prompt,
        special_tokens=special_token_variables(tokenizer),
        **variables,
    )


@dataclass
class ChatEncoding:
    """A rendered conversation as tokens.

    text: the rendered text.
    ids: its token ids (encoded as a whole, without adding special tokens: the template writes them).
    assistant_mask: one flag per id, True for tokens of assistant turns (their content and the
        template's end-of-turn text), the tokens a supervised fine-tuning loss is computed on.
    """

    text: str
    ids: list[int]
    assistant_mask: list[bool]


def assistant_spans(
    chat: ChatTemplate, messages: Sequence[Message], special_tokens: Mapping[str, str], **variables: Any
) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation's text and the character span of each assistant turn in it.

    The span of assistant message i starts where the conversation up to it, rendered with the
    generation prompt, ends, and stops where the conversation through message i ends.

    Raises:
        LMForgeError: the template does not render a conversation as a growing text (it changes
            earlier turns as later ones come: e.g. it drops the reasoning of past turns).
    """
    checked = check_messages(messages)

    def render(upto: int, prompt: bool) -> str:
        return chat.render(
            checked[:upto], add_generation_prompt=prompt, special_tokens=special_tokens, **variables
        )

    text = render(len(checked), False)
    spans = []
    for index, message in enumerate(checked):
        if message["role"] != "assistant":
            continue
        start_text, end_text = render(index, True), render(index + 1, False)
        if not (
            text.startswith(start_text) and text.startswith(end_text) and len(start_text) <= len(end_text)
        ):
            raise LMForgeError(
                f"{chat.name}: rendering the conversation up to message {index} does not give a prefix of the "
                "whole conversation, so its assistant turns cannot be told apart",
                key="chat_template",
            )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    template: str | ChatTemplate | None = None,
    **variables: Any,
) -> ChatEncoding:
    """Render a conversation and tokenize it, marking the tokens of assistant turns.

    A token belongs to an assistant turn when its text starts inside one (a token that would
    straddle the boundary is rare: templates put a newline or a special token there).

    Args:
        tokenizer: lmforge's tokenizer of the model.
        messages: the conversation, usually ending with an assistant turn.
        template: a built-in's name, Jinja source or :class:`ChatTemplate` (default: the tokenizer's).
        variables: more template variables.

    Returns:
        a :class:`ChatEncoding` (text, ids, assistant_mask).
    """
    chat = template if isinstance(template, ChatTemplate) else template_for(tokenizer, template)
    text, spans = assistant_spans(chat, messages, special_token_variables(tokenizer), **variables)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offsets]
    return ChatEncoding(text=text, ids=list(encoding.ids), assistant_mask=mask)


def chat_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    system: str | None = None,
    template: str | ChatTemplate | None = None,
) -> tuple[list[int], list[int]]:
    """A one-turn chat prompt: ``prompt`` as the user's message (after ``system``, if given),
    rendered with the generation prompt and encoded; plus the ids that end the answer.

    Returns:
        (prompt ids, stop ids) for :func:`lmforge.generation.generate`.
    """
    chat = template if isinstance(template, ChatTemplate) else template_for(tokenizer, template)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    text = render_chat(tokenizer, messages, add_generation_prompt=True, template=chat)
    return tokenizer.encode(text), chat.stop_tokens(tokenizer)
