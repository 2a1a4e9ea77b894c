"""Generation speed with a KV cache: lmforge's ``generate`` against transformers' ``generate``.

Batch 1, a 32-token prompt, 256 new tokens, greedy, fp32, at two GPT-2 shapes (vocabulary 50,257,
1,024 positions): a small one (4 layers, 128 wide, 2 heads) and GPT-2 small (12 layers, 768 wide,
12 heads). The transformers model is ``GPT2LMHeadModel`` built from a ``GPT2Config`` with random
weights; its weights are copied into lmforge's ``Transformer`` by the small mapping below, and the
two must produce the same 256 greedy tokens before anything is timed. Then lmforge (eager, and
with ``compile=True``) and transformers run in alternation (medians of interleaved rounds) and
the ratios of tokens/s are reported. Target: lmforge ≥ 1.5× transformers.

    python benchmarks/generation.py                  # both shapes, appends to RESULTS.md
    python benchmarks/generation.py --shapes small --rounds 3 --threads 1 --no-record
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, interleaved  # noqa: E402

from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.generation import generate  # noqa: E402

SHAPES = {  # name: (layers, width, heads)
    "small": (4, 128, 2),
    "gpt2-small": (12, 768, 12),
}
VOCAB, POSITIONS = 50257, 1024


def build_pair(layers: int, width: int, heads: int, *, seed: int = 0) -> tuple[Transformer, torch.nn.Module]:
    """A random transformers GPT-2 and an lmforge Transformer holding the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.generation_config.eos_token_id = None  # always 256 new tokens, as lmforge without an eos
    hf.generation_config.pad_token_id = 0
    config = ModelConfig.from_name(
        "gpt2-small", num_layers=layers, embed_dim=width, num_heads=heads, dropout=0.0, attn_dropout=0.0
    )
    model = Transformer(config).eval()
    model.load_state_dict(gpt2_to_lmforge(hf.state_dict(), layers))
    return model, hf


