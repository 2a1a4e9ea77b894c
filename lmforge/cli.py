"""The ``lmforge`` command line, generated from typed function signatures.

Each command is a plain, typed Python function in ``COMMANDS`` (the one table of commands). Its
keyword parameters become ``--key value`` options, positional ones become arguments, a parameter
typed as a dataclass (e.g. ``model: ModelConfig``) takes ``--model.field value`` options, and the
first line of its docstring plus its ``Args:`` section become ``--help``. Every command also takes
``--config FILE.yaml``: a mapping of the same keys (a dataclass parameter as a nested section);
options on the command line override the file.

User mistakes raise :class:`~lmforge.errors.LMForgeError`; :func:`main` prints them as one line
(what, where) and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .commands.launch import relaunch
from .errors import LMForgeError, did_you_mean
from .runtime import launched, rank, world_size
from .settings import coerce, dataclass_from_dict, dataclass_update, load_yaml, type_name
from .training.distributed import lost_peer, short_reason

CommandFn = Callable[..., Any]


# ---- the table of commands ---------------------------------------------------------------------


# Name -> "module:function" under lmforge.commands; a name with a space ("tokenizer train") is a
# command inside a group. The modules are imported when a command runs (or --help lists them),
# so `lmforge --help` does not pay for torch; importlib keeps the table free of import cycles.
COMMANDS: dict[str, str] = {
    "attention": "attention:attention",
    "presets": "presets:presets",
    "tokenizer train": "tokenizer:tokenizer_train",
    "convert": "convert:convert",
    "generate": "generate:generate",
    "chat": "chat:chat",
    "serve": "serve:serve",
    "pretrain": "pretrain:pretrain",
    "demo": "pretrain:demo",
    "finetune": "finetune:finetune",
    "eval": "evaluate:evaluate",
    "predict": "predict:predict",
    "merge": "merge:merge",
    "viz attention": "viz:viz_attention",
    "viz run": "viz:viz_run",
    "compare": "compare:compare",
    "prompt": "prompt:prompt",
    "continual": "continual:continual",
}


def _commands() -> dict[str, CommandFn]:
    """Name -> function, for every entry of :data:`COMMANDS`."""
    table = {}
    for name, target in COMMANDS.items():
        module, function = target.split(":")
        table[name] = getattr(importlib.import_module(f"lmforge.commands.{module}"), function)
    return table


# ---- signature -> options ----------------------------------------------------------------------


@dataclasses.dataclass
class Option:
    """One parameter of a command as the command line sees it."""

    name: str
    annotation: Any
    default: Any
    positional: bool
    help: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def is_dataclass(self) -> bool:
        return dataclasses.is_dataclass(self.annotation)

    @property
    def is_mapping(self) -> bool:
        """A free-form ``dict[str, ...]`` parameter: a YAML section and any ``--name.key value``."""
        annotation = self.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        return typing.get_origin(annotation) is dict or annotation is dict


def docstring_args(fn: CommandFn) -> dict[str, str]:
    """Parameter descriptions from the ``Args:`` section of a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.MULTILINE)
    if not match:
        return {}
    result: dict[str, str] = {}
    current = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s{2,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if item:
            current = item.group(1)
            result[current] = item.group(2).strip()
        elif current and line.strip():
            result[current] += " " + line.strip()
    return result


def options_of(fn: CommandFn) -> list[Option]:
    hints = typing.get_type_hints(fn)
    helps = docstring_args(fn)
    options = []
    for param in inspect.signature(fn).parameters.values():
        options.append(
            Option(
                name=param.name,
                annotation=hints.get(param.name, str),
                default=param.default,
                positional=param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD),
                help=helps.get(param.name, ""),
            )
        )
    return options


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises LMForgeError (one line, exit 2) instead of printing usage,
    and options are never abbreviated (a typo is reported, not guessed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        choice = re.match(r"argument (?:command|COMMAND): invalid choice: '([^']*)'", message)
        if choice:
            name = choice.group(1)
            raise LMForgeError(
                f"unknown command '{name}'" + did_you_mean(name, _commands()) + " (see lmforge --help)"
            )
        raise LMForgeError(f"{message} (see {self.prog} --help)")


def _add_command(subparsers: Any, name: str, fn: CommandFn) -> None:
    doc = inspect.getdoc(fn) or ""
    summary = doc.splitlines()[0] if doc else ""
    description = doc.split("\nArgs:")[0].strip()
    epilog = getattr(fn, "cli_epilog", None)  # more help text, built when asked (e.g. from a registry)
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog() if callable(epilog) else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="read options from a YAML file (flags override it)"
    )
    for option in options_of(fn):
        if option.positional:  # always optional to argparse: resolve_arguments reports a missing one
            nargs = "*" if _is_list(option.annotation) else "?"
            parser.add_argument(
                option.name, nargs=nargs, default=None, metavar=option.name.upper(), help=option.help
            )
        elif option.is_mapping:
            parser.add_argument_group(
                f"{option.name} (free-form options: --{option.name}.KEY VALUE, or a `{option.name}:` section)",
                option.help,
            )
        elif option.is_dataclass:
            group = parser.add_argument_group(
                f"{option.name} ({option.annotation.__name__} fields)", option.help
            )
            hints = typing.get_type_hints(option.annotation)
            for field in dataclasses.fields(option.annotation):
                flag = f"--{option.name}.{field.name}"
                group.add_argument(
                    flag,
                    dest=f"{option.name}.{field.name}",
                    default=None,
                    metavar=_metavar(hints[field.name]),
                    help=type_name(hints[field.name]),
                )
        else:
            flags = [f"--{option.name}"]
            if "_" in option.name:
                flags.append(f"--{option.name.replace('_', '-')}")
            default = "" if option.required else f" (default: {option.default})"
            kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": option.help + default}
            if option.annotation is bool or option.annotation == bool | None:
                kwargs.update(nargs="?", const="true", metavar="true|false")
            else:
                kwargs["metavar"] = _metavar(option.annotation)
            parser.add_argument(*flags, **kwargs)


