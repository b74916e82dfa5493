"""b2trl: B²-DiffuRL for text-to-image diffusion models, built on TRL's DDPOTrainer.

The top-level names are imported lazily so that light subpackages (``b2trl.toy``,
``b2trl.rewards``, ``b2trl.schedule``) do not pay for importing TRL.
"""

__version__ = "0.1.0"

_LAZY = {
    "B2DiffuRLConfig": "b2trl.config",
    "B2DiffuRLTrainer": "b2trl.trainer",
    "IntervalSchedule": "b2trl.schedule",
    "list_methods": "b2trl.methods",
    "load_pipeline": "b2trl.models",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'b2trl' has no attribute {name!r}")


def __dir__():
    return __all__
