"""Does a translation model read its source? Train a few hundred steps, then compare the loss on
validation pairs with their own sources against the same pairs with the sources shuffled.

    python benchmarks/source_probe.py --model runs/acceptance/multi30k-base --model runs/acceptance/multi30k-t5

A model that learned a language model of the target and ignores the encoder gives the same loss
both ways; one that translates gives a clearly lower loss with the real sources. Each base is
trained with the recipe of ``--config`` (the learning rate, steps and warmup overridden here), from
the same batches; ``--table-std`` re-draws the token table of the base first (N(0, std)), to show
what the initialization does. Figures go to benchmarks/RESULTS.md unless ``--no-append``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def probe(args: argparse.Namespace, model_dir: Path, workdir: Path) -> dict[str, float]:
    """Train ``model_dir`` for ``args.steps`` steps, then score real vs shuffled sources."""
    import lmforge
    from lmforge.pipeline.finetuning import DataSpec, finetune_run
    from lmforge.tasks.data import Row
    from lmforge.tasks.sft import teacher_forced_loss
    from lmforge.training import TrainConfig

    recipe = yaml.safe_load((REPO / args.config).read_text(encoding="utf-8"))
    base = model_dir
    if args.table_std is not None:
        run = lmforge.load(model_dir)
        torch.nn.init.normal_(run.model.tok_embed.weight, 0.0, args.table_std)
        base = lmforge.save_run(workdir / f"{model_dir.name}-table", model=run.model, tokenizer=run.tokenizer)
    options = {**recipe.get("options", {}), "eval_examples": args.examples}
    train = TrainConfig(
        **{
            **recipe["train"],
            "lr": args.lr,
            "max_steps": args.steps,
            "warmup_steps": min(recipe["train"].get("warmup_steps", 0), args.steps // 6),
            "eval_every": 0,
        }
    )
    start = time.perf_counter()
    result = finetune_run(
        model=base, data=DataSpec(args.data), task_name="translation", method="full", peft=None,
        options=options, train=train, epochs=None, out=workdir / f"{model_dir.name}-probe",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    task, model = result.task, result.model.eval()
    path = args.data / "validation.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[: args.examples]]
    examples = task.examples([Row(row, path, i + 1) for i, row in enumerate(rows)])[0]
    features = task.encode(examples)
    sources = [f["input_ids"] for f in features]
    random.Random(0).shuffle(sources)
    shuffled = [{**f, "input_ids": s} for f, s in zip(features, sources, strict=True)]
    return {
        "real": teacher_forced_loss(task, model, features, batch_size=32)["loss"],
        "shuffled": teacher_forced_loss(task, model, shuffled, batch_size=32)["loss"],
        "bleu": float(result.summary["validation"].get("bleu", float("nan"))),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True, help="a base run directory (repeatable)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "multi30k_en_de")
    parser.add_argument("--config", default="configs/finetune/multi30k-t5.yaml", help="the fine-tuning recipe")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--examples", type=int, default=128, help="validation pairs scored (and BLEU sentences)")
    parser.add_argument("--table-std", type=float, default=None, help="re-draw each base's token table at this std")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if not (args.data / "validation.jsonl").exists():
        parser.error(f"no validation.jsonl in {args.data} (the Multi30k folder of ../shared/data)")
    for model_dir in args.model:
        if not ((model_dir / "config.yaml").exists() or (model_dir / "config.json").exists()):
            parser.error(f"--model {model_dir}: neither an lmforge run nor a Hugging Face folder (no config.yaml / config.json)")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_dir in args.model:
            figures = probe(args, model_dir, Path(tmp))
            line = (
                f"| {model_dir.name} | {figures['real']:.3f} | {figures['shuffled']:.3f} | "
                f"{figures['shuffled'] - figures['real']:+.3f} | {figures['bleu']:.2f} | {figures['seconds']:.0f} |"
            )
            print(line, flush=True)
            rows.append(line)
    body = (
        f"{args.steps} steps of the {args.config} recipe at lr {args.lr:g}"
        + (f", token table re-drawn at N(0, {args.table_std:g})" if args.table_std is not None else "")
        + f"; loss on {args.examples} validation pairs with their own vs shuffled sources, greedy validation BLEU.\n\n"
        "| base | loss, real sources | loss, shuffled | gap | BLEU | train s |\n|---|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n"
    )
    if args.no_append:
        print(body)
    else:
        append_results("Does the translation model read its source? (benchmarks/source_probe.py)", body)


if __name__ == "__main__":
    main()
