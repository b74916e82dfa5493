"""The command line of `b2trl train` and `b2trl toy`: every `B2DiffuRLConfig` and `IntervalSchedule` field a flag,
a YAML file of the same fields (`--config`), a method preset (`--method`), help in sections, one-line errors.

Where a value comes from, last wins: the dataclasses' defaults, the command's preset (the toy model's scale), the
method's settings, the YAML file, the flags given (TRL's convention: the file gives defaults, flags override it).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from typing import Callable, Optional, Sequence

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from . import groups
from .config_file import json_object, read_config_file
from .errors import config_errors

_UNSET = object()  # a default that tells a flag given on the command line from one left alone


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag once (not its dashed alias), its value's kind as the metavar, its default after the help."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(110, max(60, _terminal_width())))

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        # not the dashed aliases HfArgumentParser adds (--sample-num-steps for --sample_num_steps)
        flags = ", ".join(s for s in action.option_strings if not s.startswith("--") or "-" not in s[2:])
        if action.nargs == 0:
            return flags
        return f"{flags} {self._format_args(action, action.dest.upper())}"

    def _get_help_string(self, action):
        text = (action.help or "").replace("%", "%%")  # help is %-formatted; a literal % must survive
        default = action.default
        if action.nargs == 0 or any(default is v for v in (None, argparse.SUPPRESS, _UNSET)) or default in ({}, [], ""):
            return text
        return text + " (default: %(default)s)"


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


class CommandParser(HfArgumentParser):
    """An `HfArgumentParser` whose errors are one line (argparse prints the whole usage first, here hundreds of
    flags), with the closest flag suggested for a misspelt one."""

    def error(self, message):
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # one name per flag, not its dashed alias
        unknown = re.findall(r"(--[\w-]+)", message) if message.startswith("unrecognized arguments") else []
        flags = [s for action in self._actions for s in action.option_strings]
        close = [match for flag in unknown for match in difflib.get_close_matches(flag, flags, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else f" ({self.prog} --help lists the flags)"
        self.exit(2, f"error: {message}{hint}\n")


_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", string_to_bool: "BOOL", json_object: "JSON"}


def build_parser(classes: Sequence[type], *, prog: str, description: str, epilog: str = "",
                 config_file: bool = True, usage: Optional[str] = None) -> CommandParser:
    """
    A parser of `classes` (dataclasses; `B2DiffuRLConfig` and `IntervalSchedule` among them for a training
    command), each field a flag, in the `--help` sections of [`~b2trl.cli.groups.SECTIONS`].
    """
    parser = CommandParser(
        tuple(classes), prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter,
        allow_abbrev=False, usage=usage or f"{prog} [--config FILE.yaml] [--FLAG VALUE ...]",
    )
    if config_file:
        parser.add_argument("--config", metavar="FILE", help="A YAML file of the same field names (a nested "
                            "`interval_schedule:` mapping allowed, and `env:` for environment variables); flags given "
                            "on the command line override it.")
    trains = any(cls.__name__ == "B2DiffuRLConfig" for cls in classes)
    ignored = frozenset(groups.replaced_trl_fields() if trains else ())
    sections: dict[str, argparse._ArgumentGroup] = {}
    for title in (*groups.SECTIONS, groups.OTHER, groups.IGNORED):
        sections[title] = parser.add_argument_group(title)
    for action in list(parser._actions):
        if not action.option_strings or action.dest == "help":
            continue
        if action.type is dict or (isinstance(action.type, type) and dataclasses.is_dataclass(action.type)):
            action.type = json_object  # dict-valued fields, and the schedule as one object, take JSON
        if action.dest == "method" and action.choices is None and action.type is str:
            from ..methods import METHODS

            action.choices = list(METHODS)
            action.help = ("Start from a named method's settings (b2trl.list_methods(); docs/methods.md): they "
                           "replace the defaults (and a command's preset where both set a field); --config and "
                           "flags override them.")
        if action.metavar is None and action.choices is None:
            action.metavar = _METAVARS.get(action.type, "VALUE")
        if isinstance(action, argparse._StoreFalseAction):
            action.help = f"Sets --{action.dest} false."
        parser._optionals._group_actions.remove(action)
        sections[groups.section_of(action.dest, ignored)]._group_actions.append(action)
    for group in sections.values():  # each section in its patterns' order: --method first, then what it sets
        group._group_actions.sort(key=lambda a: groups.rank_in_section(a.dest))
    return parser


# ---------------------------------------------------------------------------------------------- parsing


def given_flags(build: Callable[[], CommandParser], argv: Sequence[str]) -> set:
    """The fields set on the command line (not left at a default)."""
    probe = build()
    probe.set_defaults(**{a.dest: _UNSET for a in probe._actions if a.dest != "help"})
    namespace, _ = probe.parse_known_args(list(argv))
    return {dest for dest, value in vars(namespace).items() if value is not _UNSET}


def training_fields(script_class: type) -> list[str]:
    """The field names a training command's flags carry: `script_class`'s, `B2DiffuRLConfig`'s, the schedule's."""
    from ..config import B2DiffuRLConfig
    from ..schedule import IntervalSchedule

    return [f.name for cls in (script_class, B2DiffuRLConfig, IntervalSchedule) for f in dataclasses.fields(cls)]


def training_parser(script_class: type, *, prog: str, description: str, epilog: str = "") -> CommandParser:
    """The parser of a training command: `script_class`'s fields, then `B2DiffuRLConfig`'s and the schedule's."""
    from ..config import B2DiffuRLConfig
    from ..schedule import IntervalSchedule

    return build_parser((script_class, B2DiffuRLConfig, IntervalSchedule), prog=prog, description=description,
                        epilog=epilog)


