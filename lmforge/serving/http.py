"""The HTTP side of ``lmforge serve``: a Starlette app on uvicorn (ASGI), speaking OpenAI's API.

    POST /v1/chat/completions, /v1/completions ──► OpenAIService (checks, shapes) ──► Engine
    POST /v1/classify (a classification run)   ──► the run's task, predict
    GET  /v1/models, /health, /metrics

Streaming answers are Server-Sent Events (``data: {chunk}`` lines, then ``data: [DONE]``) as
OpenAI sends them. The engine runs in its own thread; each request's updates cross into the event
loop through an asyncio queue. A client that goes away cancels its request, which frees its slot
at the next decoding step (a streamed answer: Starlette cancels the stream when the connection
drops; a whole answer: the handler checks the connection while it waits). Safety: an optional API
key (``Authorization: Bearer``), a body-size limit (413), a queue limit (429); on SIGTERM uvicorn
stops accepting connections and waits for the open ones, then the engine drains and stops.
References: the Starlette and uvicorn documentation; OpenAI's API reference (streaming,
errors); the ``/metrics`` text format of Prometheus, as vLLM exposes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LMForgeError
from ..pipeline.common import Log, silent
from .engine import Handle, Update
from .openai_api import APIError, OpenAIService, Prepared

try:  # the optional extra: lmforge[serve]
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError:  # pragma: no cover - exercised where the extra is missing
    uvicorn = None

MISSING_EXTRA = "lmforge serve needs starlette and uvicorn: pip install 'lmforge[serve]'"
DISCONNECT_POLL_S = 0.5  # how often a handler waiting for a whole answer checks its client is still there


def require_serve_extra() -> None:
    """Raise a one-line error when the web stack (``lmforge[serve]``) is not installed."""
    if uvicorn is None:
        raise LMForgeError(MISSING_EXTRA)


@dataclass
class Limits:
    """What the server accepts."""

    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* and /metrics
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 256  # requests waiting for a slot; beyond it 429


Classify = Callable[[list[str]], list[dict[str, Any]]]


class App:
    """The routes, bound to a generation service and/or a classifier.

    Args:
        service: answers the generation endpoints (None: a classification run is served).
        classify: texts -> predictions, for ``/v1/classify`` (None: a generator is served).
        model_name: the served model's name (with a classifier).
        limits: the API key, body and queue limits.
        log: receives a line per notable event.
    """

    def __init__(
        self,
        *,
        service: OpenAIService | None,
        classify: Classify | None = None,
        model_name: str = "model",
        limits: Limits | None = None,
        log: Log = silent,
    ) -> None:
        require_serve_extra()
        self.service = service
        self.classify_texts = classify
        self.model_name = service.base_name if service is not None else model_name
        self.limits = limits or Limits()
        self.log = log
        self.requests: Counter[tuple[str, int]] = Counter()
        self.draining = False
        self._classify_lock = threading.Lock()

    def starlette(self) -> Starlette:
        """The ASGI application."""
        routes = [
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/classify", self._endpoint(self.classify), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self._endpoint(self.metrics), methods=["GET"]),
        ]
        handlers = {HTTPException: self._http_error, Exception: self._server_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    # ---- plumbing ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        if self.service is not None:
            self.service.engine.start()
        try:
            yield
        finally:  # uvicorn waited for the open requests (SIGTERM): stop the engine once it is idle
            self.draining = True
            if self.service is not None:
                await run_in_threadpool(self.service.engine.stop, drain=True)
            self.log("serve: stopped")

    def _endpoint(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: the API key, errors in OpenAI's shape, a count per path and status."""

        async def endpoint(request: Request) -> Response:
            try:
                self._check_key(request)
                response = await handler(request)
            except APIError as err:
                response = JSONResponse(err.body(), status_code=err.status)
            self.requests[(request.url.path, response.status_code)] += 1
            return response

        return endpoint

    def _check_key(self, request: Request) -> None:
        key = self.limits.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        """The JSON body, refused past the size limit (413) or when it is not JSON (400)."""
        limit = self.limits.max_body_bytes
        too_large = APIError(
            413,
            f"the request body is larger than this server's limit of {limit:,} bytes",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None

    async def _http_error(self, request: Request, err: Exception) -> Response:
        status = getattr(err, "status_code", 500)
        message = getattr(err, "detail", "") or "error"
        self.requests[(request.url.path, status)] += 1
        return JSONResponse(
            APIError(status, f"{request.method} {request.url.path}: {message}").body(), status_code=status
        )

    async def _server_error(self, request: Request, err: Exception) -> Response:
        self.log(f"serve: {request.url.path} failed: {type(err).__name__}: {err}")
        error = APIError(500, f"the server failed: {type(err).__name__}: {err}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    # ---- the endpoints -------------------------------------------------------------------------

    def _generator(self) -> OpenAIService:
        if self.service is None:
            raise APIError(400, f"'{self.model_name}' is a classifier: use /v1/classify")
        return self.service

    async def chat(self, request: Request) -> Response:
        service = self._generator()
        return await self._answer(request, service.chat(await self._body(request)))

    async def completions(self, request: Request) -> Response:
        service = self._generator()
        return await self._answer(request, service.completion(await self._body(request)))

    async def _answer(self, request: Request, prepared: Prepared) -> Response:
        service = self._generator()
        engine = service.engine
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error")
        if engine.snapshot().waiting >= self.limits.max_queue:
            raise APIError(
                429,
                f"the server is busy ({self.limits.max_queue} requests waiting): retry later",
                type="rate_limit_error",
            )
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        try:
            handle = engine.submit(
                prepared.request, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u)
            )
        except LMForgeError as err:
            shutting = "shutting down" in err.message
            raise APIError(
                503 if shutting else 400,
                err.message,
                type="server_error" if shutting else "invalid_request_error",
            ) from None
        if prepared.stream:
            return StreamingResponse(self._events(prepared, handle, updates), media_type="text/event-stream")
        try:
            while True:
                try:
                    update = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return Response(status_code=499)
                    continue
                if update.finish_reason is not None:
                    break
        finally:
            if not handle.done:
                handle.cancel()
        _raise_failure(handle)
        return JSONResponse(service.response(prepared, handle.result(0)))

    async def _events(
        self, prepared: Prepared, handle: Handle, updates: asyncio.Queue[Update]
    ) -> AsyncIterator[str]:
        """Server-Sent Events of one streamed answer; the request is cancelled if the client leaves."""
        service = self._generator()
        tokens = 0
        try:
            first = service.first_chunk(prepared)
            if first is not None:
                yield _event(first)
            while True:
                update = await updates.get()
                tokens += len(update.token_ids)
                if update.finish_reason in ("error", "cancelled"):
                    error = APIError(500, update.error or "the request was cancelled", type="server_error")
                    yield _event(error.body())
                    break
                chunk = service.chunk(prepared, update)
                if chunk is not None:
                    yield _event(chunk)
                if update.finish_reason is not None:
                    if prepared.include_usage:
                        yield _event(service.usage_chunk(prepared, tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the stream was cancelled), or the answer ended
            if not handle.done:
                handle.cancel()

    async def classify(self, request: Request) -> Response:
        if self.classify_texts is None:
            raise APIError(
                400, f"'{self.model_name}' generates text: /v1/classify serves classification runs"
            )
        body = await self._body(request)
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "'input' must be a text or a non-empty list of texts", param="input")
        if body.get("model") not in (None, self.model_name):
            raise APIError(
                404,
                f"The model '{body['model']}' does not exist: this server serves {self.model_name}",
                param="model",
                code="model_not_found",
            )

        def predict() -> list[dict[str, Any]]:
            with self._classify_lock:
                return self.classify_texts(texts)

        try:
            predictions = await run_in_threadpool(predict)
        except LMForgeError as err:
            raise APIError(400, err.message, param="input") from None
        data = [
            {
                "index": i,
                "label": p["prediction"],
                "score": p.get("score"),
                "probabilities": p.get("probabilities", {}),
            }
            for i, p in enumerate(predictions)
        ]
        return JSONResponse({"object": "list", "model": self.model_name, "data": data})

    async def models(self, request: Request) -> Response:
        if self.service is not None:
            return JSONResponse(self.service.models())
        entry = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "lmforge"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(self, request: Request) -> Response:
        body: dict[str, Any] = {"status": "draining" if self.draining else "ok", "model": self.model_name}
        if self.service is not None:
            stats = self.service.engine.snapshot()
            body.update(running=stats.running, waiting=stats.waiting)
        return JSONResponse(body, status_code=503 if self.draining else 200)

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4")

    def metrics_text(self) -> str:
        """The counters in Prometheus' text format."""
        lines = ["# TYPE lmforge_requests_total counter"]
        for (path, status), count in sorted(self.requests.items()):
            lines.append(f'lmforge_requests_total{{path="{path}",status="{status}"}} {count}')
        if self.service is not None:
            stats = self.service.engine.snapshot()
            values = {
                "lmforge_generated_tokens_total": stats.generated_tokens,
                "lmforge_prompt_tokens_total": stats.prompt_tokens,
                "lmforge_prefix_tokens_reused_total": stats.prefix_tokens_reused,
                "lmforge_finished_requests_total": stats.requests_finished,
                "lmforge_cancelled_requests_total": stats.cancelled,
                "lmforge_decode_steps_total": stats.steps,
                "lmforge_tokens_per_second": round(stats.tokens_per_second, 3),
                "lmforge_queue_depth": stats.waiting,
                "lmforge_running_requests": stats.running,
                "lmforge_batch_slots": stats.slots,
                "lmforge_mean_batch_size": round(stats.batch_rows / stats.steps, 3) if stats.steps else 0,
            }
            for name, value in values.items():
                kind = "counter" if name.endswith("_total") else "gauge"
                lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _raise_failure(handle: Handle) -> None:
    if handle.finish_reason == "error":
        raise APIError(500, handle.error or "generation failed", type="server_error")
    if handle.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled (the server is shutting down)", type="server_error")


def uvicorn_server(
    app: App, *, host: str, port: int, drain_timeout: float | None = None, access_log: bool = False
) -> Any:
    """A ``uvicorn.Server`` for ``app`` (``run()`` blocks; SIGTERM/SIGINT drain and stop it when it
    runs in the main thread; ``should_exit = True`` stops it from another thread)."""
    require_serve_extra()
    config = uvicorn.Config(
        app.starlette(),
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )
    return uvicorn.Server(config)
