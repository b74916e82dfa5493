"""MkDocs hooks: the configuration reference is generated from the dataclasses at build time.

A page marks where a table goes with an HTML comment, ``<!-- b2trl:table NAME -->``; :func:`on_page_markdown`
replaces it with a markdown table built from the fields' ``metadata["help"]``, types and defaults, so the
reference never drifts from ``--help``. An unknown ``NAME`` fails the build.

Which ``DDPOConfig`` fields b2trl does not use is read from ``B2DiffuRLConfig``'s docstring (the sentence
"Fields of `DDPOConfig` that this trainer replaces: ..."), the one place the code states it, by
``b2trl.cli.groups.replaced_trl_fields``, which the command line's ``--help`` sections use too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys

log = logging.getLogger("mkdocs.plugins.b2trl")

MARKER = re.compile(r"<!--\s*b2trl:table\s+([\w-]+)\s*-->")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- formatting


def _cell(text: str) -> str:
    """Make text safe inside one markdown table cell: one line, no bare `|`, no HTML outside code spans."""
    parts = " ".join(str(text).split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return f"`{json.dumps(value)}`"
    return f"`{value!r}`"


def _help(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", "")
    if not text:
        raise ValueError(f"field {field.name!r} has no metadata['help']: every config field needs one")
    choices = field.metadata.get("choices")
    if choices:
        text += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _field_rows(fields, *, with_base_default=None, as_flags=False) -> list[list[str]]:
    rows = []
    for f in fields:
        name = f"--{f.name}" if as_flags else f.name
        row = [f"`{name}`", f"`{_type_name(f.type)}`", _show(_default(f))]
        if with_base_default is not None:
            row.append(_show(_default(with_base_default[f.name])))
        row.append(_help(f))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- the tables


def _config_classes():
    from trl import DDPOConfig

    from b2trl.config import B2DiffuRLConfig

    return DDPOConfig, B2DiffuRLConfig


def replaced_trl_fields() -> list[str]:
    """The DDPOConfig fields B2DiffuRLConfig's docstring says b2trl replaces (the command line's list too)."""
    from b2trl.cli.groups import replaced_trl_fields

    return replaced_trl_fields()


def _config_groups():
    base, config = _config_classes()
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    own, changed, kept, replaced = [], [], [], []
    ignored = set(replaced_trl_fields())
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        if f.name not in base_fields:
            own.append(f)
        elif f.name in ignored:
            replaced.append(f)
        elif _default(f) != _default(base_fields[f.name]):
            changed.append(f)
        else:
            kept.append(f)
    return own, changed, kept, replaced, base_fields


def table_b2diffurl_fields() -> str:
    own = _config_groups()[0]
    return _table(["field", "type", "default", "description"], _field_rows(own))


def table_trl_changed_defaults() -> str:
    _, changed, _, _, base_fields = _config_groups()
    return _table(
        ["field", "type", "b2trl default", "DDPOConfig default", "description"],
        _field_rows(changed, with_base_default=base_fields),
    )


def table_trl_fields() -> str:
    kept = _config_groups()[2]
    return _table(["field", "type", "default", "description"], _field_rows(kept))


def table_trl_replaced() -> str:
    replaced = _config_groups()[3]
    return _table(["field", "type", "default", "TRL's description (not used by b2trl)"], _field_rows(replaced))


def table_interval_schedule() -> str:
    from b2trl.schedule import IntervalSchedule

    return _table(["field", "type", "default", "description"], _field_rows(dataclasses.fields(IntervalSchedule)))


def _arguments_table(cls) -> str:
    return _table(["flag", "type", "default", "description"], _field_rows(dataclasses.fields(cls), as_flags=True))


def table_script_arguments() -> str:
    """`b2trl train`'s own flags (besides every config and schedule field)."""
    from b2trl.cli.train import TrainArguments

    return _arguments_table(TrainArguments)


def table_toy_arguments() -> str:
    from b2trl.cli.toy import ToyArguments

    return _arguments_table(ToyArguments)


def table_eval_arguments() -> str:
    from b2trl.cli.evaluate import EvalArguments

    return _arguments_table(EvalArguments)


def table_presets() -> str:
    """What `b2trl toy` starts from on each toy model, next to the reference run's defaults."""
    from b2trl.config import B2DiffuRLConfig
    from b2trl.schedule import IntervalSchedule
    from b2trl.toy import TOY_MODELS
    from b2trl.toy.main import preset_for

    presets = {"reference": {}, **{f"b2trl toy --pretrained_model {name}": preset_for(name) for name in TOY_MODELS}}
    defaults = {}
    for cls in (B2DiffuRLConfig, IntervalSchedule):
        defaults.update({f.name: _default(f) for f in dataclasses.fields(cls)})
    names = list(dict.fromkeys(n for values in presets.values() for n in values))
    unknown = [n for n in names if n not in defaults]
    if unknown:
        raise ValueError(f"b2trl.toy.main's presets set fields that no config class has: {unknown}")
    header = ["flag", *presets]
    rows = [[f"`--{n}`", *[_show(values.get(n, defaults[n])) for values in presets.values()]] for n in names]
    return _table(header, rows)


def table_methods() -> str:
    """Every named method: what it sets (on top of B2DiffuRLConfig's defaults), where it applies, its source."""
    from b2trl.methods import METHODS

    rows = []
    for method in METHODS.values():
        settings = ", ".join(f"`{k}={v!r}`" for k, v in method.settings.items()) or "(the defaults)"
        schedule = ", ".join(f"`{k}={v!r}`" for k, v in method.schedule.items()) or "(the default)"
        where = "flow-matching models" if method.samplers else "every family"
        rows.append([f"`{method.name}`", _cell(method.description), settings, schedule, where, _cell(method.source)])
    return _table(["method", "what it does", "settings", "interval schedule", "for", "source"], rows)


TABLES = {
    "b2diffurl-fields": table_b2diffurl_fields,
    "trl-changed-defaults": table_trl_changed_defaults,
    "trl-fields": table_trl_fields,
    "trl-replaced": table_trl_replaced,
    "interval-schedule": table_interval_schedule,
    "script-arguments": table_script_arguments,
    "toy-arguments": table_toy_arguments,
    "eval-arguments": table_eval_arguments,
    "presets": table_presets,
    "methods": table_methods,
}


# ---------------------------------------------------------------------------------------------- MkDocs events


def on_config(config, **kwargs):
    # document the b2trl of this checkout, even where another copy is installed
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return config


def on_page_markdown(markdown: str, *, page, **kwargs) -> str:
    def render(match: re.Match) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"{page.file.src_uri}: unknown generated table {name!r}; known: {sorted(TABLES)}")
        return TABLES[name]()

    return MARKER.sub(render, markdown)
