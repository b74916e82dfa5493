"""Run examples/train_sd.py as a script, then save what this process trained (used by the multi-process test).

    python run_example.py [train_sd.py flags...]        # PROBE_DIR=<folder> in the environment

The example runs unchanged as ``__main__`` with the given flags. Its trainer is recorded on construction, and
when the script returns, this process's trainable parameters (as constructed and as trained) are saved to
``$PROBE_DIR/rank<process index>.pt``, so that a test can compare processes without the example writing anything
for it.
"""

import os
import runpy
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
EXAMPLE = TESTS.parent / "examples" / "train_sd.py"
sys.path.insert(0, str(TESTS))  # for --reward helpers:brightness_reward

import b2trl  # noqa: E402

trainers = []


def trainable(trainer) -> list:
    # the optimizer holds exactly the trained parameters, whatever the model family calls its modules
    return [p.detach().cpu().clone() for group in trainer.optimizer.param_groups for p in group["params"]]


class RecordedTrainer(b2trl.B2DiffuRLTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial_params = trainable(self)
        trainers.append(self)


b2trl.B2DiffuRLTrainer = RecordedTrainer  # the example's `from b2trl import B2DiffuRLTrainer` picks this up
sys.argv = [str(EXAMPLE), *sys.argv[1:]]
runpy.run_path(str(EXAMPLE), run_name="__main__")
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
