"""Pictures of models and runs: ``lmforge viz attention``, ``lmforge viz run`` and the real-model
walk of ``lmforge attention --model``.

    MODEL (run folder, Hugging Face folder, GGUF) ──lmforge.load──► model + tokenizer
        ──capture_attention(text)──► α (L, H, T, S) ──► attention.png + attention.html
    RUN [RUN …] ──metrics.jsonl, adalora_ranks.json, eval-*.json──► PNG files + index.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LMForgeError
from ..files import atomic_write_text, check_own_folder
from ..runs import load
from ..viz.attention import AttentionMaps, capture_attention
from ..viz.curves import read_run, write_run_figures
from ..viz.figures import write_attention_png
from ..viz.html import index_page, write_attention_html
from ..viz.walk import Walk, walk_attention
from .common import Log, silent


@dataclass
class AttentionFigures:
    """What :func:`attention_figures` wrote, and the weights it drew."""

    maps: AttentionMaps
    png: Path
    html: Path


def _loaded(model: str | Path):  # noqa: ANN202
    run = load(model)
    if run.tokenizer is None:
        raise LMForgeError("the model has no tokenizer (tokenizer.json): its tokens cannot be shown", file=model)
    return run


def attention_figures(
    model: str | Path,
    text: str,
    *,
    out: str | Path,
    layer: int | None = None,
    head: int | None = None,
    log: Log = silent,
) -> AttentionFigures:
    """Draw the attention of ``model`` on ``text``: ``out``/attention.png (layers × heads, or the
    layer / head asked) and ``out``/attention.html (every layer and head, interactive).

    Raises:
        LMForgeError: no such model, no tokenizer, an empty or too long text, a layer or head
            outside the model.
    """
    run = _loaded(model)
    maps = capture_attention(run.model, run.tokenizer, text)
    maps.select(layer, head)  # a bad --layer / --head is reported before anything is written
    log(
        f"{run.model.config.arch} from {model}: {maps.num_layers} layers × {maps.num_heads} heads, "
        f"{len(maps.tokens)} tokens: {' '.join(maps.tokens)}"
    )
    folder = Path(out)
    check_own_folder(folder, marker="attention.html", what="an earlier lmforge viz attention")
    png = write_attention_png(maps, folder / "attention.png", layer=layer, head=head)
    title = f"Attention of {Path(model).name} ({maps.stack})"
    page = write_attention_html(maps, folder / "attention.html", title=title, text=text)
    return AttentionFigures(maps, png, page)


def attention_walk(
    model: str | Path, text: str, *, layer: int = 0, head: int = 0, explain: bool = False
) -> Walk:
    """The step-by-step walk through head ``head`` of layer ``layer`` of a real model on ``text``.

    Raises:
        LMForgeError: as :func:`attention_figures`.
    """
    run = _loaded(model)
    try:
        return walk_attention(run.model, run.tokenizer, text, layer=layer, head=head, explain=explain)
    except ValueError as err:
        raise LMForgeError(str(err)) from None


@dataclass
class RunFigures:
    """What :func:`run_figures` wrote: the PNG files and the index page showing them."""

    figures: list[Path]
    index: Path


def run_figures(runs: list[str | Path], *, out: str | Path | None = None, log: Log = silent) -> RunFigures:
    """Draw what run folders recorded: training curves of every run overlaid, AdaLoRA's rank
    allocation and the confusion matrices of their evaluations, with an index.html.

    Args:
        runs: run folders (``lmforge pretrain`` / ``finetune`` output).
        out: where the PNG files and index.html go (default: RUN/viz of the first run).

    Raises:
        LMForgeError: no runs, a folder that is not there or holds nothing to draw.
    """
    if not runs:
        raise LMForgeError("give at least one run directory")
    records = [read_run(run) for run in runs]
    folder = Path(out) if out is not None else Path(runs[0]) / "viz"
    check_own_folder(folder, marker="index.html", what="an earlier lmforge viz run")
    for record in records:
        log(
            f"{record.path}: {len(record.steps)} training lines, {len(record.evals)} evaluations"
            + (", AdaLoRA ranks" if record.adalora else "")
            + (f", eval of {', '.join(record.evaluations)}" if record.evaluations else "")
        )
    written = write_run_figures(records, folder)
    sections: dict[str, list[tuple[str, str]]] = {}
    for section, path, caption in written:
        sections.setdefault(section, []).append((path.name, caption))
    notes = [f"runs: {', '.join(str(r.path) for r in records)}"]
    page = index_page("lmforge runs", list(sections.items()), notes=notes)
    index = atomic_write_text(folder / "index.html", page)
    return RunFigures([path for _, path, _ in written], index)
