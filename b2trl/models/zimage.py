"""Z-Image (Tongyi-MAI): a single-stream flow-matching transformer conditioned on a causal LM's hidden states.

`ZImagePipeline` differs from the other flow pipelines in four ways that this family reproduces exactly:

- **prompts** go through the tokenizer's chat template (``add_generation_prompt=True, enable_thinking=True``),
  are padded to ``max_sequence_length`` (512) and encoded by a causal LM (Qwen3); the transformer gets each
  prompt's *unpadded* penultimate hidden states, a list of tensors of different lengths. b2trl stores them one
  row per sample, zero-padded to ``max_sequence_length`` with their length beside them (``prompt_embeds`` and
  ``prompt_length`` in the conditioning), so samples batch, shuffle and slice like any other; [`ZImageFamily.forward`]
  cuts each row back to its length before calling the transformer;
- **the transformer** takes lists (one latent ``(C, 1, h, w)`` per sample, with a frame axis) and the time
  ``(1000 − t) / 1000`` (0 at pure noise), and its output is *negated* before the scheduler's Euler step. The
  family returns the negated output, so the sampler's step is the standard flow-matching step on ``σ · 1000``
  timesteps. Latents keep the pipeline's unpacked ``(B, C, h, w)`` layout;
- **guidance** is ``pos + g · (pos − neg)`` per sample (not ``neg + g · (pos − neg)``): ``guidance_scale=g`` means
  the same as in the pipeline, CFG runs whenever ``g > 0``, and ``g = 1`` still guides. The pipeline's
  ``cfg_normalization`` (the guided prediction's norm capped at that multiple of the conditional one's) and
  ``cfg_truncation`` (no guidance at steps whose ``(1000 − t) / 1000`` exceeds it) are options of the family;
- **the schedule** is explicit sigmas ``linspace(1, 1/T, T)`` plus the resolution-dependent ``mu``, both passed to
  ``set_timesteps`` whatever the scheduler's ``use_dynamic_shifting`` (Z-Image-Turbo ships a fixed shift of 3, so
  there ``mu`` is ignored as in the pipeline).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import ModelFamily, resolution_shift

# ZImagePipeline's default max_sequence_length: the length prompts are padded to before the text encoder
MAX_SEQUENCE_LENGTH = 512
# ZImagePipeline's image size when none is given (and the real VAE's sample_size)
DEFAULT_RESOLUTION = 1024


def default_sigmas(num_inference_steps: int) -> list[float]:
    """The sigmas `ZImagePipeline` passes to ``set_timesteps`` when it is given none: ``linspace(1, 1/T, T)`` in
    float32, before the scheduler's shift."""
    return torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()


