"""The cost benchmark's measurements: the two trainers as `cost.py` configures them, and one step of each (or of
plain diffusers sampling) with its denoiser rows (the UNet's, or SD3's or FLUX's transformer's), VAE decode rows,
phase times and peak memory."""

from __future__ import annotations

import contextlib
import resource
import tempfile
import threading
import time
from collections import Counter

import common
import torch

from b2trl.prompts import ANIMAL_ACTIVITY_PROMPTS

METHODS = ("b2", "b2_dpo", "ddpo", "plain")
# the report's keys for the phases (``time/<phase>`` in the trainer's stage statistics)
PHASE_KEYS = {"sampling": "sampling", "rewards": "reward", "training": "training"}


# ---------------------------------------------------------------------------------------------- set-up


def model_pipeline(args):
    """The model both trainers start from (LoRA rank 4 on the family's usual target modules): the toy model, or
    with `--sd15-random` / `--sdxl-random` / `--sd3-random` / `--flux-random` / `--qwenimage-random` an SD1.5-,
    SDXL-, SD3.5-Medium-, FLUX.1-dev- or Qwen-Image-shaped pipeline with random weights."""
    if getattr(args, "qwenimage_random", False):
        return qwenimage_pipeline(args)
    if args.random_model:
        from b2trl.models import wrap_pipeline
        from b2trl.testing import (
            build_flux_pipeline,
            build_sd15_pipeline,
            build_sd35_medium_pipeline,
            build_sdxl_pipeline,
        )

        with torch.device(args.device):  # initialising billions of random weights is seconds faster on a GPU
            if getattr(args, "sd3_random", False):
                pipeline = build_sd35_medium_pipeline(args.resolution, args.tiny_width, args.seed,
                                                      with_t5=not args.no_t5)
            elif getattr(args, "flux_random", False):
                pipeline = build_flux_pipeline(args.resolution, args.tiny_width, args.seed)
            else:
                build = build_sdxl_pipeline if args.sdxl_random else build_sd15_pipeline
                pipeline = build(args.resolution, args.tiny_width, args.seed)
        return wrap_pipeline(pipeline, use_lora=True)
    return common.toy_pipeline()


def qwenimage_pipeline(args):
    """Qwen-Image's shape with random weights, created in the run's precision: its 28.7 B parameters in float32
    would not fit one GPU."""
    from b2trl.models import wrap_pipeline
    from b2trl.testing import build_qwenimage_pipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    with torch.device(args.device):
        pipeline = build_qwenimage_pipeline(args.resolution, args.tiny_width, args.seed, dtype=dtype)
    return wrap_pipeline(pipeline, use_lora=True)


def make_reward(args):
    if args.reward == "toy_alignment":
        from b2trl.toy import alignment_reward

        return alignment_reward
    if args.reward == "brightness":
        return lambda images, prompts, metadata: (torch.nan_to_num(images.float()).mean(dim=(1, 2, 3)), {})
    return common.random_reward(args.seed)


def make_prompt_fn(args):
    if args.random_model:
        return common.seeded_prompts(ANIMAL_ACTIVITY_PROMPTS, args.seed)
    from b2trl.toy import train_prompts

    return common.seeded_prompts(train_prompts(), args.seed)


