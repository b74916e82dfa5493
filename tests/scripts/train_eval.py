"""Train the tiny test pipeline in two CPU processes with evaluation during training, save_best and the rollback
guard (tests/test_evaluation_processes.py); each process writes what it decided, stage by stage.

    torchrun --nproc_per_node 2 train_eval.py MODEL_DIR PROJECT_DIR STATS_PREFIX [--epochs N]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from accelerate import PartialState  # noqa: E402

from b2trl import B2DiffuRLTrainer, load_pipeline  # noqa: E402
from eval_helpers import skewed_reward  # noqa: E402
from helpers import cycling_prompts, small_config  # noqa: E402

torch.set_num_threads(1)

EVAL_PROMPTS = ["a cat", "a dog", "a red circle"]  # three prompts on two processes: the second share is padded

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("project_dir")
parser.add_argument("stats_prefix", help="each process writes <prefix>.<rank>.jsonl")
parser.add_argument("--epochs", type=int, default=4)
args = parser.parse_args()

state = PartialState(cpu=True)
prompts = ("a cat", "a dog") if state.process_index == 0 else ("a red circle", "a blue square")
config = small_config(
    num_epochs=args.epochs, num_branches=6, sample_batch_size=1, train_learning_rate=1e-2,
    project_kwargs={"project_dir": args.project_dir}, accelerator_kwargs={"cpu": True},
    eval_prompts=EVAL_PROMPTS, eval_seeds=[0, 1], eval_every=1,
    eval_rewards=["helpers:brightness_reward", "reward_helpers:prompt_length_reward"],
    save_best=True, on_collapse="rollback",
)
# six branches with one failure each: the skew watch fires after stage 2 on the gathered statistics
trainer = B2DiffuRLTrainer(config, skewed_reward(6), cycling_prompts(prompts), load_pipeline(args.model_dir))


def record(trainer, stats):
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.trainable_params])
    everyone = trainer.accelerator.gather(flat.unsqueeze(0))
    row = {
        "rank": trainer.accelerator.process_index,
        "stats": {k: v for k, v in stats.items() if k.startswith(("eval/", "guard/", "samples_kept"))},
        "best": [trainer.guard.best_stage, trainer.guard.best_value],
        "rule": trainer.rule.name,
        "max_weight_diff_across_ranks": float((everyone - everyone[0]).abs().max()),
    }
    with open(f"{args.stats_prefix}.{row['rank']}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


trainer.stage_end_callbacks.append(record)
trainer.train()
trainer.accelerator.end_training()
sys.stdout.flush()
os._exit(0)  # as train_tiny.py: skip the interpreter teardown, where a finished gloo run occasionally aborts
