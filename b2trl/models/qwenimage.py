"""Qwen-Image: a 20 B flow-matching MMDiT conditioned on the hidden states of a Qwen2.5-VL language model.

What differs from SD3, and how this family follows `QwenImagePipeline`:

- **Prompts** go into the pipeline's chat template (``pipe.prompt_template_encode``); the language model's last
  hidden states of the real tokens, without the template's first ``pipe.prompt_template_encode_start_idx`` (34)
  tokens, are the conditioning. Their length differs per prompt, so each row is stored zero-padded to a fixed
  `max_sequence_length` with a mask of its real tokens (``encoder_hidden_states_mask``): rows can then be batched,
  shuffled and sliced like any other conditioning. The pipeline pads a batch of prompts to its longest prompt
  only; each row also stores that length (``text_length``), and every denoiser call is cut to the largest
  ``text_length`` among its rows. A call on rows of one batch of prompts thus gets exactly the tensors the
  pipeline builds for that batch (without a mask when no prompt is padded, as the pipeline drops it then), in
  sampling and in training alike. A call mixing batches pads some rows further; the transformer masks padded
  tokens out of its attention and gives real tokens the same rotary positions, so the prediction is the same up
  to float rounding.
- **Latents** are kept unpacked, ``(B, 16, H/8, W/8)`` (the frame axis of the video VAE dropped), and packed into
  2x2 patches, ``(B, H/16 * W/16, 64)``, inside every call. The initial noise is then the same numbers as the
  pipeline's for the same generator, and the SDE step, which acts elementwise, is unchanged by the packing.
- **Schedule**: ``sigmas = linspace(1, 1/N, N)`` and the resolution-dependent shift ``mu`` of the packed token
  count, as the pipeline passes them to ``set_timesteps``. The transformer takes ``t / 1000``.
- **True classifier-free guidance** (the pipeline's ``true_cfg_scale`` with a negative prompt): the conditional
  and unconditional predictions are two transformer calls, as in the pipeline, the negative prompt as one row
  broadcast over the batch when all rows share it (the pipeline encodes it once), and the guided prediction is
  rescaled to the conditional prediction's norm per image token. The rescale is part of the step whose
  log-probability is trained, so [`QwenImageFamily.predict`] computes it in training too. It runs when
  ``train_cfg`` is on and ``sample_guidance_scale > 1`` (see [`QwenImageFamily.uses_guidance`]).
- **Decoding** undoes the VAE's per-channel normalisation (``latents_mean``/``latents_std`` of its config).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .base import ModelFamily, packed_image_size, resolution_shift

logger = logging.getLogger(__name__)

# what QwenImagePipeline.__call__ pads and truncates prompts to when it is not told otherwise
DIFFUSERS_SEQUENCE_LENGTH = 512
# the most QwenImagePipeline accepts (its tokenizer_max_length)
MAX_SEQUENCE_LENGTH = 1024


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` latents as the transformer's sequence of 2x2 patches, ``(B, h/2 * w/2, 4C)``, in the
    order of `QwenImagePipeline._pack_latents`."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of [`pack_latents`]: ``(B, h/2 * w/2, 4C)`` back to ``(B, C, h, w)`` for latents of
    `height` x `width`."""
    b, _, channels = packed.shape
    grid = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, channels // 4, height, width)


