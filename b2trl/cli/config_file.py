"""`--config FILE.yaml`: the fields of a training command in a file, read as the flags would read them (TRL's
convention: the file gives the defaults, flags given on the command line override it)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
from typing import Sequence

from .errors import fail


def json_object(text: str) -> dict:
    """A flag's JSON object (dict-valued fields: ``--accelerator_kwargs '{"cpu": true}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"cpu\": true}}', got {text!r}")
    return value


def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2's booleans and floats: `no` stays the string "no" (mixed_precision) and
    `1e-4` is a float, as a reader of the file expects."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    resolvers = {}
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items():
        resolvers[first] = [(tag, regexp) for tag, regexp in entries
                            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    Loader.yaml_implicit_resolvers = resolvers
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return Loader


def read_config_file(path: str, parser: argparse.ArgumentParser, schedule_fields: Sequence[str] = ()) -> dict:
    """
    The fields of a YAML file, checked against `parser`'s flags and converted as the flags would be. A nested
    ``interval_schedule:`` mapping is flattened into the schedule's fields; ``env:`` sets environment variables.
    """
    import yaml

    if not os.path.isfile(path):
        fail(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        fail(f"--config {path}: not valid YAML ({' '.join(str(err).split())})")
    data = {} if data is None else data
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a mapping of field names to values, got {type(data).__name__}")
    data = {str(key).replace("-", "_"): value for key, value in data.items()}
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        fail(f"--config {path}: `env` must be a mapping of environment variables to values")
    os.environ.update({str(k): str(v) for k, v in env.items()})
    schedule = data.get("interval_schedule")
    if isinstance(schedule, dict):
        unknown = sorted(set(schedule) - set(schedule_fields))
        if unknown:
            fail(f"--config {path}: interval_schedule has unknown field(s) {unknown}; known: {list(schedule_fields)}")
        del data["interval_schedule"]
        data = {**schedule, **data}
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(f"--config {path}: unknown field {key!r}{hint}")
        values[key] = _convert(actions[key], value, f"--config {path}: {key}")
    return values


def _convert(action: argparse.Action, value, where: str):
    """`value` from a file, converted and checked by the flag's own type and choices."""
    if value is None or action.type is None:
        return value

    def one(item):
        if action.type is json_object:
            if not isinstance(item, dict):
                fail(f"{where}: expected a mapping, got {item!r}")
            return item
        try:
            converted = action.type(item if isinstance(item, str) else json.dumps(item) if isinstance(item, bool)
                                    else str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            fail(f"{where}: {err}")
        if action.choices is not None and converted not in action.choices:
            fail(f"{where}: {converted!r} is not one of {list(action.choices)}")
        return converted

    if action.nargs in ("+", "*"):
        return [one(item) for item in (value if isinstance(value, list) else [value])]
    return one(value)
