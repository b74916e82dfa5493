"""One-line errors that name the flag: what every `b2trl` command stops with."""

from __future__ import annotations

import re
from typing import Sequence


def fail(message: str):
    """Stop the command with one line on stderr (exit status 1)."""
    raise SystemExit(f"error: {message}")


def flag_of(field: str, value=None) -> str:
    return f"--{field}" if value is None else f"--{field} {value}"


def name_the_flag(message: str, fields: Sequence[str]) -> str:
    """
    A validation message with the field it is about written as its flag: ``noise_level must be > 0`` becomes
    ``--noise_level must be > 0``; a message that names a field later gets the flag in front.
    """
    message = " ".join(message.split())
    pattern = re.compile(r"(?:IntervalSchedule\.|B2DiffuRLConfig\.)?\b(" + "|".join(
        sorted(map(re.escape, fields), key=len, reverse=True)) + r")\b")
    match = pattern.match(message)
    if match:
        return flag_of(match.group(1)) + message[match.end():]
    later = [m for m in pattern.finditer(message) if "_" in m.group(1)]
    return f"{flag_of(later[0].group(1))}: {message}" if later else message


def config_errors(err: ValueError, fields: Sequence[str]) -> str:
    """`B2DiffuRLConfig`'s (or a schedule's) `ValueError` as lines ``error: --flag ...``, one per problem."""
    text = str(err)
    problems = [line[2:] for line in text.splitlines() if line.startswith("- ")] or [text]
    return "\n".join(f"error: {name_the_flag(p, fields)}" for p in problems)
