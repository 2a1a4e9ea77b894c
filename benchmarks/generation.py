"""Generation speed with a KV cache: lmforge's ``generate`` against transformers' ``generate``, in
fp32 and bf16, and lmforge's int8 weight-only decoding; plus the perplexity each form costs.

Speed: batch 1, a 32-token prompt, 256 new tokens, greedy, at two GPT-2 shapes (vocabulary 50,257,
1,024 positions): a small one (4 layers, 128 wide, 2 heads) and GPT-2 small (12 layers, 768 wide,
12 heads). The transformers model is ``GPT2LMHeadModel`` built from a ``GPT2Config`` with random
weights; its weights are copied into lmforge's ``Transformer`` by the small mapping below, and in
fp32 the two must produce the same 256 greedy tokens before anything is timed. Variants run in
alternation (medians of interleaved rounds) on ``--threads`` threads; with one thread the time is
this process's CPU time (steadier on a shared machine), and the wall time is reported beside it.
Every headline ratio compares the same precision: lmforge fp32 / transformers fp32 (target ≥ 1.5×)
and lmforge bf16 / transformers bf16 (both read bfloat16 weights; lmforge's arithmetic and
activations stay float32, transformers' are bfloat16 too). int8 (``lmforge.quant``: int8 codes, one scale per 32 input
columns multiplied in fp32 by the native block kernel where it is built, else per ``--group_size``
columns with bf16 activations) has no transformers counterpart: it is compared with lmforge fp32
(its speed-up) and, labelled as cross-precision, with transformers fp32. bf16 and int8 tokens are
not expected to equal the fp32 ones (random weights make near-ties common): the share of equal
tokens is shown.

The fp32 ceiling: passes over every linear weight (the tied head once), each timed alone: a plain
read, ``F.linear`` matrix-vector products on the (out, in) layout, ``x @ Wᵀ`` on the transposed
(in, out) layout lmforge's fp32 decoding keeps, and lmforge's native one-row kernel on that layout
(``lmforge.kernels.dense_row``, what its fp32 decoding calls where it is built). A token at batch 1 reads each weight
once, so a decoder that reads them no faster than the fastest pass does not pass ``1 / its time``;
the ratio of that to transformers' tokens/s is the most the fp32 target could be met by.

Quality (random weights have no perplexity to lose): a small GPT trained by lmforge on the
Python-docs corpus (``lmforge demo``'s model and data; ``--quality_model RUN_DIR`` reuses a demo
run, otherwise one is trained for ``--quality_steps`` steps), scored on its whole validation split
in fp32, bf16 and int8. Target: int8 perplexity within 1% of fp32.

    python benchmarks/generation.py --threads 1                      # both shapes, appends to RESULTS.md
    python benchmarks/generation.py --threads 1 --shapes small --rounds 2 --quality_steps 0 --no-record
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, load_average, set_threads, weight_pass  # noqa: E402

from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.generation import generate  # noqa: E402
from lmforge.kernels import kernel_problem  # noqa: E402
from lmforge.quant import DEFAULT_GROUP_SIZE, for_decoding  # noqa: E402

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


def timed(fns: dict[str, Callable[[], object]], *, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds of each function over interleaved rounds (one warm-up call each)."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return (
        {n: statistics.median(v) for n, v in wall.items()},
        {n: statistics.median(v) for n, v in cpu.items()},
    )


def bench_shape(name: str, args: argparse.Namespace) -> dict:
    """Check that fp32 lmforge and transformers produce the same greedy tokens, then time every form."""
    layers, width, heads = SHAPES[name]
    model, hf = build_pair(layers, width, heads)
    prompt = torch.randint(0, VOCAB, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    N = args.new_tokens
    floor = weight_pass(model)  # the plain model's linear weights, before any layout change
    models = {
        "lmforge fp32 (out, in)": copy.deepcopy(model).eval(),  # the layout change alone: nn.Linear as trained
        "lmforge bf16": for_decoding(copy.deepcopy(model), "bf16"),
        "lmforge int8": for_decoding(copy.deepcopy(model), "int8", group_size=args.group_size),
    }
    # fp32 as `lmforge generate` decodes: each linear weight stored transposed, (in, out)
    model = for_decoding(model, "fp32")
    models = {"lmforge fp32": model, **models}
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)

    def ours(m: Transformer, compiled: bool = False) -> Callable[[], torch.Tensor]:
        return lambda: generate(m, prompt, max_new_tokens=N, compile=compiled)

    def theirs(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return m.generate(prompt, attention_mask=mask, max_new_tokens=N, do_sample=False, num_beams=1)

        return run

    fns = {label: ours(m) for label, m in models.items()}
    fns["transformers fp32"] = theirs(hf)
    fns["transformers bf16"] = theirs(hf_bf16)
    if args.compile:
        fns["lmforge fp32 compiled"] = ours(model, compiled=True)
    outputs = {label: fn() for label, fn in fns.items()}
    reference = outputs["transformers fp32"]
    if not torch.equal(outputs["lmforge fp32"], reference):
        differ = (outputs["lmforge fp32"] != reference).nonzero()
        raise SystemExit(
            f"{name}: lmforge fp32 and transformers fp32 differ at {differ[:3].tolist()}: not timing"
        )
    agree = {
        label: float((out[0, args.prompt_len :] == reference[0, args.prompt_len :]).float().mean())
        for label, out in outputs.items()
    }
    print(f"{name}: the same {N} greedy tokens in fp32; timing {len(fns)} variants …", flush=True)
    wall, cpu = timed(fns, rounds=args.rounds)
    basis = cpu if args.threads == 1 else wall
    row = {
        "name": name,
        "layers": layers,
        "width": width,
        "heads": heads,
        "agree": agree,
        "wall": wall,
        "cpu": cpu,
    }
    row["tps"] = {label: N / seconds for label, seconds in basis.items()}
    row["floor"] = floor
    row["ceiling"] = floor["ceiling_cpu" if args.threads == 1 else "ceiling_wall"]
    print("  " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in row["tps"].items()), flush=True)
    return row


# ---- quality: perplexity of a model trained on the Python docs ------------------------------------------


@torch.no_grad()
def perplexity(model: Transformer, batches: list[dict]) -> float:
    """exp of the mean next-token cross-entropy over every target of ``batches``."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(batch["input_ids"]).logits.float()
        labels = batch["labels"]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        count += int((labels != -100).sum())
    return math.exp(total / count)