def _is_list(annotation: Any) -> bool:
    """list[...] or list[...] | None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, tuple)


def _metavar(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    return type_name(annotation).split(" ")[0].upper()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmforge",
        description="Build, pretrain and adapt Transformer language models. "
        "Every command takes --config FILE.yaml plus --key value overrides.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, Any] = {}
    for name, fn in _commands().items():
        if " " in name:  # "group command": a second level of subcommands
            group, sub = name.split(" ", 1)
            if group not in groups:
                group_parser = subparsers.add_parser(group, help=f"{group} commands ({group} COMMAND --help)")
                groups[group] = group_parser.add_subparsers(
                    dest="subcommand", metavar="COMMAND", parser_class=_Parser
                )
            _add_command(groups[group], sub, fn)
        else:
            _add_command(subparsers, name, fn)
    return parser


def resolve_arguments(fn: CommandFn, parsed: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Merge defaults ← ``--config`` file ← command-line values and convert each to its type."""
    options = options_of(fn)
    config_path = parsed.pop("config", None)
    file_values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if config_path:
        file_values, lines = load_yaml(config_path)
        names = [o.name for o in options]
        for key in file_values:
            if key not in names:
                raise LMForgeError(
                    f"unknown key '{key}'" + did_you_mean(key, names), file=config_path, line=lines.get(key)
                )

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for option in options:
        if option.is_mapping:
            value = _resolve_mapping(option, file_values, parsed, config_path, lines)
        elif option.is_dataclass:
            value = _resolve_dataclass(option, file_values, parsed, config_path, lines)
        else:
            raw = parsed.get(option.name)
            if raw == [] and option.positional:  # nargs="*" with nothing given
                raw = None
            if raw is not None:
                value = coerce(raw, option.annotation, key=f"--{option.name}")
            elif option.name in file_values:
                value = coerce(
                    file_values[option.name],
                    option.annotation,
                    key=option.name,
                    file=config_path,
                    line=lines.get(option.name),
                )
            elif option.required:
                label = option.name.upper() if option.positional else f"--{option.name}"
                raise LMForgeError(f"missing required {label}")
            else:
                value = option.default
        if option.positional:
            args.append(value)
        else:
            kwargs[option.name] = value
    _flags_beat_the_file(fn, kwargs, parsed, file_values, config_path, lines)
    return args, kwargs


