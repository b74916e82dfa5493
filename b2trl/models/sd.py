"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet predicting noise, DDIM with eta for log-probabilities."""

from __future__ import annotations

from .base import Conditioning, ModelFamily, token_ids


class StableDiffusionFamily(ModelFamily):
    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder",)

    def prepare(self, pipe, *, use_lora: bool) -> None:
        from diffusers import DDIMScheduler

        # whatever scheduler the model ships with, DDIM with eta gives every step a log-probability
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        super().prepare(pipe, use_lora=use_lora)

    def make_sampler(self, config):
        from ..samplers import DDIMSampler

        return DDIMSampler(config.sample_eta)

    def encode_prompts(self, pipe, prompts, device, image_size=None):
        ids = token_ids(pipe.tokenizer, prompts, device)
        return {"encoder_hidden_states": pipe.text_encoder(ids)[0]}

    def trl_sample_keys(self, pipe, prompts, sample, num_branches):
        # TRL's tokenisation (the encoder's ids, padded to the tokenizer's length), one row per branch; the
        # embeddings are the sample's own tensors under TRL's names, not copies
        ids = token_ids(pipe.tokenizer, prompts, sample["latents"].device)
        keys = {"prompt_ids": ids.repeat_interleave(num_branches, dim=0),
                "prompt_embeds": sample["cond.encoder_hidden_states"]}
        if "uncond.encoder_hidden_states" in sample:
            keys["negative_prompt_embeds"] = sample["uncond.encoder_hidden_states"]
        return keys

    def conditioning_from_embeds(self, embeds, rows, negative):
        """
        TRL's layout: ``cat([negative_prompt_embeds, prompt_embeds])`` (`2 * rows` rows) under guidance, or the
        prompt embeddings alone (`rows` rows), whose unconditional half under guidance is the trainer's
        `negative`.
        """
        if negative is not None and embeds.shape[0] == 2 * rows:
            uncond, cond = embeds.chunk(2)
            return Conditioning({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond})
        if embeds.shape[0] == rows:
            return Conditioning.from_rows({"cond.encoder_hidden_states": embeds}, negative)
        if negative is None:
            expected = (f"{rows} (the prompt embeddings alone: train_cfg is off, so there is no unconditional "
                        "half to concatenate)")
        else:
            expected = (f"{2 * rows} (cat([negative_prompt_embeds, prompt_embeds]), as train_cfg runs guidance) or "
                        f"{rows} (the prompt embeddings alone)")
        raise ValueError(
            f"calculate_loss: embeds has {embeds.shape[0]} rows for {rows} rows of latents; expected {expected}."
        )

    def forward(self, denoiser, latents, timesteps, cond):
        return denoiser(latents, timesteps, cond["encoder_hidden_states"]).sample

    def decode(self, pipe, latents):
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

