"""``lmforge continual``: a sequence of tasks, one or more strategies, forgetting measured."""

from __future__ import annotations

from pathlib import Path

import torch

from ..continual.report import points
from ..continual.sequence import read_sequence
from ..continual.strategies import STRATEGIES
from ..pipeline.continual import run_sequence


def continual(
    sequence: Path,
    *,
    model: Path | None = None,
    out: Path = Path("runs/continual"),
    strategies: list[str] | None = None,
    quick: bool = False,
    resume: bool = False,
    threads: int | None = None,
) -> int:
    """Train a model on a sequence of tasks with continual-learning strategies and measure forgetting.

    The sequence file (YAML) names the base model, the tasks in order (a data folder each, or one
    task per domain of a domains file), the scenario (task, class or domain incremental), the
    fine-tuning method and the strategies to compare. With task: sft the sequence is generative:
    each task is supervised fine-tuning of a decoder answered as text (its own template, exact
    match or chrF), and the perplexity of English text never trained on is watched beside R
    (configs/continual/smollm2-generative.yaml: SmolLM2 on sentiment, intents, translation).
    After every task every task's test split is scored: OUT/results.md, .csv and .json hold each
    strategy's accuracy matrix R, average accuracy, backward transfer (BWT), forward transfer
    (FWT), forgetting, time and peak memory; OUT/R_<strategy>.png the heatmap of R (with
    matplotlib). A killed run continues from the last finished task with --resume. Example:
    configs/continual/clinc150-domains.yaml.

    Args:
        sequence: the sequence file (YAML).
        model: the base model (a run directory, a Hugging Face folder or a GGUF file), instead of the file's model:.
        out: the output folder.
        strategies: run only these strategies of the file, e.g. --strategies naive,replay.
        quick: the smaller version the file's quick: section describes (fewer rows, epochs, tasks).
        resume: continue the run in --out (finished strategies and tasks are kept).
        threads: CPU threads for torch (default: torch's own choice).
    """
    spec = read_sequence(sequence, model=model)
    if quick:
        spec = spec.quick_version()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    result = run_sequence(
        spec, out=out, strategies=strategies, resume=resume, log=lambda line: print(f"continual: {line}")
    )
    measure = "score" if spec.task == "sft" else "accuracy"
    for record in result.results:
        summary = record["summary"]
        print(
            f"continual: {record['strategy']:>9}: average {measure} {points(summary['average_accuracy'])}, "
            f"BWT {points(summary['bwt'])}, forgetting {points(summary['forgetting'])}, {record['wall_time_s']} s"
        )
    if result.interrupted:
        print(f"continual: interrupted; continue with the same command plus --resume (out: {out})")
        return 130
    print(f"continual: tables in {out}/results.md (.csv, .json)")
    return 0


def strategies_help() -> str:
    """The registered strategies, for ``lmforge continual --help``."""
    lines = ["strategies (a strategies: section names them, each with its options):"]
    for name, record in STRATEGIES.items():
        lines.append(f"  {name}: {record.summary}")
    return "\n".join(lines)


continual.cli_epilog = strategies_help  # type: ignore[attr-defined]
