"""``lmforge serve``: a model behind an OpenAI-compatible HTTP API (continuous batching)."""

from __future__ import annotations

import os
import sys

from ..serving import ServeOptions, parse_adapters, run_server


def serve(
    *,
    model: str,
    adapters: list[str] | None = None,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    prefix_cache: int = 4096,
    max_context: int | None = None,
    max_tokens: int = 1024,
    max_body_bytes: int = 1 << 20,
    max_queue: int = 256,
    system: str | None = None,
    chat_template: str | None = None,
    device: str = "cpu",
    drain_timeout: float = 60.0,
) -> int:
    """Serve a model over HTTP with OpenAI's API: chat/completions, completions, models.

    Any OpenAI client talks to it (base URL http://HOST:PORT/v1). Concurrent requests share
    decoding steps (continuous batching); several LoRA adapters on the one base are served at once,
    the request's "model" choosing one. A classification run is served on /v1/classify instead.
    /health and /metrics (Prometheus text) report on it. Binds 127.0.0.1 unless --host says
    otherwise; SIGTERM or Ctrl-C lets the requests in flight finish, then exits.
    Example: lmforge serve --model base.gguf --adapters billing=runs/billing,support=runs/support
    --api_key KEY, then OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY").

    Args:
        model: a run folder, a Hugging Face folder or a GGUF file.
        adapters: adapter runs on that base, as NAME=RUN (several: comma-separated); a request
            with "model": NAME is answered through that adapter.
        name: the base model's name in the API (default: the folder or file name).
        host: the address to listen on (127.0.0.1: this machine only).
        port: the port to listen on.
        api_key: require "Authorization: Bearer KEY" (default: $LMFORGE_API_KEY, or none).
        max_batch: requests decoded together (key/value cache slots).
        prefix_cache: prompt positions whose keys/values are kept, so a prompt that starts like an
            earlier one (the chat template's header, a shared system prompt) prefills only the
            rest; 0 turns it off.
        max_context: positions one request may hold, prompt included (default: the model's
            context; at most 2048 for a model without a position table).
        max_tokens: the most new tokens a request may ask for.
        max_body_bytes: larger request bodies are refused (413).
        max_queue: requests waiting for a slot beyond this are refused (429).
        system: a system message for chat requests that bring none.
        chat_template: a built-in template (chatml, llama-2, plain) or Jinja source instead of the
            model's own.
        device: cpu, cuda, cuda:1, ... or auto.
        drain_timeout: seconds SIGTERM waits for the requests in flight.
    """
    options = ServeOptions(
        model=model,
        adapters=parse_adapters(adapters),
        name=name,
        host=host,
        port=port,
        api_key=api_key or os.environ.get("LMFORGE_API_KEY") or None,
        max_batch=max_batch,
        prefix_cache=prefix_cache,
        max_context=max_context,
        max_tokens=max_tokens,
        max_body_bytes=max_body_bytes,
        max_queue=max_queue,
        system=system,
        chat_template=chat_template,
        device=device,
        drain_timeout=drain_timeout,
    )
    run_server(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