def _source(key: str, parsed: dict[str, Any], file_values: dict[str, Any]) -> str:
    """Where option ``key`` (``epochs``, ``train.max_steps``) got its value: flag, file or default."""
    if parsed.get(key) not in (None, []):
        return "flag"
    head, _, field = key.partition(".")
    section = file_values.get(head) if field else None
    if (field and isinstance(section, dict) and field in section) or (not field and key in file_values):
        return "file"
    return "default"


def _flags_beat_the_file(
    fn: CommandFn,
    kwargs: dict[str, Any],
    parsed: dict[str, Any],
    file_values: dict[str, Any],
    config_path: str | None,
    lines: dict[str, int],
) -> None:
    """A flag always wins over the file, also over a different key that decides the same thing
    (a command's ``cli_conflicts``, e.g. ``--train.max_steps`` against a recipe's ``epochs``): the
    file's value is dropped and a note says which value came from where."""
    for pair in getattr(fn, "cli_conflicts", ()):
        sources = {key: _source(key, parsed, file_values) for key in pair}
        flag = next((k for k in pair if sources[k] == "flag"), None)
        loser = next((k for k in pair if sources[k] == "file"), None)
        if flag is None or loser is None:
            continue
        head, _, field = loser.partition(".")
        default = next(o.default for o in options_of(fn) if o.name == head)
        if field:
            kwargs[head] = dataclasses.replace(kwargs[head], **{field: getattr(default, field)})
            shown = file_values[head][field]
        else:
            kwargs[head] = default
            shown = file_values[head]
        where = f"{config_path}:{lines[loser]}" if loser in lines else str(config_path)
        print(
            f"lmforge: note: --{flag} {parsed[flag]} (command line) wins over {loser}: {shown} ({where})",
            file=sys.stderr,
        )


def _say(line: str) -> None:
    """One line to stderr in one write: the processes of a job share the pipe, and ``print``
    writes the text and its newline apart, so two ranks' lines could splice into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _resolve_mapping(
    option: Option,
    file_values: dict[str, Any],
    parsed: dict[str, Any],
    config_path: str | None,
    lines: dict[str, int],
) -> dict[str, Any] | None:
    """A free-form mapping: its default, updated by the file's section, then by ``--name.key`` flags
    (values read the YAML way). Checking the keys is the command's business."""
    value = dict(option.default) if isinstance(option.default, dict) else None
    section = file_values.get(option.name)
    if section is not None:
        if not isinstance(section, dict):
            raise LMForgeError(
                f"'{option.name}' must be a mapping of key: value",
                file=config_path,
                line=lines.get(option.name),
            )
        value = {**(value or {}), **section}
    flags = {k.split(".", 1)[1]: v for k, v in parsed.items() if k.startswith(option.name + ".")}
    if flags:
        value = {**(value or {}), **{k: coerce(v, Any, key=f"--{option.name}.{k}") for k, v in flags.items()}}
    return value


def _resolve_dataclass(
    option: Option,
    file_values: dict[str, Any],
    parsed: dict[str, Any],
    config_path: str | None,
    lines: dict[str, int],
) -> Any:
    """A dataclass parameter: its default, updated by the file's section, then by ``--name.field`` flags."""
    section = file_values.get(option.name)
    overrides = {
        k.split(".", 1)[1]: v for k, v in parsed.items() if k.startswith(option.name + ".") and v is not None
    }
    value = None if option.required else option.default
    if section is not None:
        prefix = option.name + "."
        if value is None:
            value = dataclass_from_dict(
                option.annotation, section, file=config_path, lines=lines, prefix=prefix
            )
        else:
            value = dataclass_update(value, section, file=config_path, lines=lines, prefix=prefix)
    if overrides:
        prefix = f"--{option.name}."
        if value is None:
            value = dataclass_from_dict(option.annotation, overrides, prefix=prefix)
        else:
            value = dataclass_update(value, overrides, prefix=prefix)
    if value is None and option.required:
        raise LMForgeError(
            f"missing required section '{option.name}' (in --config or as --{option.name}.FIELD)"
        )
    return value


