"""Pretraining: the typed sections of a recipe (``configs/pretrain/*.yaml``), what they build, and
:func:`pretrain`, the pipeline function that ``lmforge pretrain`` and ``lmforge demo`` call.

A recipe has four sections, each a typed dataclass, so ``--model.num_layers 6``,
``--tokenizer.vocab_size 4096``, ``--data.path FILE`` and ``--train.lr 3e-4`` come with the
command line, and YAML mistakes are reported as ``file:line: key '...'`` with the nearest key::
    model:      a preset to start from (``preset: tiny-llama``) plus any ModelConfig field
    tokenizer:  kind (char | bpe | wordpiece) and vocabulary size, or the path of a tokenizer.json
    data:       the text (a file, a JSONL field, a folder; none = the Python documentation),
                sequence length, validation share, masking / span-corruption settings
    train:      :class:`~lmforge.training.TrainConfig`

    recipe ──build_pretraining──► tokenizer, token shards, model, objective, batch sources
           ──make_trainer──► the one loop (Trainer) ──fit──► PretrainResult (+ the run folder)
"""

from __future__ import annotations

import copy
import dataclasses
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..config import PRESETS, ModelConfig
from ..data import (
    Corpus,
    DocumentChunks,
    EvalWindows,
    MaskedLMCollator,
    RandomWindows,
    SpanCorruptionCollator,
    TokenShards,
    python_docs_corpus,
    write_shards,
)
from ..errors import ConfigError, LMForgeError, did_you_mean
from ..files import TOKENIZER_FILE, save_tokenizer
from ..model import Transformer
from ..objectives import DEFAULT_OBJECTIVE, make_objective
from ..objectives.span_corruption import num_noise_spans
from ..runtime import world_size
from ..settings import dataclass_to_dict
from ..tokenizers import Tokenizer
from ..training import Callback, Trainer, TrainState, distributed, seed_everything
from ..training.checkpoint import latest_checkpoint
from ..training.config import TrainConfig
from .common import Log, job_output_folder, silent

TokenizerKind = Literal["char", "bpe", "wordpiece"]
ObjectiveChoice = Literal["auto", "causal_lm", "masked_lm", "span_corruption"]
SHARDS_DIR = "data"  # token shards live in RUN_DIR/data (a resumed run reads them again)


