"""How much of one stage's policy gradient is signal, per branch point, on the toy world.

Draws several independent stages (fresh prompts and noise, same weights), computes each stage's policy
gradient (the PPO loss gradient at ratio 1: minus the advantage-weighted sum of the interval steps'
log-probability gradients, on the kept samples), and reports the cosine similarity between the gradients of
different stages. Two gradients that each were mostly signal point the same way (cosine near 1); pure noise
gives cosines near 0. If a stage of n images gives mean cosine c, the noise-to-signal ratio of one image's
gradient is about n (1 - c) / c, which is also the number of images a gradient needs for a cosine of 0.5.

    python benchmarks/gradient_snr.py --branch_points 0 6 --rule all
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# the sibling modules import as top-level ones, whether this file runs as a script or is loaded by path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def stage_gradient(trainer, branch_point: int, seed: int):
    """
    One stage's policy gradient at ratio 1, through the trainer's own named steps (sample, score, z-score,
    select): minus the advantage-weighted sum of the kept samples' interval log-probability gradients.
    Returns ``(gradient, kept samples, mean reward)``.
    """
    import torch

    import b2trl.toy as toy
    from b2trl.models import Conditioning

    # the stage's prompts and noise both follow `seed`
    trainer.prompt_fn = common.seeded_prompts(toy.train_prompts(), seed)
    torch.manual_seed(seed)
    samples, batches = trainer.sample_stage(branch_point)
    trainer.score(batches, stage=seed)
    z, rewards = trainer.z_scores(batches)
    keep, advantages = trainer.select_samples(z)
    rows = torch.as_tensor(np.flatnonzero(keep.reshape(-1)))
    advantages = torch.as_tensor(advantages.reshape(-1)[rows.numpy()]).float()
    conditioning = Conditioning.from_rows(samples).index(rows)
    trainer.optimizer.zero_grad()
    for j in range(samples["timesteps"].shape[1]):
        log_prob = trainer.transition_log_prob(
            samples["latents"][rows, j], samples["timesteps"][rows, j], samples["next_latents"][rows, j], conditioning
        )
        (-(advantages * log_prob).sum()).backward()
    grad = torch.cat([p.grad.flatten().clone() for p in trainer.trainable_params if p.grad is not None])
    return grad, int(keep.sum()), float(np.nanmean(rewards))


def make_trainer(prompts_per_stage: int, num_branches: int, rule: str):
    """A B² trainer on the shipped toy model (LoRA), one sampling batch per stage; `stage_gradient` sets its
    prompts. Writes nothing."""
    import b2trl.toy as toy
    from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer

    config = B2DiffuRLConfig(
        num_epochs=1,
        sample_batch_size=prompts_per_stage,
        sample_num_batches_per_epoch=1,
        num_branches=num_branches,
        selection_rule=rule,
        # z-scores against this stage's rewards alone: stages stay independent, whatever was drawn before
        history_stages=0,
        mixed_precision="no",
        save_freq=0,
        log_with=None,
        project_kwargs={"project_dir": tempfile.mkdtemp(prefix="gradient_snr_")},
    )
    return B2DiffuRLTrainer(config, toy.alignment_reward, lambda: (toy.train_prompts()[0], {}), common.toy_pipeline())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branch_points", type=int, nargs="+", default=[0, 6], help="steps shared before branching")
    parser.add_argument("--rule", default="all", choices=["all", "best_worst", "pairs"], help="selection rule")
    parser.add_argument("--prompts_per_stage", type=int, default=32)
    parser.add_argument("--num_branches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4, help="independent stages per branch point")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    trainer = make_trainer(args.prompts_per_stage, args.num_branches, args.rule)
    config = trainer.config
    images = args.prompts_per_stage * args.num_branches
    results = []
    print(f"{images} images per stage, rule {args.rule!r}, {args.repeats} stages per branch point")
    print("| branch point | trained steps | kept / stage | mean cosine | cosines | noise/signal per image |")
    print("|---|---|---|---|---|---|")
    for branch_point in args.branch_points:
        t0 = time.time()
        grads = [stage_gradient(trainer, branch_point, seed) for seed in range(args.repeats)]
        cosines = [float(torch.nn.functional.cosine_similarity(a[0], b[0], dim=0))
                   for a, b in itertools.combinations(grads, 2)]
        mean = float(np.mean(cosines))
        kept = float(np.mean([g[1] for g in grads]))
        ratio = kept * (1 - mean) / mean if mean > 0 else float("inf")
        results.append(dict(branch_point=branch_point, cosines=cosines, mean_cosine=mean, kept=kept,
                            noise_to_signal_per_image=ratio, seconds=time.time() - t0))
        print(f"| {branch_point} | {config.sample_num_steps - branch_point} | {kept:.0f} | {mean:+.3f} | "
              f"{' '.join(f'{c:+.2f}' for c in cosines)} | {ratio:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), images_per_stage=images, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
