"""Hiding two diffusers warnings that b2trl's own calls trigger on every run and that mean nothing there.

- ``There are modules in <Model> that should be kept in float32: []. Casting directly with `to()` ...``:
  diffusers warns on every ``model.to(dtype)``, also when the model has no module to keep in float32 (the empty
  list), as none of the families b2trl trains has. A model that does list modules still warns.
- ``No LoRA keys associated to <TextEncoder> found ...``: loading a LoRA that b2trl trained (denoiser only) into a
  pipeline makes diffusers look for text-encoder keys and say it found none. The same message about the denoiser
  (a LoRA that does not fit the model) still shows.

[`hide_known_warnings`] drops exactly these records, and only while b2trl's own call runs: a filter on the
emitting loggers, added on entry and removed on exit. Everything else diffusers logs is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterable, Optional

# the diffusers modules that emit the two messages
_LOGGERS = (
    "diffusers.models.modeling_utils",
    "diffusers.loaders.lora_base",
    "diffusers.loaders.peft",
    "diffusers.loaders.lora_pipeline",
)
_EMPTY_FP32 = "that should be kept in float32: []."
_NO_LORA_KEYS = "No LoRA keys associated to "


class KnownWarningFilter(logging.Filter):
    """
    Drops the empty-list float32 warning, and the no-LoRA-keys warning for the classes in `text_encoders`.

    Args:
        text_encoders (`Iterable[str]`, *optional*): class names of the modules a LoRA of b2trl's has no keys for
            (the pipeline's text encoders).
    """

    def __init__(self, text_encoders: Iterable[str] = ()):
        super().__init__()
        self.text_encoders = tuple(text_encoders)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _EMPTY_FP32 in message and message.startswith("There are modules in "):
            return False
        if message.startswith(_NO_LORA_KEYS):
            name = message[len(_NO_LORA_KEYS):].split(" ", 1)[0]
            return name not in self.text_encoders
        return True


def text_encoder_classes(pipe) -> list[str]:
    """Class names of a diffusers pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ...)."""
    components = getattr(pipe, "components", None) or {}
    return [type(module).__name__ for name, module in components.items()
            if name.startswith("text_encoder") and module is not None]


@contextlib.contextmanager
def hide_known_warnings(pipe: Optional[object] = None):
    """
    Inside the block, diffusers' two warnings that b2trl's calls make for nothing are not shown (see the module's
    docstring); every other message is.

    Args:
        pipe (*optional*): the diffusers pipeline a b2trl LoRA is loaded into; its text encoders' "no LoRA keys"
            warnings are hidden. Without it only the float32 warning is.
    """
    hidden = KnownWarningFilter(text_encoder_classes(pipe) if pipe is not None else ())
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(hidden)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hidden)


def hiding_known_warnings(method):
    """Decorator: run `method` inside [`hide_known_warnings`] (for a family's ``place``, which casts modules)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with hide_known_warnings():
            return method(*args, **kwargs)

    return wrapper