def parse_training_command(
    argv: Optional[Sequence[str]],
    script_class: type,
    *,
    prog: str,
    description: str,
    epilog: str = "",
    preset_for: Optional[Callable[[str], dict]] = None,
    model_default: Optional[str] = None,
):
    """
    Parse a training command: its own arguments (`script_class`) and the trainer's configuration.

    Args:
        argv (`Sequence[str]`, *optional*): the arguments (default: ``sys.argv[1:]``).
        script_class (`type`): the command's own dataclass; it has a ``pretrained_model`` field.
        prog, description, epilog (`str`): for `--help`.
        preset_for (`Callable[[str], dict]`, *optional*): the field values a model starts from (its name given).
        model_default (`str`, *optional*): the model when neither a flag nor the file names one.

    Returns:
        `(args, config, preset)`: the `script_class` instance, the `B2DiffuRLConfig` and the preset applied.
    """
    from ..config import B2DiffuRLConfig
    from ..schedule import IntervalSchedule

    argv = list(sys.argv[1:] if argv is None else argv)
    schedule_fields = [f.name for f in dataclasses.fields(IntervalSchedule) if f.init]

    def build():
        return training_parser(script_class, prog=prog, description=description, epilog=epilog)

    parser = build()
    # the file and the model first: they decide the defaults (which --help shows)
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--config")
    probe.add_argument("--pretrained_model")
    known, _ = probe.parse_known_args(argv)
    from_file = read_config_file(known.config, parser, schedule_fields) if known.config else {}
    model = known.pretrained_model or from_file.get("pretrained_model", model_default)
    preset = dict(preset_for(model)) if preset_for else {}
    parser.set_defaults(**{**preset, **from_file})
    namespace = parser.parse_args(argv)
    explicit = given_flags(build, argv) | set(from_file)

    config_fields = [f.name for f in dataclasses.fields(B2DiffuRLConfig) if f.init and f.name != "interval_schedule"]
    method_fields = set()
    if namespace.method:
        from ..methods import get_method

        method = get_method(namespace.method)
        method_fields = set(method.settings) | set(method.schedule)

    def chosen(name):  # given, or the preset's where the method does not set it
        return name in explicit or (name in preset and name not in method_fields)

    settings = {n: getattr(namespace, n) for n in config_fields if n != "method" and chosen(n)}
    given = getattr(namespace, "interval_schedule", None)
    schedule = dict(given) if "interval_schedule" in explicit and isinstance(given, dict) else {
        n: getattr(namespace, n) for n in schedule_fields if chosen(n)}
    try:
        if namespace.method:
            config = B2DiffuRLConfig.for_method(namespace.method, **settings, interval_schedule=schedule)
        else:
            config = B2DiffuRLConfig(**settings, interval_schedule=IntervalSchedule(**schedule))
    except (ValueError, TypeError) as err:
        raise SystemExit(config_errors(err, training_fields(script_class))) from None
    args = script_class(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(script_class) if f.init})
    return args, config, preset
