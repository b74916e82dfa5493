"""FLUX.1 (dev and schnell): a flow-matching transformer over packed latents, conditioned on T5 and pooled CLIP.

FLUX.1-dev is guidance-distilled: the guidance scale is an *input* of the transformer (its guidance embedding), so
sampling and training run one row per sample, with no unconditional half. The scale the run samples with
(`sample_guidance_scale`) is stored in every row's conditioning (``cond["guidance"]``), so training evaluates the
policy exactly as it sampled. FLUX.1-schnell has no guidance embedding and takes no guidance at all.

Latents are kept unpacked, ``(B, 16, h, w)``, as the VAE and the rest of b2trl see them; `FluxFamily.forward`
packs them into the transformer's ``(B, (h/2)(w/2), 64)`` sequence of 2x2 patches and unpacks its prediction. The
flow-matching step is elementwise and its log-probability a mean over the latent's values, so the layout changes
neither, and the image position ids follow from ``h`` and ``w`` (non-square images included).

The schedule is `FluxPipeline`'s: sigmas ``linspace(1, 1/T, T)`` shifted by ``mu``, which grows with the image's
token count (FLUX.1-dev's scheduler config, ``use_dynamic_shifting``); schnell's scheduler ignores ``mu``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .base import ModelFamily, packed_image_size, resolution_shift, token_ids

logger = logging.getLogger(__name__)

# FluxPipeline refuses longer T5 sequences; the diffusers docs limit FLUX.1-schnell to 256
MAX_T5_LENGTH, MAX_T5_LENGTH_SCHNELL = 512, 256


def _unwrapped(denoiser):
    """The transformer inside distributed or compiled wrappers (DDP, DeepSpeed: ``.module``; torch.compile:
    ``._orig_mod``), whose config says whether it has a guidance embedding."""
    while not hasattr(denoiser, "config"):
        inner = getattr(denoiser, "module", None)
        inner = getattr(denoiser, "_orig_mod", None) if inner is None else inner
        if inner is None:
            break
        denoiser = inner
    return denoiser


def has_guidance_embedding(denoiser) -> bool:
    """Whether a FLUX transformer takes a guidance value (FLUX.1-dev) or not (FLUX.1-schnell)."""
    return bool(getattr(getattr(_unwrapped(denoiser), "config", None), "guidance_embeds", False))


def t5_sequence_length(pipe) -> int:
    """
    The T5 length prompts are padded to: ``tokenizer_2.model_max_length`` (512 for FLUX.1-dev's tokenizer; 512 when
    the tokenizer sets no limit), at most 512 (what `FluxPipeline` accepts) and at most 256 for a model without a
    guidance embedding (FLUX.1-schnell, per the diffusers documentation).

    T5 is padded without an attention mask, so the padding is part of the conditioning: sample outside b2trl with
    the same ``max_sequence_length``. To train with shorter sequences (Flow-GRPO trains FLUX.1-dev with 128), set
    ``pipeline.tokenizer_2.model_max_length`` before building the trainer; it is saved with the pipeline.
    """
    length = getattr(pipe.tokenizer_2, "model_max_length", None)
    if length is None or length > 100_000:  # transformers' "no limit" is a huge integer
        length = MAX_T5_LENGTH
    limit = MAX_T5_LENGTH if has_guidance_embedding(pipe.transformer) else MAX_T5_LENGTH_SCHNELL
    return int(min(length, limit))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents as the transformer's sequence of 2x2 patches, ``(B, (h/2)(w/2), 4C)``, in
    `FluxPipeline`'s order (rows of patches; each patch's channels, then its 2x2 pixels)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width` values."""
    b, _, channels = packed.shape
    patches = packed.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(rows: int, columns: int, device, dtype) -> torch.Tensor:
    """The rotary position ids of a `rows` x `columns` grid of patches, ``(rows·columns, 3)``: 0, row, column."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


class FluxFamily(ModelFamily):
    """
    FLUX.1-dev and FLUX.1-schnell (`FluxPipeline`).

    Class attributes (besides [`~b2trl.models.ModelFamily`]'s):
        suggested_settings: the settings the field trains FLUX.1-dev with, as [`B2DiffuRLConfig`] fields:
            ``noise_level`` 0.9 and ``sample_guidance_scale`` 3.5 (Flow-GRPO's ``pickscore_flux`` config; 3.5 is also
            `FluxPipeline`'s default), ``mixed_precision`` ``"bf16"`` (Flow-GRPO's FAQ: FLUX does not produce valid
            images in fp16).
    """

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_name = "transformer"
    hub_tags = ("flux", "flux-diffusers")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    # the double-stream blocks' attention (image and text projections) and both feed-forwards; the single-stream
    # blocks' attention shares the to_q/to_k/to_v names (Flow-GRPO's train_flux.py, diffusers' FLUX LoRA script)
    lora_target_modules = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    suggested_settings = {"noise_level": 0.9, "sample_guidance_scale": 3.5, "mixed_precision": "bf16"}

    def prepare(self, pipe, *, use_lora: bool) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().prepare(pipe, use_lora=use_lora)

    def place(self, pipe, device, dtype, use_lora: bool) -> None:
        if dtype == torch.float16:
            logger.warning(
                "FLUX.1 in fp16 does not produce valid images (Flow-GRPO's FAQ); train it with mixed_precision='bf16'."
            )
        super().place(pipe, device, dtype, use_lora)

    def make_sampler(self, config):
        from ..samplers import FlowSDESampler

        return FlowSDESampler(config.noise_level, prefix_sde=config.prefix_sde, suffix_sde=config.suffix_sde)

    def uses_guidance(self, config) -> bool:
        """Never: FLUX.1-dev's guidance is an input of the transformer (one row per sample), whatever `train_cfg`
        says; schnell has none."""
        return False

    def sampling_inputs(self, pipe, config, batch_size, device):
        """``guidance``: `sample_guidance_scale` for every row (float32, as `FluxPipeline` passes it), when the
        transformer has a guidance embedding."""
        if not has_guidance_embedding(pipe.transformer):
            return {}
        return {"guidance": torch.full((batch_size,), float(config.sample_guidance_scale), device=device)}

    def guidance_call_kwargs(self, config) -> dict:
        # FluxPipeline's guidance_scale is the embedded guidance; it never runs a negative prompt unless asked
        return {"guidance_scale": config.sample_guidance_scale}

    def pipeline_call_kwargs(self, pipe, *, eta: float = 1.0) -> dict:
        return {"max_sequence_length": t5_sequence_length(pipe)}

    def schedule_kwargs(self, pipe, num_inference_steps, image_size):
        """`FluxPipeline`'s: ``sigmas = linspace(1, 1/T, T)`` (none for a scheduler with ``use_flow_sigmas``) and
        ``mu`` for the image's packed token count (schnell's scheduler, without ``use_dynamic_shifting``, ignores
        it)."""
        config = pipe.scheduler.config
        rows, columns = (side // (2 * int(pipe.vae_scale_factor)) for side in image_size)
        kwargs = {"mu": resolution_shift(config, rows * columns, default_max_shift=1.15)}
        if not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return kwargs

    # ------------------------------------------------------------------ conditioning and prediction

    def encode_prompts(self, pipe, prompts, device, image_size=None):
        """
        ``encoder_hidden_states``: T5's last hidden states, padded to `t5_sequence_length`;
        ``pooled_projections``: CLIP's pooled output. The same tensors as `FluxPipeline.encode_prompt` with
        ``max_sequence_length`` set to `t5_sequence_length` (its ``text_ids`` are zeros, made in
        `FluxFamily.forward`).
        """
        prompts = list(prompts)
        clip_ids = token_ids(pipe.tokenizer, prompts, device, pipe.tokenizer_max_length)
        pooled = pipe.text_encoder(clip_ids).pooler_output.to(dtype=pipe.text_encoder.dtype)
        t5_ids = token_ids(pipe.tokenizer_2, prompts, device, t5_sequence_length(pipe))
        states = pipe.text_encoder_2(t5_ids)[0].to(dtype=pipe.text_encoder_2.dtype)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def forward(self, denoiser, latents, timesteps, cond):
        _, _, height, width = latents.shape
        text = cond["encoder_hidden_states"]
        guidance = None
        if has_guidance_embedding(denoiser):
            guidance = cond.get("guidance")
            if guidance is None:
                raise ValueError(
                    "this FLUX transformer has a guidance embedding (FLUX.1-dev): its conditioning needs 'guidance', "
                    "one value per row (FluxFamily.predict adds the guidance scale when it is missing)."
                )
        prediction = denoiser(
            hidden_states=pack_latents(latents),
            # as FluxPipeline: the timestep in the latents' dtype, over 1000 (the transformer multiplies it back)
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=image_ids(height // 2, width // 2, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)

    def predict(self, denoiser, latents, timesteps, conditioning, guidance_scale):
        """
        One row per sample. A model with a guidance embedding takes each row's stored ``guidance`` (what the run
        sampled with), or `guidance_scale` for rows that have none; true classifier-free guidance (an unconditional
        half) is not run.
        """
        if conditioning.uncond is not None:
            raise ValueError(
                "FLUX.1 runs without classifier-free guidance halves (its guidance is an input of the transformer); "
                "pass a Conditioning without uncond."
            )
        cond = conditioning.cond
        if "guidance" not in cond and has_guidance_embedding(denoiser):
            cond = dict(cond, guidance=torch.full((latents.shape[0],), float(guidance_scale), device=latents.device))
        return self.forward(denoiser, latents, timesteps, cond)

    # ------------------------------------------------------------------ weights

    def lora_layers(self, denoiser) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT's key names, as diffusers' FLUX LoRA script saves them and
        `FluxPipeline.load_lora_weights` reads them (its loader checks ``lora_A`` shapes against the model)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    # ------------------------------------------------------------------ latents and images

    def image_size(self, pipe, resolution=None):
        """``(height, width)``: `resolution` square (a multiple of 16: the VAE's scale factor, then the 2x2
        packing), else `FluxPipeline`'s default, ``default_sample_size · vae_scale_factor`` (1024)."""
        return packed_image_size(pipe, resolution, "FLUX")

    def latent_shape(self, pipe, batch_size, image_size):
        """Unpacked: ``(B, in_channels / 4, h, w)`` with ``h = H / vae_scale_factor`` (even)."""
        factor = 2 * int(pipe.vae_scale_factor)
        channels = pipe.transformer.config.in_channels // 4
        return (batch_size, channels, 2 * (image_size[0] // factor), 2 * (image_size[1] // factor))

    def decode(self, pipe, latents):
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, pipe, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Latents of `images` in ``[0, 1]`` as the transformer sees them (unpacked): ``(x − shift_factor) ·
        scaling_factor`` of a draw from the VAE's posterior (the inverse of `FluxFamily.decode`)."""
        vae = pipe.vae
        latents = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist.sample(generator)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor
