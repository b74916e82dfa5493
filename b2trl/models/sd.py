"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet predicting noise, DDIM with eta for log-probabilities."""

from __future__ import annotations

from .base import ModelFamily, token_ids


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

    def forward(self, denoiser, latents, timesteps, cond):
        return denoiser(latents, timesteps, cond["encoder_hidden_states"]).sample

    def decode(self, pipe, latents):
        vae = pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

