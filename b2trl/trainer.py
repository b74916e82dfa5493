"""B²-DiffuRL on top of TRL's `DDPOTrainer`.

One `train()` epoch is one stage, and [`B2DiffuRLTrainer.step`] reads as the stage's named steps: branch
rollout → rewards → advantages (the selection rule) → training on the kept samples' interval steps → logging and
checkpoint. A [`~b2trl.stage.Stage`] carries what each step produced to the next. What depends on the model, the
sampler, the advantage rule or the loss is behind the seams in ``b2trl/models``, ``b2trl/samplers``,
``b2trl/advantages`` and ``b2trl/losses``; a named method ([`B2DiffuRLConfig.for_method`]) is a row of settings.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent import futures
from typing import Any, Callable, Optional

import torch
from accelerate import logging
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from trl import DDPOTrainer

from . import checkpoint as ckpt
from .accelerator import build_accelerator
from .advantages import build_rule
from .compute import ComputeCounter
from .config import B2DiffuRLConfig
from .ema import ParameterEMA
from .losses import build_loss
from .losses.reference import ReferencePolicy
from .methods import check_sampler
from .models import family_for_pipeline
from .monitoring import TrainingMonitor
from .sampling import StageSampling
from .scoring import NegativeSkewWatch, stage_statistics
from .sharding import build_sharding
from .stage import Stage
from .timing import PhaseTimer
from .update import PolicyUpdate

logger = logging.get_logger(__name__)


class B2DiffuRLTrainer(StageSampling, PolicyUpdate, TrainingMonitor, DDPOTrainer):
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
            Called once per stage with `(prompt_image_data, step, tracker)`: a list of
            [`~b2trl.stage.SampleBatch`] (each unpacks like TRL's `[images, prompts, metadata, rewards,
            reward_metadata]`), the stage index (the step every statistic of the stage is logged at; TRL passes
            its global step, the step TRL logs at) and the first tracker (`None` when no tracker is configured).

    After each stage, `trainer.last_stage` is its [`~b2trl.stage.Stage`] (rewards, normalised scores, keep mask
    and advantages of every process's samples, in sample order, and the logged statistics), and
    `trainer.last_stage_stats` its statistics. With `eval_every > 0` the trainer evaluates as it trains, keeps the
    best checkpoint (`save_best`) and acts on a collapse (`on_collapse`); `trainer.evaluate()` runs one evaluation
    now, and `trainer.guard` holds the best evaluation and the guard's events (see [`~b2trl.monitoring`]).
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
        check_sampler(config.method, self.sampler)
        self.loss_fn = build_loss(config)
        self.rule = build_rule(config, config.effective_selection_rule)
        self.accelerator = build_accelerator(config)
        self.use_lora = bool(getattr(sd_pipeline, "use_lora", False))
        self.sharding = build_sharding(config, self.accelerator, use_lora=self.use_lora)  # FSDP2, or None
        if image_samples_hook is None:
            logger.info("No image_samples_hook provided; no images will be logged.")
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers(
                config.tracker_project_name, config=config.to_dict(), init_kwargs=config.tracker_kwargs
            )
        set_seed(config.seed, device_specific=True)

        self.sd_pipeline = sd_pipeline
        self.sd_pipeline.set_progress_bar_config(disable=True)
        self.reference = None
        needs_reference = self.loss_fn.needs_reference or config.kl_coef > 0
        if self.sharding is not None:
            self._shard(needs_reference)
        self.family.place(self.sd_pipeline.sd_pipeline, self.accelerator.device, self.inference_dtype, self.use_lora)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        trainable = self.sd_pipeline.get_trainable_layers()
        params = trainable if isinstance(trainable, list) else [p for p in trainable.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The pipeline has no trainable parameters: get_trainable_layers() returned none.")
        if self.sharding is None:
            self.accelerator.register_save_state_pre_hook(self._save_model_hook)
            self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        else:
            self.accelerator.register_save_state_pre_hook(self._save_sharded_hook)
            self.accelerator.register_load_state_pre_hook(self._load_sharded_hook)
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

        if self.sharding is not None:
            # already sharded: accelerate's wrappers (DDP) must not see the module, nor its checkpointing the
            # optimizer (whose state is sharded too)
            self.training_denoiser, self.optimizer, self.trainable_params = self.denoiser, optimizer, params
        elif isinstance(trainable, list):
            # a parameter list cannot be wrapped for DDP; it trains on one process only
            self.trainable_params, self.optimizer = self.accelerator.prepare(trainable, optimizer)
            self.training_denoiser = self.denoiser
        else:
            # train through the prepared module so that DDP sees the forward and all-reduces gradients
            self.training_denoiser, self.optimizer = self.accelerator.prepare(trainable, optimizer)
            self.trainable_params = [p for p in self.training_denoiser.parameters() if p.requires_grad]
        if needs_reference and self.reference is None:
            self.reference = ReferencePolicy(self.denoiser, use_lora=self.use_lora, dtype=self.inference_dtype)
        sharded_checkpointing = self.sharding is not None and self.sharding.options.activation_checkpointing
        if config.gradient_checkpointing or sharded_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        if config.compile_unet:
            from .accelerator import compile_unet

            # in place, after the LoRA adapter exists: the prepared (possibly DDP-wrapped) module is unchanged
            compile_unet(self.denoiser, **config.compile_unet_kwargs)
        self.ema = None
        if config.ema_decay > 0:
            self.ema = ParameterEMA(self.trainable_params, config.ema_decay, config.ema_update_every,
                                    on_cpu=config.ema_on_cpu)
            if self.sharding is None:  # sharded: its shards are in the sharded checkpoint
                self.accelerator.register_for_checkpointing(self.ema)
        self.executor = futures.ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self.skew_watch = NegativeSkewWatch()
        self.compute = ComputeCounter()
        self.last_stage: Optional[Stage] = None
        self.last_stage_stats: dict = {}
        self.first_epoch = 0
        self.global_step = 0
        # called as fn(trainer, stats) after every stage, e.g. to write metrics to disk as training goes
        self.stage_end_callbacks: list[Callable[["B2DiffuRLTrainer", dict], None]] = []
        self.setup_monitoring()  # evaluation, best checkpoint, collapse guard (b2trl/monitoring.py)
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

    def _shard(self, needs_reference: bool) -> None:
        """Shard the denoiser with FSDP2 before it is moved to the device (each process moves its shards only), and
        the frozen reference copy of DPO / the KL term, taken before (a sharded module cannot be copied)."""
        if needs_reference:
            self.reference = ReferencePolicy(self.denoiser, use_lora=False, dtype=self.inference_dtype,
                                             shard=functools.partial(self.sharding.shard, frozen=True))
        self.sharding.shard(self.denoiser)

    def _save_sharded_hook(self, models, weights, output_dir):
        self.sharding.save_state(output_dir, self.denoiser, self.optimizer, self.ema)

    def _load_sharded_hook(self, models, input_dir):
        self.sharding.load_state(input_dir, self.denoiser, self.optimizer, self.ema)

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
        from .sharding import SHARDED_STATE

        if os.path.isdir(os.path.join(input_dir, SHARDED_STATE)):
            raise ValueError(f"{input_dir} was written by a run with fsdp (sharded weights); resume it with fsdp.")
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
        return ckpt.save_stage(self.accelerator, self.checkpoint_dir, stage, self.checkpoint_state(stage))

    def checkpoint_state(self, stage: int, global_step: Optional[int] = None) -> dict:
        """What a checkpoint's ``b2trl_state.json`` holds besides accelerate's state: the stage, the global step,
        the advantage rule's history, the compute counter, the collapse guard and the rule that runs."""
        return {"stage": stage, "global_step": self.global_step if global_step is None else global_step,
                "advantage_rule": self.rule.state_dict(), "compute": self.compute.state_dict(),
                **self.monitoring_state()}

    def resume(self, resume_from: str) -> None:
        """Restore a checkpoint (a folder, a run folder, ``"latest"`` or ``"best"``); training continues after its
        stage."""
        path = ckpt.resolve_resume_path(resume_from, self.checkpoint_dir)
        state = ckpt.read_state(path)
        self.accelerator.load_state(path)
        self.load_monitoring_state(state)  # the guard, and the rule a rollback switched to
        # checkpoints written before the advantage seam hold the z-score rules' history on its own
        rule_state = state.get("advantage_rule", {"history": state["history"]} if "history" in state else {})
        if rule_state:
            self.rule.load_state_dict(rule_state)
        if "compute" in state:
            self.compute.load_state_dict(state["compute"])
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
        Run stage `epoch` (one stage per TRL epoch): sample, score, compute advantages, train. Returns the updated
        `global_step` (optimizer steps). Each line is one named step of the method.
        """
        timer = PhaseTimer()
        with timer("sampling"):
            stage = self.sample_stage(epoch)
        with timer("rewards"):
            stage = self.score(stage)
        self.call_image_hook(stage, stage.index)  # at the step the stage's statistics are logged at
        stage = self.compute_advantages(stage)
        self.watch_skew(stage)
        with timer("training"):
            stage, global_step = self.train_stage(stage, global_step)
        stage = self.monitor_stage(stage, global_step)  # evaluation, best checkpoint, collapse guard
        self.finish_stage(stage, timer, global_step)
        return global_step

    def compute_advantages(self, stage: Stage) -> Stage:
        """The stage with the advantage rule's scores, keep mask and advantages (every process computes the same
        ones from the gathered rewards) and its statistics."""
        result = self.rule(stage.reward_inputs())
        stage = stage.replace(scores=result.scores.reshape(-1), keep=result.keep.reshape(-1),
                              advantages=result.advantages.reshape(-1))
        return stage.with_stats(**stage_statistics(stage))

    def watch_skew(self, stage: Stage) -> None:
        """Warn once when the kept samples' advantages have been mostly negative (the loop that collapses a
        model; see [`~b2trl.scoring.NegativeSkewWatch`]); the collapse guard acts on it at the stage's end."""
        warning = self.skew_watch.update(stage.stats)
        if warning:
            self.notice_skew(stage, warning)

    def finish_stage(self, stage: Stage, timer: PhaseTimer, global_step: int) -> None:
        """Count the stage's compute, log its statistics, run the stage-end callbacks, checkpoint."""
        timings = timer.stats()
        self.compute.seconds += sum(timings.values())
        stage = stage.with_stats(**timings, **self.compute.stats())
        self.accelerator.log(stage.stats, step=stage.index)
        self.last_stage, self.last_stage_stats = stage, stage.stats
        for callback in self.stage_end_callbacks:
            callback(self, stage.stats)
        self.last_stage = stage.released()  # the transitions and images are not kept past the stage
        if self.config.save_freq > 0 and (stage.index + 1) % self.config.save_freq == 0:
            self.global_step = global_step
            self.save_checkpoint(stage.index)  # every process takes part: FSDP/DeepSpeed need all of them

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str, ema: bool = False, **card_kwargs) -> str:
        """
        Save what was trained so that plain diffusers loads it.

        With LoRA: ``pytorch_lora_weights.safetensors`` (diffusers key layout) for
        ``<Pipeline>.from_pretrained(base).load_lora_weights(save_directory)`` (the family's diffusers pipeline
        class, e.g. `StableDiffusionPipeline`). With full fine-tuning: the whole pipeline, for
        ``<Pipeline>.from_pretrained(save_directory)``. Both get a model card
        (``README.md``); `card_kwargs` go to [`~b2trl.hub.build_model_card`]. Call it on every process: only the
        main process writes, and with FSDP2 sharding every process takes part in gathering the whole weights.

        Args:
            save_directory (`str`): the folder to write.
            ema (`bool`, *optional*, defaults to `False`): save the moving average of the weights (needs
                `ema_decay > 0`) instead of the last ones.
        """
        from .hub import save_trained

        if ema and self.ema is None:
            raise ValueError("save_pretrained(ema=True) needs ema_decay > 0 in the config: no average was kept.")
        self.accelerator.wait_for_everyone()
        if self.sharding is not None:
            # every process takes part in gathering the whole weights (with its EMA shards swapped in)
            with self.ema.applied() if ema else contextlib.nullcontext():
                weights = self.sharding.full_state_dict(self.denoiser)
            if self.accelerator.is_main_process:
                save_trained(self, save_directory, ema=ema, denoiser_weights=weights, **card_kwargs)
        elif self.accelerator.is_main_process:
            with self.ema.applied() if ema else contextlib.nullcontext():
                save_trained(self, save_directory, ema=ema, **card_kwargs)
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
        """
        Run stages `first_epoch .. epochs - 1` (default `config.num_epochs`); returns the global step. With
        ``on_collapse="stop"`` it returns early when the guard fires (`trainer.guard.stopped` is the event); with
        `load_best_model_at_end` the best checkpoint is restored before it returns.
        """
        epochs = self.config.num_epochs if epochs is None else epochs
        self.final_stage = epochs - 1
        self.guard.stopped = None
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
            if self.guard.stopped is not None:
                epochs = epoch + 1
                break
        self.first_epoch = epochs
        self.end_monitoring()
        return self.global_step


