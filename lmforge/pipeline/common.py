"""What the pipeline functions share: how they report progress without printing, and the run
folder of a job of several processes.

Pipeline functions return results and print nothing: a caller that wants the plan and the
milestones as lines passes ``log`` (``print`` for a command, a list's ``append`` in a test, a
logger in a server). Progress bars are the loop's own (on the writer process only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import LMForgeError
from ..files import output_folder
from ..runtime import is_writer
from ..training import distributed

Log = Callable[[str], None]


def silent(line: str) -> None:
    """The default ``log``: says nothing."""


@contextlib.contextmanager
def job_output_folder(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """:func:`lmforge.files.output_folder` for every process of a job: the writer (rank 0)
    checks and opens the folder and tells the others where it is, or the one-line reason it
    refused, which every rank then raises. Alone, it is ``output_folder`` itself."""
    if not distributed.active():
        with output_folder(path, overwrite=overwrite, resume=resume) as work:
            yield work
        return
    if not is_writer():
        where, why = distributed.broadcast(None)
        if why is not None:
            raise LMForgeError(why)
        yield Path(where)
        return
    with contextlib.ExitStack() as stack:
        try:
            work = stack.enter_context(output_folder(path, overwrite=overwrite, resume=resume))
        except LMForgeError as err:
            distributed.broadcast((None, err.one_line()))
            raise
        distributed.broadcast((str(work), None))
        yield work
