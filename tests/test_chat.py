"""``lmforge chat`` and the Conversation behind it: answers streamed as they are written (the
pieces make the whole, the same tokens as generate under greedy decoding), the history kept
within the context (oldest turns dropped, with a note), /reset, /system, /save, an answer
stopped early (Ctrl-C), and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serving_models import save_tiny_runs, tiny_decoder, tiny_tokenizer

from lmforge import ModelConfig, Transformer, peft
from lmforge.commands.chat import interruptible
from lmforge.errors import LMForgeError
from lmforge.generation import generate
from lmforge.pipeline.chat import Conversation, load_with_adapters
from lmforge.pipeline.generation import Sampling


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return save_tiny_runs(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def greedy_answer(model, tokenizer, messages: list[dict[str, str]], new: int) -> str:
    """What generate answers to ``messages`` alone (greedy, up to the end of the turn)."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    out = generate(model, torch.tensor([ids]), max_new_tokens=new, eos_token_id=tokenizer.eos_id)
    return tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t != tokenizer.eos_id])


def test_an_answer_streams_in_pieces_that_make_the_greedy_answer(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    conversation = Conversation(model, tokenizer, system="be brief", sampling=Sampling(max_new_tokens=10))
    pieces: list[str] = []
    reply = conversation.reply("hello there", on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == reply.text
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert reply.text == greedy_answer(model, tokenizer, first, 10)
    assert reply.finish_reason in ("stop", "length") and reply.dropped_turns == 0
    second = conversation.reply("my card was charged twice")
    history = [*first, {"role": "assistant", "content": reply.text}]
    history.append({"role": "user", "content": "my card was charged twice"})
    assert second.text == greedy_answer(model, tokenizer, history, 10)  # the history is in the prompt
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_the_oldest_turns_are_dropped_to_fit_the_context(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    conversation = Conversation(model, tokenizer, sampling=Sampling(max_new_tokens=6), context=70)
    replies = [conversation.reply(f"what time does the store open on day {i}") for i in range(4)]
    assert replies[0].dropped_turns == 0
    assert sum(r.dropped_turns for r in replies) >= 2
    kept = conversation.messages
    assert kept[0]["content"] != "what time does the store open on day 0"  # the first turn left out
    assert kept[-2]["content"] == "what time does the store open on day 3"
    ids, _, _ = conversation.prompt_ids("again")
    assert len(ids) + 6 <= 70
    assert len(conversation.turns) == 8  # the whole history is kept for /save
    with pytest.raises(LMForgeError, match="past the context of 70"):
        conversation.reply("the quick brown fox jumps over the lazy dog " * 8)


def test_reset_system_and_stopping_an_answer(tokenizer) -> None:
    model = tiny_decoder(tokenizer.vocab_size)
    conversation = Conversation(model, tokenizer, sampling=Sampling(max_new_tokens=40))
    conversation.reply("hello")
    conversation.set_system("answer in one word")
    assert conversation.messages[0] == {"role": "system", "content": "answer in one word"}
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "answer in one word"}]
    conversation.set_system(None)
    assert conversation.messages == []
    pieces: list[str] = []
    stopped = conversation.reply("hello", on_text=pieces.append, should_stop=lambda: len(pieces) >= 3)
    assert stopped.finish_reason == "interrupted" and len(stopped.new_ids) < 40
    assert conversation.turns[-1] == {"role": "assistant", "content": stopped.text}
    encoder = Transformer(ModelConfig.from_name("tiny-encoder", vocab_size=tokenizer.vocab_size))
    with pytest.raises(LMForgeError, match="chat needs a decoder"):
        Conversation(encoder, tokenizer)


def test_ctrl_c_stops_the_answer_not_the_program(tokenizer) -> None:
    """SIGINT while an answer is written ends that answer (lmforge chat's interruptible block);
    after it, Ctrl-C interrupts as usual again."""
    model = tiny_decoder(tokenizer.vocab_size)
    conversation = Conversation(model, tokenizer, sampling=Sampling(max_new_tokens=60))
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends

    previous = signal.getsignal(signal.SIGINT)
    with interruptible() as stopped:
        reply = conversation.reply("hello there", on_text=on_text, should_stop=stopped.is_set)
    assert reply.finish_reason == "interrupted" and len(pieces) == 3 and len(reply.new_ids) < 60
    assert signal.getsignal(signal.SIGINT) is previous
    assert conversation.reply("hello again").finish_reason in ("stop", "length")  # the chat goes on


def lmforge(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the command line; its output decoded as written (no newline translation: a random
    model's answers may hold a carriage return)."""
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"},
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_lmforge_chat_in_a_terminal_session(runs, tmp_path: Path) -> None:
    """Scripted stdin: two messages with an adapter, /system, /save, /reset, one more, an unknown
    command, end of input; the answers on stdout equal the adapter's greedy answers."""
    base, adapters = runs
    saved = tmp_path / "conversation.json"
    script = [
        "hello there",
        "/system be brief",
        "my card was charged twice",
        f"/save {saved}",
        "/reset",
        "hello there",
        "/nonsense",
    ]
    done = lmforge(
        "chat", "--model", str(base), "--adapter", str(adapters["billing"]), "--max_new_tokens", "8",
        stdin="\n".join(script) + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = load_with_adapters(base, {"billing": adapters["billing"]}, active="billing")
    first = greedy_answer(run.model, run.tokenizer, [{"role": "user", "content": "hello there"}], 8)
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "my card was charged twice"},
    ]
    second = greedy_answer(run.model, run.tokenizer, history, 8)
    reset = greedy_answer(run.model, run.tokenizer, [history[0], history[1]], 8)
    answers = [part.rstrip("\n") for part in done.stdout.split("> ") if part.strip()]
    assert answers == [first, second, reset]
    assert json.loads(saved.read_text()) == {"messages": [*history, {"role": "assistant", "content": second}]}
    assert "(system message: be brief)" in done.stderr and "(the conversation is reset)" in done.stderr
    assert "unknown command /nonsense" in done.stderr
    peft.set_adapter(run.model, None)  # the base answers differently: the adapter was really used
    assert greedy_answer(run.model, run.tokenizer, [{"role": "user", "content": "hello there"}], 8) != first


def test_lmforge_chat_notes_dropped_turns(runs) -> None:
    base, _ = runs
    lines = [f"what time does the store open on day {i}" for i in range(4)]
    done = lmforge(
        "chat", "--model", str(base), "--max_new_tokens", "6", "--context", "70",
        stdin="\n".join(lines) + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "oldest turn(s) no longer fit the context: left out" in done.stderr


def test_lmforge_chat_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    done = lmforge("chat", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
