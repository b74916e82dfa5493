"""Run the `b2trl` command as ``python -m b2trl`` does, then save what this process trained (used by the
multi-process test).

    python run_cli.py train [flags...]        # PROBE_DIR=<folder> in the environment

The command runs unchanged as the ``b2trl`` module's ``__main__``. Its trainer is recorded on construction, and when
the command returns, this process's trainable parameters (as constructed and as trained) are saved to
``$PROBE_DIR/rank<process index>.pt``, so that a test can compare processes without the command writing anything
for it.
"""

import os
import runpy
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # for --reward helpers:brightness_reward

import b2trl.trainer  # noqa: E402

trainers = []


def trainable(trainer) -> list:
    # the optimizer holds exactly the trained parameters, whatever the model family calls its modules
    return [p.detach().cpu().clone() for group in trainer.optimizer.param_groups for p in group["params"]]


class RecordedTrainer(b2trl.trainer.B2DiffuRLTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial_params = trainable(self)
        trainers.append(self)


b2trl.trainer.B2DiffuRLTrainer = RecordedTrainer  # the command imports the trainer when it runs: it gets this one
sys.argv = ["b2trl", *sys.argv[1:]]
runpy.run_module("b2trl", run_name="__main__", alter_sys=True)
(trainer,) = trainers
torch.save(
    {"initial": trainer.initial_params, "trained": trainable(trainer)},
    Path(os.environ["PROBE_DIR"]) / f"rank{trainer.accelerator.process_index}.pt",
)
# exit without the interpreter's teardown, where a finished gloo run's background thread occasionally aborts
# (SIGABRT) after everything above is written
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
