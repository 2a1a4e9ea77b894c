"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1 (a free port) and the official
``openai`` client. Chat and text completions (streamed chunks reassemble to the whole answer),
models, adapters chosen by ``model``, errors in OpenAI's shape with their status codes, 16
concurrent clients each answered as if alone, a client that leaves mid-stream, /health, /metrics,
/v1/classify; and ``lmforge serve`` itself draining on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import torch  # noqa: E402
from serving_models import save_tiny_runs  # noqa: E402
from serving_server import running  # noqa: E402

from lmforge import peft  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.generation import generate  # noqa: E402
from lmforge.pipeline.chat import load_with_adapters  # noqa: E402
from lmforge.serving import ServeOptions, build_app, parse_adapters  # noqa: E402
from lmforge.serving.server import check_address  # noqa: E402

KEY = "test-key"
BODY_LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return save_tiny_runs(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(runs) -> str:
    base, adapters = runs
    options = ServeOptions(
        model=str(base),
        adapters={k: str(v) for k, v in adapters.items()},
        api_key=KEY,
        max_batch=8,
        max_tokens=256,
        max_body_bytes=BODY_LIMIT,
    )
    with running(build_app(options)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(runs):
    """The tokens a chat request gets from lmforge.generation.generate alone, per adapter."""
    base, adapters = runs
    run = load_with_adapters(base, adapters)

    def answer(content: str, model: str, max_tokens: int) -> str:
        messages = [{"role": "user", "content": content}]
        ids = run.tokenizer.encode(run.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        peft.set_adapter(run.model, None if model == "base" else model)
        out = generate(
            run.model, torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=run.tokenizer.eos_id
        )
        return run.tokenizer.decode([t for t in out[0, len(ids) :].tolist() if t != run.tokenizer.eos_id])

    return answer


def chat(client, content: str, model: str = "base", max_tokens: int = 12, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        **kw,
    )


def test_chat_completion_streamed_and_whole_agree(client) -> None:
    whole = chat(client, "my card was charged twice")
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert (
        whole.usage.completion_tokens <= 12
        and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    )
    chunks = list(
        chat(client, "my card was charged twice", stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_text_completions_stream_as_sse_ending_with_done(server: str, client) -> None:
    whole = client.completions.create(model="base", prompt="the quick brown", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens > 0
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "base", "prompt": "the quick brown", "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_models_and_adapters_chosen_by_model(client, reference) -> None:
    assert [m.id for m in client.models.list()] == ["base", "billing", "support"]
    answers = {}
    for model in ("base", "billing", "support"):
        answers[model] = chat(client, "hello there", model=model, max_tokens=10).choices[0].message.content
        assert answers[model] == reference("hello there", model, 10)
    assert len(set(answers.values())) == 3  # each adapter answers in its own way


def test_errors_have_openai_shape_and_status(server: str, client) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(
        server + "/v1/chat/completions", content=b'{"model": "base", "messages": [', headers=headers
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as unknown:
        chat(client, "hi", model="gpt-4")
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    with pytest.raises(openai.APIStatusError) as large:
        chat(client, "x" * (BODY_LIMIT + 10))
    assert large.value.status_code == 413 and large.value.body["code"] == "request_too_large"
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.models.list()
    assert auth.value.status_code == 401 and auth.value.body["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401  # no key at all
    with pytest.raises(openai.BadRequestError) as too_many:
        chat(client, "hi", max_tokens=100_000)
    assert too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[], max_tokens=4)
    missing = httpx.get(server + "/v1/nothing", headers=headers)
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.post(server + "/v1/classify", json={"input": ["x"]}, headers=headers).status_code == 400


def test_sixteen_concurrent_clients_get_what_they_get_alone(server: str, client) -> None:
    """Different prompt lengths, adapters and lengths of answer, all at once (8 slots: some wait)."""
    words = ["a", "customer", "asks", "about", "a", "refund", "for", "a", "late", "order", "please", "help"]
    requests = [
        (
            " ".join(words[: 1 + (i * 5) % len(words)]) * (1 + i % 3),
            ["base", "billing", "support"][i % 3],
            6 + (i * 7) % 17,
        )
        for i in range(16)
    ]
    alone = [
        chat(client, content, model, tokens).choices[0].message.content for content, model, tokens in requests
    ]
    steps_before = metric(server, "lmforge_decode_steps_total")
    rows_before = metric(server, "lmforge_mean_batch_size") * steps_before

    def ask(index: int) -> str:
        own = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
        content, model, tokens = requests[index]
        if index % 2:  # half of them streamed
            chunks = chat(own, content, model, tokens, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return chat(own, content, model, tokens).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone
    steps = metric(server, "lmforge_decode_steps_total") - steps_before
    rows = (
        metric(server, "lmforge_mean_batch_size") * metric(server, "lmforge_decode_steps_total") - rows_before
    )
    assert rows / steps > 2, "the concurrent requests did not share decoding steps"


def test_a_client_leaving_mid_stream_frees_its_slot(server: str, client) -> None:
    cancelled = metric(server, "lmforge_cancelled_requests_total")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": "billing",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 250,
        "temperature": 0,
        "stream": True,
    }
    others: list[str] = []
    worker = threading.Thread(
        target=lambda: others.extend(
            chat(client, "store hours", max_tokens=20).choices[0].message.content for _ in range(3)
        )
    )
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        worker.start()
    # the connection is closed with about 247 tokens still to come
    worker.join(120)
    assert len(others) == 3 and len(set(others)) == 1
    deadline = time.monotonic() + 30
    while metric(server, "lmforge_cancelled_requests_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "lmforge_cancelled_requests_total") == cancelled + 1
    assert metric(server, "lmforge_running_requests") == 0


def test_health_and_metrics(server: str) -> None:
    health = httpx.get(server + "/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == "base"
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in (
        "lmforge_requests_total",
        "lmforge_generated_tokens_total",
        "lmforge_tokens_per_second",
        "lmforge_queue_depth",
    ):
        assert name in text


def metric(server: str, name: str) -> float:
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_classification_runs_are_served_on_classify(tmp_path: Path) -> None:
    from test_tasks_classification import base_run, run, write_sentiment

    from lmforge.pipeline.evaluation import load_task_run, predict

    data = write_sentiment(tmp_path / "data")
    run(tmp_path, base_run(tmp_path, "tiny-encoder"), data)
    folder = tmp_path / "run-full"
    expected = predict(load_task_run(folder), [{"review": "it was great"}, {"review": "awful plot"}])
    with running(build_app(ServeOptions(model=str(folder), name="sentiment"))) as url:
        answer = httpx.post(
            url + "/v1/classify", json={"model": "sentiment", "input": ["it was great", "awful plot"]}
        )
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x"})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [d["label"] for d in data] == [e["prediction"] for e in expected] == ["pos", "neg"]
    assert data[0]["probabilities"] == expected[0]["probabilities"]
    assert refused.status_code == 400 and "classifier" in refused.json()["error"]["message"]


def test_lmforge_serve_drains_in_flight_requests_on_sigterm(runs) -> None:
    base, _ = runs
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(base), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "lmforge serve did not start"
            time.sleep(0.2)
        body = {"model": "base", "prompt": "the", "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert process.wait(60) == 0
        log = process.stderr.read()
        assert f"on http://127.0.0.1:{port}/v1" in log and "serve: stopped" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (closed again: the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_options_are_checked_in_one_line() -> None:
    assert parse_adapters(["billing=runs/a", " support = runs/b "]) == {
        "billing": "runs/a",
        "support": "runs/b",
    }
    for bad, message in (
        (["billing"], "expected NAME=RUN"),
        (["a=x", "a=y"], "given twice"),
        (["=x"], "NAME=RUN"),
    ):
        with pytest.raises(LMForgeError, match=message):
            parse_adapters(bad)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(LMForgeError, match="cannot listen on 127.0.0.1"):
            check_address("127.0.0.1", taken.getsockname()[1])
