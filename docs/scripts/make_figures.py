"""Draw the figures of the Concepts page into docs/img/.

    python docs/scripts/make_figures.py

- ``interval_schedule.png``: which denoising steps are trained at each stage, for the reference schedule and
  for one that starts from the last step (computed with `b2trl.schedule.IntervalSchedule`, so the figure is
  the code's schedule);
- ``branch_rollout.png``: one prompt's branch rollout (shared prefix, fork, N branches, rewards, selection).

Needs matplotlib (in the ``dev`` and ``examples`` extras). The PNGs are committed; rerun this after changing
the schedule's formula or the figures.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Patch  # noqa: E402

from b2trl.schedule import IntervalSchedule  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "img")
PREFIX_COLOUR = "#d9d9d9"
INTERVAL_COLOUR = "#4c72b0"
BEST_COLOUR = "#2ca02c"
WORST_COLOUR = "#d62728"
DROPPED_COLOUR = "#9e9e9e"
# no software/version text in the files, so rerunning with another matplotlib does not change them needlessly
PNG_METADATA = {"Software": None}


def draw_schedule(path: str, num_steps: int = 20, num_stages: int = 100) -> None:
    schedules = [
        ("reference: IntervalSchedule(initial_length=14, num_stages=100)", IntervalSchedule(14, num_stages)),
        ("IntervalSchedule.from_last_step(num_stages=100)", IntervalSchedule.from_last_step(num_stages)),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (title, schedule) in zip(axes, schedules):
        lengths = np.array(schedule.lengths(num_steps, num_stages))
        branch_points = num_steps - lengths
        stages = np.arange(num_stages)
        # denoising step index on the y axis: 0 (pure noise) at the top, T - 1 (the image) at the bottom
        grid = np.zeros((num_steps, num_stages))
        for k, b in enumerate(branch_points):
            grid[b:, k] = 1.0
        cmap = matplotlib.colors.ListedColormap([PREFIX_COLOUR, INTERVAL_COLOUR])
        ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest",
                  extent=(-0.5, num_stages - 0.5, num_steps - 0.5, -0.5))
        ax.step(stages, branch_points - 0.5, where="mid", color="black", linewidth=1.2)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("stage k (one sample → score → train round)")
        ax.set_xlim(-0.5, num_stages - 0.5)
        first_full = int(np.argmax(lengths == num_steps)) if (lengths == num_steps).any() else None
        if first_full is not None:
            ax.axvline(first_full - 0.5, color="white", linestyle=":", linewidth=1)
            ax.annotate(f"whole trajectory\nfrom stage {first_full}", xy=(first_full, 15), xytext=(first_full - 28, 15),
                        fontsize=8, color="white", va="center", arrowprops=dict(arrowstyle="->", color="white"))
        ax.annotate(f"branch point b_k = T − L_k\n(stage 0: b = {branch_points[0]}, L = {lengths[0]})",
                    xy=(8, branch_points[8] - 0.5), xytext=(3, 1.6),
                    fontsize=8, arrowprops=dict(arrowstyle="->"))
    axes[0].set_ylabel(f"denoising step (0 = noise, {num_steps - 1} = last)")
    axes[0].set_yticks(range(0, num_steps, 2))
    fig.legend(
        handles=[
            Patch(color=PREFIX_COLOUR, label="shared prefix: sampled once per prompt, not trained"),
            Patch(color=INTERVAL_COLOUR, label="interval: the last L_k steps, branched and trained"),
        ],
        loc="lower center", ncol=2, fontsize=9, frameon=False,
    )
    fig.suptitle(f"Backward progressive training, T = {num_steps} DDIM steps", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)


def draw_branch_rollout(path: str, num_steps: int = 20, branch_point: int = 6, num_branches: int = 5) -> None:
    rng = np.random.default_rng(3)
    fig, ax = plt.subplots(figsize=(11, 4.6))
    ax.axvspan(0, branch_point, color=PREFIX_COLOUR, alpha=0.6, linewidth=0)
    ax.axvspan(branch_point, num_steps, color=INTERVAL_COLOUR, alpha=0.12, linewidth=0)

    # the shared prefix: one path from the initial noise to the branch-point latent
    prefix = np.concatenate([[0.0], np.cumsum(rng.normal(0, 0.25, branch_point))])
    prefix -= prefix[-1]
    ax.plot(range(branch_point + 1), prefix, color="black", linewidth=2.2)
    ax.plot([0], [prefix[0]], "o", color="black")
    ax.annotate("x_T (noise)", (0, prefix[0]), xytext=(0.1, prefix[0] - 0.55), fontsize=9)
    ax.plot([branch_point], [0], "D", color="black", markersize=7)
    ax.annotate(f"branch point b = T − L = {branch_point}\n(copied N = {num_branches} times, bit-identical)",
                (branch_point, 0), xytext=(branch_point - 5.6, -2.3), fontsize=9,
                arrowprops=dict(arrowstyle="->"))

    # the branches: each finishes the interval with its own noise
    rewards = np.array([0.31, 0.24, 0.28, 0.35, 0.27])
    z = np.round((rewards - rewards.mean()) / rewards.std(), 2)
    best, worst = int(np.argmax(z)), int(np.argmin(z))
    ends = np.linspace(1.9, -1.9, num_branches)
    steps = np.arange(branch_point, num_steps + 1)
    for i in range(num_branches):
        walk = np.concatenate([[0.0], np.cumsum(rng.normal(0, 0.12, len(steps) - 1))])
        drift = np.linspace(0, 1, len(steps)) ** 0.8 * ends[i]
        colour = BEST_COLOUR if i == best else WORST_COLOUR if i == worst else DROPPED_COLOUR
        ax.plot(steps, walk - walk[-1] * np.linspace(0, 1, len(steps)) + drift, color=colour, linewidth=1.8)
        status = "kept: best, z ≥ +0.5" if i == best else "kept: worst, z < −0.5" if i == worst else "dropped"
        box = FancyBboxPatch((num_steps + 0.3, ends[i] - 0.3), 0.6, 0.6, boxstyle="round,pad=0.02",
                             facecolor=colour, alpha=0.85, edgecolor="black", linewidth=0.6)
        ax.add_patch(box)
        ax.text(num_steps + 1.1, ends[i], f"image {i + 1}: reward {rewards[i]:.2f}, z = {z[i]:+.2f}  ({status})",
                va="center", fontsize=8.5)

    ax.text(branch_point / 2, 2.55, "shared prefix\nsteps 0 … b−1: once per prompt,\nno gradients, nothing recorded",
            ha="center", va="center", fontsize=9)
    ax.text((branch_point + num_steps) / 2, 2.55,
            "interval: the last L steps, N branches as one batch;\nlatents, timesteps and log-probs recorded",
            ha="center", va="center", fontsize=9)
    ax.set_xlim(-0.3, num_steps + 8.6)
    ax.set_ylim(-3.0, 3.1)
    ax.set_xticks(list(range(0, num_steps + 1, 2)))
    ax.set_xlabel(f"denoising step (T = {num_steps})")
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_bounds(0, num_steps)
    ax.set_title("One group: a prompt's branch rollout, its rewards, z-scores and the best/worst selection",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=OUT, help="where the PNGs go (default: docs/img)")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    draw_schedule(os.path.join(args.output_dir, "interval_schedule.png"))
    draw_branch_rollout(os.path.join(args.output_dir, "branch_rollout.png"))
    print(f"wrote interval_schedule.png and branch_rollout.png to {args.output_dir}")


if __name__ == "__main__":
    main()
