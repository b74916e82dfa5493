"""Name → reward lookup: built-in scorers, user-registered ones, and `"module:function"` strings.

Built-ins are stored as import strings and imported on lookup, so `import b2trl.rewards` stays cheap
(no transformers, no trl).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable

_BUILTINS: dict[str, str] = {
    "jpeg_compressibility": "b2trl.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "b2trl.rewards.jpeg:JpegIncompressibility",
    "aesthetic": "b2trl.rewards.clip:AestheticScorer",
    "clip_score": "b2trl.rewards.clip:CLIPScore",
    "pickscore": "b2trl.rewards.clip:PickScore",
    "hpsv2": "b2trl.rewards.hps:HPSv2",
    "vqa_score": "b2trl.rewards.vqa:VQAScore",
    "remote": "b2trl.rewards.remote:RemoteReward",
    "toy_alignment": "b2trl.toy:alignment_reward",
}

# name -> import string or object (class, factory or reward function)
_REGISTRY: dict[str, str | Callable] = dict(_BUILTINS)
_LOCK = threading.Lock()


def list_rewards() -> list[str]:
    """Names accepted by [`get_reward`] (built-in and registered), sorted."""
    return sorted(_REGISTRY)


def register_reward(name: str, *, overwrite: bool = False):
    """Decorator adding a reward function or class to the registry under `name`.

    Example:

    ```python
    @register_reward("brightness")
    def brightness(images, prompts, prompt_metadata):
        return images.float().mean(dim=(1, 2, 3)), {}
    ```

    Args:
        name (`str`): the name for [`get_reward`]; must not contain `":"`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing entry instead of raising.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}.")

    def decorator(obj):
        if not callable(obj):
            raise TypeError(f"register_reward({name!r}) expects a function or class, got {type(obj).__name__}.")
        with _LOCK:
            if name in _REGISTRY and not overwrite and _REGISTRY[name] is not obj:
                raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it.")
            _REGISTRY[name] = obj
        return obj

    return decorator


def _import_target(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r} must have the form 'package.module:function' (or ':Class').")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for reward {spec!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward {spec!r}).") from None
    if not callable(obj):
        raise TypeError(f"reward {spec!r} resolves to a {type(obj).__name__}, which is not callable.")
    return obj


def get_reward(name: str | Callable, **kwargs) -> Callable:
    """Build a TRL DDPO reward function `(images, prompts, prompt_metadata) -> (rewards, metadata)`.

    Args:
        name (`str` or callable):
            a name from [`list_rewards`] (`"jpeg_compressibility"`, `"jpeg_incompressibility"`, `"aesthetic"`,
            `"clip_score"`, `"pickscore"`, `"hpsv2"`, `"vqa_score"`, `"remote"`, `"toy_alignment"` or one added
            with [`register_reward`]), or
            `"package.module:attribute"` for your own code. A callable is returned unchanged.
        **kwargs:
            if the target is a class, it is instantiated with them (e.g. `model_name_or_path=`, `device=`,
            `dtype=` for the model-based scorers, `url=` for `"remote"`); if it is a function, they are bound with
            `functools.partial`.

    Raises:
        `ValueError`: unknown name (the message lists the known ones) or a `module:attribute` that cannot be
            imported.
    """
    if callable(name) and not isinstance(name, str):
        if kwargs:
            raise TypeError("keyword arguments are only accepted with a reward name, not with a callable.")
        return name
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a reward name or a callable, got {type(name).__name__}.")
    if ":" in name:
        target = _import_target(name)
    else:
        try:
            target = _REGISTRY[name]
        except KeyError:
            raise ValueError(
                f"unknown reward {name!r}. Known rewards: {', '.join(list_rewards())}. "
                "Use 'package.module:function' for your own, or register it with @register_reward(name)."
            ) from None
        if isinstance(target, str):
            target = _import_target(target)
    if inspect.isclass(target):
        return target(**kwargs)
    return functools.partial(target, **kwargs) if kwargs else target
