"""The serving engine: continuous batching of text-generation requests on one decoder.

    submit(request) ──► waiting queue ──admit (a free slot; the prompt prefilled alone)──► running
    every step: one token for every running request, in one forward pass of the batch
    a request leaves the batch the step it ends (stop token, stop text, max_new_tokens, cancel)

Continuous (iteration-level) batching after Orca (Yu et al., OSDI 2022) and vLLM (Kwon et al.,
SOSP 2023): the batch is re-formed at every decoding step, so a request joins at the next step
instead of waiting for the batch to finish, and leaves as soon as it is done. Each request owns a
row of the key/value cache (:mod:`lmforge.serving.slots`) and decodes at its own position: a
mask hides, per row, the cache positions past its own length, and position ids are per row, so
every row computes what it would compute alone (greedy decoding gives the same tokens; a test
holds it to that). Prompts are prefilled one request at a time (up to a token budget per step,
so the running requests keep streaming while a burst arrives). A prompt that starts like one
prefilled before — the chat template's header and a shared system prompt, typically — takes that
prefix's keys and values from a small store and prefills only the rest (automatic prefix caching,
as vLLM and llama.cpp's server do): the keys and values of the first n positions depend on those
n tokens (and the adapter) alone, so they are the same numbers either way.

Several LoRA adapters on one base are decoded in the same batch: each row names its adapter and
:func:`lmforge.peft.route_rows` sends it through that adapter in every adapted layer. For LoRA
(additive: y = W x + s·B A x) the base matmul is shared by all rows and each adapter adds its
low-rank term to its rows, as S-LoRA / Punica do; a method that is not additive (IA3, DoRA,
bottleneck adapters) runs its adapted layers per group of rows, the rest of the model still
batched.

The engine runs in a thread of its own (:meth:`Engine.start`) or is stepped by the caller
(:meth:`Engine.step`, tests); it knows nothing about HTTP.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import LMForgeError
from ..generation import IncrementalDecoder, next_tokens
from ..generation.sampling import check_sampling
from ..generation.state import ABSOLUTE_POSITIONS, check_model, last_logits
from ..model import Transformer
from ..peft import active_adapter, peft_configs, route_rows
from ..peft.base import seam_slots
from ..pipeline.common import Log, silent
from .slots import SlotCache

DEFAULT_MAX_CONTEXT = 2048  # positions per request when the model has no position table
DECODE_CONTEXT = 8  # prompt ids given to the incremental decoder as left context
MIN_PREFIX = 8  # the shortest stored prefix worth copying instead of computing


@dataclass
class Request:
    """One text-generation request, already tokenized."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # seeds sampling (None: a fresh seed)
    stop_ids: Sequence[int] = ()  # token ids that end the text (not part of it): eos, end of turn
    stop: Sequence[str] = ()  # texts that end it (not part of it), as OpenAI's ``stop``
    adapter: str | None = None  # the adapter decoding it (None: the engine's default)


@dataclass
class Update:
    """What a request's listener receives after each of its tokens (and once at the end)."""

    text: str  # text completed by this step (may be empty: half a character, or held back by a stop)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error" at the end, else None
    error: str | None = None


@dataclass
class Completion:
    """A finished request: what :meth:`Handle.result` returns."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    first_token_s: float  # seconds from submit to the first token
    total_s: float


class Handle:
    """A submitted request: cancel it, or wait for its :class:`Completion`."""

    def __init__(self, request: Request, listener: Callable[[Update], None] | None, number: int) -> None:
        self.request = request
        self.listener = listener
        self.id = number
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.cancelled = False
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop the request at the next step (its slot is freed; a client went away)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end (the engine must be running, or stepped by another thread).

        Raises:
            LMForgeError: the request failed, or did not end within ``timeout`` seconds.
        """
        if not self._done.wait(timeout):
            raise LMForgeError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise LMForgeError(self.error)
        end = time.perf_counter()
        return Completion(
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "stop",
            prompt_tokens=len(self.request.prompt_ids),
            first_token_s=(self.first_token or end) - self.submitted,
            total_s=end - self.submitted,
        )

    def _emit(self, update: Update) -> None:
        self.text += update.text
        self.token_ids += update.token_ids
        if update.finish_reason is not None:
            self.finish_reason, self.error = update.finish_reason, update.error
            self._done.set()  # before the listener hears of the end: result() is ready when it does
        if self.listener is not None:
            self.listener(update)


@dataclass
class _Sequence:
    """A running request: its slot, its tokens, its text and how it chooses tokens."""

    handle: Handle
    adapter: str | None
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    last_token: int = 0
    generated: int = 0
    text: str = ""  # the text so far (a stop text cut off)
    shown: int = 0  # characters of text already sent to the listener


