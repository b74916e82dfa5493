"""B²-DiffuRL on top of TRL's `DDPOTrainer`.

One `train()` epoch is one stage: branch rollout → rewards → per-prompt z-scores over the history →
best/worst selection per group → PPO-clip on the kept samples' interval steps → the schedule advances.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import defaultdict
from concurrent import futures
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator, logging
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm
from trl import DDPOTrainer

from . import checkpoint as ckpt
from .config import B2DiffuRLConfig
from .pipeline import ensure_accelerate_state
from .rollout import branch_rollout, guided_noise_prediction
from .selection import PromptRewardHistory, select, stage_advantages

logger = logging.get_logger(__name__)

# keys of a recorded sample that have a time axis (one entry per interval step)
TIME_KEYS = ("timesteps", "latents", "next_latents", "log_probs")


def _callable_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class B2DiffuRLTrainer(DDPOTrainer):
    """
    Trains a diffusion model with B²-DiffuRL: branch-based sampling and backward progressive training of the
    final denoising steps, against a sparse (end-of-trajectory) reward.

    Same constructor as [`~trl.DDPOTrainer`]; works with [`~trl.DefaultDDPOStableDiffusionPipeline`] (LoRA or
    full fine-tuning).

    Args:
        config ([`B2DiffuRLConfig`]): Training configuration.
        reward_function (`Callable[[torch.Tensor, tuple[str], tuple[Any]], tuple[torch.Tensor, Any]]`):
            Scores images: `(images (B,3,H,W) in [0,1], prompts, prompt_metadata) -> (rewards (B,), metadata)`.
        prompt_function (`Callable[[], tuple[str, Any]]`): Returns one `(prompt, metadata)` per call.
        sd_pipeline ([`~trl.DDPOStableDiffusionPipeline`]): The pipeline to fine-tune.
        image_samples_hook (`Callable[[Any, int, Any], Any]`, *optional*):
            Called once per stage with `(prompt_image_data, global_step, tracker)`; `tracker` is `None` when no
            tracker is configured.
    """

    _tag_names = ["trl", "b2trl", "b2-diffurl"]

    def __init__(
        self,
        config: B2DiffuRLConfig,
        reward_function: Callable[[torch.Tensor, tuple[str], tuple[Any]], Any],
        prompt_function: Callable[[], tuple[str, Any]],
        sd_pipeline,
        image_samples_hook: Optional[Callable[[Any, Any, Any], Any]] = None,
    ):
        if not isinstance(config, B2DiffuRLConfig):
            raise TypeError(f"config must be a B2DiffuRLConfig, got {type(config).__name__}.")
        # The base constructor is not called: it fixes gradient accumulation from `train_timestep_fraction`,
        # logs before accelerate has a state, and keeps the unwrapped UNet for training. What it sets up is
        # rebuilt here in the order this trainer needs.
        self.config = config
        self.reward_fn = reward_function
        self.prompt_fn = prompt_function
        self.image_samples_callback = image_samples_hook
        self.accelerator = self._build_accelerator()
        if image_samples_hook is None:
            logger.info("No image_samples_hook provided; no images will be logged.")
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers(
                config.tracker_project_name, config=config.to_dict(), init_kwargs=config.tracker_kwargs
            )
        set_seed(config.seed, device_specific=True)

        self.sd_pipeline = sd_pipeline
        self.sd_pipeline.set_progress_bar_config(disable=True)
        self.use_lora = bool(getattr(sd_pipeline, "use_lora", False))
        inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        device = self.accelerator.device
        self.sd_pipeline.vae.to(device, dtype=inference_dtype)
        self.sd_pipeline.text_encoder.to(device, dtype=inference_dtype)
        # full fine-tuning keeps fp32 master weights; with LoRA only the frozen base is cast down
        self.sd_pipeline.unet.to(device, dtype=inference_dtype if self.use_lora else torch.float32)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        trainable = self.sd_pipeline.get_trainable_layers()
        params = trainable if isinstance(trainable, list) else [p for p in trainable.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The pipeline has no trainable parameters: get_trainable_layers() returned none.")
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        optimizer = self._setup_optimizer(params)
        with torch.no_grad():
            self.neg_prompt_embed = self._encode_prompts([config.negative_prompts or ""])
        self.autocast = self.sd_pipeline.autocast or self.accelerator.autocast

        if isinstance(trainable, list):
            # a parameter list cannot be wrapped for DDP; it trains on one process only
            self.trainable_params, self.optimizer = self.accelerator.prepare(trainable, optimizer)
            self.training_unet = self.sd_pipeline.unet
        else:
            # train through the prepared module so that DDP sees the forward and all-reduces gradients
            self.training_unet, self.optimizer = self.accelerator.prepare(trainable, optimizer)
            self.trainable_params = [p for p in self.training_unet.parameters() if p.requires_grad]
        if config.compile_unet:
            from .pipeline import compile_unet

            # in place, after the LoRA adapter exists: the prepared (possibly DDP-wrapped) module is unchanged
            compile_unet(self.sd_pipeline.unet, **config.compile_unet_kwargs)
        self.executor = futures.ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self.history = PromptRewardHistory(config.history_stages)
        self.first_epoch = 0
        self.global_step = 0
        # called as fn(trainer, stats) after every stage, e.g. to write metrics to disk as training goes
        self.stage_end_callbacks: list[Callable[["B2DiffuRLTrainer", dict], None]] = []
        if config.resume_from:
            self.resume(config.resume_from)

    # ------------------------------------------------------------------ set-up

    def _build_accelerator(self) -> Accelerator:
        config = self.config
        ensure_accelerate_state(**({"cpu": True} if config.accelerator_kwargs.get("cpu") else {}))
        mixed_precision = config.mixed_precision
        if mixed_precision == "fp16" and not torch.cuda.is_available():
            logger.warning("mixed_precision='fp16' needs a GPU; training in fp32 on this CPU-only machine.")
            mixed_precision = "no"
        project = dict(config.project_kwargs)
        project.setdefault("project_dir", os.path.join(config.logdir, config.run_name or config.exp_name or "b2trl"))
        project.setdefault("total_limit", config.num_checkpoint_limit)
        # checkpoints are named by stage and written atomically here, not by accelerate's counter
        project["automatic_checkpoint_naming"] = False
        checkpoints = os.path.join(project["project_dir"], "checkpoints")
        if config.save_freq > 0 and not config.resume_from and ckpt.complete_checkpoints(checkpoints):
            # found now, not after a stage of work when the first checkpoint would collide
            raise ValueError(
                f"{checkpoints} already holds checkpoints of another run. Continue it with "
                "resume_from='latest', or use another project_dir (project_kwargs / output folder)."
            )
        # accumulation is decided per stage (the interval length and kept count change), so the
        # accelerator itself never accumulates
        return Accelerator(
            log_with=config.log_with,
            mixed_precision=mixed_precision,
            project_config=ProjectConfiguration(**project),
            gradient_accumulation_steps=1,
            **config.accelerator_kwargs,
        )

    def _config_check(self) -> tuple[bool, str]:
        errors = self.config.validation_errors()
        return (not errors, "\n".join(errors))

    def _encode_prompts(self, prompts) -> torch.Tensor:
        tokenizer = self.sd_pipeline.tokenizer
        ids = tokenizer(
            list(prompts),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
        ).input_ids.to(self.accelerator.device)
        return self.sd_pipeline.text_encoder(ids)[0]

    def _save_model_hook(self, models, weights, output_dir):
        unwrapped = [self.accelerator.unwrap_model(m) for m in models]
        if self.accelerator.is_main_process:
            self.sd_pipeline.save_checkpoint(unwrapped, weights, output_dir)
        if weights:
            weights.pop()  # the pipeline wrote the weights; accelerate must not write them again

    def _load_model_hook(self, models, input_dir):
        unet = self.accelerator.unwrap_model(models[0])
        if self.use_lora:
            # into the adapter the optimizer holds (TRL adds a second adapter here, and nothing trains after)
            ckpt.load_lora_into_unet(unet, input_dir)
        else:
            from diffusers import UNet2DConditionModel

            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            unet.load_state_dict(loaded.state_dict())
        models.pop()

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.accelerator.project_dir, "checkpoints")

    def save_checkpoint(self, stage: int) -> str:
        """
        Checkpoint the state after `stage` into ``checkpoints/checkpoint_<stage>``: trained weights, optimizer,
        RNG states, stage, global step and per-prompt reward history. Every process takes part (FSDP and
        DeepSpeed need it); the folder appears only once complete.
        """
        root, main = self.checkpoint_dir, self.accelerator.is_main_process
        partial, final = os.path.join(root, ckpt.partial_name(stage)), os.path.join(root, ckpt.checkpoint_name(stage))
        if main:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(output_dir=partial)
            self.accelerator.wait_for_everyone()
            if main:
                state = {"stage": stage, "global_step": self.global_step, "history": self.history.state_dict()}
                ckpt.write_state(partial, state)
                ckpt.finalize(partial, final)
                ckpt.prune(root, self.accelerator.project_configuration.total_limit)
        except OSError as err:
            if main:
                shutil.rmtree(partial, ignore_errors=True)
            done = ckpt.complete_checkpoints(root)
            last = done[-1][1] if done else "none"
            raise OSError(
                f"Could not write the checkpoint of stage {stage} ({err}). The last complete checkpoint is {last}."
            ) from err
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, resume_from: str) -> None:
        """Restore a checkpoint (a folder, a run folder, or ``"latest"``); training continues after its stage."""
        path = ckpt.resolve_resume_path(resume_from, self.checkpoint_dir)
        state = ckpt.read_state(path)
        self.accelerator.load_state(path)
        self.history.load_state_dict(state["history"])
        self.global_step = int(state["global_step"])
        self.first_epoch = int(state["stage"]) + 1
        logger.info(f"Resumed from {path}: continuing at stage {self.first_epoch}.")

    def load_lora_weights(self, folder: str) -> None:
        """Continue training from LoRA weights saved by `save_pretrained` (or pushed to the Hub and downloaded)."""
        if not self.use_lora:
            raise ValueError("load_lora_weights needs a LoRA pipeline (use_lora=True).")
        ckpt.load_lora_into_unet(self.accelerator.unwrap_model(self.training_unet), folder)

    # ------------------------------------------------------------------ one stage

    def step(self, epoch: int, global_step: int) -> int:
        """
        Run stage `epoch`: sample, score, select, train. Returns the updated `global_step` (optimizer steps).
        """
        config, stage = self.config, epoch
        num_steps = config.sample_num_steps
        length = config.interval_schedule.length(stage, num_steps)
        branch_point = num_steps - length

        # 1. branch rollout: a shared prefix per prompt, then N branches over the interval
        samples, prompt_image_data = self._generate_samples(
            config.sample_num_batches_per_epoch, config.sample_batch_size, branch_point=branch_point
        )
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}

        # 2. rewards
        try:
            rewards, rewards_metadata = self.compute_rewards(
                prompt_image_data, is_async=config.async_reward_computation
            )
        except Exception as err:
            raise RuntimeError(
                f"reward_function {_callable_name(self.reward_fn)} raised at stage {stage}: {err!r}"
            ) from err
        rewards = self._check_rewards(rewards, prompt_image_data, stage)
        for data, reward, metadata in zip(prompt_image_data, rewards, rewards_metadata):
            data.extend([reward, metadata])
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(prompt_image_data, global_step, tracker)

        # 3. per-prompt z-scores over the history (on every process, from the gathered rewards)
        local_rewards = torch.cat(rewards)
        all_rewards = self.accelerator.gather(local_rewards).cpu().numpy().astype(np.float64)
        local_prompts = [p for data in prompt_image_data for p in data[1]]
        all_prompts = gather_object(local_prompts) if self.accelerator.num_processes > 1 else local_prompts
        z = self.history.update(all_prompts, all_rewards)
        z = z.reshape(self.accelerator.num_processes, -1)[self.accelerator.process_index]

        # 4. best/worst selection per group; groups never cross processes
        keep = select(
            z.reshape(-1, config.num_branches),
            config.selection_rule,
            config.selection_threshold_best,
            config.selection_threshold_worst,
        )
        advantages = stage_advantages(z.reshape(keep.shape), keep, config.selection_rule, config.train_adv_clip_max)
        samples["advantages"] = torch.as_tensor(
            advantages.reshape(-1), dtype=torch.float32, device=self.accelerator.device
        )
        self.last_local_kept = int(keep.sum())
        # how kept samples are pushed up vs down: when the advantages sum far below zero, the update mostly pushes
        # likelihoods down, which degrades a model faster than the positive samples teach it
        kept_adv = advantages[keep]
        signs = self.accelerator.gather(
            torch.tensor(
                [float((kept_adv > 0).sum()), float((kept_adv < 0).sum()), float(kept_adv.sum())],
                device=self.accelerator.device,
            )
        ).reshape(-1, 3).sum(0)
        kept_counts = self.accelerator.gather(
            torch.tensor([int(keep.sum())], device=self.accelerator.device)
        ).cpu()
        stats = {
            "stage": stage,
            "reward_mean": float(np.nanmean(all_rewards)),
            "reward_std": float(np.nanstd(all_rewards)),
            "rewards_dropped": int(np.isnan(all_rewards).sum()),
            "interval_length": length,
            "branch_point": branch_point,
            "groups_kept": int(self.accelerator.gather(torch.tensor([int(keep.any(1).sum())],
                                                                    device=self.accelerator.device)).sum()),
            "groups_total": int(keep.shape[0] * self.accelerator.num_processes),
            "samples_kept": int(kept_counts.sum()),
            "samples_total": int(all_rewards.size),
            "samples_kept_positive": int(signs[0]),
            "samples_kept_negative": int(signs[1]),
            "kept_advantage_sum": float(signs[2]),
        }
        stats.update(self._reward_components(rewards_metadata))

        # 5. PPO-clip on the kept samples' interval steps
        if int(kept_counts.max()) == 0:
            logger.warning(
                f"Stage {stage}: no group passed the selection thresholds "
                f"({config.selection_threshold_best}, {config.selection_threshold_worst}); skipping the update."
            )
            stats["skipped_update"] = 1
        else:
            stats["skipped_update"] = 0
            rows, is_padding = pad_rows(keep.reshape(-1), int(kept_counts.max()))
            kept = {k: v[rows] for k, v in samples.items()}
            kept["advantages"] = kept["advantages"].masked_fill(
                torch.as_tensor(is_padding, device=self.accelerator.device), 0.0
            )
            global_step, train_stats = self._train_stage(kept, stage, global_step)
            stats.update(train_stats)
        self.accelerator.log(stats, step=stage)
        self.last_stage_stats = stats
        for callback in self.stage_end_callbacks:
            callback(self, stats)

        # 6. checkpoint (every process takes part: FSDP/DeepSpeed need all of them)
        if config.save_freq > 0 and (stage + 1) % config.save_freq == 0:
            self.global_step = global_step
            self.save_checkpoint(stage)
        return global_step

    def _generate_samples(self, iterations: int, batch_size: int, branch_point: int = 0):
        """
        Sample `iterations` batches of `batch_size` prompts, each with `num_branches` branches forking at
        `branch_point`. Returns DDPO-layout sample dicts (rows grouped by prompt, time axis = interval steps)
        and `[images, prompts, prompt_metadata]` per batch for the reward function.
        """
        config = self.config
        samples, prompt_image_data = [], []
        self.sd_pipeline.unet.eval()
        n = config.num_branches
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self._next_prompt() for _ in range(batch_size)])
            with torch.no_grad():
                prompt_embeds = self._encode_prompts(prompts)
                neg_embeds = self.neg_prompt_embed.repeat(batch_size, 1, 1)
            with self.autocast():
                rollout = branch_rollout(
                    self.sd_pipeline,
                    prompt_embeds,
                    neg_embeds if config.train_cfg else None,
                    num_inference_steps=config.sample_num_steps,
                    branch_point=branch_point,
                    num_branches=n,
                    guidance_scale=config.sample_guidance_scale,
                    eta=config.sample_eta,
                    chunk_size=config.rollout_chunk_size,
                )
            samples.append(
                {
                    "prompt_embeds": prompt_embeds.repeat_interleave(n, dim=0),
                    "negative_prompt_embeds": neg_embeds.repeat_interleave(n, dim=0),
                    "timesteps": rollout.timesteps,
                    "latents": rollout.latents,
                    "next_latents": rollout.next_latents,
                    "log_probs": rollout.log_probs,
                }
            )
            prompt_image_data.append(
                [
                    rollout.images,
                    tuple(p for p in prompts for _ in range(n)),
                    tuple(m for m in prompt_metadata for _ in range(n)),
                ]
            )
        return samples, prompt_image_data

    def _next_prompt(self) -> tuple[str, Any]:
        name = _callable_name(self.prompt_fn)
        try:
            result = self.prompt_fn()
        except Exception as err:
            raise RuntimeError(f"prompt_function {name} raised: {err!r}") from err
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)):
            raise TypeError(f"prompt_function {name} must return (prompt: str, metadata), got {result!r}.")
        return result

    def compute_rewards(self, prompt_image_pairs, is_async: bool = False):
        """Score every batch; with `is_async` the batches are scored concurrently in a thread pool."""
        if is_async:
            pending = [self.executor.submit(self.reward_fn, *pair[:3]) for pair in prompt_image_pairs]
            results = [job.result() for job in pending]
        else:
            results = [self.reward_fn(*pair[:3]) for pair in prompt_image_pairs]
        rewards, metadata = [], []
        for result in results:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"reward_function {_callable_name(self.reward_fn)} must return (rewards, metadata), "
                    f"got {type(result).__name__}."
                )
            # bf16/fp16 rewards are promoted: numpy has no bf16
            rewards.append(torch.as_tensor(result[0], device=self.accelerator.device).float())
            metadata.append(result[1])
        return rewards, metadata

    def _check_rewards(self, rewards, prompt_image_data, stage):
        name = _callable_name(self.reward_fn)
        for reward, (images, *_rest) in zip(rewards, prompt_image_data):
            if reward.shape != (images.shape[0],):
                raise ValueError(
                    f"reward_function {name} returned rewards of shape {tuple(reward.shape)} at stage {stage}; "
                    f"expected ({images.shape[0]},), one per image."
                )
        checked = []
        for reward in rewards:
            bad = ~torch.isfinite(reward)
            if bad.any():
                if not self.config.drop_nonfinite_rewards:
                    raise ValueError(
                        f"reward_function {name} returned non-finite rewards (NaN/inf) at stage {stage}: "
                        f"{reward.tolist()}. Fix the reward, or set drop_nonfinite_rewards=True to drop such samples."
                    )
                logger.warning(f"Stage {stage}: dropping {int(bad.sum())} samples with non-finite rewards from {name}.")
                reward = reward.masked_fill(bad, float("nan"))
            checked.append(reward)
        return checked

    @staticmethod
    def _reward_components(rewards_metadata) -> dict:
        """Means of each part a composite reward reports in ``metadata["components"]``."""
        parts = defaultdict(list)
        for metadata in rewards_metadata:
            if isinstance(metadata, dict) and isinstance(metadata.get("components"), dict):
                for name, values in metadata["components"].items():
                    parts[name].append(torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu())
        values = {name: torch.cat(v) for name, v in parts.items()}
        # a part may have no values this stage (e.g. a relation score when no prompt had a relation)
        return {f"reward/{name}": float(v.mean()) for name, v in values.items() if v.numel()}

    # ------------------------------------------------------------------ training

    def _train_stage(self, samples: dict, stage: int, global_step: int) -> tuple[int, dict]:
        """
        PPO-clip over the kept samples for `train_num_inner_epochs` passes. An optimizer step follows every
        `train_gradient_accumulation_steps` micro-batches (each one backward pass per interval step); the
        last window of a pass steps with what it has. Every process holds the same number of rows here,
        so all run the same number of backward passes and optimizer steps.
        """
        config, device = self.config, self.accelerator.device
        total, num_timesteps = samples["timesteps"].shape
        info = defaultdict(list)
        first_step = global_step
        self.training_unet.train()
        for inner_epoch in range(config.train_num_inner_epochs):
            perm = torch.randperm(total, device=device)
            shuffled = {k: v[perm] for k, v in samples.items()}
            # an independent order of the interval steps for each sample
            time_perm = torch.argsort(torch.rand(total, num_timesteps, device=device), dim=1)
            rows = torch.arange(total, device=device)[:, None]
            for key in TIME_KEYS:
                shuffled[key] = shuffled[key][rows, time_perm]
            batches = [
                slice(start, min(start + config.train_batch_size, total))
                for start in range(0, total, config.train_batch_size)
            ]
            for first in range(0, len(batches), config.train_gradient_accumulation_steps):
                window = batches[first : first + config.train_gradient_accumulation_steps]
                window_rows = sum(b.stop - b.start for b in window)
                for b_index, batch in enumerate(window):
                    sample = {k: v[batch] for k, v in shuffled.items()}
                    weight = (batch.stop - batch.start) / (window_rows * num_timesteps)
                    # several interval steps of the micro-batch go through the UNet as one batch: the same gradient
                    # in fewer, larger calls (rows are sample-major: sample i's steps are rows i*k .. i*k + k - 1)
                    for step_start in range(0, num_timesteps, config.train_timesteps_per_forward):
                        steps = slice(step_start, min(step_start + config.train_timesteps_per_forward, num_timesteps))
                        k = steps.stop - steps.start
                        embeds = sample["prompt_embeds"].repeat_interleave(k, dim=0)
                        if config.train_cfg:
                            negative = sample["negative_prompt_embeds"].repeat_interleave(k, dim=0)
                            embeds = torch.cat([negative, embeds])
                        last = b_index == len(window) - 1 and steps.stop == num_timesteps
                        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.training_unet)
                        with sync:
                            loss, approx_kl, clipfrac = self.calculate_loss(
                                sample["latents"][:, steps].flatten(0, 1),
                                sample["timesteps"][:, steps].flatten(0, 1),
                                sample["next_latents"][:, steps].flatten(0, 1),
                                sample["log_probs"][:, steps].flatten(0, 1),
                                sample["advantages"].repeat_interleave(k),
                                embeds,
                            )
                            # the loss is a mean over k steps' rows: it stands for k single-step losses
                            self.accelerator.backward(loss * weight * k)
                        info["loss"].append(loss.detach())
                        info["approx_kl"].append(approx_kl.detach())
                        info["clipfrac"].append(clipfrac.detach())
                grad_norm = self.accelerator.clip_grad_norm_(self.trainable_params, config.train_max_grad_norm)
                if grad_norm is not None:
                    info["grad_norm"].append(torch.as_tensor(grad_norm, device=device).float())
                self.optimizer.step()
                self.optimizer.zero_grad()
                global_step += 1
        stats = {k: torch.stack(v).float().mean() for k, v in info.items()}
        stats = {k: float(v) for k, v in self.accelerator.reduce(stats, reduction="mean").items()}
        stats["optimizer_steps"] = global_step - first_step
        return global_step, stats

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """
        PPO-clip loss of one interval step for a micro-batch (same inputs and outputs as
        [`~trl.DDPOTrainer.calculate_loss`]), evaluated through the *prepared* UNet so that distributed
        wrappers synchronise gradients; TRL's version calls the bare UNet.

        Returns:
            `(loss, approx_kl, clipfrac)`, scalars.
        """
        config = self.config
        log_prob = self.transition_log_prob(latents, timesteps, next_latents, embeds)
        advantages = torch.clamp(advantages, -config.train_adv_clip_max, config.train_adv_clip_max)
        ratio = torch.exp(log_prob - log_probs)
        loss = self.loss(advantages, config.train_clip_range, ratio)
        approx_kl = 0.5 * torch.mean((log_prob - log_probs) ** 2)
        clipfrac = torch.mean((torch.abs(ratio - 1.0) > config.train_clip_range).float())
        return loss, approx_kl, clipfrac

    def transition_log_prob(self, latents, timesteps, next_latents, embeds) -> torch.Tensor:
        """Log-probability of ``latents -> next_latents`` under the current policy (with gradients).

        `embeds` is ``cat([negative, prompt])`` when `train_cfg` is set (as in TRL), else the prompt embeddings.
        """
        config = self.config
        negative, positive = embeds.chunk(2) if config.train_cfg else (None, embeds)
        with self.autocast():
            noise_pred = guided_noise_prediction(
                self.training_unet, latents, timesteps, positive, negative, config.sample_guidance_scale
            )
            return self.sd_pipeline.scheduler_step(
                noise_pred, timesteps, latents, eta=config.sample_eta, prev_sample=next_latents
            ).log_probs

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str, **card_kwargs) -> str:
        """
        Save what was trained so that plain diffusers loads it.

        With LoRA: ``pytorch_lora_weights.safetensors`` (diffusers key layout) for
        ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(save_directory)``. With full fine-tuning:
        the whole pipeline, for ``StableDiffusionPipeline.from_pretrained(save_directory)``. Both get a model card
        (``README.md``); `card_kwargs` go to [`~b2trl.hub.build_model_card`]. Only the main process writes.
        """
        from .hub import build_model_card, save_trained_weights

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(self.training_unet)
            save_trained_weights(self.sd_pipeline, unet, save_directory, use_lora=self.use_lora)
            build_model_card(self, **card_kwargs).save(os.path.join(save_directory, "README.md"))
        self.accelerator.wait_for_everyone()
        return save_directory

    def push_to_hub(self, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                    commit_message: str = "Upload B²-DiffuRL weights", **card_kwargs) -> Optional[str]:
        """
        Upload the trained weights (see [`B2DiffuRLTrainer.save_pretrained`]) and their model card to `repo_id`.
        Returns the repository URL on the main process, `None` on the others.
        """
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, **card_kwargs)
            url = None
            if self.accelerator.is_main_process:
                url = push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)
            self.accelerator.wait_for_everyone()
        return url

    # ------------------------------------------------------------------ loop

    def train(self, epochs: Optional[int] = None) -> int:
        """Run stages `first_epoch .. epochs - 1` (default `config.num_epochs`); returns the global step."""
        epochs = self.config.num_epochs if epochs is None else epochs
        bar = tqdm(
            range(self.first_epoch, epochs),
            desc="B²-DiffuRL stages",
            unit="stage",
            disable=not self.accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        for epoch in bar:
            self.global_step = self.step(epoch, self.global_step)
            stats = self.last_stage_stats
            bar.set_postfix(
                reward=f"{stats['reward_mean']:.3f}",
                L=stats["interval_length"],
                kept=f"{stats['groups_kept']}/{stats['groups_total']}",
            )
        self.first_epoch = epochs
        return self.global_step


def pad_rows(keep: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """
    Row indices of the kept samples, padded to `target` rows with other (or repeated) rows.

    Padding rows are trained with advantage 0 (zero loss, zero gradient): they only make every process run the
    same number of backward passes, which DDP's all-reduce requires.

    Returns:
        `(rows, is_padding)`: int64 indices and a bool mask of the padding rows.
    """
    keep = np.asarray(keep, dtype=bool)
    kept = np.flatnonzero(keep)
    if target < len(kept):
        raise ValueError(f"target ({target}) is smaller than the number of kept rows ({len(kept)}).")
    pool = np.concatenate([np.flatnonzero(~keep), kept]) if len(keep) else kept
    extra = np.resize(pool, target - len(kept)) if target > len(kept) else np.zeros(0, dtype=np.int64)
    rows = np.concatenate([kept, extra]).astype(np.int64)
    return rows, np.arange(target) >= len(kept)
