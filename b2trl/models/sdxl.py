"""Stable Diffusion XL: two CLIP text encoders, a pooled prompt embedding and size micro-conditioning.

What differs from SD1.x:

- the prompt embedding is both encoders' penultimate hidden states side by side (768 + 1280 = 2048 channels for
  the released model), and text_encoder_2's projection gives a pooled embedding;
- the UNet also takes ``added_cond_kwargs``: that pooled embedding (``text_embeds``) and ``time_ids``, the six
  numbers (original height, original width, crop top, crop left, target height, target width) it was trained to
  condition on; both are per row of the [`~b2trl.models.Conditioning`], so training sees them as sampled;
- the model ships an Euler scheduler; DDIM with eta replaces it so that every step has a log-probability;
- the released VAE overflows in fp16 (its config says ``force_upcast``), so it decodes in fp32 in an fp16 run.
"""

from __future__ import annotations

import torch

from ..quiet import hide_known_warnings, hiding_known_warnings
from .base import ModelFamily, token_ids

# (text encoder, tokenizer) pairs in the order their hidden states are concatenated
_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class StableDiffusionXLFamily(ModelFamily):
    """
    The [`~b2trl.models.ModelFamily`] of `StableDiffusionXLPipeline` (SDXL base and its fine-tunes).

    Its conditioning has three tensors per row: ``encoder_hidden_states`` (both text encoders' penultimate hidden
    states, concatenated), ``text_embeds`` (text_encoder_2's pooled projection) and ``time_ids`` (original size,
    crop corner and target size, from the run's image size). The unconditional half of guidance is zeros when the
    negative prompt is empty and the model sets ``force_zeros_for_empty_prompt``. Sampling uses DDIM with eta
    whatever scheduler the model ships with, and the VAE decodes in fp32 in an fp16 run when its config sets
    ``force_upcast``.
    """

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    def prepare(self, pipe, *, use_lora: bool) -> None:
        from diffusers import DDIMScheduler

        config = pipe.scheduler.config
        # an Euler config may not name clip_sample, and DDIM's default (True) would clamp x0-predictions of
        # latents to [-1, 1]
        overrides = {} if "clip_sample" in config else {"clip_sample": False}
        pipe.scheduler = DDIMScheduler.from_config(config, **overrides)
        super().prepare(pipe, use_lora=use_lora)

    @hiding_known_warnings
    def place(self, pipe, device, dtype: torch.dtype, use_lora: bool) -> None:
        """
        As [`~b2trl.models.ModelFamily.place`], except that the VAE goes straight to the dtype `vae_dtype` gives
        it (fp32 in an fp16 run unless the VAE is fp16-safe): casting it to fp16 and back would round its weights.
        """
        for name in self.text_encoder_names:
            getattr(pipe, name).to(device, dtype=dtype)
        pipe.vae.to(device, dtype=self.vae_dtype(pipe.vae, dtype))
        pipe.unet.to(device, dtype=dtype if use_lora else torch.float32)

    def make_sampler(self, config):
        from ..samplers import DDIMSampler

        return DDIMSampler(config.sample_eta)

    # ------------------------------------------------------------------ conditioning and prediction

    def _text_embeddings(self, pipe, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' penultimate hidden states, concatenated, and text_encoder_2's pooled projection."""
        hidden, pooled = [], None
        for encoder_name, tokenizer_name in _ENCODERS:
            tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
            out = encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise ValueError(
                "text_encoder_2 returned no pooled projection (text_embeds): SDXL needs a CLIPTextModelWithProjection."
            )
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, image_size: tuple[int, int], rows: int, device) -> torch.Tensor:
        """
        SDXL's size conditioning for `rows` images of `image_size` ``(h, w)``: original size = target size =
        `image_size`, crop at the top left corner (what diffusers' pipeline uses by default). Float32 in any run:
        bf16 rounds sizes above 2048 (2056 becomes 2048), and the UNet embeds the ids in float32 anyway.
        """
        height, width = image_size
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
        return ids.unsqueeze(0).repeat(rows, 1)

    def encode_prompts(self, pipe, prompts, device, image_size=None):
        if image_size is None:
            image_size = self.image_size(pipe)
        hidden, pooled = self._text_embeddings(pipe, prompts, device)
        return {
            "encoder_hidden_states": hidden,
            "text_embeds": pooled,
            "time_ids": self.time_ids(image_size, hidden.shape[0], device),
        }

    def encode_negative(self, pipe, negative_prompt, device, image_size=None):
        cond = self.encode_prompts(pipe, [negative_prompt or ""], device, image_size)
        if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            # the model was trained with zeros for "no prompt"; the size conditioning stays
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    def forward(self, denoiser, latents, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return denoiser(latents, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added).sample

    # ------------------------------------------------------------------ latents and images

    def vae_dtype(self, vae, inference_dtype: torch.dtype) -> torch.dtype:
        """
        The dtype the VAE should run in when the run's inference dtype is `inference_dtype`: fp32 when the VAE's
        config says it overflows in fp16 (``force_upcast``, true for the released SDXL VAE, false for the
        fp16-fix VAE), else `inference_dtype`.
        """
        if inference_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return torch.float32
        return inference_dtype

    def decode(self, pipe, latents):
        vae = pipe.vae
        dtype = self.vae_dtype(vae, vae.dtype)
        if vae.dtype != dtype:
            # once, and for the rest of the run: toggling per decode would re-cast 84 M parameters each time
            with hide_known_warnings():
                vae.to(dtype=dtype)
        config = vae.config
        latents = latents.to(vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        decoded = vae.decode(latents).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)
