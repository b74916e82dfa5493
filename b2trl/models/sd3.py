"""Stable Diffusion 3 / 3.5: a flow-matching transformer conditioned on two CLIP encoders and T5.

The transformer (MMDiT) predicts a velocity on a rectified-flow path, so the family trains with the SDE step of
[`~b2trl.samplers.FlowSDESampler`] instead of DDIM. Prompts are encoded exactly as `StableDiffusion3Pipeline`
encodes them, except that T5 is padded to ``tokenizer_3.model_max_length``, the length the model was trained
with, instead of the pipeline's default of 256.
"""

from __future__ import annotations

import torch

from .base import ModelFamily, resolution_shift, token_ids

# what StableDiffusion3Pipeline pads T5 to when it is not told otherwise
DIFFUSERS_T5_LENGTH = 256


def t5_sequence_length(pipe) -> int:
    """
    The T5 length that prompts are padded to: ``tokenizer_3.model_max_length``, or diffusers' default of 256 when
    the pipeline has no T5 tokenizer or the tokenizer sets no limit.

    A model trained with shorter T5 sequences degrades at diffusers' 256 (T5 is padded without an attention mask,
    so the padding is part of the conditioning); pass the same value as ``max_sequence_length`` to the pipeline
    when sampling outside b2trl.
    """
    tokenizer = getattr(pipe, "tokenizer_3", None)
    length = getattr(tokenizer, "model_max_length", None)
    if length is None or length > 100_000:  # transformers' "no limit" is a huge integer
        return DIFFUSERS_T5_LENGTH
    return int(length)


class StableDiffusion3Family(ModelFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    hub_tags = ("sd3", "sd3-diffusers")
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    # diffusers' SD3 LoRA scripts' default: the joint attention's image and text projections
    lora_target_modules = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )

    def prepare(self, pipe, *, use_lora: bool) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the SDE step is built on the flow-matching Euler schedule; another scheduler's config is converted
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().prepare(pipe, use_lora=use_lora)

    def pipeline_call_kwargs(self, pipe, *, eta: float = 1.0) -> dict:
        # the flow pipeline has no eta; it must pad T5 as the model was trained
        return {"max_sequence_length": t5_sequence_length(pipe)}

    def schedule_kwargs(self, pipe, num_inference_steps, image_size):
        """SD3 and SD3.5 ship a fixed shift; a scheduler configured for a resolution-dependent one gets the ``mu``
        that `StableDiffusion3Pipeline` computes (its image tokens: latent pixels over the patch size, squared)."""
        if not pipe.scheduler.config.get("use_dynamic_shifting", False):
            return {}
        factor, patch = int(pipe.vae_scale_factor), pipe.transformer.config.patch_size
        tokens = (image_size[0] // factor // patch) * (image_size[1] // factor // patch)
        return {"mu": resolution_shift(pipe.scheduler.config, tokens, default_max_shift=1.16)}

    def make_sampler(self, config):
        from ..samplers import FlowSDESampler

        return FlowSDESampler(config.noise_level, prefix_sde=config.prefix_sde, suffix_sde=config.suffix_sde)

    # ------------------------------------------------------------------ conditioning and prediction

    def _clip(self, pipe, tokenizer, text_encoder, prompts, device):
        """One CLIP encoder's penultimate hidden states and pooled (projected) embedding."""
        out = text_encoder(token_ids(tokenizer, prompts, device, pipe.tokenizer_max_length), output_hidden_states=True)
        return out.hidden_states[-2].to(dtype=pipe.text_encoder.dtype), out[0]

    def _t5(self, pipe, prompts, device):
        """T5's last hidden states padded to [`t5_sequence_length`], or zeros of that shape without T5."""
        length = t5_sequence_length(pipe)
        if pipe.text_encoder_3 is None:
            width = pipe.transformer.config.joint_attention_dim
            return torch.zeros((len(prompts), length, width), device=device, dtype=pipe.text_encoder.dtype)
        states = pipe.text_encoder_3(token_ids(pipe.tokenizer_3, prompts, device, length))[0]
        return states.to(dtype=pipe.text_encoder_3.dtype)

    def encode_prompts(self, pipe, prompts, device, image_size=None):
        """
        ``encoder_hidden_states``: both CLIP encoders' penultimate hidden states side by side, zero-padded to T5's
        width and followed by T5's sequence; ``pooled_projections``: both CLIP encoders' pooled embeddings side
        by side. The same tensors as `StableDiffusion3Pipeline.encode_prompt` with ``max_sequence_length`` set
        to [`t5_sequence_length`].
        """
        prompts = list(prompts)
        clip_l, pooled_l = self._clip(pipe, pipe.tokenizer, pipe.text_encoder, prompts, device)
        clip_g, pooled_g = self._clip(pipe, pipe.tokenizer_2, pipe.text_encoder_2, prompts, device)
        t5 = self._t5(pipe, prompts, device)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1),
        }

    def forward(self, denoiser, latents, timesteps, cond):
        return denoiser(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ weights

    def lora_layers(self, denoiser) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT's key names, as diffusers' SD3 LoRA scripts save them. (The older
        diffusers names would rename ``to_q``/``to_k``/``to_v``/``to_out`` but not the ``add_*`` projections, and
        SD3's loader, which reads the first key to tell the layouts apart, would then drop half the file.)"""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    # ------------------------------------------------------------------ latents and images

    def decode(self, pipe, latents):
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        decoded = vae.decode(latents).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, pipe, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents of `images` in ``[0, 1]`` as the transformer sees them: ``(x − shift_factor) · scaling_factor``
        of a draw from the VAE's posterior (the inverse of [`StableDiffusion3Family.decode`])."""
        vae = pipe.vae
        posterior = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist
        latents = posterior.sample(generator)
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
