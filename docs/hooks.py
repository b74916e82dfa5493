"""MkDocs hooks: the configuration reference is generated from the dataclasses at build time.

A page marks where a table goes with an HTML comment, ``<!-- b2trl:table NAME -->``; :func:`on_page_markdown`
replaces it with a markdown table built from the fields' ``metadata["help"]``, types and defaults, so the
reference never drifts from ``--help``. An unknown ``NAME`` fails the build.

Which ``DDPOConfig`` fields b2trl does not use is read from ``B2DiffuRLConfig``'s docstring (the sentence
"Fields of `DDPOConfig` that this trainer replaces: ..."), the one place the code states it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import json
import logging
import os
import re
import sys

log = logging.getLogger("mkdocs.plugins.b2trl")

MARKER = re.compile(r"<!--\s*b2trl:table\s+([\w-]+)\s*-->")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_SCRIPT = os.path.join(ROOT, "examples", "train_sd.py")
REPLACED_SENTENCE = re.compile(r"Fields of `DDPOConfig` that this trainer replaces:(.*?)(?:\n\s*\n|$)", re.DOTALL)


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
    """The DDPOConfig fields B2DiffuRLConfig's docstring says b2trl replaces (``name*`` patterns expanded)."""
    base, config = _config_classes()
    match = REPLACED_SENTENCE.search(config.__doc__ or "")
    if match is None:
        raise ValueError(
            "B2DiffuRLConfig's docstring no longer says which DDPOConfig fields it replaces (the sentence "
            "'Fields of `DDPOConfig` that this trainer replaces: ...'); the configuration reference is built from it."
        )
    base_names = [f.name for f in dataclasses.fields(base)]
    all_names = [f.name for f in dataclasses.fields(config)]
    names = []
    for pattern in re.findall(r"`([\w*]+)`", match.group(1)):
        found = fnmatch.filter(base_names, pattern)
        if not found and not fnmatch.filter(all_names, pattern):
            raise ValueError(f"B2DiffuRLConfig's docstring names `{pattern}`, which matches no config field.")
        # b2trl's own fields named there explain the replacement; only DDPOConfig's are replaced
        names += [n for n in found if n not in names]
    return names


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


def _example_module():
    """``examples/train_sd.py``, imported as a module (its ``main()`` does not run)."""
    name = "b2trl_docs_train_sd"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def table_script_arguments() -> str:
    fields = dataclasses.fields(_example_module().ScriptArguments)
    return _table(["flag", "type", "default", "description"], _field_rows(fields, as_flags=True))


def table_presets() -> str:
    from b2trl.config import B2DiffuRLConfig
    from b2trl.schedule import IntervalSchedule

    presets = _example_module().PRESETS
    defaults = {}
    for cls in (B2DiffuRLConfig, IntervalSchedule):
        defaults.update({f.name: _default(f) for f in dataclasses.fields(cls)})
    names = list(dict.fromkeys(n for values in presets.values() for n in values))
    unknown = [n for n in names if n not in defaults]
    if unknown:
        raise ValueError(f"examples/train_sd.py PRESETS set fields that no config class has: {unknown}")
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
