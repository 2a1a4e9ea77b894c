"""Thin command functions behind the ``lmforge`` command line (see :mod:`lmforge.cli`).

Each builds the pieces it needs from its typed arguments and calls into the library; none holds
logic of its own. One module per area keeps them short.
"""

from .model_info import attention, presets
from .tokenizer import tokenizer_train

__all__ = ["attention", "presets", "tokenizer_train"]
