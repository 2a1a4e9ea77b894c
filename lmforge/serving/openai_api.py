"""The OpenAI wire format: request bodies → engine requests, engine results → response bodies.

Covers the parts of the OpenAI API (platform.openai.com/docs/api-reference) that clients of a
self-hosted model use — the official ``openai`` Python client, LangChain, chat UIs:

- ``POST /v1/chat/completions``: ``messages`` rendered through the model's chat template;
- ``POST /v1/completions``: ``prompt`` continued as it is;
- both with ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 1, as
  OpenAI), ``top_p``, ``stop`` (a text or up to 4), ``seed``, ``n`` = 1, ``stream`` (chunks of
  the ``*.chunk`` objects; ``stream_options.include_usage`` adds a last chunk with the counts)
  and ``usage`` in the answer; ``model`` names the base model or one of its adapters;
- ``GET /v1/models``: the base model and every adapter;
- errors as ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status OpenAI uses
  (400 bad request, 401 bad key, 404 unknown model, 413 body too large, 429/503 busy).

Fields this server does not implement (``logprobs``, ``tools``, penalties, ...) are ignored as
vLLM's and llama.cpp's OpenAI-compatible servers ignore them. Nothing here knows HTTP: the web
layer (:mod:`lmforge.serving.http`) moves these dicts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..chat_template import ChatTemplate
from ..errors import LMForgeError
from ..pipeline.chat import render_prompt
from ..pipeline.generation import prompt_ids
from .engine import Completion, Engine, Request, Update

MAX_STOP_TEXTS = 4  # OpenAI's limit
COMPLETIONS_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it.

    Args:
        status: the HTTP status (400, 401, 404, 413, 429, 503, ...).
        message: what is wrong, one line.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if any.
        code: a machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Prepared:
    """A checked request: what the engine runs and how to answer."""

    kind: str  # "chat" or "text"
    model: str  # the name the client asked for (echoed back)
    request: Request
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


class OpenAIService:
    """Turns OpenAI request bodies into :class:`~lmforge.serving.engine.Request` objects for
    ``engine`` and results into OpenAI response bodies.

    Args:
        engine: the engine that decodes.
        base_name: what ``model`` is called for the base model (``/v1/models`` lists it first).
        template: the chat template of ``/v1/chat/completions`` (None: chat is refused, completions work).
        system: a system message put before requests that bring none.
        max_tokens_limit: the most ``max_tokens`` a request may ask (400 above it).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        base_name: str,
        template: ChatTemplate | None,
        system: str | None = None,
        max_tokens_limit: int = 1024,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.base_name = base_name
        self.template = template
        self.system = system
        self.max_tokens_limit = max_tokens_limit
        self.created = int(time.time())

    # ---- models --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [self.base_name, *sorted(self.engine.adapters)]

    def models(self) -> dict[str, Any]:
        """The body of ``GET /v1/models``."""
        data = [
            {"id": name, "object": "model", "created": self.created, "owned_by": "lmforge"}
            for name in self.names()
        ]
        for entry in data[1:]:
            entry["parent"] = self.base_name
        return {"object": "list", "data": data}

    def adapter_of(self, model: Any) -> str | None:
        """The adapter a request's ``model`` names (None: the base as served).

        Raises:
            APIError: 404 for a name the server does not serve.
        """
        if model is None or model == self.base_name:
            return None
        if isinstance(model, str) and model in self.engine.adapters:
            return model
        raise APIError(
            404,
            f"The model '{model}' does not exist: this server serves {', '.join(self.names())}",
            param="model",
            code="model_not_found",
        )

    # ---- requests ------------------------------------------------------------------------------

    def chat(self, body: Any) -> Prepared:
        """Check a ``/v1/chat/completions`` body. Raises :class:`APIError` (400/404)."""
        body = _object(body)
        if self.template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        messages = [_message(m, i) for i, m in enumerate(messages)]
        if self.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})
        try:
            ids, stop_ids = render_prompt(self.tokenizer, messages, self.template)
        except LMForgeError as err:
            raise APIError(400, err.message, param="messages") from None
        return self._prepare("chat", body, ids, stop_ids, default_tokens=None)

    def completion(self, body: Any) -> Prepared:
        """Check a ``/v1/completions`` body. Raises :class:`APIError` (400/404)."""
        body = _object(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
        try:
            ids = prompt_ids(self.tokenizer, prompt, arch="decoder")
        except LMForgeError as err:
            raise APIError(400, err.message, param="prompt") from None
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        return self._prepare("text", body, ids, eos, default_tokens=COMPLETIONS_DEFAULT_TOKENS)

    def _prepare(
        self,
        kind: str,
        body: Mapping[str, Any],
        ids: list[int],
        stop_ids: list[int],
        *,
        default_tokens: int | None,
    ) -> Prepared:
        model = body.get("model")
        adapter = self.adapter_of(model)
        if body.get("n", 1) != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        room = self.engine.max_context - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server's context holds {self.engine.max_context}",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        limit = min(self.max_tokens_limit, room)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = min(default_tokens or limit, limit)
        if not _is_int(max_tokens) or max_tokens < 1:
            raise APIError(
                400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens"
            )
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} is above this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
            )
        if max_tokens > room:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) and max_tokens {max_tokens} do not fit this server's context of "
                f"{self.engine.max_context}: ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
        top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
        if top_p == 0.0:
            raise APIError(400, "top_p must be above 0", param="top_p")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop or []
        if (
            not isinstance(stops, list)
            or len(stops) > MAX_STOP_TEXTS
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise APIError(
                400, f"stop must be a text or a list of at most {MAX_STOP_TEXTS} texts", param="stop"
            )
        options = body.get("stream_options") or {}
        request = Request(
            prompt_ids=ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=None if top_p >= 1.0 else top_p,
            seed=None if seed is None else seed % 2**63,
            stop_ids=stop_ids,
            stop=stops,
            adapter=adapter,
        )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", param="stream")
        include = isinstance(options, dict) and bool(options.get("include_usage"))
        return Prepared(kind, model if isinstance(model, str) else self.base_name, request, stream, include)

    # ---- responses -----------------------------------------------------------------------------

    def response(self, prepared: Prepared, completion: Completion) -> dict[str, Any]:
        """The body of a whole (not streamed) answer."""
        if prepared.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
            }
        else:
            choice = {"index": 0, "text": completion.text, "logprobs": None}
        choice["finish_reason"] = completion.finish_reason
        return {
            **self._head(prepared),
            "object": prepared.object,
            "choices": [choice],
            "usage": usage(len(prepared.request.prompt_ids), len(completion.token_ids)),
        }

    def first_chunk(self, prepared: Prepared) -> dict[str, Any] | None:
        """The chunk that opens a streamed chat answer (the assistant's role); None for completions."""
        if prepared.kind != "chat":
            return None
        return self._chunk(prepared, {"role": "assistant", "content": ""}, None)

    def chunk(self, prepared: Prepared, update: Update) -> dict[str, Any] | None:
        """The chunk of one update: new text, and the finish reason at the end (None: nothing to send)."""
        if not update.text and update.finish_reason is None:
            return None
        text = update.text
        delta: Any = text if prepared.kind == "text" else ({"content": text} if text else {})
        return self._chunk(prepared, delta, update.finish_reason)

    def usage_chunk(self, prepared: Prepared, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage`` asks for the counts."""
        return {
            **self._head(prepared),
            "object": prepared.object + ".chunk" if prepared.kind == "chat" else prepared.object,
            "choices": [],
            "usage": usage(len(prepared.request.prompt_ids), completion_tokens),
        }

    def _chunk(self, prepared: Prepared, delta: Any, finish: str | None) -> dict[str, Any]:
        if prepared.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {**self._head(prepared), "object": kind, "choices": [choice]}

    def _head(self, prepared: Prepared) -> dict[str, Any]:
        return {
            "id": prepared.response_id,
            "created": prepared.created,
            "model": prepared.model,
            "system_fingerprint": "lmforge",
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _message(message: Any, index: int) -> dict[str, Any]:
    """One chat message as the template reads it (OpenAI's list-of-parts content joined as text)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{index}] must be an object with a 'role'", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise APIError(400, f"messages[{index}]: only text content parts are supported", param="messages")
        content = "".join(parts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise APIError(400, f"messages[{index}].content must be a text", param="messages")
    return {"role": message["role"], "content": content}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], key: str, default: float, *, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number between {low:g} and {high:g}, got {value!r}", param=key)
    return float(value)
