"""``lmforge serve`` as one function: load the model and its adapters, build the engine and the
app, run uvicorn until SIGTERM / Ctrl-C (draining the requests in flight).

    ServeOptions ──load (+ adapters by name)──► Engine (continuous batching) ──► OpenAIService
                 ──► App (Starlette) ──► uvicorn on host:port (127.0.0.1 unless told otherwise)

A classification run (``lmforge finetune --task classification``) is served for
``POST /v1/classify`` through the pipeline's ``predict`` instead.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat_template import template_for
from ..errors import LMForgeError
from ..files import CONFIG_FILE
from ..pipeline.chat import load_with_adapters
from ..pipeline.common import Log, silent
from ..pipeline.evaluation import load_task_run, predict
from ..runtime import resolve_device
from ..settings import load_yaml
from .engine import Engine
from .http import App, Limits, require_serve_extra, uvicorn_server
from .openai_api import OpenAIService

CLASSIFYING_TASKS = ("classification",)  # runs served on /v1/classify
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    """What ``lmforge serve`` serves, where, and within which limits."""

    model: str  # run folder, Hugging Face folder or GGUF file
    adapters: dict[str, str] = field(default_factory=dict)  # API model name -> adapter run folder
    name: str | None = None  # the base model's name in the API (default: the folder or file name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16  # requests decoded together (key/value cache slots)
    prefix_cache: int = 4096  # prompt positions kept for reuse by prompts that start alike (0 = off)
    max_context: int | None = (
        None  # positions per request (default: the model's, at most 2048 without a table)
    )
    max_tokens: int = 1024  # the most max_tokens a request may ask
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    system: str | None = None  # a system message for chat requests that bring none
    chat_template: str | None = None  # a built-in name or Jinja source (default: the model's)
    device: str = "cpu"
    drain_timeout: float | None = 60.0  # seconds SIGTERM waits for requests in flight


def parse_adapters(items: list[str] | None) -> dict[str, str]:
    """``["name=RUN", ...]`` -> ``{name: RUN}``.

    Raises:
        LMForgeError: an item without ``=``, an empty part or a name given twice.
    """
    adapters: dict[str, str] = {}
    for item in items or []:
        name, sep, run = item.partition("=")
        name, run = name.strip(), run.strip()
        if not sep or not name or not run:
            raise LMForgeError(f"expected NAME=RUN, got {item!r}", key="adapters")
        if name in adapters:
            raise LMForgeError(f"adapter name '{name}' is given twice", key="adapters")
        adapters[name] = run
    return adapters


def task_of(path: str | Path) -> str | None:
    """The task a run folder was fine-tuned on (None: not a fine-tuned run folder)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return None
    task = load_yaml(config)[0].get("task")
    return task if isinstance(task, str) else None


def build_app(options: ServeOptions, *, log: Log = silent) -> App:
    """Load what ``options`` names and build the app (the engine starts with the app's lifespan).

    Raises:
        LMForgeError: the web stack missing, a model or adapter that cannot be loaded or served.
    """
    require_serve_extra()
    limits = Limits(
        api_key=options.api_key, max_body_bytes=options.max_body_bytes, max_queue=options.max_queue
    )
    device = resolve_device(options.device)
    name = options.name or Path(options.model).name.removesuffix(".gguf")
    if name in options.adapters:
        raise LMForgeError(f"adapter name '{name}' is the base model's name: choose another", key="adapters")
    if task_of(options.model) in CLASSIFYING_TASKS:
        if options.adapters:
            raise LMForgeError("a classification run is served alone (no --adapters)", key="adapters")
        task_run = load_task_run(options.model, device=str(device))
        field_name = task_run.task.columns.column("text")

        def classify(texts: list[str]) -> list[dict[str, Any]]:
            return predict(task_run, [{field_name: text} for text in texts])

        log(f"serve: classifier '{name}' ({len(task_run.task.labels)} labels) on {url(options)}/v1/classify")
        return App(service=None, classify=classify, model_name=name, limits=limits, log=log)
    run = load_with_adapters(options.model, options.adapters, device=device)
    engine = Engine(
        run.model,
        run.tokenizer,
        max_batch=options.max_batch,
        max_context=options.max_context,
        prefix_cache=options.prefix_cache,
        log=log,
    )
    try:
        template = template_for(run.tokenizer, options.chat_template)
    except LMForgeError:
        if options.chat_template:
            raise
        template = None
        log(
            "serve: note: the model has no chat template: /v1/chat/completions is refused (or give --chat_template)"
        )
    service = OpenAIService(
        engine, base_name=name, template=template, system=options.system, max_tokens_limit=options.max_tokens
    )
    served = ", ".join(service.names())
    log(
        f"serve: {served} on {url(options)}/v1 ({engine.cache.num_slots} slots, context {engine.max_context} "
        f"positions{', API key required' if options.api_key else ''})"
    )
    return App(service=service, limits=limits, log=log)


def url(options: ServeOptions) -> str:
    host = f"[{options.host}]" if ":" in options.host else options.host
    return f"http://{host}:{options.port}"


def run_server(options: ServeOptions, *, log: Log = silent) -> None:
    """Serve until SIGTERM or Ctrl-C; requests in flight finish first (up to ``drain_timeout``)."""
    app = build_app(options, log=log)
    if options.host not in LOCAL_HOSTS:
        log(
            f"serve: note: listening on {options.host}: other machines can reach this server"
            + ("" if options.api_key else " (no --api_key: anyone who can reach it can use it)")
        )
    check_address(options.host, options.port)
    server = uvicorn_server(app, host=options.host, port=options.port, drain_timeout=options.drain_timeout)
    try:
        with drained_stop_is_success():
            server.run()
    except SystemExit:  # uvicorn exits when it cannot start (it logged why)
        raise LMForgeError(
            f"the server could not start on {options.host}:{options.port}", key="port"
        ) from None


@contextlib.contextmanager
def drained_stop_is_success() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT, once uvicorn has drained and re-raised them, end
    nothing: a server stopped that way returns normally (exit status 0), not killed by the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stopping}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_address(host: str, port: int) -> None:
    """Refuse, in one line, an address this machine cannot listen on (in use, not its own)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):
            pass
    except OSError as err:
        raise LMForgeError(f"cannot listen on {host}:{port}: {err.strerror or err}", key="port") from None
