"""Task data: a user's local JSONL / CSV / TSV files → rows with named fields → splits.

A data folder holds one file per split, named by the split — ``train``, ``validation`` (also
``valid``, ``val``, ``dev``), ``test`` — with the extension ``.jsonl``, ``.csv`` or ``.tsv``;
a split too big for one file comes in shards (``train-00000-of-00002.jsonl``) read in index
order. A single file, or a folder of files not named by split, is split by ratio with a seed
(``split_ratio: [0.8, 0.1, 0.1]``); a folder with a train file and no validation file gets its
validation rows carved from train the same way. ``labels.txt`` beside the data names the labels
of a classification task, one per line (line 1 is label 0).

Columns are mapped to the fields a task reads (``text``, ``text_pair``, ``label``, ``source``,
``target``, ``context``, ``question``, ``answers``, ``tokens``, ``tags``, ``id``) with
``columns: {text: sentence, label: polarity}`` (or ``--columns.text sentence``). A row that
cannot be used — bad JSON, a missing field, an empty text, a label outside the label set — is a
:class:`BadRow` with its file and line; :func:`check_bad_rows` stops with the first one (and the
count) unless bad rows are to be skipped. The file conventions follow Hugging Face ``datasets``'
local loading (split names, shard names) and ../shared/data/README.md.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LMForgeError, did_you_mean

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
FIELDS = (
    "text",
    "text_pair",
    "label",
    "source",
    "target",
    "context",
    "question",
    "answers",
    "tokens",
    "tags",
    "id",
)
LABELS_FILE = "labels.txt"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)$")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long contexts (QA) in one CSV cell


@dataclass(frozen=True)
class Row:
    """One record of a data file, with where it came from (``file``:``line``, 1-based)."""

    values: dict[str, Any]
    file: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, and why."""

    file: Path
    line: int
    reason: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class RowError(Exception):
    """Raised by a task while reading a row it cannot use (becomes a :class:`BadRow`)."""


class PartialRowError(RowError):
    """A row holding several examples (a QA paragraph) of which some cannot be used: the good
    ones are kept, each bad one becomes a :class:`BadRow` of the same line."""

    def __init__(self, examples: list[Any], errors: list[str]) -> None:
        super().__init__(errors[0])
        self.examples = examples
        self.errors = errors


# ---- column mapping ----------------------------------------------------------------------------


