"""``lmforge predict``: use a fine-tuned run on new inputs, from the command line or a JSONL file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..files import write_jsonl
from ..pipeline.evaluation import load_task_run
from ..pipeline.evaluation import predict as predict_records
from ..tasks.data import FORMATS, BadRow, read_rows

# The field a bare --text fills, per task (QA's --text is the question; --context the passage).
TEXT_FIELD = {"classification": "text", "tagging": "tokens", "sft": "source", "translation": "source",
              "summarization": "source", "qa": "question"}  # fmt: skip


def predict(
    texts: list[str] | None = None,
    *,
    model: Path,
    text: str | None = None,
    context: str | None = None,
    input: Path | None = None,
    output: Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    overwrite: bool = False,
) -> int:
    """Predict with a fine-tuned run on new text: a label with its probabilities, tags, an answer
    span or generated text, whatever the run's task gives.

    With --text "..." (or several texts as arguments) each prediction is printed, one line per
    text; with --input FILE.jsonl (the
    fields the run was trained on, e.g. {"text": ...}) each input line is written back with its
    prediction to --output (JSONL), or printed.

    Args:
        texts: texts to predict on (as --text, several at once).
        model: the run directory written by lmforge finetune.
        text: a text (classification: the text; tagging: the words; sft and seq2seq: the source;
            qa: the question, with --context).
        context: qa: the passage the answer is in.
        input: a JSONL file of inputs (the run's column names apply).
        output: where to write the inputs with their predictions (JSONL; default: print them).
        batch_size: inputs per forward pass.
        device: cpu, cuda, ...
        overwrite: replace an existing --output file.
    """
    given = ([text] if text is not None else []) + list(texts or [])
    if bool(given) == (input is not None):
        raise LMForgeError("give the inputs either as --text ... (or texts) or as --input FILE.jsonl", key="text")
    if output is not None and output.exists() and not overwrite:
        raise LMForgeError("the output file exists: choose another --output, or add --overwrite", file=output)
    loaded = load_task_run(model, device=device)
    task = loaded.task
    if given:
        field = loaded.task.columns.column(TEXT_FIELD.get(task.name, "text"))
        records = [{field: t, **({"context": context} if context is not None else {})} for t in given]
    else:
        records = read_inputs(input)
    predictions = predict_records(loaded, records, batch_size=batch_size)
    results = [{**record, **prediction} for record, prediction in zip(records, predictions, strict=True)]
    if output is not None:
        write_jsonl(output, results)
        print(f"predict: {len(results):,} predictions written to {output}")
    elif given:
        for record, prediction in zip(records, predictions, strict=True):
            print(f"{shown(record)} → {shown_prediction(prediction)}")
    else:
        for result in results:
            sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    return 0


def read_inputs(path: Path) -> list[dict[str, Any]]:
    """The records of an input file (.jsonl, .csv, .tsv), a bad line named with file:line."""
    if not path.is_file():
        raise LMForgeError("input file not found", file=path)
    if path.suffix.lower() not in FORMATS:
        raise LMForgeError(f"unsupported input file type (use {', '.join(sorted(FORMATS))})", file=path)
    records = []
    for row in read_rows([path]):
        if isinstance(row, BadRow):
            raise LMForgeError(row.reason, file=row.file, line=row.line)
        records.append(row.values)
    return records


def shown(record: dict[str, Any]) -> str:
    return " | ".join(str(v) for v in record.values())


def shown_prediction(prediction: dict[str, Any]) -> str:
    value = prediction["prediction"]
    if "probabilities" in prediction:
        ranked = ", ".join(f"{k} {v:.3f}" for k, v in prediction["probabilities"].items())
        return f"{value}  ({ranked})"
    return " ".join(value) if isinstance(value, list) else str(value)