def _take_mapping_flags(parsed: dict[str, Any], extras: list[str]) -> list[str]:
    """Move ``--name.key value`` / ``--name.key=value`` of the command's mapping parameters from
    argparse's leftovers into ``parsed``; return what is still unknown."""
    name = parsed.get("command")
    if parsed.get("subcommand"):
        name = f"{name} {parsed['subcommand']}"
    fn = _commands().get(name or "")
    if fn is None:
        return extras
    mappings = [o.name for o in options_of(fn) if o.is_mapping]
    rest: list[str] = []
    i = 0
    while i < len(extras):
        flag = extras[i]
        key, has_value, inline = flag.partition("=")
        owner = key[2:].split(".", 1)[0] if key.startswith("--") and "." in key else None
        if owner in mappings and len(key[2:].split(".", 1)[1]) > 0:
            if has_value:
                parsed[key[2:]] = inline
            elif i + 1 < len(extras) and not extras[i + 1].startswith("--"):
                parsed[key[2:]] = extras[i + 1]
                i += 1
            else:
                raise LMForgeError(f"option {key} needs a value")
        else:
            rest.append(flag)
        i += 1
    return rest


def _unknown_option(parser: argparse.ArgumentParser, names: list[str | None], flag: str) -> typing.NoReturn:
    """Report the first unknown option with the nearest option of the command it was given to."""
    sub = parser
    for name in names:  # descend: command, then subcommand of a group
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                sub = action.choices[name]
                break
    known = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    what = "option" if flag.startswith("-") else "argument"
    raise LMForgeError(
        f"unknown {what} '{flag}'" + did_you_mean(flag.split("=")[0], known) + f" (see {sub.prog} --help)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lmforge`` and ``python -m lmforge``: returns the exit status."""
    parser = build_parser()
    try:
        namespace, extras = parser.parse_known_args(argv)
        parsed = vars(namespace)
        if extras:
            extras = _take_mapping_flags(parsed, extras)
        if extras:
            _unknown_option(parser, [parsed.get("command"), parsed.get("subcommand")], extras[0])
        if parsed.pop("version", False):
            print(f"lmforge {importlib.metadata.version('lmforge')}")
            return 0
        name = parsed.pop("command", None)
        if name is None:
            parser.print_help()
            return 0
        sub = parsed.pop("subcommand", None)
        if f"{name} {sub}" in _commands():
            name = f"{name} {sub}"
        elif name not in _commands():  # a group given without its command
            group = [c.split(" ", 1)[1] for c in _commands() if c.startswith(name + " ")]
            raise LMForgeError(f"'{name}' needs a command: one of {', '.join(group)}")
        fn = _commands()[name]
        args, kwargs = resolve_arguments(fn, parsed)
        if kwargs.get("nproc", 1) > 1 and not launched():  # this command again, as a torchrun job
            return relaunch(kwargs["nproc"], sys.argv[1:] if argv is None else argv)
        if rank() != 0:  # a torchrun job's other ranks: rank 0 alone prints (errors still show)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
        result = fn(*args, **kwargs)
        return result if isinstance(result, int) else 0
    except LMForgeError as err:
        where = f"[rank {rank()}] " if world_size() > 1 else ""
        _say(f"lmforge: error: {where}{err.one_line()}")
        return 2
    except KeyboardInterrupt:
        _say("lmforge: interrupted")
        return 130
    except RuntimeError as err:  # in a torchrun job: a collective that failed because a peer is gone
        if world_size() <= 1 or not lost_peer(err):
            raise
        _say(
            f"lmforge: error: [rank {rank()}] another process of this job stopped ({short_reason(err)}); "
            "run the same command with --resume to continue from the last checkpoint"
        )
        return 2
    except BrokenPipeError:  # `lmforge ... | head`
        return 0