@dataclass
class Columns:
    """Field → column name in the files; a field not mapped is read from the column of its own name."""

    mapping: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, column in self.mapping.items():
            if name not in FIELDS:
                raise LMForgeError(
                    f"unknown field '{name}'"
                    + did_you_mean(name, FIELDS)
                    + f" (fields: {', '.join(FIELDS)})",
                    key=f"columns.{name}",
                )
            if not isinstance(column, str | int) or isinstance(column, bool) or str(column) == "":
                raise LMForgeError(f"expected a column name, got {column!r}", key=f"columns.{name}")
        self.mapping = {k: str(v) for k, v in self.mapping.items()}

    def column(self, name: str) -> str:
        return self.mapping.get(name, name)

    def has(self, row: Row, name: str) -> bool:
        value = row.values.get(self.column(name))
        return value is not None and value != ""

    def get(self, row: Row, name: str, *, required: bool = True, default: Any = None) -> Any:
        """The value of field ``name`` in ``row``; a missing one raises :class:`RowError` when required."""
        column = self.column(name)
        if column not in row.values or row.values[column] is None:
            if not required:
                return default
            mapped = f" (the {name} field)" if column != name else ""
            present = ", ".join(map(str, row.values)) or "nothing"
            raise RowError(f"missing field '{column}'{mapped}; the row has: {present}")
        return row.values[column]

    def text(self, row: Row, name: str, *, required: bool = True) -> str | None:
        """A non-empty text field (numbers are read as their text)."""
        value = self.get(row, name, required=required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise RowError(f"field '{self.column(name)}' must be text, got {type(value).__name__}")
        text = str(value)
        if not text.strip():
            raise RowError(f"empty text in field '{self.column(name)}'")
        return text


# ---- files -------------------------------------------------------------------------------------


def data_files(path: str | Path) -> dict[str, list[Path]]:
    """The data files of ``path`` grouped by split (``"all"`` for files not named by a split).

    Shards of one split are returned in index order; a missing shard is an error.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise LMForgeError(
                f"unsupported data file type '{path.suffix}' (use .jsonl, .csv or .tsv)", file=path
            )
        return {"all": [path]}
    if not path.is_dir():
        raise LMForgeError("data folder or file not found", file=path)
    groups: dict[str, list[tuple[int, int, Path]]] = {}
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.suffix.lower() not in FORMATS or file.name.startswith("."):
            continue
        stem, index, count = file.stem, 0, 1
        shard = _SHARD.match(stem)
        if shard:
            stem, index, count = shard["stem"], int(shard["index"]), int(shard["count"])
        split = SPLIT_NAMES.get(stem.lower(), "all")
        groups.setdefault(split, []).append((index, count, file))
    if not groups:
        raise LMForgeError("no data files here (.jsonl, .csv or .tsv)", file=path)
    files: dict[str, list[Path]] = {}
    for split, found in groups.items():
        found.sort(key=lambda item: (item[0], item[2].name))
        if split != "all" and found and _SHARD.match(found[0][2].stem):
            count = found[0][1]
            indices = [i for i, _, _ in found]
            if indices != list(range(count)):
                missing = sorted(set(range(count)) - set(indices))
                raise LMForgeError(
                    f"split '{split}' has {len(found)} of {count} shards"
                    + (f" (shard {missing[0]:05d} is missing)" if missing else ""),
                    file=path,
                )
        files[split] = [f for _, _, f in found]
    return files


def read_rows(files: Sequence[Path]) -> Iterator[Row | BadRow]:
    """The rows of ``files`` in order: JSONL objects, CSV/TSV records (first line = header)."""
    for file in files:
        kind = FORMATS[file.suffix.lower()]
        try:
            if kind == "jsonl":
                yield from _read_jsonl(file)
            else:
                yield from _read_table(file, delimiter="," if kind == "csv" else "\t")
        except UnicodeDecodeError as err:
            raise LMForgeError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=file) from None
        except OSError as err:
            raise LMForgeError(f"cannot read the file ({err.strerror})", file=file) from None


def _read_jsonl(file: Path) -> Iterator[Row | BadRow]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield BadRow(file, number, f"bad JSON: {err.msg} (column {err.colno})")
                continue
            if not isinstance(value, dict):
                yield BadRow(file, number, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield Row(value, file, number)


def _read_table(file: Path, *, delimiter: str) -> Iterator[Row | BadRow]:
    with file.open(encoding="utf-8", newline="") as f:
        # TSV files (GLUE) are not quoted: a quote character is text.
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        start = reader.line_num
        for record in reader:
            number, start = start + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                yield BadRow(file, number, f"{len(record)} cells, the header has {len(header)}")
                continue
            yield Row(dict(zip(header, record, strict=True)), file, number)


def read_label_file(path: str | Path) -> list[str]:
    """Label names from a file, one per line (line 1 is label 0); blank lines are an error."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError("labels file not found", file=path)
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = line.strip()
        if not name:
            if any(rest.strip() for rest in path.read_text(encoding="utf-8").splitlines()[number:]):
                raise LMForgeError("empty label name", file=path, line=number)
            break
        if name in seen:
            raise LMForgeError(
                f"label '{name}' is listed twice (first on line {seen[name]})", file=path, line=number
            )
        seen[name] = number
        names.append(name)
    if not names:
        raise LMForgeError("the labels file lists no labels", file=path)
    return names


# ---- splits ------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """How rows become splits: by file name, or by ratio with a seed.

    Args:
        split_ratio: fractions for train, validation (and test) of the rows of a single file or
            of files not named by split; with a train file and no validation file, the second
            number carves validation out of train. Default (0.8, 0.1, 0.1) / 0.1.
        seed: seeds the shuffle before a ratio split.
    """

    split_ratio: Sequence[float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        ratio = self.split_ratio
        if ratio is None:
            return
        if not 2 <= len(ratio) <= 3 or any(r < 0 for r in ratio) or ratio[0] <= 0:
            raise LMForgeError(
                f"split_ratio {list(ratio)}: give 2 or 3 non-negative fractions (train, validation[, test])",
                key="split_ratio",
            )
        if abs(sum(ratio) - 1.0) > 1e-6:
            raise LMForgeError(
                f"split_ratio {list(ratio)} must add up to 1 (it adds up to {sum(ratio):g})",
                key="split_ratio",
            )

    def describe(self, files: dict[str, list[Path]]) -> dict[str, str]:
        """Where each split comes from, in words (for the run summary)."""
        out = {}
        for split in SPLITS:
            if split in files:
                out[split] = ", ".join(f.name for f in files[split])
            elif "all" in files and not any(s in files for s in SPLITS):
                out[split] = f"{self._ratio()[SPLITS.index(split)]:g} of the rows (seed {self.seed})"
            elif split == "validation" and "train" in files:
                out[split] = f"{self.carved_fraction:g} of the train rows (seed {self.seed})"
        return out

    @property
    def carved_fraction(self) -> float:
        """The share of a train file that becomes validation when there is no validation file."""
        return 0.1 if self.split_ratio is None else float(self.split_ratio[1])

    def _ratio(self) -> tuple[float, float, float]:
        ratio = list(self.split_ratio) if self.split_ratio is not None else [0.8, 0.1, 0.1]
        return (ratio + [0.0])[:3] if len(ratio) == 2 else tuple(ratio)  # type: ignore[return-value]

    def rows(self, path: str | Path, split: str) -> list[Row | BadRow]:
        """The rows of one split (train, validation or test)."""
        if split not in SPLITS:
            raise LMForgeError(f"unknown split '{split}'" + did_you_mean(split, SPLITS), key="split")
        files = data_files(path)
        if split in files:
            return list(read_rows(files[split]))
        if "all" in files and not any(s in files for s in SPLITS):
            parts = _ratio_split(list(read_rows(files["all"])), self._ratio(), self.seed)
            return parts[SPLITS.index(split)]
        if split == "validation" and "train" in files:
            fraction = self.carved_fraction
            return _ratio_split(list(read_rows(files["train"])), (1 - fraction, fraction, 0.0), self.seed)[1]
        present = ", ".join(sorted(s for s in files if s != "all")) or "none"
        raise LMForgeError(f"no {split} split in this data (splits found: {present})", file=Path(path))

    def train_rows(self, path: str | Path) -> list[Row | BadRow]:
        """Training rows: the train file minus carved validation rows, or the ratio's share."""
        files = data_files(path)
        if "train" in files:
            rows = list(read_rows(files["train"]))
            if "validation" in files:
                return rows
            fraction = self.carved_fraction
            return _ratio_split(rows, (1 - fraction, fraction, 0.0), self.seed)[0]
        if "all" in files and not any(s in files for s in SPLITS):
            return _ratio_split(list(read_rows(files["all"])), self._ratio(), self.seed)[0]
        raise LMForgeError("no train split in this data (a train.jsonl / .csv / .tsv file)", file=Path(path))


def _ratio_split(
    rows: list[Row | BadRow], ratio: Sequence[float], seed: int
) -> tuple[list[Row | BadRow], list[Row | BadRow], list[Row | BadRow]]:
    """Shuffle with ``seed`` and cut into train/validation/test by ``ratio`` (file order kept inside each)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = int(round(ratio[1] * len(rows)))
    n_test = int(round(ratio[2] * len(rows))) if len(ratio) > 2 else 0
    n_train = len(rows) - n_val - n_test
    cuts = (
        sorted(order[:n_train]),
        sorted(order[n_train : n_train + n_val]),
        sorted(order[n_train + n_val :]),
    )
    return tuple([rows[i] for i in part] for part in cuts)  # type: ignore[return-value]


# ---- bad rows ----------------------------------------------------------------------------------


def check_bad_rows(bad: Sequence[BadRow], *, skip: bool, split: str, used: int) -> None:
    """Stop at the first bad row (with the count) unless ``skip``; then say how many were skipped."""
    if not bad:
        return
    first = bad[0]
    more = (
        f" ({len(bad)} bad rows in the {split} split" + ("" if skip else "; --skip_bad_rows skips them") + ")"
    )
    if not skip:
        raise LMForgeError(first.reason + more, file=first.file, line=first.line)
    print(
        f"data: skipped {len(bad):,} bad row(s) of the {split} split, kept {used:,} "
        f"(first: {first.where}: {first.reason})"
    )


__all__ = [
    "FIELDS",
    "LABELS_FILE",
    "SPLITS",
    "BadRow",
    "Columns",
    "PartialRowError",
    "Row",
    "RowError",
    "SplitPlan",
    "check_bad_rows",
    "data_files",
    "read_label_file",
    "read_rows",
]