@dataclass
class EngineStats:
    """Counters for /metrics."""

    waiting: int = 0  # queue depth
    running: int = 0  # requests in the batch
    slots: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    tokens_per_second: float = 0.0  # generated tokens per second over the last WINDOW_S seconds
    steps: int = 0
    batch_rows: int = 0  # rows decoded over all steps (batch_rows / steps: the mean batch)
    cancelled: int = 0
    prefix_tokens_reused: int = 0  # prompt positions taken from the prefix store, not computed
    history: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) of recent steps


WINDOW_S = 10.0


class Engine:
    """Continuous batching of generation requests on ``model``.

    Args:
        model: a decoder with an LM head (eval mode, on its device); adapters loaded on it by
            name can be chosen per request.
        tokenizer: its tokenizer (to turn tokens into text as they come).
        max_batch: the most requests decoded at once (slots of the key/value cache).
        max_context: the most positions one request may hold, prompt included (default: the
            model's context for a position table, else min(its max_seq_len, 2048)).
        prefill_budget: prompt tokens prefilled per step before the running requests decode
            again (at least one prompt per step).
        prefix_cache: prompt positions whose keys/values are kept (the most recent prompts',
            at most this many positions in all) so a later prompt that starts the same way
            reuses them; 0 = off. Memory: positions × layers × 2 × kv heads × head dim × 4 bytes
            (fp32), e.g. 4,096 positions of SmolLM2-135M take 189 MB.
        log: receives a line about anything noteworthy (a failed step).

    Raises:
        LMForgeError: a model the engine cannot batch (no decoder, an encoder-decoder, an active
            prefix or prompt-tuning adapter).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_context: int | None = None,
        prefill_budget: int = 512,
        prefix_cache: int = 4096,
        log: Log = silent,
    ) -> None:
        check_model(model)
        config = model.config
        if config.arch != "decoder":
            raise LMForgeError(
                f"the server batches decoder models; this one is an {config.arch} (use lmforge generate)",
                key="model",
            )
        if any(slot.names for slot in seam_slots(model)):
            raise LMForgeError(
                "prefix and prompt tuning adapters cannot be served with batching: they change every "
                "row's keys or sequence (merge a LoRA-family adapter instead, or use lmforge generate)",
                key="adapter",
            )
        if max_batch < 1:
            raise LMForgeError(f"max_batch must be at least 1, got {max_batch}", key="max_batch")
        limit = config.max_seq_len if config.position in ABSOLUTE_POSITIONS else None
        context = max_context or (limit or min(config.max_seq_len, DEFAULT_MAX_CONTEXT))
        if limit is not None and context > limit:
            raise LMForgeError(
                f"max_context {context} is past the model's position table of {limit}", key="max_context"
            )
        if config.position == "relative":  # T5 buckets need the shared position of every row
            max_batch = 1
        parameter = next(model.parameters())
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = context
        self.prefill_budget = prefill_budget
        self.log = log
        self.default_adapter = active_adapter(model)
        self.adapters = set(peft_configs(model))
        self.device = parameter.device
        self.cache = SlotCache(
            num_layers=len(model.decoder.layers),
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            num_slots=max_batch,
            max_context=context,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        self.stats = EngineStats(slots=max_batch)
        self.prefix_cache = max(prefix_cache, 0)
        # (adapter, prompt ids) -> per layer (keys, values) of the prompt's positions; newest last
        self._prefixes: OrderedDict[tuple[str | None, tuple[int, ...]], list[tuple[Tensor, Tensor]]] = (
            OrderedDict()
        )
        self._waiting: deque[Handle] = deque()
        self._running: list[_Sequence] = []  # index = slot
        self._lock = threading.Condition()
        self._numbers = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closing = False

    # ---- requests ------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuse, in one line, a request the engine cannot run (before it is queued).

        Raises:
            LMForgeError: an empty prompt, one that does not fit the context with its new tokens,
                bad sampling settings, or an unknown adapter.
        """
        prompt = len(request.prompt_ids)
        if prompt == 0:
            raise LMForgeError("the prompt is empty", key="prompt")
        if request.max_new_tokens < 1:
            raise LMForgeError(
                f"max_tokens must be at least 1, got {request.max_new_tokens}", key="max_tokens"
            )
        if prompt + request.max_new_tokens > self.max_context:
            raise LMForgeError(
                f"the prompt ({prompt} tokens) and max_tokens {request.max_new_tokens} do not fit the "
                f"context of {self.max_context} positions",
                key="max_tokens",
            )
        vocab = self.model.config.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise LMForgeError(f"the prompt holds ids outside the {vocab}-token vocabulary", key="prompt")
        check_sampling(
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, repetition_penalty=1.0
        )
        if request.adapter is not None and request.adapter not in self.adapters:
            raise LMForgeError(f"no adapter named '{request.adapter}'", key="model")

    def submit(self, request: Request, listener: Callable[[Update], None] | None = None) -> Handle:
        """Queue ``request``; ``listener`` (called on the engine's thread) gets its updates.

        Raises:
            LMForgeError: the request is refused (:meth:`check`), or the engine is shutting down.
        """
        self.check(request)
        handle = Handle(request, listener, next(self._numbers))
        with self._lock:
            if self._closing:
                raise LMForgeError("the server is shutting down")
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def generate(self, request: Request, timeout: float | None = None) -> Completion:
        """Submit ``request`` and wait for it (steps the engine here when no thread runs it)."""
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                self.step()
        return handle.result(timeout)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    # ---- one iteration -------------------------------------------------------------------------

    def step(self) -> None:
        """Admit waiting requests (prefill), then decode one token for every running request."""
        with torch.inference_mode():
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode()
            except Exception as err:  # a failed step fails its requests, not the server
                self.log(f"engine: a step failed: {type(err).__name__}: {err}")
                for seq in self._running:
                    seq.handle._emit(
                        Update("", [], "error", f"generation failed: {type(err).__name__}: {err}")
                    )
                self._running.clear()
        self._update_stats()

    def _drop_cancelled(self) -> None:
        gone = [slot for slot, seq in enumerate(self._running) if seq.handle.cancelled]
        for seq in (self._running[s] for s in gone):
            seq.handle._emit(Update("", [], "cancelled"))
        self.stats.cancelled += len(gone)
        self._free(gone)

    def _admit(self) -> None:
        budget = self.prefill_budget
        while len(self._running) < self.cache.num_slots and budget > 0:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            if handle.cancelled:
                handle._emit(Update("", [], "cancelled"))
                self.stats.cancelled += 1
                continue
            budget -= len(handle.request.prompt_ids)
            try:
                self._prefill(handle)
            except Exception as err:  # this request fails; the batch goes on
                self.log(f"engine: a prefill failed: {type(err).__name__}: {err}")
                handle._emit(Update("", [], "error", f"generation failed: {type(err).__name__}: {err}"))

    def _prefill(self, handle: Handle) -> None:
        request = handle.request
        adapter = request.adapter if request.adapter is not None else self.default_adapter
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        seq = _Sequence(
            handle=handle,
            adapter=adapter,
            decoder=IncrementalDecoder(self.tokenizer, prompt_ids=request.prompt_ids[-DECODE_CONTEXT:]),
            generator=torch.Generator(device=self.device).manual_seed(seed)
            if request.temperature > 0
            else None,
        )
        slot = len(self._running)
        prompt = len(request.prompt_ids)
        self.cache.reserve(prompt)
        reused = self._reuse_prefix(slot, adapter, request.prompt_ids)
        views = self.cache.prefill_views(slot, past=reused)
        ids = torch.tensor([request.prompt_ids[reused:]], dtype=torch.long, device=self.device)  # (1, P − reused)
        with self._routes([adapter]):
            logits = last_logits(self.model, ids, None, None, views, None, None, None)  # (1, V)
        self.cache.advance(slot, prompt - reused)
        self._keep_prefix(slot, adapter, request.prompt_ids)
        self._running.append(seq)
        self.stats.prompt_tokens += prompt
        self.stats.prefix_tokens_reused += reused
        if self._take(seq, logits[0]):
            self._free([slot])

    def _reuse_prefix(self, slot: int, adapter: str | None, prompt: list[int]) -> int:
        """Copy the longest stored prefix of ``prompt`` (same adapter; at least MIN_PREFIX
        positions, at most all but the last token, whose logits are needed) into ``slot``;
        returns its length (0: none)."""
        best, found = 0, None
        for (name, ids), kv in self._prefixes.items():
            if name != adapter:
                continue
            n = common_prefix(ids, prompt, limit=len(prompt) - 1)
            if n > best:
                best, found = n, ((name, ids), kv)
        if found is None or best < MIN_PREFIX:
            return 0
        self._prefixes.move_to_end(found[0])
        self.cache.write_prefix(slot, found[1], best)
        return best

    def _keep_prefix(self, slot: int, adapter: str | None, prompt: list[int]) -> None:
        """Store ``slot``'s prompt keys/values for later prompts (the oldest entries leave when
        the positions stored pass ``prefix_cache``)."""
        kept = prompt[: self.prefix_cache]
        key = (adapter, tuple(kept))
        if len(kept) < MIN_PREFIX or key in self._prefixes:
            return
        self._prefixes[key] = self.cache.read_prefix(slot, len(kept))
        while sum(len(ids) for _, ids in self._prefixes) > self.prefix_cache:
            self._prefixes.popitem(last=False)

    def _decode(self) -> None:
        active = len(self._running)
        views, positions, mask = self.cache.decode_views(active)
        ids = torch.tensor([[seq.last_token] for seq in self._running], dtype=torch.long, device=self.device)
        with self._routes([seq.adapter for seq in self._running]):
            logits = last_logits(self.model, ids, mask, positions[:, None], views, None, None, None)  # (B, V)
        for slot in range(active):
            self.cache.advance(slot)
        greedy = [s for s, seq in enumerate(self._running) if seq.generator is None]
        chosen: dict[int, int] = {}
        if greedy:  # one argmax over the greedy rows (the first maximum, as generate does)
            rows = torch.tensor(greedy, device=self.device)
            chosen.update(zip(greedy, logits.index_select(0, rows).max(dim=-1).indices.tolist(), strict=True))
        finished = [
            slot for slot, seq in enumerate(self._running) if self._take(seq, logits[slot], chosen.get(slot))
        ]
        self.stats.steps += 1
        self.stats.batch_rows += active
        self._free(finished)

    def _routes(self, names: list[str | None]) -> contextlib.AbstractContextManager[None]:
        return route_rows(self.model, names) if self.adapters else contextlib.nullcontext()

    def _take(self, seq: _Sequence, logits: Tensor, token: int | None = None) -> bool:
        """Choose ``seq``'s next token from its logits (V,) and send it on; True when it ended."""
        request = seq.handle.request
        if token is None:
            token = int(
                next_tokens(
                    logits[None],
                    temperature=request.temperature,
                    top_k=request.top_k,
                    top_p=request.top_p,
                    generator=seq.generator,
                )[0]
            )
        if seq.handle.first_token is None:
            seq.handle.first_token = time.perf_counter()
        seq.generated += 1
        seq.last_token = token
        self.stats.generated_tokens += 1
        finish = None
        if token in request.stop_ids:
            finish = "stop"
        else:
            seq.text += seq.decoder.push(token)
            if seq.generated >= request.max_new_tokens:
                finish = "length"
        if finish is not None:
            seq.text += seq.decoder.flush()
        if request.stop and _cut_at_stop(seq, request.stop):
            finish = "stop"
        held = 0 if finish is not None else _held_back(seq.text, request.stop)
        new_text = seq.text[seq.shown : len(seq.text) - held]
        seq.shown += len(new_text)
        seq.handle._emit(Update(new_text, [token], finish))
        return finish is not None

    def _free(self, slots: list[int]) -> None:
        """Remove the sequences of ``slots``; the last rows move into the holes."""
        for slot in sorted(slots, reverse=True):
            last = len(self._running) - 1
            if slot != last:
                self.cache.move(last, slot)
                self._running[slot] = self._running[last]
            self._running.pop()
            self.stats.requests_finished += 1

    def _update_stats(self) -> None:
        self.stats.history.append((time.perf_counter(), self.stats.generated_tokens))
        self.snapshot()

    def snapshot(self) -> EngineStats:
        """The counters as of now (tokens per second over the last WINDOW_S seconds)."""
        now = time.perf_counter()
        stats = self.stats
        while stats.history and now - stats.history[0][0] > WINDOW_S:
            stats.history.popleft()
        if stats.history:
            first_time, first_count = stats.history[0]
            span = max(now - first_time, 1e-9)
            stats.tokens_per_second = (stats.generated_tokens - first_count) / span
        else:
            stats.tokens_per_second = 0.0
        stats.waiting = len(self._waiting)
        stats.running = len(self._running)
        return stats

    # ---- the engine's own thread ---------------------------------------------------------------

    def start(self) -> None:
        """Run the engine in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._closing:
                    self._lock.wait(timeout=1.0)
                if self.idle and self._closing:
                    return
            self.step()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish the queued and running ones (``drain``) or cancel them;
        then end the thread."""
        with self._lock:
            self._closing = True
            if not drain:
                for handle in [*self._waiting, *(seq.handle for seq in self._running)]:
                    handle.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            while not self.idle:
                self.step()


def common_prefix(a: Sequence[int], b: Sequence[int], *, limit: int) -> int:
    """How many leading ids ``a`` and ``b`` share (at most ``limit``)."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cut_at_stop(seq: _Sequence, stops: Sequence[str]) -> bool:
    """Cut ``seq.text`` at the first stop text in it (searching the part not yet sent on)."""
    start = max(0, seq.shown - max(len(s) for s in stops))
    found = [i for i in (seq.text.find(stop, start) for stop in stops if stop) if i >= 0]
    if not found:
        return False
    seq.text = seq.text[: min(found)]
    return True


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop text (not sent yet)."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held
