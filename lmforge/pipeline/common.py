"""What the pipeline functions share: how they report progress without printing.

Pipeline functions return results and print nothing: a caller that wants the plan and the
milestones as lines passes ``log`` (``print`` for a command, a list's ``append`` in a test, a
logger in a server). Progress bars are the loop's own (on the writer process only).
"""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]


def silent(line: str) -> None:
    """The default ``log``: says nothing."""

