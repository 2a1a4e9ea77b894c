"""Pictures of what a model does and how its training went.

- :mod:`~lmforge.viz.attention`: α of every layer and head of a real model on a text;
- :mod:`~lmforge.viz.figures`: heatmaps and charts as PNG files (matplotlib, Agg, no pyplot);
- :mod:`~lmforge.viz.html`: the self-contained interactive attention page, index pages;
- :mod:`~lmforge.viz.walk`: the step-by-step attention walk on one layer of a real model;
- :mod:`~lmforge.viz.curves`: training curves, AdaLoRA ranks and confusion matrices of run folders.
"""

from .attention import AttentionMaps, capture_attention

__all__ = ["AttentionMaps", "capture_attention"]