def quality(args: argparse.Namespace) -> dict[str, float] | None:
    """Perplexity of the fp32, bf16 and int8 forms of a demo model on its Python-docs validation split."""
    from lmforge import load
    from lmforge.data import TokenShards, pretraining_batches
    from lmforge.pipeline.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.quality_model
        if run_dir is None:
            if args.quality_steps <= 0:
                return None
            run_dir = Path(tmp) / "demo"
            print(
                f"training lmforge's demo model on the Python docs for {args.quality_steps} steps …",
                flush=True,
            )
            run_demo(
                out=run_dir, minutes=600, max_steps=args.quality_steps, progress=False
            )
        loaded = load(run_dir)
        shards = TokenShards(Path(run_dir) / "data", tokenizer=loaded.tokenizer)
        seq_len = loaded.model.config.max_seq_len
        batches = list(
            pretraining_batches(
                shards["validation"],
                loaded.tokenizer,
                objective="causal_lm",
                seq_len=seq_len,
                batch_size=8,
                evaluation=True,
            )
        )
        result = {
            "tokens": sum(int((b["labels"] != -100).sum()) for b in batches),
            "params": loaded.model.num_params(),
        }
        result["config"] = loaded.model.config
        for dtype in ("fp32", "bf16", "int8"):
            model = for_decoding(copy.deepcopy(loaded.model), dtype, group_size=args.group_size)
            result[dtype] = perplexity(model, batches)
            print(f"  perplexity {dtype}: {result[dtype]:.3f}", flush=True)
        if args.group_size != 32 and kernel_problem() is not None:  # with the kernel, int8 is 32 wide already
            model = for_decoding(copy.deepcopy(loaded.model), "int8", group_size=32)
            result["int8 (groups of 32, Q8_0)"] = perplexity(model, batches)
    return result


