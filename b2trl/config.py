"""Configuration of the B²-DiffuRL trainer: TRL's `DDPOConfig` plus branching, selection and the schedule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from trl import DDPOConfig

from .advantages import RULES
from .advantages.grpo import STD_MODES
from .evaluation_config import EvaluationFields, evaluation_errors
from .losses import LOSS_TYPES, LOSSES
from .samplers import DDIMSampler
from .scale_config import ScaleFields, scale_errors
from .schedule import IntervalSchedule


@dataclass
class B2DiffuRLConfig(ScaleFields, EvaluationFields, DDPOConfig):
    r"""
    Configuration class for [`B2DiffuRLTrainer`].

    Extends [`~trl.DDPOConfig`]; its defaults reproduce the reference B²-DiffuRL run (20 DDIM steps, eta 1.0,
    guidance 5.0, PPO clip range 0.1, learning rate 1e-4, 2 inner epochs, 8 prompts × 5 branches per sampling
    batch, 32 batches per stage, 100 stages). One epoch of [`~trl.DDPOTrainer.train`] is one *stage*.
    Usable with [`~transformers.HfArgumentParser`]; parse [`IntervalSchedule`] as a separate dataclass and
    assign it to `interval_schedule`.

    Fields of `DDPOConfig` that this trainer replaces: `train_timestep_fraction` (the interval schedule decides
    which steps are trained) and `per_prompt_stat_tracking*` (statistics are always per prompt, over the last
    `history_stages` stages).

    Parameters:
        num_branches (`int`, *optional*, defaults to `5`):
            Branches sampled from each prompt's shared prefix; one group per prompt.
        selection_threshold_best (`float`, *optional*, defaults to `0.5`):
            The best branch of a group is trained on if its z-score is at least this.
        selection_threshold_worst (`float`, *optional*, defaults to `-0.5`):
            The worst branch of a group is trained on if its z-score is below this.
        selection_rule (`str`, *optional*, defaults to `"pairs"`):
            The advantage rule (`b2trl.advantages`): `"pairs"` (a group's best and worst branches together when
            their z-scores differ by at least `selection_threshold_best - selection_threshold_worst`, with advantages
            of +-half the difference, so each group's advantages sum to zero), `"best_worst"` (the paper's: each of
            the two kept on its own threshold, with its z-score; `for_method("b2")`), `"all"` (train on every branch
            with its z-score, DDPO-style) or `"grpo"` (group-relative: ``(r - mean of the prompt's samples) /
            (std + 1e-4)``, no history). The default is `"pairs"` because the paper's rule collapsed long runs once
            most samples scored well, and the zero-sum one never did (docs/study_v3.md, "Defaults").
        history_stages (`int`, *optional*, defaults to `8`):
            Previous stages whose rewards are pooled with the current stage's for the per-prompt z-score (the
            `best_worst`, `pairs` and `all` rules).
        advantage_std (`str`, *optional*, defaults to `"group"`):
            `selection_rule="grpo"`: the std that divides a sample's distance to its group's mean: the group's own
            (`"group"`) or that of every reward of the stage (`"global"`, Flow-GRPO's ``global_std``).
        advantage_per_reward (`bool`, *optional*, defaults to `False`):
            `selection_rule="grpo"` with a reward made of parts (`CompositeReward`): normalise each part within its
            group before the weighted sum, then the sum over the stage, so that no part drowns another by its
            scale. Each part is logged as ``reward/<part>``.
        independent_noise (`bool`, *optional*, defaults to `False`):
            Every branch draws its own initial noise and runs its own prefix, so a group is a prompt's independent
            samples (Flow-GRPO) rather than branches of one shared prefix.
        ema_decay (`float`, *optional*, defaults to `0.0`):
            Keep an exponential moving average of the trained weights with this decay (0: off). It is kept in
            checkpoints, exported with ``save_pretrained(dir, ema=True)`` and used for evaluation when on.
        ema_update_every (`int`, *optional*, defaults to `1`):
            Optimizer steps between two updates of the average.
        ema_on_cpu (`bool`, *optional*, defaults to `False`):
            Keep the average in CPU memory (one float32 copy of the trained parameters: for full fine-tuning of a
            large model, more than a GPU can spare).
        method (`str` or `None`, *optional*, defaults to `None`):
            The named method preset this configuration was built from ([`B2DiffuRLConfig.for_method`]); recorded
            for logs and model cards. Set by `for_method`.
        eval_prompts (`list[str]` or `None`, *optional*, defaults to `None`):
            Evaluation prompts, inline. At most one of `eval_prompts`, `eval_prompts_file` and
            `eval_prompts_dataset` is given.
        eval_prompts_file (`str` or `None`, *optional*, defaults to `None`):
            A text file of evaluation prompts, one per line.
        eval_prompts_dataset (`str` or `None`, *optional*, defaults to `None`):
            A `datasets` dataset of evaluation prompts (Hub id, local dataset or `save_to_disk` folder), read from
            `eval_prompts_dataset_split` (default `"train"`) and `eval_prompts_dataset_column` (default `"prompt"`).
        eval_every (`int`, *optional*, defaults to `0`):
            Evaluate after every `eval_every`-th stage and after the last one (0: off). An evaluation samples every
            prompt once per seed of `eval_seeds` with the pipeline (with the EMA weights when `ema_decay > 0`),
            scores the images with each of `eval_rewards`, and logs ``eval/<reward>`` with the stage's statistics
            and a labelled grid image (``eval/grid``) to the trackers.
        eval_seeds (`list[int]`, *optional*, defaults to `[0]`):
            Noise seeds of the evaluation: a (prompt, seed) pair starts from the same noise at every evaluation,
            on any number of processes and with any batch size.
        eval_rewards (`list[str]`, *optional*, defaults to `[]`):
            The rewards an evaluation scores with ([`~b2trl.rewards.get_reward`] names or
            ``"package.module:function"``; ``"reward"`` is the training reward), each logged as ``eval/<name>``
            (``eval/<function>`` for ``"package.module:function"``). Empty: the training reward, as
            ``eval/reward``. Several rewards show reward hacking: the trained one rising while another falls.
        save_best (`bool`, *optional*, defaults to `False`):
            Keep the checkpoint whose evaluation was best by `metric_for_best_model` as
            ``checkpoints/checkpoint_best`` (a complete checkpoint that `resume_from` accepts, also as
            ``"best"``). Needs `eval_every > 0`.
        metric_for_best_model (`str` or `None`, *optional*, defaults to `None`):
            The evaluation metric that decides the best checkpoint and the evaluation-drop guard,
            ``"eval/<name>"`` (the ``"eval/"`` prefix may be left out). Default: the first of `eval_rewards`.
        greater_is_better (`bool`, *optional*, defaults to `True`):
            Whether a higher `metric_for_best_model` is better.
        load_best_model_at_end (`bool`, *optional*, defaults to `False`):
            When training ends, restore the best checkpoint's weights (and EMA). Needs `save_best`. A run that the
            guard stops restores it whether or not this is set.
        on_collapse (`str`, *optional*, defaults to `"warn"`):
            What the collapse guard does when the skew watch fires (the kept samples' advantages mostly negative,
            see [`~b2trl.scoring.NegativeSkewWatch`]) or an evaluation falls more than `collapse_tolerance` below
            the best: `"warn"` logs it; `"stop"` ends training after the stage (`train()` returns with the best
            checkpoint's weights when `save_best`; `trainer.guard.stopped` says why); `"rollback"` restores the best
            checkpoint and goes on with
            `selection_rule="pairs"` (needs `save_best`). Each event is logged as ``guard/*`` statistics.
        collapse_tolerance (`float` or `None`, *optional*, defaults to `None`):
            An evaluation more than this far below the best, in the units of `metric_for_best_model`, counts as a
            collapse. `None`: only the skew watch triggers the guard. Needs `eval_every > 0`.
        interval_schedule (`IntervalSchedule`, *optional*):
            Which denoising steps are trained at each stage (reference: the last 14 + floor(7k/100) of 20;
            `IntervalSchedule(anchor="start")` trains that many first steps instead).
        rollout_chunk_size (`int` or `None`, *optional*, defaults to `None`):
            At most this many images per UNet/VAE call while sampling, to bound memory. `None`: no chunking.
        drop_nonfinite_rewards (`bool`, *optional*, defaults to `False`):
            Drop samples whose reward is NaN/inf (with a warning) instead of raising an error.
        compile_unet (`bool`, *optional*, defaults to `False`):
            Compile the UNet with `torch.compile`, in place (see [`~b2trl.accelerator.compile_unet`]): parameter names,
            LoRA saving and loading and DDP wrapping are unchanged. Compilation takes minutes at the start.
        compile_unet_kwargs (`dict`, *optional*, defaults to `{}`):
            Keyword arguments for `torch.compile` when `compile_unet` is set (`mode`, `backend`, `dynamic`,
            `fullgraph`, `options`).
        loss_type (`str`, *optional*, defaults to `"ppo"`):
            `"ppo"`: PPO-clip on the kept samples' advantages. `"dpo"`: each kept group's best and worst branch form
            a (winner, loser) pair (the `"pairs"` selection rule), trained with
            ``-log σ(β (log r_w - log r_l))``, ``r = clamp(π_θ / π_ref, 1 - ε, 1 + ε)`` per interval step, against
            the base model (LoRA disabled, or a frozen copy for full fine-tuning).
        dpo_beta (`float`, *optional*, defaults to `0.1`):
            β of the DPO loss.
        kl_coef (`float`, *optional*, defaults to `0.0`):
            Weight of ``KL(π_θ ‖ π_ref)`` per trained step against the base model, added to the loss and logged as
            `kl_ref`.
        noise_level (`float`, *optional*, defaults to `0.7`):
            Flow-matching models only: the noise scale of the SDE step (Flow-GRPO's ``a``); the counterpart of
            `sample_eta` for DDIM models, which ignore it.
        prefix_sde (`bool`, *optional*, defaults to `False`):
            Flow-matching models only: sample the shared prefix with the SDE step instead of the ODE.
        suffix_sde (`bool`, *optional*, defaults to `False`):
            Flow-matching models only: with a start-anchored interval (`IntervalSchedule(anchor="start")`), finish
            each branch after its interval with the SDE step instead of the ODE. DDIM models finish it with their
            own step (`sample_eta`).
        resolution (`int` or `None`, *optional*, defaults to `None`):
            Image height and width in pixels; `None` uses the model's own size.
        fsdp (`bool`, *optional*, defaults to `False`):
            Full fine-tuning sharded over the processes with FSDP2: each process holds a shard of the denoiser's
            parameters, gradients and optimizer state (see [`~b2trl.sharding`]). Also on when the run is launched
            with accelerate's FSDP (``accelerate launch --use_fsdp --fsdp_version 2``, or a config file).
        fsdp_kwargs (`dict`, *optional*, defaults to `{}`):
            [`~b2trl.sharding.FSDPOptions`] (``reshard_after_forward``, ``cpu_offload``,
            ``transformer_cls_names_to_wrap``, ``min_num_params``, ``param_dtype``, ``reduce_dtype``,
            ``activation_checkpointing``); they override the launcher's ``--fsdp_*`` settings.
        gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            Recompute the denoiser's activations during the backward pass (less memory, slower training).
        train_timesteps_per_forward (`int`, *optional*, defaults to `2`):
            Interval steps of a training micro-batch stacked into one UNet forward and backward pass. The gradient
            is the same; a call holds ``train_batch_size * train_timesteps_per_forward`` sample-steps (doubled by
            CFG), so activation memory grows with it, and so does throughput. A micro-batch with fewer samples
            (a small kept set, the last one of a pass) stacks proportionally more steps, never more rows. Set 1
            for TRL DDPO's memory per call (one step of `train_batch_size` samples).
    """

    num_branches: int = field(
        default=5,
        metadata={
            "help": "Branches sampled from each prompt's shared prefix (one group per prompt); 1 only with "
            "selection_rule='all' (no branching, an ablation)."
        },
    )
    selection_threshold_best: float = field(
        default=0.5, metadata={"help": "Keep a group's best branch if its per-prompt z-score is >= this."}
    )
    selection_threshold_worst: float = field(
        default=-0.5, metadata={"help": "Keep a group's worst branch if its per-prompt z-score is < this."}
    )
    selection_rule: str = field(
        default="pairs",
        metadata={
            "help": "The advantage rule: 'pairs' (a group's best and worst branch together, zero-sum advantages; the "
            "default), 'best_worst' (B²-DiffuRL's own, --method b2), 'all' (every sample with its per-prompt "
            "z-score) or 'grpo' (group-relative advantages, no history: Flow-GRPO).",
            "choices": list(RULES),
        },
    )
    history_stages: int = field(
        default=8,
        metadata={"help": "Previous stages pooled with the current one for per-prompt z-scores (not for 'grpo')."},
    )
    advantage_std: str = field(
        default="group",
        metadata={
            "help": "selection_rule='grpo': divide by the std of the prompt's group ('group') or of every reward "
            "of the stage ('global', Flow-GRPO's global_std).",
            "choices": list(STD_MODES),
        },
    )
    advantage_per_reward: bool = field(
        default=False,
        metadata={
            "help": "selection_rule='grpo' with a composite reward: normalise each part within its group before the "
            "weighted sum, so that no part drowns another by its scale."
        },
    )
    independent_noise: bool = field(
        default=False,
        metadata={
            "help": "Every branch of a group draws its own initial noise (and runs its own prefix): groups of "
            "independent samples per prompt, as Flow-GRPO samples them."
        },
    )
    interval_schedule: IntervalSchedule = field(
        default_factory=IntervalSchedule,
        metadata={
            "help": "The progressive interval schedule (backward by default). On the command line: the "
            "IntervalSchedule flags (--initial_length, --num_stages, --milestones, --anchor) or a JSON object of "
            "them; in Python an IntervalSchedule."
        },
    )
    rollout_chunk_size: Optional[int] = field(
        default=None, metadata={"help": "Max images per UNet/VAE call while sampling (bounds memory)."}
    )
    drop_nonfinite_rewards: bool = field(
        default=False,
        metadata={
            "help": "Drop samples whose reward is NaN/inf (with a warning; counted as rewards_dropped) instead "
            "of stopping with an error."
        },
    )

    loss_type: str = field(
        default="ppo",
        metadata={
            "help": "'ppo' (PPO-clip on the kept samples' advantages, the method) or 'dpo' (D3PO-style: each kept "
            "group's best and worst branch as a (winner, loser) pair against the base model).",
            "choices": list(LOSS_TYPES),
        },
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "beta of the DPO loss (loss_type='dpo'): how sharply a pair's margin counts."}
    )
    kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of KL(policy || base model) per trained step, added to the loss (0: none). Counters "
            "reward hacking; 0.01-0.04 is a common range."
        },
    )
    noise_level: float = field(
        default=0.7,
        metadata={
            "help": "Flow-matching models (SD3): the SDE step's noise scale a, std = a*sqrt(sigma/(1-sigma)); must be "
            "> 0 (0 is the deterministic ODE, which has no log-probability). DDIM models (SD1.x, SDXL) use "
            "sample_eta instead and ignore this."
        },
    )
    prefix_sde: bool = field(
        default=False,
        metadata={
            "help": "Flow-matching models: run the shared prefix with the SDE step instead of the deterministic "
            "ODE. The prefix is not trained, so either is valid; the ODE keeps the branch point on the model's "
            "own path."
        },
    )
    suffix_sde: bool = field(
        default=False,
        metadata={
            "help": "Flow-matching models, start-anchored intervals: finish each branch after its interval with the "
            "SDE step instead of the deterministic ODE. Those steps are not trained; the ODE makes a branch's image "
            "a function of where its interval ended."
        },
    )
    resolution: Optional[int] = field(
        default=None,
        metadata={
            "help": "Image height and width in pixels (a multiple of the VAE's scale factor, usually 8). Default: "
            "the model's own (512 for SD1.5, 1024 for SDXL)."
        },
    )
    method: Optional[str] = field(
        default=None,
        metadata={
            "help": "The method preset these settings come from (set by B2DiffuRLConfig.for_method / --method); "
            "b2trl.list_methods() lists them."
        },
    )

    # reference defaults that differ from DDPOConfig's
    tracker_project_name: str = field(default="b2trl", metadata={"help": "Name of the tracker project."})
    num_epochs: int = field(default=100, metadata={"help": "Number of stages (one sample-score-train round each)."})
    sample_num_steps: int = field(default=20, metadata={"help": "Number of DDIM sampling steps T."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta; must be > 0 (stochastic policy)."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance scale."})
    sample_batch_size: int = field(
        default=8, metadata={"help": "Prompts per sampling batch (each sampled num_branches times)."}
    )
    sample_num_batches_per_epoch: int = field(
        default=32, metadata={"help": "Sampling batches per stage (per process)."}
    )
    train_batch_size: int = field(default=2, metadata={"help": "Kept samples per training micro-batch."})
    train_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate."})
    train_gradient_accumulation_steps: int = field(
        default=64,
        metadata={
            "help": "Micro-batches per optimizer step; each micro-batch contributes one backward pass per "
            "interval step, so a step follows train_gradient_accumulation_steps * L_k backward passes. The "
            "last window of an inner epoch steps with what it has."
        },
    )
    train_num_inner_epochs: int = field(default=2, metadata={"help": "Passes over each stage's kept samples."})
    train_clip_range: float = field(default=0.1, metadata={"help": "PPO clip range epsilon."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.interval_schedule, dict):
            self.interval_schedule = IntervalSchedule(**self.interval_schedule)
        if not isinstance(self.interval_schedule, IntervalSchedule):
            raise ValueError(
                f"interval_schedule must be an IntervalSchedule (or a dict of its fields), "
                f"got {type(self.interval_schedule).__name__}."
            )
        errors = self.validation_errors()
        if errors:
            raise ValueError("Invalid B2DiffuRLConfig:\n- " + "\n- ".join(errors))

    def validation_errors(self) -> list[str]:
        """Every problem with this configuration, one message each, naming the field and the fix."""
        errors = []

        def positive(name, minimum=1):
            value = getattr(self, name)
            if value is None or value < minimum:
                errors.append(f"{name} must be >= {minimum}, got {value}.")

        for name in ("sample_batch_size", "sample_num_batches_per_epoch", "train_batch_size",
                     "train_gradient_accumulation_steps", "train_num_inner_epochs", "sample_num_steps"):
            positive(name)
        positive("num_epochs", 0)
        positive("history_stages", 0)
        positive("num_branches", 1)
        if self.num_branches == 1 and self.selection_rule not in ("all",):
            errors.append(
                f"num_branches=1 works only with selection_rule='all' (got {self.selection_rule!r}): a group of one "
                "branch has nothing to compare it with. Use num_branches >= 2."
            )
        if self.rollout_chunk_size is not None:
            positive("rollout_chunk_size")
        if self.resolution is not None:
            positive("resolution", 8)
        errors.extend(scale_errors(self))
        # the sampler checks its own settings (DDIM: eta > 0)
        errors.extend(DDIMSampler(self.sample_eta).validation_errors())
        if self.selection_threshold_best < self.selection_threshold_worst:
            errors.append(
                f"selection_threshold_best ({self.selection_threshold_best}) must be >= selection_threshold_worst "
                f"({self.selection_threshold_worst}); the thresholds look swapped."
            )
        if self.selection_rule not in RULES:
            errors.append(f"selection_rule must be one of {tuple(RULES)}, got {self.selection_rule!r}.")
        if self.advantage_std not in STD_MODES:
            errors.append(f"advantage_std must be one of {STD_MODES}, got {self.advantage_std!r}.")
        if self.advantage_per_reward and self.selection_rule != "grpo":
            errors.append(
                f"advantage_per_reward=True is an option of selection_rule='grpo' (got {self.selection_rule!r}); "
                "set selection_rule='grpo' or turn it off."
            )
        if self.loss_type not in LOSS_TYPES:
            errors.append(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        else:
            needed = LOSSES[self.loss_type].selection
            if needed is not None and self.effective_selection_rule != needed:
                errors.append(
                    f"loss_type={self.loss_type!r} needs selection_rule={needed!r} (got {self.selection_rule!r}): "
                    f"it trains each group's best and worst branch as a pair. Use selection_rule={needed!r} "
                    "('best_worst' is taken as it)."
                )
            if needed == "pairs" and self.num_branches < 2:
                errors.append(
                    f"loss_type={self.loss_type!r} needs num_branches >= 2 (got {self.num_branches}): a pair is two "
                    "branches of a group."
                )
        if not self.dpo_beta > 0:
            errors.append(f"dpo_beta must be > 0, got {self.dpo_beta}.")
        if not self.kl_coef >= 0:
            errors.append(f"kl_coef must be >= 0 (0 turns the KL term off), got {self.kl_coef}.")
        if self.method is not None:
            from .methods import METHODS

            if self.method not in METHODS:
                errors.append(f"method must be one of {tuple(METHODS)} (or None), got {self.method!r}.")
        if not self.train_clip_range > 0:
            errors.append(f"train_clip_range must be > 0, got {self.train_clip_range}.")
        if not self.train_adv_clip_max > 0:
            errors.append(f"train_adv_clip_max must be > 0, got {self.train_adv_clip_max}.")
        errors.extend(evaluation_errors(self))
        if self.sample_num_steps >= 1:
            try:
                self.interval_schedule.validate(self.sample_num_steps)
            except ValueError as err:
                errors.append(str(err))
        return errors

    @property
    def effective_selection_rule(self) -> str:
        """The rule that runs: `selection_rule`, except that a loss needing a rule (DPO: ``"pairs"``) takes it in
        place of ``"best_worst"`` (so that `for_method("b2", loss_type="dpo")` is B² with the DPO loss)."""
        needed = LOSSES[self.loss_type].selection if self.loss_type in LOSSES else None
        if needed is not None and self.selection_rule == "best_worst":
            return needed
        return self.selection_rule

    @classmethod
    def for_method(cls, name: str, **overrides) -> "B2DiffuRLConfig":
        """
        The configuration of a named method ([`b2trl.list_methods`]: `b2`, `b2_pairs`, `b2_grpo`, `ddpo`, `d3po`,
        `flow_grpo`, `flow_grpo_fast`, `mix_grpo`), with `overrides` on top.

        `overrides` are `B2DiffuRLConfig` fields; `interval_schedule` may be an [`IntervalSchedule`] (replacing the
        method's) or a dict of its fields (merged onto the method's). A method that trains "every step" follows the
        final `sample_num_steps`.

        Example:

        ```python
        config = B2DiffuRLConfig.for_method("flow_grpo", sample_num_steps=10, num_branches=8)
        ```
        """
        from .methods import method_config

        return method_config(cls, name, overrides)

    def to_dict(self) -> dict:
        """A flat dict of scalars (what trackers such as TensorBoard's hparams accept)."""
        flat = {}
        for key, value in asdict(self).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, sub_value in items:
                name = key if sub is None else f"{key}/{sub}"
                flat[name] = sub_value if isinstance(sub_value, (int, float, str, bool)) else str(sub_value)
        return flat