def build_b2_trainer(args, logdir, loss_type: str = "ppo"):
    from b2trl import B2DiffuRLConfig, B2DiffuRLTrainer, IntervalSchedule

    common.reset_accelerate_state()
    config = B2DiffuRLConfig(
        num_epochs=args.repeats,
        sample_num_steps=args.num_steps,
        sample_batch_size=args.prompts,
        sample_num_batches_per_epoch=args.batches,
        num_branches=args.branches,
        sample_guidance_scale=args.guidance_scale,
        train_batch_size=args.train_batch_size,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=args.inner_epochs,
        **({} if args.timesteps_per_forward is None else {"train_timesteps_per_forward": args.timesteps_per_forward}),
        interval_schedule=IntervalSchedule(initial_length=args.interval, milestones=[]),  # L stays fixed
        loss_type=loss_type,
        selection_rule="best_worst",  # the paper's method (the DPO loss takes its pairs); not the trainer's default
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        mixed_precision=args.mixed_precision,
        save_freq=0,
        logdir=logdir,
        seed=args.seed,
        # the built size (FLUX's pipeline does not record it: its own default is 1024 px)
        resolution=args.resolution if args.random_model else None,
    )
    return B2DiffuRLTrainer(config, make_reward(args), make_prompt_fn(args), model_pipeline(args))


def build_ddpo_trainer(args, logdir):
    from trl import DDPOConfig

    common.reset_accelerate_state()
    images = args.prompts * args.branches * args.batches
    config = DDPOConfig(
        num_epochs=args.repeats,
        sample_num_steps=args.num_steps,
        sample_eta=1.0,
        sample_guidance_scale=args.guidance_scale,
        sample_batch_size=args.ddpo_sample_batch_size,
        sample_num_batches_per_epoch=images // args.ddpo_sample_batch_size,
        train_batch_size=args.train_batch_size,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=args.inner_epochs,
        train_timestep_fraction=1.0,
        mixed_precision=args.mixed_precision,
        save_freq=10**9,
        logdir=logdir,
        seed=args.seed,
    )
    return common.quiet_ddpo_trainer(config, make_reward(args), make_prompt_fn(args), model_pipeline(args))


# ---------------------------------------------------------------------------------------------- measuring


