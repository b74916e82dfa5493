"""The update of a stage: training the policy on the kept samples' interval steps.

[`PolicyUpdate`] is the part of [`B2DiffuRLTrainer`] that turns a stage's kept samples (or pairs) into
optimizer steps: padding so every process runs the same backward passes, the reference pass, micro-batches
through the loss, accumulation windows and gradient synchronisation.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import logging

from . import batching
from .losses import LossOutput
from .losses.base import StageStatistics
from .models import Conditioning
from .stage import Stage
from .timing import PhaseTimer

logger = logging.get_logger(__name__)


class PolicyUpdate:
    """The training half of [`B2DiffuRLTrainer`] (a mixin: it uses the trainer's config, accelerator, family,
    sampler, loss, optimizer and prepared denoiser)."""

    def train_stage(self, stage: Stage, global_step: int) -> tuple[Stage, int]:
        """
        Train on this process's kept samples (or, for a loss over pairs, its kept groups' (winner, loser) pairs).
        Every process trains the same number of rows, known from the gathered keep mask without communication:
        padding rows have weight 0 (and advantage 0), so they add no gradient.
        """
        config, device = self.config, self.accelerator.device
        pairs = self.loss_fn.group_size == 2
        kept_per_process = stage.per_process(stage.keep)
        if pairs:
            groups = kept_per_process.reshape(stage.num_processes, -1, stage.num_branches).any(axis=2)
            counts, extra = groups.sum(axis=1), {"pairs_kept": int(groups.sum())}
        else:
            counts, extra = kept_per_process.sum(axis=1), {}
        target = int(counts.max())
        if target == 0:
            rule = config.effective_selection_rule
            why = (f"no group passed the selection thresholds ({config.selection_threshold_best}, "
                   f"{config.selection_threshold_worst})" if rule in ("best_worst", "pairs")
                   else "no sample had a nonzero advantage (every group's rewards tied)")
            logger.warning(f"Stage {stage.index}: {why} under selection_rule={rule!r}; skipping the update.")
            return stage.with_stats(**extra, skipped_update=1), global_step
        keep, advantages = stage.groups(stage.local(stage.keep)), stage.groups(stage.local(stage.advantages))
        if pairs:
            rows, weight = batching.pair_rows(stage.groups(stage.local(stage.scores)), keep, target)
        else:
            rows, weight = batching.training_rows(keep.reshape(-1), target)
        kept = {k: v[rows] for k, v in stage.transitions.items()}
        kept["row_weight"] = torch.as_tensor(weight, device=device)
        kept["advantages"] = torch.as_tensor(advantages.reshape(-1)[rows], dtype=torch.float32, device=device)
        kept["advantages"] = kept["advantages"] * kept["row_weight"]
        timings = {}
        if self.reference is not None:
            timer = PhaseTimer()
            with timer("reference"):
                kept.update(self.reference_pass(kept))
            timings = timer.stats()
        global_step, train_stats = self._train_stage(kept, global_step)
        return stage.with_stats(**extra, skipped_update=0, **timings, **train_stats), global_step

    def _train_stage(self, samples: dict, global_step: int) -> tuple[int, dict]:
        """
        The loss over the kept samples for `train_num_inner_epochs` passes. An optimizer step follows every
        `train_gradient_accumulation_steps` micro-batches (each one backward pass per interval step, or per
        `train_timesteps_per_forward` steps stacked); the last window of a pass steps with what it has. Every
        process holds the same number of rows here, so all run the same number of backward passes and
        optimizer steps. The EMA of the weights, when on, follows every optimizer step.
        """
        config = self.config
        info = StageStatistics()
        first_step = global_step
        self.training_denoiser.train()
        for _ in range(config.train_num_inner_epochs):
            for batch, scale, closes_window in batching.micro_batches(
                samples,
                batch_size=config.train_batch_size,
                accumulation_steps=config.train_gradient_accumulation_steps,
                steps_per_forward=config.train_timesteps_per_forward,
                group_size=self.loss_fn.group_size,
            ):
                sync = contextlib.nullcontext() if closes_window else self._no_sync()
                with sync:
                    out = self.micro_batch_loss(batch)
                    self.accelerator.backward(out.loss * scale)
                rows = batch["latents"].shape[0] * (1 if self.negative_conditioning is None else 2)
                self.compute.add("training", rows * self.accelerator.num_processes)
                info.add_output(out)
                if closes_window:
                    grad_norm = self._clip_grad_norm(config.train_max_grad_norm)
                    if grad_norm is not None:
                        info.add("grad_norm", grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                    global_step += 1
                    if self.ema is not None:
                        self.ema.step(global_step)
        stats = info.means(self.accelerator)
        stats["optimizer_steps"] = global_step - first_step
        return global_step, stats

    def _no_sync(self):
        """Inside an accumulation window: DDP skips its all-reduce; a sharded denoiser reduce-scatters anyway (see
        [`~b2trl.sharding.FSDP2Sharding.no_sync`])."""
        if self.sharding is not None:
            return self.sharding.no_sync(self.training_denoiser)
        return self.accelerator.no_sync(self.training_denoiser)

    def _clip_grad_norm(self, max_norm: float):
        if self.sharding is not None:
            return self.sharding.clip_grad_norm_(self.trainable_params, max_norm)
        return self.accelerator.clip_grad_norm_(self.trainable_params, max_norm)

    def micro_batch_loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The loss of one micro-batch of transitions (one row per sample and interval step), plus
        ``kl_coef * KL(π_θ ‖ π_ref)`` when the KL term is on. The unconditional half of guidance is the trainer's
        negative conditioning, held once and expanded to the micro-batch (unless the batch carries its own)."""
        conditioning = Conditioning.from_rows(batch, self.negative_conditioning)
        prediction, log_prob = self._policy_step(batch["latents"], batch["timesteps"], batch["next_latents"],
                                                 conditioning)
        out = self.loss_fn(log_prob, batch)
        if self.config.kl_coef > 0:
            kl = self.sampler.kl_divergence(
                self.sd_pipeline.scheduler, prediction, batch["ref_predictions"], batch["timesteps"], batch["latents"]
            )
            weight = batch.get("row_weight", torch.ones_like(kl))
            out.loss = out.loss + self.config.kl_coef * torch.mean(kl * weight)
            out.stats["kl_ref"] = (kl.detach() * weight).sum() / weight.sum().clamp(min=1)
            out.weights["kl_ref"] = weight.sum()
        return out

    def reference_pass(self, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference policy's ``ref_log_probs`` (and, for the KL term, ``ref_predictions``) of every kept
        transition, once per stage without gradients (see [`~b2trl.losses.reference.ReferencePolicy.evaluate`])."""
        chunk = self.config.train_batch_size * self.config.train_timesteps_per_forward
        negative = self.negative_conditioning
        rows = kept["timesteps"].numel() * (1 if negative is None else 2)
        self.compute.add("reference", rows * self.accelerator.num_processes)
        with self.autocast():
            return self.reference.evaluate(
                kept, self.family, self.sampler, self.sd_pipeline.scheduler, self.config.sample_guidance_scale,
                chunk_size=chunk, predictions=self.config.kl_coef > 0, negative=negative,
            )

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """
        The loss of one interval step for a micro-batch, as [`~trl.DDPOTrainer.calculate_loss`] computes it, but
        evaluated through the *prepared* denoiser so that distributed wrappers synchronise gradients (TRL's
        version calls the bare UNet).

        Args:
            latents, timesteps, next_latents, log_probs, advantages (`torch.Tensor`):
                One interval step of `B` rows, as TRL passes them (``sample["latents"][:, j]``, ...).
            embeds ([`~b2trl.models.Conditioning`] or `torch.Tensor`):
                The rows' conditioning: a `Conditioning` (any family; e.g. ``Conditioning.from_rows(sample)``), or,
                for SD1.x, TRL's embeddings tensor: ``cat([negative_prompt_embeds, prompt_embeds])`` (`2B` rows)
                when guidance is on (`train_cfg`), or ``prompt_embeds`` alone (`B` rows; under guidance the
                unconditional half is then the trainer's negative prompt).

        Returns:
            `(loss, approx_kl, clipfrac)`, scalars.
        """
        if not isinstance(embeds, Conditioning):
            if not torch.is_tensor(embeds):
                raise TypeError(
                    f"calculate_loss: embeds must be a Conditioning or TRL's prompt-embeddings tensor, got "
                    f"{type(embeds).__name__}."
                )
            embeds = self.family.conditioning_from_embeds(embeds, latents.shape[0], self.negative_conditioning)
        batch = {
            **embeds.to_rows(), "latents": latents, "timesteps": timesteps, "next_latents": next_latents,
            "log_probs": log_probs, "advantages": advantages,
        }
        out = self.micro_batch_loss(batch)
        return out.loss, out.stats["approx_kl"], out.stats["clipfrac"]

    def transition_log_prob(self, latents, timesteps, next_latents, conditioning: Conditioning) -> torch.Tensor:
        """Log-probability of ``latents -> next_latents`` under the current policy (with gradients)."""
        return self._policy_step(latents, timesteps, next_latents, conditioning)[1]

    def _policy_step(self, latents, timesteps, next_latents, conditioning):
        """The current policy's guided prediction and its log-probability of the transitions (with gradients)."""
        with self.autocast():
            prediction = self.family.predict(
                self.training_denoiser, latents, timesteps, conditioning, self.config.sample_guidance_scale
            )
            scheduler = self.sd_pipeline.scheduler
            step = self.sampler.step(scheduler, prediction, timesteps, latents, prev_sample=next_latents)
            return prediction, step.log_prob
