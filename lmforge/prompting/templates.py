"""Prompt templates and verbalizers: how an example becomes text a language model continues,
and which words stand for each label.

A template is text with ``{column}`` slots and one ``{label}`` slot::

    Review: {text}
    Sentiment: {label}

For a decoder the prompt is the text before ``{label}``; each label is scored by the
log-probability of its word(s) written there. For an encoder with a masked-LM head the slot
becomes ``[MASK]`` tokens (a cloze, as in PET, Schick & Schütze 2021). A demonstration (an
in-context example) is the whole template with its label's first word filled in. ``{labels}``
anywhere (usually in the instruction) lists the label words, for a model that does better when it
sees the options.

Raw templates join an optional instruction, the demonstrations and the query with a separator
(a blank line by default). Chat templates (``chat: true``) go through the model's own chat
template: the instruction is the system message, each demonstration a user turn (the template
text before ``{label}``) answered by an assistant turn (the label word), and the query a last
user turn; the label word is then what the assistant says first.

Whitespace: the spaces between the text and ``{label}`` belong to the label word, not to the
prompt (``"Sentiment:"`` + ``" positive"``), as a byte-level BPE tokenizer writes them: the
word's own token (``Ġpositive``) is scored, never a dangling space token.

A verbalizer maps each label name to one or more words (``negative: [terrible, bad]``); without
one the label names are the words (``pin_change`` → ``pin change``), which is how a task with
many labels (CLINC150's 151 intents) is verbalized.

Template files (YAML) hold one template or several (for ensembling)::

    templates:
      - name: review
        template: "Review: {text}\\nSentiment: {label}"
        verbalizer: {negative: terrible, positive: great}
      - name: chat
        chat: true
        template: "{text}\\nIs this review positive or negative? {label}"

Reference for the vocabulary (template, verbalizer, label words): OpenPrompt (Ding et al. 2022),
whose code is not used here.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..chat_template import render_chat
from ..errors import LMForgeError, did_you_mean
from ..settings import load_yaml

LABEL = "label"  # the slot the label word fills
LABELS = "labels"  # the list of label words, for instructions
SPACES = " \t"  # whitespace that moves from the prompt onto the label word
TEMPLATE_KEYS = ("name", "template", "verbalizer", "instruction", "chat", "separator")


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the text a decoder continues, and the whitespace its label word
    starts with (``" "`` when the template had a space before ``{label}``)."""

    text: str
    lead: str = ""


@dataclass(frozen=True)
class Verbalizer:
    """Label names and the words that stand for each (the first one fills demonstrations)."""

    labels: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]

    @classmethod
    def build(cls, labels: Sequence[str], mapping: Mapping[str, Any] | None = None, *, where: str = "") -> Verbalizer:
        """The verbalizer of ``labels``: ``mapping`` gives a word or a list of words for some or all
        labels; any other label is its own word (its name, underscores as spaces).

        Raises:
            LMForgeError: a key that is no label, an empty word.
        """
        at = f"{where}: " if where else ""
        mapping = dict(mapping or {})
        unknown = [key for key in mapping if str(key) not in labels]
        if unknown:
            raise LMForgeError(
                f"{at}verbalizer label '{unknown[0]}' is not a label of the data" + did_you_mean(str(unknown[0]), labels)
                + f" (labels: {', '.join(labels[:8])}{', …' if len(labels) > 8 else ''})",
                key="verbalizer",
            )
        words = []
        for name in labels:
            value = mapping.get(name, name.replace("_", " "))
            found = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list | tuple) else None
            if not found or not all(isinstance(w, str) and w.strip() for w in found):
                raise LMForgeError(
                    f"{at}label '{name}': give a word or a list of non-empty words, got {value!r}", key="verbalizer"
                )
            words.append(tuple(found))
        return cls(tuple(labels), tuple(words))

    def token_ids(self, tokenizer: Any, lead: str = "") -> list[list[list[int]]]:
        """Each label's words as token ids, each word encoded as it follows the prompt: after
        ``lead`` (the prompt's trailing spaces) when there is one.

        Raises:
            LMForgeError: a word the tokenizer turns into no token.
        """
        out = []
        for name, words in zip(self.labels, self.words, strict=True):
            label_ids = []
            for word in words:
                ids = tokenizer.encode(join_word(lead, word))
                if not ids:
                    raise LMForgeError(f"label '{name}': the word {word!r} has no tokens", key="verbalizer")
                label_ids.append(ids)
            out.append(label_ids)
        return out

    def to_dict(self) -> dict[str, list[str]]:
        return {name: list(words) for name, words in zip(self.labels, self.words, strict=True)}