def int8_form(args: argparse.Namespace) -> str:
    """What ``for_decoding(..., "int8")`` makes here."""
    if kernel_problem() is None:
        return "one scale per 32 input columns, fp32 arithmetic (the native block kernel)"
    return f"groups of {args.group_size} input columns per scale, bf16 activations (no native kernel here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument(
        "--group_size", type=int, default=DEFAULT_GROUP_SIZE, help="int8: input columns per scale"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time generate(..., compile=True) in fp32"
    )
    parser.add_argument("--quality_model", type=Path, default=None, help="a demo run directory to score")
    parser.add_argument(
        "--quality_steps", type=int, default=600, help="train a demo model this long (0: skip)"
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    set_threads(args.threads)

    load_before = load_average()
    rows = [bench_shape(name, args) for name in args.shapes]
    load_after = load_average()
    scores = quality(args)

    basis = "process CPU time" if args.threads == 1 else "wall time"
    lines = [
        f"Greedy decoding with KV cache, batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{args.threads} thread(s), vocabulary {VOCAB}, random weights; lmforge fp32 and transformers fp32 produce the "
        f"same tokens (checked). Tokens/s from the medians of {args.rounds} interleaved rounds of {basis} (wall in "
        f"the last column). int8: weight-only, {int8_form(args)}. "
        f"Load average (1/5/15 min) {load_before} before, {load_after} after.",
        "",
        "| shape | variant | tok/s | tokens equal to fp32 | wall tok/s |",
        "|---|---|---:|---:|---:|",
    ]
    ratios = []
    for row in rows:
        tps, wall = row["tps"], row["wall"]
        for label in tps:
            lines.append(
                f"| {row['name']} | {label} | {tps[label]:.1f} | {row['agree'][label]:.0%} | {args.new_tokens / wall[label]:.1f} |"
            )
        t = tps
        ratios.append(
            f"| {row['name']} | **{t['lmforge fp32'] / t['transformers fp32']:.2f}×** | "
            f"**{t['lmforge bf16'] / t['transformers bf16']:.2f}×** | {t['lmforge bf16'] / t['lmforge fp32']:.2f}× | "
            f"{t['lmforge int8'] / t['lmforge fp32']:.2f}× | {t['lmforge int8'] / t['transformers fp32']:.2f}× | "
            f"{row['ceiling'] / t['transformers fp32']:.2f}× |"
        )
    lines += [
        "",
        "| shape | lmforge / transformers, fp32 (target ≥ 1.5×) | lmforge / transformers, bf16 | lmforge bf16 / lmforge fp32 | "
        "lmforge int8 / lmforge fp32 | lmforge int8 / transformers fp32 (*cross-precision*) | "
        "fp32 ceiling / transformers fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *ratios,
        "",
        "fp32 ceiling: the tokens/s of a decoder whose token cost nothing but one pass over every linear weight "
        "(the tied head once) at the fastest of the speeds below, the least an fp32 implementation reading "
        "them no faster must spend per token at batch 1; ceiling / transformers is the most such a decoder could "
        "reach against it on this core.",
        "",
        "| shape | fp32 weights read per token, MB | plain read (`sum`): ms, GB/s | `F.linear` on (out, in): ms, GB/s "
        "| `x @ Wᵀ` stored (in, out): ms, GB/s | lmforge's native one-row kernel (`dense_row`) on (in, out), its "
        "fp32 decoding: ms, GB/s | fp32 ceiling, tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {row['name']} | {row['floor']['megabytes']:.0f} | "
            + " | ".join(
                f"{1e3 * row['floor'][p + '_wall']:.1f}, {row['floor']['megabytes'] / row['floor'][p + '_wall'] / 1e3:.1f}"
                if p + "_wall" in row["floor"]
                else "not built"
                for p in ("read", "gemv", "gemv_t", "native")
            )
            + f" | {row['ceiling']:.1f} |"
            for row in rows
        ],
    ]
    if scores is not None:
        c = scores["config"]
        lines += [
            "",
            f"Quality: lmforge's demo GPT ({c.num_layers} layers, width {c.embed_dim}, {scores['params'] / 1e6:.2f}M parameters, "
            f"byte-level BPE of {c.vocab_size}) trained on the Python-docs corpus, perplexity on its whole validation split "
            f"({scores['tokens']:,} tokens):",
            "",
            "| weights | perplexity | change vs fp32 |",
            "|---|---:|---:|",
        ]
        for key in [k for k in scores if k in ("fp32", "bf16", "int8") or k.startswith("int8 (")]:
            label = f"int8 ({int8_form(args)})" if key == "int8" else key
            lines.append(
                f"| {label} | {scores[key]:.3f} | {100 * (scores[key] / scores['fp32'] - 1):+.2f}% |"
            )
    body = "\n".join(lines)
    if args.no_record:
        print(body)
    else:
        import transformers

        append_results(
            f"Generation vs transformers {transformers.__version__} generate, fp32 / bf16 / int8 (benchmarks/generation.py)",
            body,
        )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
