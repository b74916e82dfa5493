"""The `b2trl` command: `b2trl train`, `b2trl eval` and `b2trl toy` (also `python -m b2trl ...`, and
`accelerate launch -m b2trl train ...` / `torchrun -m b2trl train ...` for several processes).

Each subcommand is a module with ``main(argv)``: [`~b2trl.cli.train.main`], [`~b2trl.cli.evaluate.main`],
[`~b2trl.cli.toy.main`]. Their flags are the fields of dataclasses (the command's own arguments,
`B2DiffuRLConfig`, `IntervalSchedule`), so a field added to the configuration is a flag without more code.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

# subcommand -> (module, one line for the overview); modules are imported only when run (--help stays fast)
COMMANDS = {
    "train": ("b2trl.cli.train", "fine-tune a model with B²-DiffuRL or another method (flags or --config run.yaml)"),
    "eval": ("b2trl.cli.evaluate", "score a base model and its LoRA / EMA / full fine-tunes with one or more rewards"),
    "toy": ("b2trl.cli.toy", "the offline toy job: train on the shipped toy world, held-out alignment before/after"),
}


def usage() -> str:
    from .. import __version__

    lines = [f"usage: b2trl {{{','.join(COMMANDS)}}} [FLAGS ...]", "",
             f"b2trl {__version__}: reinforcement learning for text-to-image diffusion models (B²-DiffuRL on TRL).",
             "", "commands:"]
    lines += [f"  {name:7s}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`b2trl COMMAND --help` lists a command's flags. Start with `b2trl toy` (offline, a few minutes on a "
              "CPU).", "Several processes: accelerate launch -m b2trl train ...  |  torchrun --nproc_per_node N -m "
              "b2trl train ..."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    Run the `b2trl` command line (the console script's entry point). Errors stop it with one line on stderr and a
    non-zero exit status; a subcommand's result (a run's summary) is in the files it writes, or returned by the
    subcommand module's own ``main``.
    """
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"b2trl {__version__}")
        return None
    if argv[0] not in COMMANDS:
        raise SystemExit(f"error: unknown command {argv[0]!r}; b2trl's commands are {', '.join(COMMANDS)} "
                         "(b2trl --help)")
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
