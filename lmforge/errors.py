"""The one error type for user mistakes.

Anything a user can get wrong (a bad path, an unknown config key, a value of the wrong type, a JSONL
line that is not JSON, a label out of range) raises :class:`LMForgeError`. The command line prints it
as a single line naming what is wrong and where (file, line, key) and exits with status 2; Python
callers can catch it like any exception. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class LMForgeError(Exception):
    """A mistake in what the user handed us, explained in one line.

    Args:
        message: what is wrong, in words a user understands.
        file: the file it came from, if any.
        line: the 1-based line in that file, if known.
        key: the config key, tensor name or field involved, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message prefixed with its location, e.g. ``cfg.yaml:3: key 'lr': ...``."""
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        key = f"key '{self.key}': " if self.key is not None and f"'{self.key}'" not in self.message else ""
        return (where + key + self.message).replace("\n", " ")


class ConfigError(LMForgeError, ValueError):
    """An invalid configuration value: names the field and says why."""


# How other toolkits spell an option (Hugging Face Trainer / PEFT, nanoGPT, LitGPT) -> lmforge's name.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "max_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_accumulation_iters": "grad_accum",
    "max_iters": "max_steps",
    "warmup_iters": "warmup_steps",
    "max_grad_norm": "grad_clip",
    "gradient_clipping": "grad_clip",
    "lr_scheduler_type": "schedule",
    "max_seq_length": "max_length",
    "block_size": "seq_len",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "embed_dim",
    "hidden_size": "embed_dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "output_dir": "out",
    "bf16": "precision",
}


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix: the name other toolkits give the option (``rank`` → ``r``,
    ``learning_rate`` → ``lr``), else the nearest choice; an empty string when none is near."""
    choices = list(choices)
    prefix, bare = _split_flag(name)
    alias = ALIASES.get(bare)
    if alias is not None and prefix + alias in choices:
        return f" (did you mean '{prefix + alias}'?)"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _split_flag(name: str) -> tuple[str, str]:
    """``--train.learning_rate`` -> (``--train.``, ``learning_rate``); ``rank`` -> ("", ``rank``)."""
    head, dot, tail = name.rpartition(".")
    if dot:
        return head + dot, tail
    stripped = name.lstrip("-")
    return name[: len(name) - len(stripped)], stripped
