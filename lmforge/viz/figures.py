"""Matplotlib figures without pyplot: each picture is a :class:`matplotlib.figure.Figure` drawn by
the Agg renderer straight to a PNG file, so nothing here touches the caller's global backend or
opens a window (it works the same on a headless server and inside a notebook).
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from ..files import atomic_write
from .attention import AttentionMaps

DPI = 100
MAX_LABELED_TOKENS = 40  # beyond this many tokens a heatmap's axes carry no token labels


def new_figure(width: float, height: float, *, constrained: bool = False) -> Figure:
    """A figure (size in inches) with its own Agg canvas (``constrained``: matplotlib's
    constrained layout places titles, labels and colour bars)."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG, atomically (temp + rename)."""
    canvas = figure.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def _label_axes(axes, rows: Sequence[str], cols: Sequence[str], *, left: bool, bottom: bool, fontsize: float) -> None:  # noqa: ANN001
    if left and len(rows) <= MAX_LABELED_TOKENS:
        axes.set_yticks(range(len(rows)), rows, fontsize=fontsize)
    else:
        axes.set_yticks([])
    if bottom and len(cols) <= MAX_LABELED_TOKENS:
        axes.set_xticks(range(len(cols)), cols, fontsize=fontsize, rotation=90)
    else:
        axes.set_xticks([])


def attention_figure(maps: AttentionMaps, *, layer: int | None = None, head: int | None = None) -> Figure:
    """Heatmaps of α: a grid of layers (rows) × heads (columns), or one layer, one head, or one cell.

    Rows of each heatmap are the queries, columns the keys; the colour is the weight (0 white, 1
    dark). Token labels sit on the left column and the bottom row of the grid.
    """
    layers, heads = maps.select(layer, head)
    T, S = maps.weights.shape[-2:]
    single = len(layers) == 1 and len(heads) == 1
    cell = max(2.2, 0.28 * max(T, S)) if single else max(1.1, 0.11 * max(T, S))
    margin = 0.09 * max(len(t) for t in maps.key_tokens + maps.tokens) + 0.6
    figure = new_figure(cell * len(heads) + margin + 1.0, cell * len(layers) + margin + 0.9, constrained=True)
    grid = figure.subplots(len(layers), len(heads), squeeze=False)
    fontsize = 9 if single else 6
    image = None
    for r, l in enumerate(layers):
        for c, h in enumerate(heads):
            axes = grid[r][c]
            image = axes.imshow(maps.weights[l, h], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            _label_axes(axes, maps.tokens, maps.key_tokens, left=c == 0, bottom=r == len(layers) - 1, fontsize=fontsize)
            if r == 0:
                axes.set_title(f"layer {l}, head {h}" if single else f"head {h}", fontsize=fontsize + 1)
            if c == 0 and not single:
                axes.set_ylabel(f"layer {l}", fontsize=fontsize + 1)
    figure.suptitle(f"attention α of the {maps.stack}\nrows: queries, columns: keys", fontsize=9 if single else 10)
    if image is not None:
        figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8 if single else 0.3)
    return figure


def write_attention_png(
    maps: AttentionMaps, path: Path, *, layer: int | None = None, head: int | None = None
) -> Path:
    """:func:`attention_figure` written to ``path``."""
    return save_png(attention_figure(maps, layer=layer, head=head), path)


def png_pixels(path: Path) -> np.ndarray:
    """The RGBA pixels of a PNG written here (for tests and checks): (height, width, 4) uint8."""
    pixels = imread(str(path))
    return (pixels * 255).round().astype(np.uint8) if pixels.dtype != np.uint8 else pixels