class ZImageFamily(ModelFamily):
    """
    Z-Image and Z-Image-Turbo (`ZImagePipeline`): a 6 B single-stream transformer, Qwen3 hidden states as text,
    flow matching trained with [`~b2trl.samplers.FlowSDESampler`].

    Guidance runs when `train_cfg` is on and `sample_guidance_scale > 0` (Z-Image's convention: Turbo samples with
    0, one row per sample). The two guidance options of `ZImagePipeline.__call__` are the family's, so that
    sampling, training and the model card's samples all use them; set them on a loaded pipeline with
    ``pipeline.family = ZImageFamily(cfg_normalization=..., cfg_truncation=...)``.

    Args:
        cfg_normalization (`float`, *optional*, defaults to `0.0`):
            The pipeline's ``cfg_normalization``: when above 0, a guided prediction whose norm exceeds this
            multiple of the conditional prediction's norm is scaled down to it (``True`` is 1.0). 0 turns it off.
        cfg_truncation (`float`, *optional*, defaults to `1.0`):
            The pipeline's ``cfg_truncation``: steps whose normalised time ``(1000 − t) / 1000`` (0 at pure noise,
            near 1 at the end) is above it run without guidance. 1.0 or more never truncates.
        max_sequence_length (`int`, *optional*, defaults to `512`):
            The length prompts are padded (and truncated) to, the pipeline's ``max_sequence_length``.
    """

    name = "zimage"
    pipeline_class_name = "ZImagePipeline"
    denoiser_name = "transformer"
    hub_tags = ("z-image", "z-image-diffusers")
    text_encoder_names = ("text_encoder",)
    # Flow-Factory's Z-Image defaults: every block's attention projections and SwiGLU feed-forward (the main
    # layers and both refiners, which are the same block)
    lora_target_modules = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )

    def __init__(
        self,
        *,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        cfg_normalization, cfg_truncation = float(cfg_normalization), float(cfg_truncation)
        if not (math.isfinite(cfg_normalization) and cfg_normalization >= 0):
            raise ValueError(
                f"cfg_normalization must be a finite number >= 0 (0 turns it off, 1.0 caps the guided prediction at "
                f"the conditional one's norm), got {cfg_normalization}."
            )
        if math.isnan(cfg_truncation):
            raise ValueError("cfg_truncation must be a number (1.0 never truncates), got nan.")
        if int(max_sequence_length) < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}.")
        self.cfg_normalization = cfg_normalization
        self.cfg_truncation = cfg_truncation
        self.max_sequence_length = int(max_sequence_length)

    def __repr__(self) -> str:
        return (f"ZImageFamily(cfg_normalization={self.cfg_normalization}, cfg_truncation={self.cfg_truncation}, "
                f"max_sequence_length={self.max_sequence_length})")

    def prepare(self, pipe, *, use_lora: bool) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the SDE step is built on the flow-matching Euler schedule; another scheduler's config is converted
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().prepare(pipe, use_lora=use_lora)

    def make_sampler(self, config):
        from ..samplers import FlowSDESampler

        return FlowSDESampler(config.noise_level, prefix_sde=config.prefix_sde, suffix_sde=config.suffix_sde)

    def uses_guidance(self, config) -> bool:
        """`train_cfg` and a guidance scale above 0: `ZImagePipeline` guides whenever ``guidance_scale > 0``
        (Z-Image-Turbo samples with 0)."""
        return bool(config.train_cfg) and config.sample_guidance_scale > 0

    def guidance_call_kwargs(self, config) -> dict:
        """As for other families, except that a scale of 0 turns guidance off: 1.0 still guides Z-Image
        (``pos + 1 · (pos − neg)``)."""
        if self.uses_guidance(config):
            return super().guidance_call_kwargs(config)
        return {"guidance_scale": 0.0}

    def pipeline_call_kwargs(self, pipe, *, eta: float = 1.0) -> dict:
        # no eta; the guidance options only where they differ from the pipeline's defaults
        kwargs = {}
        if self.max_sequence_length != MAX_SEQUENCE_LENGTH:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if self.cfg_normalization > 0:
            kwargs["cfg_normalization"] = self.cfg_normalization
        if self.cfg_truncation != 1.0:
            kwargs["cfg_truncation"] = self.cfg_truncation
        return kwargs

    def schedule_kwargs(self, pipe, num_inference_steps, image_size):
        """``sigmas`` (``linspace(1, 1/T, T)``) and ``mu`` for the image's tokens (latent pixels over the 2x2
        patches), as `ZImagePipeline` passes them."""
        factor = 2 * int(pipe.vae_scale_factor)
        tokens = (image_size[0] // factor) * (image_size[1] // factor)
        return {"sigmas": default_sigmas(num_inference_steps), "mu": resolution_shift(pipe.scheduler.config, tokens)}

    # ------------------------------------------------------------------ conditioning and prediction

    def encode_prompts(self, pipe, prompts, device, image_size=None):
        """
        ``prompt_embeds`` ``(B, max_sequence_length, D)``: each prompt's penultimate hidden states at its
        non-padding tokens, zero-padded at the end; ``prompt_length`` ``(B,)``: how many rows of it are the
        prompt's. Cut back to their lengths they are exactly the list `ZImagePipeline.encode_prompt` gives.
        """
        tokenizer, length = pipe.tokenizer, self.max_sequence_length
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                enable_thinking=True,
            )
            for prompt in prompts
        ]
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device).bool()
        states = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        embeds = torch.zeros((len(texts), length, states.shape[-1]), device=states.device, dtype=states.dtype)
        for i in range(len(texts)):
            kept = states[i][mask[i]]  # the pipeline's selection, wherever the tokenizer pads
            embeds[i, : kept.shape[0]] = kept
        return {"prompt_embeds": embeds, "prompt_length": mask.sum(dim=1)}

    def forward(self, denoiser, latents, timesteps, cond):
        """The transformer's negated output ``(B, C, h, w)`` in float32, so that it is the velocity the
        flow-matching step takes, for `timesteps` ``σ · 1000``."""
        embeds = cond["prompt_embeds"]
        captions = [embeds[i, :n] for i, n in enumerate(cond["prompt_length"].tolist())]
        out = denoiser(
            x=list(latents.unsqueeze(2).unbind(dim=0)),
            t=(1000 - timesteps) / 1000,
            cap_feats=captions,
            return_dict=False,
        )[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def guided_rows(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Which rows guidance applies to: those not past `cfg_truncation` (compared in double precision, as the
        pipeline compares its Python floats)."""
        t_norm = ((1000 - timesteps.float()) / 1000).double()
        return ~(t_norm > self.cfg_truncation)

    def predict(self, denoiser, latents, timesteps, conditioning, guidance_scale):
        """
        ``pos + g · (pos − neg)`` per row, with `cfg_normalization` and `cfg_truncation` as `ZImagePipeline`
        applies them; both halves run as one batch, the conditional rows first (the pipeline's order). Rows past
        the truncation take the conditional prediction; when every row is past it, only the conditional half
        runs, as in the pipeline.
        """
        if conditioning.uncond is None:
            return self.forward(denoiser, latents, timesteps, conditioning.cond)
        guided = self.guided_rows(timesteps)
        if not bool(guided.any()):
            return self.forward(denoiser, latents, timesteps, conditioning.cond)
        both = {k: torch.cat([conditioning.cond[k], conditioning.uncond[k]]) for k in conditioning.cond}
        pred = self.forward(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        positive, negative = pred.chunk(2)
        rows = []
        # row by row, as the pipeline computes it (a norm over one row is not reduced in the same order batched)
        for j, is_guided in enumerate(guided.tolist()):
            pos = positive[j]
            if not is_guided:
                rows.append(pos)
                continue
            row = pos + guidance_scale * (pos - negative[j])
            if self.cfg_normalization > 0:
                cap = torch.linalg.vector_norm(pos) * self.cfg_normalization
                norm = torch.linalg.vector_norm(row)
                if norm > cap:
                    row = row * (cap / norm)
            rows.append(row)
        return torch.stack(rows)

    # ------------------------------------------------------------------ latents and images

    def image_size(self, pipe, resolution: Optional[int] = None) -> tuple[int, int]:
        """
        ``(height, width)``: `resolution` square if given, else the VAE's ``sample_size`` (1024 for Z-Image's VAE,
        the pipeline's default; 1024 when its config does not set one, rather than `AutoencoderKL`'s default of
        32). Sides must be multiples of twice the VAE's scale factor (the transformer's 2x2 patches), as
        `ZImagePipeline` requires.
        """
        factor = 2 * int(pipe.vae_scale_factor)
        if resolution is None:
            config = pipe.vae.config
            unset = "sample_size" in (config.get("_use_default_values") or ())
            size = (None if unset else config.get("sample_size")) or DEFAULT_RESOLUTION
            height, width = (size, size) if isinstance(size, int) else tuple(size)
        else:
            height = width = resolution
        for side in (height, width):
            if side < factor or side % factor:
                raise ValueError(
                    f"resolution must be a positive multiple of {factor} for this Z-Image pipeline (its VAE's scale "
                    f"factor {factor // 2} times the transformer's 2x2 patches), got {side}."
                )
        return (height, width)

    def latent_shape(self, pipe, batch_size, image_size):
        factor = int(pipe.vae_scale_factor)
        return (batch_size, pipe.transformer.config.in_channels, image_size[0] // factor, image_size[1] // factor)

    def decode(self, pipe, latents):
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ weights

    def lora_layers(self, denoiser) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT's key names (``layers.0.attention.to_q.lora_A.weight``), the layout
        `ZImagePipeline.load_lora_weights` (diffusers' `ZImageLoraLoaderMixin`) loads without conversion."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)
