"""``lmforge viz attention`` and ``lmforge viz run``: pictures of a model's attention and of runs."""

from __future__ import annotations

from pathlib import Path

from ..pipeline.viz import attention_figures, run_figures


def viz_attention(
    *,
    model: str,
    text: str,
    layer: int | None = None,
    head: int | None = None,
    out: Path = Path("viz/attention"),
) -> int:
    """Draw a real model's attention on a text: a PNG grid and an interactive HTML page.

    attention.png holds one heatmap per layer (rows) and head (columns), queries down, keys
    across, labelled with the tokens as the tokenizer splits the text (--layer / --head narrow it
    to one row, one column or one map). attention.html holds every layer and head: pick them,
    hover a token to see where it attends. The page is self-contained (works offline).

    Args:
        model: a run directory, a Hugging Face model folder or a GGUF file.
        text: the text to read.
        layer: draw only this layer (from 0).
        head: draw only this head (from 0).
        out: the folder for attention.png and attention.html.
    """
    figures = attention_figures(model, text, out=out, layer=layer, head=head, log=lambda line: print(f"viz: {line}"))
    print(f"viz: wrote {figures.png} and {figures.html}")
    return 0


def viz_run(runs: list[Path], *, out: Path | None = None) -> int:
    """Draw what run folders recorded: training curves (several runs overlaid), AdaLoRA ranks,
    confusion matrices, continual-learning accuracy matrices, and an index.html showing them.

    curves.png: training and validation loss, the other validation metrics, the learning rate
    and tokens/s from each run's metrics.jsonl. adalora-ranks.png: the rank of every adapted
    matrix over the steps (adalora_ranks.json of an AdaLoRA run). confusion-SPLIT.png: from
    eval-SPLIT.json written by lmforge eval. R-STRATEGY.png: each strategy's accuracy matrix
    from the results.json of an lmforge continual output folder.

    Args:
        runs: one or more run directories.
        out: the folder for the PNG files and index.html (default: RUN/viz of the first run).
    """
    result = run_figures(list(runs or []), out=out, log=lambda line: print(f"viz: {line}"))
    for path in result.figures:
        print(f"viz: wrote {path}")
    print(f"viz: open {result.index}")
    return 0
