"""The embedded corpus: English documentation that ships inside the Python interpreter.

``lmforge demo`` must pretrain with no download and no data folder, so it reads text every
Python installation carries:

- ``pydoc_data.topics`` — the language reference topics that ``help("if")`` prints (the
  statements, operators, data model, ...);
- the docstrings of the standard-library modules — module, class and function docstrings,
  read from the ``.py`` sources with :mod:`ast` (nothing is imported, so no module runs).

Order is deterministic (topics by name, then modules by path); test suites, private modules
(``_name``), ``idlelib``, ``lib2to3``, ``tkinter``, ``turtledemo`` and the site-packages of
installed libraries are left out. About 1–3 MB of text, depending on the Python version.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import sysconfig
import warnings
from pathlib import Path

from ..corpus import Corpus
from ..errors import LMForgeError

_SKIPPED_PARTS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "site-packages",
    "ensurepip",
}
_SKIPPED_MODULES = {"this", "antigravity"}  # a rot13 poem and a joke
_MIN_DOCSTRING_CHARS = 40  # shorter ones ("Return self.") teach little


def python_docs_corpus(*, max_bytes: int | None = None) -> Corpus:
    """The embedded corpus as in-memory documents: one per reference topic and one per module.

    Args:
        max_bytes: stop adding documents after about this many UTF-8 bytes (None: all).

    Raises:
        LMForgeError: this Python installation has neither the topics nor standard-library sources.
    """
    documents = list(_documents())
    if not documents:
        raise LMForgeError(
            "this Python installation ships neither pydoc_data nor standard-library sources: "
            "nothing to build the embedded corpus from"
        )
    if max_bytes is not None:
        kept, size = [], 0
        for doc in documents:
            if size >= max_bytes:
                break
            kept.append(doc)
            size += len(doc.encode("utf-8"))
        documents = kept
    return Corpus.from_texts(documents, name="the Python documentation (pydoc topics + stdlib docstrings)")


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    """All documents, gathered once per process (parsing the standard library takes seconds)."""
    return tuple(_topic_documents() + _docstring_documents())


def _topic_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split it out
        return []
    return [topics[name].strip() + "\n" for name in sorted(topics) if topics[name].strip()]


def _docstring_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = set(getattr(sys, "stdlib_module_names", ())) or None
    documents = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        module = parts[0].removesuffix(".py")
        if module.startswith("_") or module in _SKIPPED_MODULES or _SKIPPED_PARTS & set(parts):
            continue
        if names is not None and module not in names:
            continue
        if any(p.startswith("_") and p != "__init__.py" for p in parts[1:]):
            continue
        text = _module_docstrings(path)
        if text:
            documents.append(text)
    return documents


def _module_docstrings(path: Path) -> str:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escape sequences in a few sources
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    nodes: list[ast.AST] = [tree, *sorted(defs, key=lambda n: (n.lineno, n.col_offset))]
    for node in nodes:
        if not isinstance(node, ast.Module) and node.name.startswith("_") and node.name != "__init__":
            continue
        doc = ast.get_docstring(node, clean=False)
        if doc and len(doc.strip()) >= _MIN_DOCSTRING_CHARS:
            parts.append(inspect.cleandoc(doc))
    return "\n\n".join(parts) + "\n" if parts else ""