def gpt2_to_lmforge(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """GPT-2's state dict in lmforge's names. GPT-2's Conv1D stores (in, out): transpose; its
    c_attn holds Q, K and V side by side: split."""
    out = {
        "tok_embed.weight": hf["transformer.wte.weight"],
        "decoder.pos_embed.weight": hf["transformer.wpe.weight"],
        "decoder.norm.weight": hf["transformer.ln_f.weight"],
        "decoder.norm.bias": hf["transformer.ln_f.bias"],
        "head.proj.weight": hf["transformer.wte.weight"],  # tied
    }
    for i in range(layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for hf_norm, lm_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[f"{dst}{lm_norm}.weight"] = hf[f"{src}{hf_norm}.weight"]
            out[f"{dst}{lm_norm}.bias"] = hf[f"{src}{hf_norm}.bias"]
        qkv_w = hf[f"{src}attn.c_attn.weight"].t()  # (3E, E)
        qkv_b = hf[f"{src}attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = qkv_w.chunk(3, dim=0)[j].contiguous()
            out[f"{dst}self_attn.{name}.bias"] = qkv_b.chunk(3)[j].contiguous()
        for hf_name, lm_name in (
            ("attn.c_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.up_proj"),
            ("mlp.c_proj", "mlp.down_proj"),
        ):
            out[f"{dst}{lm_name}.weight"] = hf[f"{src}{hf_name}.weight"].t().contiguous()
            out[f"{dst}{lm_name}.bias"] = hf[f"{src}{hf_name}.bias"]
    return out


def timed(fns: dict[str, Callable[[], object]], *, rounds: int, cpu_time: bool) -> dict[str, float]:
    """Median seconds of each function over interleaved rounds: wall time, or with one thread the
    CPU time of this thread (time waiting for a core taken by other jobs is not counted)."""
    if not cpu_time:
        return interleaved(fns, rounds=rounds, warmup=1)
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_shape(name: str, args: argparse.Namespace) -> dict[str, float | int | str]:
    """Check that the models produce the same greedy tokens, then time them in alternation."""
    layers, width, heads = SHAPES[name]
    model, hf = build_pair(layers, width, heads)
    prompt = torch.randint(0, VOCAB, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    N = args.new_tokens

    def run_lmforge() -> torch.Tensor:
        return generate(model, prompt, max_new_tokens=N)

    def run_compiled() -> torch.Tensor:
        return generate(model, prompt, max_new_tokens=N, compile=True)

    def run_transformers() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=N, do_sample=False, num_beams=1)

    theirs = run_transformers()
    start = time.perf_counter()
    compiled = run_compiled()
    compile_s = time.perf_counter() - start
    for label, ours in (("lmforge", run_lmforge()), ("lmforge compiled", compiled)):
        if ours.shape != theirs.shape or not torch.equal(ours, theirs):
            differ = (ours[0, : theirs.shape[1]] != theirs[0, : ours.shape[1]]).nonzero()
            first = int(differ[0]) - args.prompt_len if len(differ) else "length"
            raise SystemExit(
                f"{name}: {label} and transformers differ (first at new token {first}): not timing"
            )
    print(f"{name}: the same {N} greedy tokens (first compiled call {compile_s:.0f} s); timing …", flush=True)
    fns = {"lmforge": run_lmforge, "compiled": run_compiled, "transformers": run_transformers}
    times = timed(fns, rounds=args.rounds, cpu_time=args.threads == 1)
    with torch.inference_mode():  # the weight read every step needs: the vocabulary projection alone
        hidden = torch.randn(1, width)
        head = model.head.proj.weight
        project = {"head": lambda: torch.nn.functional.linear(hidden, head)}
        head_ms = timed(project, rounds=50, cpu_time=args.threads == 1)["head"] * 1e3
    row = {"name": name, "layers": layers, "width": width, "heads": heads, "compile_s": compile_s}
    row.update({f"{key}_tps": N / seconds for key, seconds in times.items()})
    row["head_share"] = head_ms / (times["lmforge"] / N * 1e3)
    print(
        f"  lmforge {row['lmforge_tps']:.1f} tok/s, compiled {row['compiled_tps']:.1f}, "
        f"transformers {row['transformers_tps']:.1f}; LM head alone {head_ms:.2f} ms/token"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    rows = [bench_shape(name, args) for name in args.shapes]
    load_after = os.getloadavg()[0]

    lines = [
        f"Greedy decoding with KV cache, batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new "
        f"tokens, fp32, {torch.get_num_threads()} thread(s), vocabulary {VOCAB}; every column produces the "
        f"same tokens (checked); medians of {args.rounds} interleaved rounds of "
        f"{'thread CPU time' if args.threads == 1 else 'wall time'}. *compiled*: "
        "`generate(..., compile=True)`, one-token steps through torch.compile (first call's compile "
        "time in the last column, not in the rate). *LM head share*: time of the vocabulary "
        "projection alone (one (1, E) × (E, V) product, a weight read both libraries make every "
        "step) / lmforge's time per token. Target: lmforge ≥ 1.5× transformers. Machine load "
        f"average {load_before:.1f} before, {load_after:.1f} after (other jobs share the cores: "
        "with more threads than free cores, every parallel region waits for a descheduled thread).",
        "",
        "| shape | layers | width | heads | lmforge tok/s | compiled tok/s | transformers tok/s | "
        "**lmforge / transformers** | **compiled / transformers** | LM head share | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        theirs = row["transformers_tps"]
        lines.append(
            f"| {row['name']} | {row['layers']} | {row['width']} | {row['heads']} | {row['lmforge_tps']:.1f} | "
            f"{row['compiled_tps']:.1f} | {theirs:.1f} | **{row['lmforge_tps'] / theirs:.2f}** | "
            f"**{row['compiled_tps'] / theirs:.2f}** | {row['head_share']:.0%} | {row['compile_s']:.0f} |"
        )
    body = "\n".join(lines)
    if args.no_record:
        print(body)
    else:
        import transformers

        append_results(
            f"Generation tokens/s vs transformers {transformers.__version__} generate (benchmarks/generation.py)",
            body,
        )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
