"""``lmforge chat``: talk to a chat model in the terminal, the answer streamed as it comes."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..pipeline.chat import Conversation, load_with_adapters
from ..pipeline.generation import Sampling
from ..runtime import resolve_device

HELP = "/reset forget the turns · /system TEXT set (no TEXT: remove) the system message · /save FILE · /quit"


def chat(
    *,
    model: str,
    adapter: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    chat_template: str | None = None,
    context: int | None = None,
    device: str = "auto",
) -> int:
    """Chat with a model in the terminal: type a message, read the answer as it is written.

    The conversation is kept within the model's context: when it no longer fits, the oldest turns
    are left out (with a note). Ctrl-C stops an answer (not the program); Ctrl-D or /quit ends.
    Commands: /reset, /system TEXT, /save FILE (the conversation as JSON), /help.
    Example: lmforge chat --model SmolLM2-135M-Instruct.Q4_1.gguf --system "Answer briefly."

    Args:
        model: a run folder, a Hugging Face folder or a GGUF file (with a chat template).
        adapter: an adapter run (e.g. a LoRA SFT) to answer with, on the model as its base.
        system: a system message before the conversation.
        max_new_tokens: the most tokens of one answer.
        temperature: 0 decodes greedily; above 0 samples (higher: more varied).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probabilities reach p (nucleus).
        repetition_penalty: above 1 discourages tokens already in the text (CTRL).
        seed: random seed of sampling.
        chat_template: a built-in template (chatml, llama-2, plain) or Jinja source instead of the
            model's own.
        context: positions the conversation may take (default: the model's context).
        device: cpu, cuda, cuda:1, … or auto (a GPU when there is one).
    """
    run = load_with_adapters(
        model, {"adapter": adapter} if adapter else None, active="adapter" if adapter else None,
        device=resolve_device(device),
    )  # fmt: skip
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
    conversation = Conversation(
        run.model, run.tokenizer, system=system, sampling=sampling, template=chat_template, context=context
    )
    print(f"lmforge chat: {Path(model).name}{' + ' + adapter if adapter else ''}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if line.strip().startswith("/"):
            if not command(conversation, line.strip()):
                return 0
            continue
        if not line.strip():
            continue
        with interruptible() as stopped:
            reply = conversation.reply(line, on_text=show, should_stop=stopped.is_set)
        print()
        if reply.dropped_turns:
            print(
                f"(note: the {reply.dropped_turns} oldest turn(s) no longer fit the context: left out)",
                file=sys.stderr,
            )
        if reply.finish_reason == "interrupted":
            print("(stopped)", file=sys.stderr)
        elif reply.finish_reason == "length":
            print(f"(the answer reached --max_new_tokens {max_new_tokens})", file=sys.stderr)


def show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def command(conversation: Conversation, line: str) -> bool:
    """Carry out a /command; False when the chat should end."""
    name, _, argument = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        conversation.reset()
        print("(the conversation is reset)", file=sys.stderr)
    elif name == "/system":
        conversation.set_system(argument.strip() or None)
        print(f"(system message: {argument.strip() or 'none'})", file=sys.stderr)
    elif name == "/save" and argument.strip():
        path = conversation.save(argument.strip())
        print(f"(saved {len(conversation.turns)} turn(s) to {path})", file=sys.stderr)
    elif name == "/help":
        print(HELP, file=sys.stderr)
    else:
        print(f"(unknown command {name}{'' if name != '/save' else ' without a FILE'}) {HELP}", file=sys.stderr)
    return True


@contextmanager
def interruptible() -> Iterator[threading.Event]:
    """While an answer is written, Ctrl-C (SIGINT) sets the event instead of ending the program."""
    stopped = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stopped.set())
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)
