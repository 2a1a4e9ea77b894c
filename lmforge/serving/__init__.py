"""Serving: a model behind an OpenAI-compatible HTTP API, with continuous batching.

- :mod:`~lmforge.serving.slots`: the key/value cache, one row per running request;
- :mod:`~lmforge.serving.engine`: :class:`Engine`, the scheduler (requests join and leave the
  batch at every step; several adapters decoded in one batch);
- :mod:`~lmforge.serving.openai_api`: OpenAI request/response bodies (no HTTP);
- :mod:`~lmforge.serving.http`: the Starlette app and its uvicorn server (``lmforge[serve]``);
- :mod:`~lmforge.serving.server`: ``lmforge serve`` as one function, :func:`run_server`.
"""

from .engine import Completion, Engine, EngineStats, Handle, Request, Update
from .openai_api import APIError, OpenAIService
from .server import ServeOptions, build_app, parse_adapters, run_server

__all__ = [
    "APIError",
    "Completion",
    "Engine",
    "EngineStats",
    "Handle",
    "OpenAIService",
    "Request",
    "ServeOptions",
    "Update",
    "build_app",
    "parse_adapters",
    "run_server",
]
