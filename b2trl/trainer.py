"""B²-DiffuRL on top of TRL's `DDPOTrainer`.

One `train()` epoch is one stage, and [`B2DiffuRLTrainer.step`] reads as the stage's named steps: branch
rollout → rewards → per-prompt z-scores over the history → selection per group → stage statistics → training
on the kept samples' interval steps → checkpoint. What depends on the model, the sampler or the loss is behind
the seams in ``b2trl/models``, ``b2trl/samplers`` and ``b2trl/losses``.
"""

from __future__ import annotations

import os
from concurrent import futures
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import logging
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from trl import DDPOTrainer

from . import checkpoint as ckpt
from .config import B2DiffuRLConfig
from .losses import build_loss
from .losses.reference import ReferencePolicy
from .models import Conditioning, family_for_pipeline
from .pipeline import build_accelerator
from .rollout import SampleBatch, branch_rollout
from .scoring import (
    NegativeSkewWatch,
    call_reward_function,
    callable_name,
    check_rewards,
    next_prompt,
    stage_statistics,
)
from .selection import PromptRewardHistory, select, stage_advantages
from .timing import PhaseTimer
from .update import PolicyUpdate

logger = logging.get_logger(__name__)


class B2DiffuRLTrainer(PolicyUpdate, DDPOTrainer):
    """
    Trains a diffusion model with B²-DiffuRL: branch-based sampling and backward progressive training of the
    final denoising steps, against a sparse (end-of-trajectory) reward.

    Same constructor as [`~trl.DDPOTrainer`]; takes a pipeline from [`~b2trl.load_pipeline`] (any supported model
    family) or TRL's [`~trl.DefaultDDPOStableDiffusionPipeline`] (LoRA or full fine-tuning).

    Args:
        config ([`B2DiffuRLConfig`]): Training configuration.
        reward_function (`Callable[[torch.Tensor, tuple[str], tuple[Any]], tuple[torch.Tensor, Any]]`):
            Scores images: `(images (B,3,H,W) in [0,1], prompts, prompt_metadata) -> (rewards (B,), metadata)`.
        prompt_function (`Callable[[], tuple[str, Any]]`): Returns one `(prompt, metadata)` per call.
        sd_pipeline ([`~trl.DDPOStableDiffusionPipeline`]): The pipeline to fine-tune.
        image_samples_hook (`Callable[[Any, int, Any], Any]`, *optional*):
            Called once per stage with `(prompt_image_data, global_step, tracker)`: a list of
            [`~b2trl.rollout.SampleBatch`] (each unpacks like TRL's `[images, prompts, metadata, rewards,
            reward_metadata]`); `tracker` is `None` when no tracker is configured.
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
        self.family = family_for_pipeline(sd_pipeline)
        self.sampler = self.family.make_sampler(config)
        errors = self.sampler.validation_errors()
        if errors:
            raise ValueError("Invalid B2DiffuRLConfig:\n- " + "\n- ".join(errors))
        self.loss_fn = build_loss(config)
        self.accelerator = build_accelerator(config)
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
        self.family.place(self.sd_pipeline.sd_pipeline, self.accelerator.device, self.inference_dtype, self.use_lora)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        trainable = self.sd_pipeline.get_trainable_layers()
        params = trainable if isinstance(trainable, list) else [p for p in trainable.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The pipeline has no trainable parameters: get_trainable_layers() returned none.")
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        optimizer = self._setup_optimizer(params)
        self.image_size = self.family.image_size(self.sd_pipeline.sd_pipeline, config.resolution)
        self.negative_conditioning = None
        if self.family.uses_guidance(config):
            with torch.no_grad():
                # the unconditional half of guidance, encoded once (one row; expanded per batch)
                self.negative_conditioning = self.family.encode_negative(
                    self.sd_pipeline.sd_pipeline, config.negative_prompts or "", self.accelerator.device,
                    self.image_size,
                )
        self.autocast = self.sd_pipeline.autocast or self.accelerator.autocast

        if isinstance(trainable, list):
            # a parameter list cannot be wrapped for DDP; it trains on one process only
            self.trainable_params, self.optimizer = self.accelerator.prepare(trainable, optimizer)
            self.training_denoiser = self.denoiser
        else:
            # train through the prepared module so that DDP sees the forward and all-reduces gradients
            self.training_denoiser, self.optimizer = self.accelerator.prepare(trainable, optimizer)
            self.trainable_params = [p for p in self.training_denoiser.parameters() if p.requires_grad]
        self.reference = None
        if self.loss_fn.needs_reference or config.kl_coef > 0:
            self.reference = ReferencePolicy(self.denoiser, use_lora=self.use_lora, dtype=self.inference_dtype)
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        if config.compile_unet:
            from .pipeline import compile_unet

            # in place, after the LoRA adapter exists: the prepared (possibly DDP-wrapped) module is unchanged
            compile_unet(self.denoiser, **config.compile_unet_kwargs)
        self.executor = futures.ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self.history = PromptRewardHistory(config.history_stages)
        self.skew_watch = NegativeSkewWatch()
        self.first_epoch = 0
        self.global_step = 0
        # called as fn(trainer, stats) after every stage, e.g. to write metrics to disk as training goes
        self.stage_end_callbacks: list[Callable[["B2DiffuRLTrainer", dict], None]] = []
        if config.resume_from:
            self.resume(config.resume_from)

    # ------------------------------------------------------------------ set-up

    @property
    def denoiser(self):
        """The pipeline's trained network (``unet`` or ``transformer``), unwrapped."""
        return getattr(self.sd_pipeline, self.family.denoiser_name)

    @property
    def training_unet(self):
        """The prepared (possibly DDP-wrapped) denoiser that training runs through (kept for TRL's name)."""
        return self.training_denoiser

    @property
    def inference_dtype(self) -> torch.dtype:
        """The dtype of the frozen parts (VAE, text encoders, the LoRA base): the mixed precision's."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    def _save_model_hook(self, models, weights, output_dir):
        unwrapped = self.accelerator.unwrap_model(models[0])
        if self.accelerator.is_main_process:
            if self.use_lora:
                self.family.save_lora(unwrapped, output_dir)
            else:
                self.family.save_denoiser(unwrapped, output_dir)
        if weights:
            weights.pop()  # the family wrote the weights; accelerate must not write them again

    def _load_model_hook(self, models, input_dir):
        denoiser = self.accelerator.unwrap_model(models[0])
        if self.use_lora:
            # into the adapter the optimizer holds (TRL adds a second adapter here, and nothing trains after)
            self.family.load_lora(denoiser, input_dir)
        else:
            self.family.load_denoiser(denoiser, input_dir)
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
        state = {"stage": stage, "global_step": self.global_step, "history": self.history.state_dict()}
        return ckpt.save_stage(self.accelerator, self.checkpoint_dir, stage, state)

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
        self.family.load_lora(self.accelerator.unwrap_model(self.training_denoiser), folder)

    # ------------------------------------------------------------------ one stage

    def step(self, epoch: int, global_step: int) -> int:
        """
        Run stage `epoch` (one stage per TRL epoch): sample, score, select, train. Returns the updated
        `global_step` (optimizer steps). Each line is one named step of the method.
        """
        stage, timer = epoch, PhaseTimer()
        branch_point, interval_end = self.config.interval_schedule.interval(stage, self.config.sample_num_steps)
        with timer("sampling"):
            samples, batches = self.sample_stage(branch_point, interval_end)
        with timer("rewards"):
            self.score(batches, stage)
        self.call_image_hook(batches, global_step)
        z, all_rewards = self.z_scores(batches)
        keep, advantages = self.select_samples(z)
        stats = stage_statistics(self.accelerator, stage, (branch_point, interval_end), batches, all_rewards, keep,
                                 advantages)
        skew_warning = self.skew_watch.update(stats)
        if skew_warning:
            logger.warning(skew_warning)
        with timer("training"):
            global_step = self.train_kept(samples, keep, advantages, stats, global_step)
        stats.update(timer.stats())
        self.log_stage(stats)
        if self.config.save_freq > 0 and (stage + 1) % self.config.save_freq == 0:
            self.global_step = global_step
            self.save_checkpoint(stage)  # every process takes part: FSDP/DeepSpeed need all of them
        return global_step

    def sample_stage(self, branch_point: int, interval_end: Optional[int] = None) -> tuple[dict, list[SampleBatch]]:
        """The stage's branch rollouts, concatenated into one dict of transitions, and their sample batches.
        Branches fork at `branch_point`; steps ``[branch_point, interval_end)`` are recorded (`interval_end`
        defaults to the last step)."""
        config = self.config
        samples, batches = self._generate_samples(
            config.sample_num_batches_per_epoch, config.sample_batch_size, branch_point=branch_point,
            interval_end=interval_end,
        )
        return {k: torch.cat([s[k] for s in samples]) for k in samples[0]}, batches

    def score(self, batches: list[SampleBatch], stage: int) -> None:
        """Reward every sample batch; each batch gets its rewards and reward metadata appended."""
        try:
            rewards, rewards_metadata = self.compute_rewards(batches, is_async=self.config.async_reward_computation)
        except Exception as err:
            raise RuntimeError(
                f"reward_function {callable_name(self.reward_fn)} raised at stage {stage}: {err!r}"
            ) from err
        rewards = check_rewards(
            rewards, batches, stage, callable_name(self.reward_fn), self.config.drop_nonfinite_rewards
        )
        for batch, reward, metadata in zip(batches, rewards, rewards_metadata):
            batch.extend([reward, metadata])

    def call_image_hook(self, batches: list[SampleBatch], global_step: int) -> None:
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(batches, global_step, tracker)

    def z_scores(self, batches: list[SampleBatch]) -> tuple[np.ndarray, np.ndarray]:
        """This process's per-prompt z-scores (computed on every process from the gathered rewards), and all
        processes' rewards."""
        local_rewards = torch.cat([batch.rewards for batch in batches])
        all_rewards = self.accelerator.gather(local_rewards).cpu().numpy().astype(np.float64)
        local_prompts = [p for batch in batches for p in batch.prompts]
        all_prompts = gather_object(local_prompts) if self.accelerator.num_processes > 1 else local_prompts
        z = self.history.update(all_prompts, all_rewards)
        return z.reshape(self.accelerator.num_processes, -1)[self.accelerator.process_index], all_rewards

    def select_samples(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The selection rule per group (groups never cross processes): ``(keep, advantages)``, both of shape
        ``(groups, branches)``."""
        config = self.config
        z = z.reshape(-1, config.num_branches)
        # a loss over pairs trains each kept group's best and worst branch together
        rule = "pairs" if self.loss_fn.group_size == 2 else config.selection_rule
        keep = select(z, rule, config.selection_threshold_best, config.selection_threshold_worst)
        return keep, stage_advantages(z, keep, rule, config.train_adv_clip_max)

    def log_stage(self, stats: dict) -> None:
        self.accelerator.log(stats, step=stats["stage"])
        self.last_stage_stats = stats
        for callback in self.stage_end_callbacks:
            callback(self, stats)

    def encode(self, prompts) -> Conditioning:
        """The conditioning of `prompts`, with the unconditional half when `train_cfg` (guidance) is on."""
        with torch.no_grad():
            cond = self.family.encode_prompts(
                self.sd_pipeline.sd_pipeline, list(prompts), self.accelerator.device, self.image_size
            )
            # per-row inputs set by the config (FLUX.1-dev's guidance), stored with the samples like the prompt's
            cond.update(self.family.sampling_inputs(
                self.sd_pipeline.sd_pipeline, self.config, len(prompts), self.accelerator.device
            ))
        uncond = None
        if self.negative_conditioning is not None:
            n = len(prompts)
            uncond = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.negative_conditioning.items()}
        return Conditioning(cond, uncond)

    def _generate_samples(self, iterations: int, batch_size: int, branch_point: int = 0,
                          interval_end: Optional[int] = None):
        """
        Sample `iterations` batches of `batch_size` prompts, each with `num_branches` branches forking at
        `branch_point` and recorded until `interval_end` (the last step by default). Returns DDPO-layout sample
        dicts (rows grouped by prompt, time axis = interval steps, conditioning under ``cond.*``/``uncond.*`` keys)
        and one [`~b2trl.rollout.SampleBatch`] per batch for the reward function.
        """
        config = self.config
        samples, batches = [], []
        self.denoiser.eval()
        n = config.num_branches
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self._next_prompt() for _ in range(batch_size)])
            conditioning = self.encode(prompts)
            with self.autocast():
                rollout = branch_rollout(
                    self.sd_pipeline,
                    conditioning,
                    sampler=self.sampler,
                    num_inference_steps=config.sample_num_steps,
                    branch_point=branch_point,
                    interval_end=interval_end,
                    num_branches=n,
                    guidance_scale=config.sample_guidance_scale,
                    chunk_size=config.rollout_chunk_size,
                    image_size=self.image_size,
                )
            samples.append(rollout.transitions(conditioning))
            batches.append(rollout.sample_batch(prompts, prompt_metadata))
        return samples, batches

    def _next_prompt(self) -> tuple[str, Any]:
        return next_prompt(self.prompt_fn)

    def compute_rewards(self, prompt_image_pairs, is_async: bool = False):
        """Score every batch; with `is_async` the batches are scored concurrently in a thread pool."""
        return call_reward_function(
            self.reward_fn, prompt_image_pairs, self.accelerator.device, self.executor if is_async else None
        )

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str, **card_kwargs) -> str:
        """
        Save what was trained so that plain diffusers loads it.

        With LoRA: ``pytorch_lora_weights.safetensors`` (diffusers key layout) for
        ``<Pipeline>.from_pretrained(base).load_lora_weights(save_directory)`` (the family's diffusers pipeline
        class, e.g. `StableDiffusionPipeline`). With full fine-tuning: the whole pipeline, for
        ``<Pipeline>.from_pretrained(save_directory)``. Both get a model card
        (``README.md``); `card_kwargs` go to [`~b2trl.hub.build_model_card`]. Only the main process writes.
        """
        from .hub import save_trained

        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_trained(self, save_directory, **card_kwargs)
        self.accelerator.wait_for_everyone()
        return save_directory

    def push_to_hub(self, repo_id: str, *, token: Optional[str] = None, private: Optional[bool] = None,
                    commit_message: str = "Upload B²-DiffuRL weights", **card_kwargs) -> Optional[str]:
        """
        Upload the trained weights (see [`B2DiffuRLTrainer.save_pretrained`]) and their model card to `repo_id`.
        Returns the repository URL on the main process, `None` on the others.
        """
        from .hub import push_trained

        return push_trained(self, repo_id, token=token, private=private, commit_message=commit_message, **card_kwargs)

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