def join_word(lead: str, word: str) -> str:
    """The label word as written after a prompt that ended with ``lead`` (its trailing spaces)."""
    return lead + word.lstrip(SPACES) if lead else word


def slots(text: str, *, where: str) -> list[str]:
    """The ``{slot}`` names of a template text (``{{`` / ``}}`` are literal braces)."""
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as err:
        raise LMForgeError(f"{where}: bad template text {text!r}: {err}", key="template") from None
    for name in names:
        if not name.isidentifier():
            raise LMForgeError(f"{where}: template slot {{{name}}} must be a plain column name", key="template")
    return names


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt format: text with ``{column}`` slots and one ``{label}`` slot.

    Args:
        text: the template, e.g. ``"Review: {text}\\nSentiment: {label}"``.
        name: what to call it in reports.
        instruction: text before everything (raw) or the system message (chat); may hold ``{labels}``.
        chat: render through the model's chat template.
        separator: between instruction, demonstrations and query (raw templates).
        verbalizer: label → word(s); None: the label names.

    Raises:
        LMForgeError: no ``{label}`` slot (or two), a slot that is not a plain name.
    """

    text: str
    name: str = "custom"
    instruction: str | None = None
    chat: bool = False
    separator: str = "\n\n"
    verbalizer: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"template '{self.name}'"
        names = slots(self.text, where=where)
        if names.count(LABEL) != 1:
            found = "no {label} slot" if LABEL not in names else "the {label} slot twice"
            raise LMForgeError(
                f"{where} has {found}: it needs exactly one, where the label word goes (e.g. 'Sentiment: {{label}}')",
                key="template",
            )
        if self.instruction is not None:
            extra = [n for n in slots(self.instruction, where=where) if n != LABELS]
            if extra:
                raise LMForgeError(
                    f"{where}: the instruction can only hold {{labels}}, not {{{extra[0]}}}", key="instruction"
                )

    # ---- pieces --------------------------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        """The data columns the template reads."""
        return [n for n in slots(self.text, where=self.name) if n not in (LABEL, LABELS)]

    @property
    def before(self) -> str:
        """The template text before ``{label}`` (with its slots)."""
        return self.text.split("{" + LABEL + "}", 1)[0]

    @property
    def after(self) -> str:
        """The template text after ``{label}``."""
        return self.text.split("{" + LABEL + "}", 1)[1]

    @property
    def lead(self) -> str:
        """The spaces between the prompt and its label word (moved onto the word)."""
        if self.chat:
            return ""
        before = self.before
        return before[len(before.rstrip(SPACES)) :]

    def check_columns(self, available: Sequence[str]) -> None:
        """Raises one line when the template reads a column the data does not have."""
        missing = [c for c in self.columns if c not in available]
        if missing:
            raise LMForgeError(
                f"template '{self.name}': unknown column {{{missing[0]}}}" + did_you_mean(missing[0], available)
                + f" (the data has: {', '.join(available)})",
                key="template",
            )

    def fill(self, text: str, values: Mapping[str, Any], label_words: Sequence[str] = ()) -> str:
        """``text`` (a piece of this template) with its slots filled: columns from ``values``,
        ``{labels}`` with the label words."""
        names = [n for n in slots(text, where=self.name) if n not in (LABEL, LABELS)]
        missing = [n for n in names if values.get(n) is None]
        if missing:
            self.check_columns([k for k, v in values.items() if v is not None])
            raise LMForgeError(f"template '{self.name}': no value for column {{{missing[0]}}}", key="template")
        filled = {n: str(values[n]) for n in names}
        return text.format_map({**filled, LABELS: ", ".join(w.strip() for w in label_words), LABEL: "{label}"})

    def demonstration(self, values: Mapping[str, Any], word: str, label_words: Sequence[str] = ()) -> str:
        """A whole example with its label word filled in (raw templates)."""
        before = self.fill(self.before, values, label_words)
        stripped = before.rstrip(SPACES)
        return stripped + join_word(before[len(stripped) :], word) + self.fill(self.after, values, label_words)

    # ---- prompts -------------------------------------------------------------------------------

    def prompt(
        self,
        values: Mapping[str, Any],
        demonstrations: Sequence[tuple[Mapping[str, Any], str]] = (),
        *,
        label_words: Sequence[str] = (),
        tokenizer: Any = None,
    ) -> Prompt:
        """The prompt of one query after its demonstrations ((values, label word) pairs).

        Args:
            values: the query's columns.
            demonstrations: in-context examples, in order, each with the word of its label.
            label_words: every label's first word (fills ``{labels}`` in the instruction).
            tokenizer: the model's tokenizer (its chat template renders chat prompts).
        """
        instruction = self.fill(self.instruction, {}, label_words) if self.instruction else None
        if self.chat:
            messages = [{"role": "system", "content": instruction}] if instruction else []
            for demo, word in demonstrations:
                messages.append({"role": "user", "content": self.fill(self.before, demo, label_words).strip()})
                messages.append({"role": "assistant", "content": word.strip()})
            messages.append({"role": "user", "content": self.fill(self.before, values, label_words).strip()})
            return Prompt(render_chat(tokenizer, messages, add_generation_prompt=True), "")
        parts = [instruction] if instruction else []
        parts += [self.demonstration(demo, word, label_words) for demo, word in demonstrations]
        query = self.fill(self.before, values, label_words)
        stripped = query.rstrip(SPACES)
        parts.append(stripped)
        return Prompt(self.separator.join(parts), query[len(stripped) :])

    def cloze(
        self,
        values: Mapping[str, Any],
        demonstrations: Sequence[tuple[Mapping[str, Any], str]] = (),
        *,
        label_words: Sequence[str] = (),
    ) -> tuple[str, str]:
        """For an encoder: the text before and after the ``[MASK]`` tokens (demonstrations and
        instruction before the query, raw layout)."""
        if self.chat:
            raise LMForgeError(f"template '{self.name}': an encoder (cloze) cannot use a chat template", key="template")
        head = self.prompt(values, demonstrations, label_words=label_words)
        return head.text + head.lead, self.fill(self.after, values, label_words)

    # ---- files ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "template": self.text, "chat": self.chat}
        if self.instruction is not None:
            out["instruction"] = self.instruction
        if self.separator != "\n\n":
            out["separator"] = self.separator
        if self.verbalizer is not None:
            out["verbalizer"] = {k: list(v) if isinstance(v, list | tuple) else v for k, v in self.verbalizer.items()}
        return out

    @classmethod
    def from_dict(cls, value: Any, *, where: str = "template", name: str | None = None) -> PromptTemplate:
        """A template from its mapping (a template file's entry, a run's recorded state)."""
        if not isinstance(value, Mapping):
            raise LMForgeError(f"{where}: a template is a mapping with a 'template' key", key="template")
        unknown = [k for k in value if k not in TEMPLATE_KEYS]
        if unknown:
            raise LMForgeError(
                f"{where}: unknown key '{unknown[0]}'" + did_you_mean(str(unknown[0]), TEMPLATE_KEYS)
                + f" (keys: {', '.join(TEMPLATE_KEYS)})",
                key="template",
            )
        text = value.get("template")
        if not isinstance(text, str) or not text.strip():
            raise LMForgeError(f"{where}: 'template' must be the template text", key="template")
        verbalizer = value.get("verbalizer")
        if verbalizer is not None and not isinstance(verbalizer, Mapping):
            raise LMForgeError(f"{where}: 'verbalizer' maps each label to a word or a list of words", key="verbalizer")
        return cls(
            text=text,
            name=str(value.get("name", name or where)),
            instruction=value.get("instruction"),
            chat=bool(value.get("chat", False)),
            separator=str(value.get("separator", "\n\n")),
            verbalizer=dict(verbalizer) if verbalizer is not None else None,
        )

    def verbalizer_for(self, labels: Sequence[str]) -> Verbalizer:
        return Verbalizer.build(labels, self.verbalizer, where=f"template '{self.name}'")


# ---- built-in templates and template files -----------------------------------------------------------

BUILTIN: dict[str, dict[str, Any]] = {
    # Any classification folder: the label names are the words and are listed for the model.
    "plain": {
        "template": "Text: {text}\nAnswer: {label}",
        "instruction": "Classify each text as one of: {labels}.",
    },
    "chat": {
        "template": "Classify this text as one of: {labels}.\n\nText: {text}\n\nAnswer with the category only. {label}",
        "chat": True,
    },
    # Sentiment (labels named negative / positive, as SST-2's and ChnSentiCorp's labels.txt).
    "sentiment": {"template": "Review: {text}\nSentiment: {label}"},
    "sentiment-chat": {
        "template": "Review: {text}\nIs the sentiment of this review positive or negative? {label}",
        "chat": True,
    },
}


def builtin_template(name: str, *, chat_available: bool) -> PromptTemplate:
    """A named template; ``default`` is ``chat`` for a model with a chat template, else ``plain``."""
    if name == "default":
        name = "chat" if chat_available else "plain"
    if name not in BUILTIN:
        raise LMForgeError(
            f"unknown template '{name}'" + did_you_mean(name, [*BUILTIN, "default"])
            + f" (built-in: default, {', '.join(BUILTIN)}; or a .yaml file, or text with a {{label}} slot)",
            key="template",
        )
    return PromptTemplate.from_dict({"name": name, **BUILTIN[name]})


def read_template_file(path: str | Path) -> list[PromptTemplate]:
    """The templates of a YAML file: one template mapping, or ``templates:`` with a list of them."""
    path = Path(path)
    data, lines = load_yaml(path)
    entries = data.get("templates") if "templates" in data else [data]
    if not isinstance(entries, list) or not entries:
        raise LMForgeError("'templates' must be a non-empty list of templates", file=path, line=lines.get("templates"))
    out = []
    for index, entry in enumerate(entries):
        listed = "templates" in data
        where = f"templates[{index}]" if listed else "template"
        try:
            out.append(PromptTemplate.from_dict(entry, where=where, name=f"{path.stem}-{index}" if listed else path.stem))
        except LMForgeError as err:
            line = entry_lines(path)[index] if listed else lines.get("template")
            raise LMForgeError(err.message, file=path, line=line) from None
    return out


def entry_lines(path: Path) -> list[int]:
    """The line where each entry of a template file's ``templates:`` list starts."""
    node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    for key, value in getattr(node, "value", []):
        if key.value == "templates" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def resolve_templates(spec: str | None, *, chat_available: bool) -> list[PromptTemplate]:
    """The templates ``spec`` names: a YAML file, a built-in name, or template text itself
    (anything with a ``{label}`` slot). None: the ``default`` built-in."""
    if spec is None or not spec.strip():
        return [builtin_template("default", chat_available=chat_available)]
    if spec.endswith((".yaml", ".yml")):
        return read_template_file(spec)
    if "{" in spec:
        return [PromptTemplate(text=spec.replace("\\n", "\n"), name="inline")]
    return [builtin_template(spec, chat_available=chat_available)]


__all__ = [
    "BUILTIN",
    "LABEL",
    "Prompt",
    "PromptTemplate",
    "Verbalizer",
    "builtin_template",
    "join_word",
    "read_template_file",
    "resolve_templates",
]
