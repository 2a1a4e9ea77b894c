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


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix with the nearest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
