"""The first half of a stage: the branch rollouts and their rewards, gathered once across processes.

[`StageSampling`] is the part of [`B2DiffuRLTrainer`] that turns prompts into a [`~b2trl.stage.Stage`] with
recorded transitions and images ([`StageSampling.sample_stage`]), and scores it
([`StageSampling.score`]): the reward function is called once per sampling batch, and every process's prompts and
rewards (and a composite reward's parts) are gathered in one collective call.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from accelerate.utils import gather_object

from .models import Conditioning
from .rollout import branch_rollout
from .scoring import call_reward_function, callable_name, check_rewards, next_prompt, reward_parts
from .stage import Stage


class StageSampling:
    """The sampling half of [`B2DiffuRLTrainer`] (a mixin: it uses the trainer's config, accelerator, family,
    sampler, pipeline, prompt and reward functions)."""

    def encode(self, prompts) -> Conditioning:
        """The conditioning of `prompts`, one row each, with the unconditional half when the family runs
        classifier-free guidance."""
        with torch.no_grad():
            cond = self.family.encode_prompts(
                self.sd_pipeline.sd_pipeline, list(prompts), self.accelerator.device, self.image_size
            )
            # per-row inputs set by the config (FLUX.1-dev's guidance), stored with the samples like the prompt's
            cond.update(self.family.sampling_inputs(
                self.sd_pipeline.sd_pipeline, self.config, len(prompts), self.accelerator.device
            ))
        return Conditioning.from_rows({f"cond.{k}": v for k, v in cond.items()}, self.negative_conditioning)

    def _rollouts(self, iterations: int, batch_size: int, first_step: int, end_step: Optional[int]):
        """`iterations` branch rollouts of `batch_size` prompts each: ``(prompts, metadata, conditioning,
        rollout)`` per sampling batch."""
        config = self.config
        self.denoiser.eval()
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self._next_prompt() for _ in range(batch_size)])
            conditioning = self.encode(prompts)
            if getattr(self, "sharding", None) is not None:
                # the rollout reads the denoiser's dtype: its registered parameters must be the float32 shards, not
                # the bf16 copies a module keeps gathered after a forward pass with reshard_after_forward=False
                self.sharding.reshard(self.denoiser)
            with self.autocast():
                rollout = branch_rollout(
                    self.sd_pipeline,
                    conditioning,
                    sampler=self.sampler,
                    num_inference_steps=config.sample_num_steps,
                    branch_point=first_step,
                    interval_end=end_step,
                    num_branches=config.num_branches,
                    guidance_scale=config.sample_guidance_scale,
                    chunk_size=config.rollout_chunk_size,
                    image_size=self.image_size,
                    independent_noise=config.independent_noise,
                )
            self.compute.add("sampling", rollout.denoiser_rows * self.accelerator.num_processes)
            yield prompts, prompt_metadata, conditioning, rollout

    def sample_stage(self, index: int, interval: Optional[tuple[int, int]] = None) -> Stage:
        """Stage `index`'s branch rollouts (branches fork at the interval's first step; the interval's steps are
        recorded), as a [`~b2trl.stage.Stage`] holding this process's transitions, images and prompts. `interval`
        ``(first_step, end_step)`` replaces the schedule's (for probes of a chosen interval)."""
        config = self.config
        first, end = interval or config.interval_schedule.interval(index, config.sample_num_steps)
        transitions, images, prompts, metadata, sizes = [], [], [], [], []
        n = config.num_branches
        for batch_prompts, batch_metadata, conditioning, rollout in self._rollouts(
            config.sample_num_batches_per_epoch, config.sample_batch_size, first, end
        ):
            transitions.append(rollout.transitions(conditioning))
            images.append(rollout.images)
            prompts.extend(p for p in batch_prompts for _ in range(n))
            metadata.extend(m for m in batch_metadata for _ in range(n))
            sizes.append(rollout.images.shape[0])
        return Stage(
            index=index,
            interval=(first, end),
            num_branches=n,
            transitions={k: torch.cat([t[k] for t in transitions]) for k in transitions[0]},
            negative=self.negative_conditioning,
            prompts=tuple(prompts),
            prompt_metadata=tuple(metadata),
            images=torch.cat(images),
            batch_sizes=tuple(sizes),
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
        )

    def _generate_samples(self, iterations: int, batch_size: int, branch_point: int = 0,
                          interval_end: Optional[int] = None):
        """
        TRL's sampling entry point: `iterations` batches of `batch_size` prompts, each with `num_branches` branches
        forking at `branch_point` and recorded until `interval_end` (the last step by default). Returns one
        DDPO-layout sample dict per batch (rows grouped by prompt, time axis = interval steps, the prompt's
        conditioning under ``cond.*`` keys and the unconditional half under ``uncond.*`` keys, as views of the one
        row the trainer holds) and one [`~b2trl.stage.SampleBatch`] per batch. For a family that TRL's DDPO
        trains (SD1.x), each dict also carries TRL's keys ``prompt_ids``, ``prompt_embeds`` and (with guidance)
        ``negative_prompt_embeds``, the same tensors as ``cond.*`` and ``uncond.*`` under TRL's names.
        """
        samples, batches = [], []
        for prompts, metadata, conditioning, rollout in self._rollouts(iterations, batch_size, branch_point,
                                                                        interval_end):
            sample = rollout.transitions(conditioning)
            rows = sample["latents"].shape[0]
            # the unconditional half per row, as TRL's sample dicts carry it: views of the one row held, not copies
            for key, value in (self.negative_conditioning or {}).items():
                sample[f"uncond.{key}"] = value.expand(rows, *value.shape[1:])
            sample.update(self.family.trl_sample_keys(self.sd_pipeline.sd_pipeline, prompts, sample,
                                                      self.config.num_branches))
            samples.append(sample)
            batches.append(rollout.sample_batch(prompts, metadata))
        return samples, batches

    def _next_prompt(self) -> tuple[str, Any]:
        return next_prompt(self.prompt_fn)

    def compute_rewards(self, prompt_image_pairs, is_async: bool = False):
        """Score every batch; with `is_async` the batches are scored concurrently in a thread pool."""
        return call_reward_function(
            self.reward_fn, prompt_image_pairs, self.accelerator.device, self.executor if is_async else None
        )

    def score(self, stage: Stage) -> Stage:
        """The stage with its rewards: the reward function on every sampling batch, then every process's prompts,
        rewards and reward parts gathered in one call."""
        try:
            rewards, metadata = self.compute_rewards(stage.batches(), is_async=self.config.async_reward_computation)
        except Exception as err:
            raise RuntimeError(
                f"reward_function {callable_name(self.reward_fn)} raised at stage {stage.index}: {err!r}"
            ) from err
        rewards = check_rewards(
            rewards, stage.batches(), stage.index, callable_name(self.reward_fn), self.config.drop_nonfinite_rewards
        )
        local = torch.cat(rewards).cpu().double().numpy()
        parts, values, weights = reward_parts(metadata, stage.batch_sizes)
        payload = {"prompts": list(stage.prompts), "rewards": local, "parts": parts, "values": values}
        gathered = gather_object([payload]) if stage.num_processes > 1 else [payload]
        names = set.intersection(*(set(g["parts"]) for g in gathered))
        logged = {}
        for name in sorted(set().union(*(g["values"] for g in gathered))):
            part = np.concatenate([g["values"].get(name, np.zeros(0)) for g in gathered])
            if np.isfinite(part).any():  # a part may have no values this stage
                logged[f"reward/{name}"] = float(np.nanmean(part))
        return stage.replace(
            reward_metadata=tuple(metadata),
            all_prompts=tuple(p for g in gathered for p in g["prompts"]),
            rewards=np.concatenate([g["rewards"] for g in gathered]),
            reward_components={n: np.concatenate([g["parts"][n] for g in gathered]) for n in sorted(names)},
            reward_weights=weights,
        ).with_stats(**logged)

    def call_image_hook(self, stage: Stage, global_step: int) -> None:
        """TRL's image hook, with this process's scored batches (``[images, prompts, metadata, rewards,
        reward_metadata]`` each)."""
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(stage.scored_batches(), global_step, tracker)