class CostMeter:
    """
    Counts denoiser rows (the UNet's, or SD3's transformer's) and VAE-decoder rows and measures wall time and peak
    memory, per named phase. The denoiser's counts keep the names ``unet_rows``/``unet_calls`` that the reports
    have always used.

    Phases nest (a whole step, and sampling/rewards/training inside it); rows are charged to the innermost.
    """

    def __init__(self, denoiser, vae, device: str):
        self.cuda = device == "cuda"
        self.stack: list[str] = []
        self.unet_rows, self.unet_calls, self.vae_rows = Counter(), Counter(), Counter()
        self.seconds, self.peak = Counter(), {}
        self._handles = [
            denoiser.register_forward_pre_hook(self._count(self.unet_rows, self.unet_calls), with_kwargs=True),
            vae.decoder.register_forward_pre_hook(self._count(self.vae_rows, Counter()), with_kwargs=True),
        ]
        self._stop = threading.Event()
        self._sampler = None
        if not self.cuda:
            import psutil

            self._process = psutil.Process()
            self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
            self._sampler.start()

    def _count(self, rows, calls):
        def hook(module, args, kwargs):
            # the batch: a UNet's (and the VAE decoder's) `sample`, a transformer's `hidden_states`
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            phase = self.stack[-1] if self.stack else "outside"
            rows[phase] += int(sample.shape[0])
            calls[phase] += 1

        return hook

    def _memory(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else self._process.memory_info().rss

    def _sample_rss(self):
        while not self._stop.wait(0.005):
            self._note(self._process.memory_info().rss)

    def _note(self, value: int):
        for name in list(self.stack):
            self.peak[name] = max(self.peak.get(name, 0), value)

    def reset(self):
        for counter in (self.unet_rows, self.unet_calls, self.vae_rows, self.seconds):
            counter.clear()
        self.peak.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            self._note(torch.cuda.max_memory_allocated())  # what the enclosing phases reached so far
            torch.cuda.reset_peak_memory_stats()
        self.stack.append(name)
        self._note(self._memory())
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self._note(self._memory())
            self.stack.pop()

    def close(self):
        self._stop.set()
        for handle in self._handles:
            handle.remove()


def one_row_conditioning(family, pipe, args, image_size) -> dict:
    """The denoiser's conditioning tensors for one row, for warming up: the unconditional half's for a family that
    runs classifier-free guidance, else an empty prompt's with the run's per-row inputs (FLUX.1's guidance)."""
    from types import SimpleNamespace

    settings = SimpleNamespace(train_cfg=True, sample_guidance_scale=args.guidance_scale)
    if family.uses_guidance(settings):
        return family.encode_negative(pipe, "", args.device, image_size)
    cond = family.encode_prompts(pipe, [""], args.device, image_size)
    cond.update(family.sampling_inputs(pipe, settings, 1, args.device))
    return cond


def warm_up(pipeline, conditioning: dict, sampling_rows, training_rows, autocast, image_size=None):
    """
    First calls allocate memory and pick kernels; make them before anything is timed (weights unchanged).
    `conditioning` holds the denoiser's conditioning tensors for one row, expanded to each call's rows; images are
    `image_size` (the model's own size by default).
    """
    from b2trl.models import family_for_pipeline

    family = family_for_pipeline(pipeline)
    denoiser = getattr(pipeline, family.denoiser_name)
    device = next(iter(conditioning.values())).device
    image_size = image_size or family.image_size(pipeline)

    def inputs(rows):
        latents = torch.randn(family.latent_shape(pipeline, rows, image_size), device=device, dtype=denoiser.dtype)
        cond = {k: v.expand(rows, *v.shape[1:]) for k, v in conditioning.items()}
        return latents, torch.full((rows,), 500, device=device), cond

    with torch.no_grad(), autocast():
        for rows in sampling_rows:
            family.forward(denoiser, *inputs(rows))
        family.decode(pipeline, inputs(1)[0])
    if training_rows:
        was_training = denoiser.training
        denoiser.train()
        with autocast():
            family.forward(denoiser, *inputs(training_rows)).float().mean().backward()
        denoiser.zero_grad(set_to_none=True)
        denoiser.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_method(method: str, args) -> dict:
    """Run one B² stage or one DDPO epoch (or plain sampling) and return its counts, times and memory."""
    torch.manual_seed(args.seed)
    if method == "plain":
        return measure_plain(args)
    with tempfile.TemporaryDirectory() as logdir:
        g = args.cfg_rows
        if method in ("b2", "b2_dpo"):
            trainer = build_b2_trainer(args, logdir, loss_type="dpo" if method == "b2_dpo" else "ppo")
            # the unconditional half (CFG), or a prompt's own row with its guidance value (FLUX.1)
            one_row = trainer.negative_conditioning or dict(trainer.encode([""]).cond)
            b = args.num_steps - args.interval
            sampling_rows = [g * args.prompts] * (b > 0) + [g * args.prompts * args.branches]
            image_size = trainer.image_size
        else:
            trainer = build_ddpo_trainer(args, logdir)
            one_row = {"encoder_hidden_states": trainer.neg_prompt_embed}
            sampling_rows = [g * args.ddpo_sample_batch_size]
            image_size = None
        pipeline = trainer.sd_pipeline
        warm_up(pipeline, one_row, sampling_rows, g * args.train_batch_size, trainer.autocast, image_size)
        meter = CostMeter(pipeline.denoiser, pipeline.vae, args.device)
        common.run_in_phases(trainer, meter.phase)
        global_step = 0
        counted = {}
        try:
            for epoch in range(args.repeats):
                meter.reset()
                before = dict(getattr(trainer, "compute", None).rows) if method in ("b2", "b2_dpo") else None
                with meter.phase("step"):
                    global_step = trainer.step(epoch, global_step)
                if before is not None:
                    # the trainer's own count of this stage's denoiser rows, checked against the meter's hook
                    counted = {kind: rows - before[kind] for kind, rows in trainer.compute.rows.items()}
        finally:
            meter.close()
        images = args.prompts * args.branches * args.batches
        if method in ("b2", "b2_dpo"):
            stats = trainer.last_stage_stats
            result = summarise_meter(meter, method, stage_stats=stats)
            result.update(
                samples_kept=stats["samples_kept"],
                groups_kept=stats["groups_kept"],
                interval_length=stats["interval_length"],
                branch_point=stats["branch_point"],
                transitions_trained=stats["samples_kept"] * stats["interval_length"] * args.inner_epochs,
                reward_mean=stats["reward_mean"],
                # the DPO loss's reference pass (the base model's log-probs of the kept transitions), in training
                reference_seconds=stats.get("time/reference"),
                compute_counter_rows=counted,
            )
        else:
            result = summarise_meter(meter, method)
            result.update(
                interval_length=trainer.num_train_timesteps,
                transitions_trained=images * trainer.num_train_timesteps * args.inner_epochs,
            )
        result["images"] = images
        result["optimizer_steps"] = global_step
    return derive_rates(result)


def measure_plain(args) -> dict:
    """The model's own diffusers pipeline call (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
    `StableDiffusion3Pipeline`, `FluxPipeline` or `QwenImagePipeline`, no log-probs), for a same-run anchor. It
    samples as training does: DDIM with eta 1.0 for the SD families; SD3's and FLUX's flow steps with T5 padded to the
    length their family uses (the T5 tokenizer's ``model_max_length``); FLUX with its embedded guidance, one row per
    image; Qwen-Image's with true CFG and the family's text length."""
    import inspect

    from b2trl.models import family_for_pipeline

    pipeline = model_pipeline(args)
    sd = pipeline.sd_pipeline
    family = family_for_pipeline(pipeline)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    sd.to(args.device, dtype=dtype)
    sd.set_progress_bar_config(disable=True)
    batch = args.plain_batch_size
    images = args.prompts * args.branches * args.batches
    prompts = [ANIMAL_ACTIVITY_PROMPTS[i % len(ANIMAL_ACTIVITY_PROMPTS)] for i in range(batch)]
    # DDIM's eta for the SD families, the T5 length (max_sequence_length) for the flow families
    sampling = family.pipeline_call_kwargs(sd, eta=1.0)
    call = dict(num_inference_steps=args.num_steps, guidance_scale=args.guidance_scale, output_type="pt", **sampling)
    image_size = family.image_size(sd, args.resolution if args.random_model else None)
    if args.random_model:
        call.update(height=image_size[0], width=image_size[1])
    encode = dict(device=args.device, num_images_per_prompt=1)
    accepted = inspect.signature(sd.encode_prompt).parameters
    if "do_classifier_free_guidance" in accepted:
        encode["do_classifier_free_guidance"] = True
    # SDXL's and SD3's second and third prompts default to the first; SD3 takes them as required arguments
    encode.update({name: None for name in ("prompt_2", "prompt_3") if name in accepted})
    if "max_sequence_length" in accepted and "max_sequence_length" in sampling:
        encode["max_sequence_length"] = sampling["max_sequence_length"]
    with torch.no_grad():
        if family.name == "qwenimage":
            embeds, call = qwenimage_plain_inputs(sd, family, prompts, args, call)
        else:
            encoded = sd.encode_prompt(prompts, **encode)
            # SD1.x returns the prompt and negative embeddings; SDXL and SD3 also their pooled projections; FLUX (no
            # classifier-free guidance) its T5 and pooled CLIP embeddings, then its text ids
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds")
            if "do_classifier_free_guidance" not in accepted:
                names = ("prompt_embeds", "pooled_prompt_embeds")
            embeds = dict(zip(names, encoded))
        one_row = one_row_conditioning(family, sd, args, image_size)
    warm_up(pipeline, one_row, [args.cfg_rows * batch], None, contextlib.nullcontext, image_size)
    meter = CostMeter(getattr(sd, family.denoiser_name), sd.vae, args.device)
    try:
        with meter.phase("step"), meter.phase("sampling"), torch.no_grad():
            for _ in range(-(-images // batch)):
                sd(**embeds, **call)
    finally:
        meter.close()
    result = summarise_meter(meter, "plain")
    result.update(images=-(-images // batch) * batch, transitions_trained=0)
    return derive_rates(result)


def qwenimage_plain_inputs(sd, family, prompts, args, call: dict) -> tuple[dict, dict]:
    """`QwenImagePipeline`'s encoded inputs and call arguments for the plain run: the prompts and the empty negative
    prompt encoded once, at the family's text length, and true CFG at the run's guidance scale (the pipeline's own
    `guidance_scale` is for guidance-distilled models)."""
    length = call["max_sequence_length"]
    embeds, mask = sd.encode_prompt(prompts, device=args.device, max_sequence_length=length)
    negative, negative_mask = sd.encode_prompt("", device=args.device, max_sequence_length=length)
    inputs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                  negative_prompt_embeds_mask=negative_mask)
    from types import SimpleNamespace

    run = SimpleNamespace(train_cfg=True, sample_guidance_scale=args.guidance_scale, negative_prompts="")
    guidance = {k: v for k, v in family.guidance_call_kwargs(run).items() if v is not None}
    guidance.pop("negative_prompt", None)  # given as embeddings
    return inputs, {**{k: v for k, v in call.items() if k != "guidance_scale"}, **guidance}


def summarise_meter(meter: CostMeter, method: str, stage_stats: dict | None = None) -> dict:
    """The meter's counts in the report's layout. Phase seconds come from `stage_stats` (a B²-DiffuRL stage's
    ``time/<phase>``) when given, else from the meter (TRL's phases, plain sampling); the step total always from
    the meter."""
    if stage_stats is not None:
        seconds = {key: stage_stats[f"time/{phase}"] for phase, key in PHASE_KEYS.items()}
    else:
        seconds = {key: meter.seconds.get(phase, 0.0) for phase, key in PHASE_KEYS.items()}
    seconds["other"] = max(0.0, meter.seconds["step"] - sum(seconds.values()))
    seconds["total"] = meter.seconds["step"]
    memory_kind = "cuda max_memory_allocated" if meter.cuda else "cpu peak RSS (psutil, sampled every 5 ms)"
    counted = {**PHASE_KEYS, "step": "step", "outside": "outside"}
    return {
        "method": method,
        "unet_rows": {key: meter.unet_rows.get(phase, 0) for phase, key in counted.items()},
        "unet_calls": {key: meter.unet_calls.get(phase, 0) for phase, key in counted.items()},
        "vae_decode_rows": sum(meter.vae_rows.values()),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "peak_memory_bytes": {p: meter.peak.get(p) for p in ("step", "sampling", "training")},
        "memory_kind": memory_kind,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def derive_rates(result: dict) -> dict:
    seconds = result["seconds"]
    result["images_per_s"] = result["images"] / seconds["sampling"] if seconds["sampling"] else None
    trained = result["transitions_trained"]
    result["transitions_per_s"] = trained / seconds["training"] if trained and seconds["training"] else None
    result["seconds_per_image"] = seconds["total"] / result["images"]
    return result


def expected_unet_rows(args) -> dict:
    """Denoiser rows the two methods must run, from the settings alone (CFG doubles every row, for the UNet and for
    SD3's transformer alike; FLUX.1's guidance is an input of a single row)."""
    images = args.prompts * args.branches * args.batches
    prefix = args.num_steps - args.interval
    g = args.cfg_rows
    return {
        "b2_sampling": g * args.batches * (args.prompts * prefix + args.prompts * args.branches * args.interval),
        "ddpo_sampling": g * images * args.num_steps,
        "ddpo_training": g * images * args.num_steps * args.inner_epochs,
        # B²'s training rows depend on how many samples the selection kept: g * kept * L * inner epochs
    }