def shared_row(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`cond` as one row when all its rows are the same (the negative prompt): the transformer broadcasts it over the
    batch, as `QwenImagePipeline` broadcasts its negative prompt's single row."""
    if all(bool((v == v[:1]).all()) for v in cond.values()):
        return {k: v[:1] for k, v in cond.items()}
    return cond


def call_text(cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    The text tensors of one transformer call: the stored rows cut to the largest ``text_length`` among them (the
    longest prompt of the batch each row was encoded in), and their mask, or `None` when no row is padded: what
    `QwenImagePipeline.encode_prompt` gives for a batch of the same prompts.
    """
    length = int(cond["text_length"].max())
    mask = cond["encoder_hidden_states_mask"][:, :length]
    return cond["encoder_hidden_states"][:, :length], None if bool(mask.bool().all()) else mask


def discarded_modules(transformer) -> list[str]:
    """The last block's modules that only compute the text stream's output, which the transformer drops (it predicts
    from the image stream): they take part in no prediction, so they are not trained."""
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.attn.to_add_out", f"{last}.txt_mlp"]


class QwenImageFamily(ModelFamily):
    """
    `QwenImagePipeline` (Qwen-Image) as a model family.

    Args:
        max_sequence_length (`int`, *optional*, defaults to `512`):
            Text tokens per prompt that are kept (after the chat template's system part); longer prompts are
            truncated, as the pipeline truncates them with the same ``max_sequence_length`` (512 is its
            default, 1024 its maximum). Every sample stores its prompt's hidden states padded to this length, for
            the prompt and for the negative prompt: ``2 x max_sequence_length x 3584`` values per sample in the
            text encoder's dtype (7.3 MB at 512 in bf16), so a shorter length saves memory when prompts are short.
            The denoiser never sees this padding (each call is cut to its rows' longest prompt). To change it, set
            ``pipeline.family = QwenImageFamily(max_sequence_length=...)`` on the loaded pipeline before creating
            the trainer.
    """

    name = "qwenimage"
    pipeline_class_name = "QwenImagePipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder",)
    hub_tags = ("qwen-image", "qwen-image-diffusers")
    # the joint attention's image and text projections and both streams' MLPs: Flow-GRPO's and verl's Qwen-Image
    # LoRA targets (verl examples/flowgrpo_trainer/run_flowgrpo.sh)
    lora_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )

    def __init__(self, max_sequence_length: int = DIFFUSERS_SEQUENCE_LENGTH):
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not (
            1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH
        ):
            raise ValueError(
                f"QwenImageFamily: max_sequence_length must be an int in [1, {MAX_SEQUENCE_LENGTH}] (QwenImagePipeline "
                f"refuses longer prompts), got {max_sequence_length!r}."
            )
        self.max_sequence_length = max_sequence_length

    def prepare(self, pipe, *, use_lora: bool) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the SDE step is built on the flow-matching Euler schedule; another scheduler's config is converted
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().prepare(pipe, use_lora=use_lora)
        for name in discarded_modules(pipe.transformer):
            pipe.transformer.get_submodule(name).requires_grad_(False)

    def lora_targets(self, denoiser) -> list[str]:
        """`lora_target_modules` in every block, except the last block's text output projection and text MLP:
        the transformer discards their output, so they would never get a gradient (DDP refuses parameters that
        get none)."""
        discarded = tuple(discarded_modules(denoiser))
        return [
            name for name, _ in denoiser.named_modules()
            if name.endswith(tuple("." + target for target in self.lora_target_modules))
            and not name.startswith(discarded)
        ]

    def make_sampler(self, config):
        from ..samplers import FlowSDESampler

        return FlowSDESampler(config.noise_level, prefix_sde=config.prefix_sde, suffix_sde=config.suffix_sde)

    def uses_guidance(self, config) -> bool:
        """
        True classifier-free guidance, as the pipeline runs it only with ``true_cfg_scale > 1`` and a negative
        prompt: on when ``train_cfg`` is set and ``sample_guidance_scale > 1`` (the negative prompt is
        ``negative_prompts``, the empty prompt by default). ``train_cfg=False`` or ``sample_guidance_scale <= 1``
        samples and trains one row per sample, without the negative prompt.
        """
        return bool(config.train_cfg) and config.sample_guidance_scale > 1

    def pipeline_call_kwargs(self, pipe, *, eta: float = 1.0) -> dict:
        # no eta; prompts truncated as in training
        return {"max_sequence_length": self.max_sequence_length}

    def guidance_call_kwargs(self, config) -> dict:
        """The pipeline's ``true_cfg_scale`` and a negative prompt (the empty one unless `negative_prompts` is set),
        which together turn its guidance on; ``true_cfg_scale=1`` without a negative prompt when the run samples
        without guidance. ``guidance_scale`` is the guidance-distilled models' argument, not passed."""
        if not self.uses_guidance(config):
            return {"true_cfg_scale": 1.0, "guidance_scale": None}
        return {"true_cfg_scale": config.sample_guidance_scale, "negative_prompt": config.negative_prompts or "",
                "guidance_scale": None}

    def schedule_kwargs(self, pipe, num_inference_steps, image_size):
        """``sigmas = linspace(1, 1/N, N)`` and the shift ``mu`` of the image's packed token count (latent pixels over
        2x2 patches), as `QwenImagePipeline` passes them to ``set_timesteps``."""
        patch = 2 * int(pipe.vae_scale_factor)
        tokens = (image_size[0] // patch) * (image_size[1] // patch)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return {"sigmas": sigmas, "mu": resolution_shift(pipe.scheduler.config, tokens)}

    # ------------------------------------------------------------------ conditioning and prediction

    def encode_prompts(self, pipe, prompts, device, image_size=None):
        """
        ``encoder_hidden_states``: the text encoder's last hidden states of each prompt's real tokens after the chat
        template's system part, zero-padded to `max_sequence_length` rows; ``encoder_hidden_states_mask``: 1 on
        those tokens, 0 on the padding; ``text_length``: the longest prompt's token count, on every row. Cut to
        that length, they are the tensors of `QwenImagePipeline.encode_prompt` with the same
        ``max_sequence_length`` for the same batch of prompts.
        """
        prompts = list(prompts)
        drop = pipe.prompt_template_encode_start_idx
        tokens = pipe.tokenizer(
            [pipe.prompt_template_encode.format(p) for p in prompts],
            max_length=pipe.tokenizer_max_length + drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        hidden = pipe.text_encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        length = self.max_sequence_length
        embeds = hidden.new_zeros(len(prompts), length, hidden.shape[-1])
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=hidden.device)
        longest = 0
        for i, row in enumerate(hidden):
            real = row[tokens.attention_mask[i].bool()][drop:]
            longest = max(longest, real.shape[0])
            real = real[:length]
            embeds[i, : real.shape[0]] = real
            mask[i, : real.shape[0]] = 1
        if longest > length:
            logger.warning(
                f"A prompt has {longest} text tokens; QwenImageFamily keeps max_sequence_length={length} of them (the "
                "rest is cut, as QwenImagePipeline cuts it with the same max_sequence_length)."
            )
        return {
            "encoder_hidden_states": embeds.to(pipe.text_encoder.dtype),
            "encoder_hidden_states_mask": mask,
            "text_length": torch.full((len(prompts),), min(longest, length), dtype=torch.long, device=hidden.device),
        }

    def _packed_forward(self, denoiser, latents, timesteps, cond):
        """The transformer's prediction for unpacked `latents`, in the packed layout ``(B, tokens, 64)``."""
        batch, _, height, width = latents.shape
        text, mask = call_text(cond)
        return denoiser(
            hidden_states=pack_latents(latents),
            timestep=timesteps.to(latents.dtype) / 1000,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]

    def forward(self, denoiser, latents, timesteps, cond):
        return unpack_latents(self._packed_forward(denoiser, latents, timesteps, cond), *latents.shape[-2:])

    def predict(self, denoiser, latents, timesteps, conditioning, guidance_scale):
        """
        Without an unconditional half, one call. With it, the pipeline's true CFG: the conditional and the
        unconditional prediction as two calls (the negative prompt as one broadcast row when every row has the
        same), combined with `guidance_scale`, then rescaled per image token to the conditional prediction's norm
        over the token's 64 packed channels.
        """
        if conditioning.uncond is None:
            return self.forward(denoiser, latents, timesteps, conditioning.cond)
        cond = self._packed_forward(denoiser, latents, timesteps, conditioning.cond)
        uncond = self._packed_forward(denoiser, latents, timesteps, shared_row(conditioning.uncond))
        combined = uncond + guidance_scale * (cond - uncond)
        rescaled = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return unpack_latents(rescaled, *latents.shape[-2:])

    # ------------------------------------------------------------------ weights

    def lora_layers(self, denoiser) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT's key names, as diffusers' Qwen-Image LoRA script saves them and
        `QwenImagePipeline.load_lora_weights` reads them."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    # ------------------------------------------------------------------ latents and images

    def image_size(self, pipe, resolution: Optional[int] = None) -> tuple[int, int]:
        """``(height, width)``: `resolution` square (a multiple of the VAE's scale factor times the 2x2 patches,
        16 for Qwen-Image), else the pipeline's default size (``default_sample_size`` latent pixels, 1024 px)."""
        return packed_image_size(pipe, resolution, "this Qwen-Image pipeline")

    def latent_shape(self, pipe, batch_size, image_size):
        factor = int(pipe.vae_scale_factor)
        channels = pipe.transformer.config.in_channels // 4
        return (batch_size, channels, image_size[0] // factor, image_size[1] // factor)

    def decode(self, pipe, latents):
        """Images in ``[0, 1]``: the VAE's normalisation undone as `QwenImagePipeline` undoes it, then decoded as a
        one-frame video."""
        vae = pipe.vae
        latents = latents.unsqueeze(2).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        decoded = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)