class _ModelSectionBase:
    """Methods of :data:`ModelSection` (its fields are generated from ModelConfig's)."""
    preset: str | None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(
                f"unknown preset '{self.preset}'"
                + did_you_mean(self.preset, PRESETS)
                + f" (presets: {', '.join(PRESETS)})",
                key="preset",
            )
        self.build(vocab_size=self.given().get("vocab_size") or 256, max_seq_len=None)  # validate early

    def given(self) -> dict[str, Any]:
        """The ModelConfig fields set in the recipe (None = not set: preset or default)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name != "preset" and getattr(self, f.name) is not None
        }

    def build(
        self, *, vocab_size: int, max_seq_len: int | None, pad_token_id: int | None = None
    ) -> ModelConfig:
        """The ModelConfig: the preset (if any), then the recipe's fields; ``vocab_size``,
        ``max_seq_len`` and ``pad_token_id`` fill in what neither sets (from the tokenizer/data)."""
        values: dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        given = self.given()
        values.update(given)
        if "vocab_size" not in given:
            values["vocab_size"] = vocab_size
        if max_seq_len is not None and "max_seq_len" not in given:
            values["max_seq_len"] = max(max_seq_len, values.get("max_seq_len", 0))
        if pad_token_id is not None and "pad_token_id" not in given:
            values["pad_token_id"] = pad_token_id
        if values.get("arch") == "encoder" and "head" not in values:
            values["head"] = "mlm"
        return ModelConfig.from_dict(values)


def _model_section() -> type:
    hints = typing.get_type_hints(ModelConfig)
    fields: list[tuple[str, Any, Any]] = [("preset", str | None, dataclasses.field(default=None))]
    for f in dataclasses.fields(ModelConfig):
        annotation = hints[f.name]
        optional = annotation if type(None) in typing.get_args(annotation) else annotation | None
        fields.append((f.name, optional, dataclasses.field(default=None)))
    cls = dataclasses.make_dataclass("ModelSection", fields, bases=(_ModelSectionBase,))
    cls.__doc__ = (
        "The model of a recipe: ``preset`` (a ModelConfig preset to start from) and any ModelConfig "
        "field; unset fields come from the preset or ModelConfig's defaults, vocab_size from the "
        "tokenizer and max_seq_len from data.seq_len."
    )
    cls.__module__ = __name__
    return cls


ModelSection = _model_section()


@dataclass
class TokenizerSection:
    """The tokenizer: trained on the training text, or read from a tokenizer.json."""
    kind: TokenizerKind = "bpe"  # "char", "bpe" (byte-level) or "wordpiece"
    vocab_size: int = 4096  # vocabulary size, specials included (char: an upper bound)
    path: Path | None = None  # an existing tokenizer.json to use instead of training one
    lowercase: bool = False  # WordPiece only: lower-case the text

    def __post_init__(self) -> None:
        if self.vocab_size < 8:
            raise ConfigError(f"vocab_size = {self.vocab_size}: must be at least 8", key="vocab_size")


@dataclass
class DataSection:
    """The text and how it becomes batches."""
    path: Path | None = None  # a text/JSONL file or a folder; none = the Python documentation corpus
    field: str = "text"  # the JSON field holding the text in JSONL files
    documents: Literal["file", "line", "blank_line"] = "file"  # how a text file splits into documents
    seq_len: int = 256  # tokens per training sequence (decoder: window length)
    val_fraction: float = 0.1  # share of the text held out for validation
    split: Literal["tail", "documents"] = (
        "tail"  # validation = the last share of the tokens, or whole documents
    )
    mask_probability: float = 0.15  # masked LM: share of tokens selected
    whole_word: bool = False  # masked LM: select whole words
    noise_density: float = 0.15  # span corruption: share of tokens dropped into spans
    mean_span_length: float = 3.0  # span corruption: mean length of a dropped span
    seed: int = 0  # seeds the batch sampler (windows, masks, spans)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len = {self.seq_len}: must be at least 2", key="seq_len")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction = {self.val_fraction}: must be in (0, 1)", key="val_fraction")
        if not 0 < self.mask_probability < 1:
            raise ConfigError(
                f"mask_probability = {self.mask_probability}: must be in (0, 1)", key="mask_probability"
            )
        if not 0 < self.noise_density < 1:
            raise ConfigError(f"noise_density = {self.noise_density}: must be in (0, 1)", key="noise_density")
        if self.mean_span_length < 1:
            raise ConfigError(
                f"mean_span_length = {self.mean_span_length}: must be at least 1", key="mean_span_length"
            )


# ---- recipe → pieces ---------------------------------------------------------------------------


@dataclass
class Pretraining:
    """Everything the loop needs for a pretraining run, built from a recipe."""
    model: Transformer
    tokenizer: Tokenizer
    objective: Any  # lmforge.objectives: CausalLM | MaskedLM | SpanCorruption
    objective_name: str
    train_batches: Any  # a resumable batch source
    eval_batches: Any  # validation batches, re-iterable
    shards: TokenShards
    run_config: dict[str, Any]  # the resolved recipe (written as config.yaml)


def recipe_arch(model: Any) -> str:
    """The architecture a model section asks for (its own, its preset's, or decoder)."""
    if model.arch is not None:
        return model.arch
    return PRESETS[model.preset].get("arch", "decoder") if model.preset else "decoder"


def corpus_of(data: DataSection) -> Corpus:
    """The training text: ``data.path`` (file, JSONL, folder) or the embedded Python documentation."""
    if data.path is None:
        return python_docs_corpus()
    return Corpus.from_files(data.path, field=data.field, documents=data.documents)


def sentinels_needed(data: DataSection) -> int:
    """Sentinel tokens span corruption needs for chunks of ``data.seq_len`` (a safe upper bound:
    a raw chunk is longer than the corrupted input it becomes)."""
    _, spans = num_noise_spans(
        2 * data.seq_len, noise_density=data.noise_density, mean_span_length=data.mean_span_length
    )
    return spans + 1


def build_tokenizer(
    section: TokenizerSection, corpus: Corpus, *, objective: str, data: DataSection, progress: bool = True
) -> Tokenizer:
    """Read ``section.path`` or train a tokenizer on ``corpus`` (with sentinels for span corruption)."""
    sentinels = sentinels_needed(data) if objective == "span_corruption" else 0
    if section.path is not None:
        tokenizer = Tokenizer.from_file(section.path)
        return tokenizer.add_sentinels(sentinels) if sentinels else tokenizer
    return Tokenizer.train(
        corpus,
        kind=section.kind,
        vocab_size=section.vocab_size,
        num_sentinels=sentinels,
        lowercase=section.lowercase,
        show_progress=progress,
    )


def batch_sources(
    split_train: Any,
    split_eval: Any,
    tokenizer: Tokenizer,
    *,
    objective: str,
    data: DataSection,
    train: TrainConfig,
) -> tuple[Any, Any]:
    """The resumable training source and the validation source for ``objective``. In a job of
    N processes each rank evaluates the same batches of N × batch_size sequences: the windows
    one process with that batch would evaluate."""
    eval_batch = train.batch_size * world_size()
    if objective == "causal_lm":
        train_source = RandomWindows(
            split_train, seq_len=data.seq_len, batch_size=train.batch_size, seed=data.seed
        )
        eval_source = EvalWindows(
            split_eval,
            seq_len=data.seq_len,
            batch_size=eval_batch,
            pad_id=tokenizer.pad_id or 0,
            max_batches=train.eval_batches,
        )
        return train_source, eval_source
    if objective == "masked_lm":
        collator: Any = MaskedLMCollator(
            tokenizer, probability=data.mask_probability, whole_word=data.whole_word
        )
    else:
        collator = SpanCorruptionCollator(
            tokenizer, noise_density=data.noise_density, mean_span_length=data.mean_span_length
        )
    common = dict(seq_len=data.seq_len, batch_size=train.batch_size, collator=collator)
    train_source = DocumentChunks(split_train, seed=data.seed, **common)
    eval_source = Restarting(
        lambda: DocumentChunks(
            split_eval, seed=data.seed + 1, shuffle=False, epochs=1, **{**common, "batch_size": eval_batch}
        )
    )
    return train_source, eval_source


class Restarting:
    """Validation batches that start from the same first batch at every evaluation (a fresh
    source each time), even when an evaluation stopped early after ``eval_batches``."""
    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return iter(self.make())


def build_pretraining(
    *,
    model: Any,
    tokenizer: TokenizerSection,
    data: DataSection,
    train: TrainConfig,
    objective: ObjectiveChoice = "auto",
    run_dir: str | Path,
    resume: bool = False,
    shared: bool = False,
    progress: bool = True,
) -> Pretraining:
    """Build tokenizer, token shards, model, objective and batch sources from a recipe.

    A fresh run trains the tokenizer (unless ``tokenizer.path`` is given) and writes the shards
    into ``RUN_DIR/data``; a resumed run reads both back from the run directory, so it sees
    exactly the ids it trained on, and so does a job's other ranks (``shared``) once the writer
    has made them.

    Raises:
        LMForgeError: bad data files, a run directory that already holds a run (without
            ``resume``) or has nothing to resume, an objective that does not fit the architecture.
    """
    run_dir = Path(run_dir)
    arch = recipe_arch(model)
    name = DEFAULT_OBJECTIVE[arch] if objective == "auto" else objective
    fits = {"decoder": ("causal_lm",), "encoder": ("masked_lm",), "encoder_decoder": ("span_corruption",)}[
        arch
    ]
    if name not in fits:
        raise LMForgeError(
            f"objective {name} does not fit arch {arch} (use {fits[0]} or auto)", key="objective"
        )

    if resume or shared:
        if resume and latest_checkpoint(run_dir) is None:
            raise LMForgeError("nothing to resume: no checkpoint in this run directory", file=run_dir)
        tok = Tokenizer.from_file(run_dir / TOKENIZER_FILE)  # the model check comes with the weights
        shards = TokenShards(run_dir / SHARDS_DIR, tokenizer=tok)
    else:
        if latest_checkpoint(run_dir) is not None:
            raise LMForgeError(
                "this run directory already holds a run: add --resume to continue it, or choose another --out",
                file=run_dir,
            )
        corpus = corpus_of(data)
        tok = build_tokenizer(tokenizer, corpus, objective=name, data=data, progress=progress)
        shards = write_shards(
            corpus,
            tok,
            run_dir / SHARDS_DIR,
            validation=data.val_fraction,
            split=data.split,
            seed=data.seed,
            show_progress=progress,
        )
    model_config = model.build(vocab_size=tok.vocab_size, max_seq_len=data.seq_len, pad_token_id=tok.pad_id)
    if model_config.max_seq_len < data.seq_len:
        raise LMForgeError(
            f"model.max_seq_len {model_config.max_seq_len} is shorter than data.seq_len {data.seq_len}",
            key="model.max_seq_len",
        )
    if model_config.vocab_size < tok.vocab_size:
        raise LMForgeError(
            f"model.vocab_size {model_config.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens",
            key="model.vocab_size",
        )
    net = Transformer(model_config)
    objective_fn = make_objective(name, bytes_per_token=shards["train"].bytes_per_token)
    train_source, eval_source = batch_sources(
        shards["train"], shards["validation"], tok, objective=name, data=data, train=train
    )
    tokenizer_section = dataclass_to_dict(tokenizer)
    tokenizer_section["vocab_size"] = tok.vocab_size
    run_config = {
        "model": model_config.to_dict(),
        "tokenizer": tokenizer_section,
        "data": dataclass_to_dict(data),
        "objective": name,
        "out": str(run_dir),
    }
    return Pretraining(
        model=net,
        tokenizer=tok,
        objective=objective_fn,
        objective_name=name,
        train_batches=train_source,
        eval_batches=eval_source,
        shards=shards,
        run_config=run_config,
    )


def seconds_per_step(
    model: nn.Module, objective: Any, batches: Any, config: TrainConfig, *, steps: int = 4
) -> float:
    """Time a few training steps on a copy of ``model`` (the model itself is not touched); the
    first step (warm-up: allocations, kernel selection) is left out."""
    marks: list[float] = []

    class Clock(Callback):
        def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            marks.append(time.perf_counter())

    probe = dataclasses.replace(config, max_steps=steps + 1, progress=False, max_minutes=None, eval_every=0)
    Trainer(copy.deepcopy(model), objective, batches, config=probe, callbacks=[Clock()]).fit()
    return (marks[-1] - marks[0]) / max(len(marks) - 1, 1)


def make_trainer(
    run: Pretraining,
    train: TrainConfig,
    *,
    out: str | Path | None,
    callbacks: list[Callback] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Trainer:
    """The one loop set up for a built recipe: its objective, batch sources, run folder and
    tokenizer, the resolved recipe (plus ``extra_config``) as config.yaml."""
    return Trainer(
        run.model,
        run.objective,
        run.train_batches,
        config=train,
        eval_data=run.eval_batches,
        callbacks=callbacks or [],
        run_dir=out,
        tokenizer=run.tokenizer,
        run_config={**run.run_config, **(extra_config or {})},
    )


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the trained pieces and how training ended."""

    model: Transformer
    tokenizer: Tokenizer
    state: TrainState  # step, evaluations, times; ``interrupted`` after Ctrl-C / SIGTERM
    run: Pretraining  # the built recipe (objective name, shards, resolved config)
    out: Path

    @property
    def last_eval(self) -> dict[str, float]:
        return self.state.evals[-1] if self.state.evals else {}


def describe_pretraining(run: Pretraining) -> str:
    """One line: the model, objective, tokenizer and the tokens it trains on."""
    shards = run.shards
    return (
        f"{run.model.config.arch} with {run.model.num_params() / 1e6:.2f}M parameters, "
        f"objective {run.objective_name}, tokenizer {run.tokenizer.kind} ({run.tokenizer.vocab_size} tokens), "
        f"{shards['train'].num_tokens:,} training / {shards['validation'].num_tokens:,} validation tokens"
    )


def pretrain(
    *,
    model: Any,
    tokenizer: TokenizerSection,
    data: DataSection,
    train: TrainConfig,
    objective: ObjectiveChoice = "auto",
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[Callback] | None = None,
    log: Log = silent,
) -> PretrainResult:
    """Pretrain a model from a recipe into the run folder ``out`` (or continue it, ``resume``).

    Seeds everything with ``train.seed``, builds the recipe (:func:`build_pretraining`), runs the
    one loop and returns; it prints nothing itself (``log`` receives the plan, one line each).
    ``out`` must be new or empty (or its own run, with ``resume``); ``overwrite`` replaces an
    occupied folder as a whole once this run has saved (:func:`lmforge.files.output_folder`).

    Raises:
        LMForgeError: bad recipe or data, an occupied folder (without resume or overwrite).
    """
    out = Path(out)
    with distributed.job(train.device), job_output_folder(out, overwrite=overwrite, resume=resume) as work:
        seed_everything(train.seed)

        def build(shared: bool) -> Pretraining:
            return build_pretraining(
                model=model,
                tokenizer=tokenizer,
                data=data,
                train=train,
                objective=objective,
                run_dir=work,
                resume=resume,
                shared=shared,
                progress=train.progress and not shared,
            )

        def first() -> Pretraining:  # the writer trains the tokenizer and writes the shards
            built = build(shared=False)
            if distributed.active() and not resume:
                save_tokenizer(built.tokenizer, work)
            return built

        run = distributed.writer_first(first) or build(shared=True)
        run.run_config["out"] = str(out)
        log(describe_pretraining(run))
        timed = train.progress and not resume and not distributed.active()
        log(plan_line(train, run) + (estimate(run, train, data) if timed else ""))
        trainer = make_trainer(run, train, out=work, callbacks=callbacks)
        if resume:
            log(f"resumed {out} at step {trainer.resume()}")
        state = trainer.fit()
    return PretrainResult(model=run.model, tokenizer=run.tokenizer, state=state, run=run, out=out)


def estimate(run: Pretraining, train: TrainConfig, data: DataSection) -> str:
    """", about N minutes" from a timing of a few steps on a copy of the model and its own batches."""
    probe, _ = batch_sources(
        run.shards["train"], run.shards["validation"], run.tokenizer, objective=run.objective_name,
        data=data, train=train,
    )  # fmt: skip
    seconds = seconds_per_step(run.model, run.objective, probe, train, steps=3) * train.max_steps
    return f", about {seconds / 60:.1f} minutes of training on this machine (timed on 3 steps)"


def plan_line(train: TrainConfig, run: Pretraining) -> str:
    """What the run is about to do: steps, batch, tokens, evaluations, checkpoints."""
    ranks = world_size()
    tokens = train.max_steps * train.batch_size * train.grad_accum * ranks * int(run.run_config["data"]["seq_len"])
    saves = f"a checkpoint every {train.save_every} steps" if train.save_every else "a checkpoint at the end"
    each = f" on each of {ranks} processes" if ranks > 1 else ""
    return (
        f"{train.max_steps:,} steps of {train.batch_size}×{train.grad_accum} sequences{each} (about {tokens / 1e6:.1f}M "
        f"tokens), lr {train.lr:g} {train.schedule}, {train.precision}, evaluation every "
        f"{train.eval_every or train.max_steps} steps, {saves}"
    )
