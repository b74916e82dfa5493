"""What the trainer needs from a model family, and the conditioning object that carries a prompt through it.

A family knows how one kind of diffusers pipeline encodes prompts, calls its denoiser, shapes and decodes
latents, and saves or loads LoRA weights in diffusers' layout. The trainer and the branch rollout call only
these methods, so supporting a new kind of model is one new module in ``b2trl/models/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..quiet import hiding_known_warnings

LORA_FILE = "pytorch_lora_weights.safetensors"


def token_ids(tokenizer, prompts, device, max_length: Optional[int] = None) -> torch.Tensor:
    """Token ids of `prompts` padded and truncated to `max_length` (default: the tokenizer's own), as diffusers'
    pipelines tokenize them."""
    return tokenizer(
        list(prompts),
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length if max_length is None else max_length,
    ).input_ids.to(device)


def resolution_shift(scheduler_config, image_seq_len: int, default_max_shift: float = 1.15) -> float:
    """
    ``mu``, the resolution-dependent shift of a flow-matching schedule (``use_dynamic_shifting``): linear in the
    image's token count, from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at
    ``max_image_seq_len`` (the scheduler config's values; FLUX.1's defaults 0.5 at 256 and 1.15 at 4096).
    """
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    # the pipelines' order of operations, so that mu (and the schedule) match theirs to the last bit
    intercept = base_shift - slope * base_len
    return image_seq_len * slope + intercept


def packed_image_size(pipe, resolution: Optional[int], model: str) -> tuple[int, int]:
    """
    ``(height, width)`` for a family whose transformer packs latents in 2x2 patches (FLUX.1, Qwen-Image):
    `resolution` square, checked to be a multiple of twice the VAE's scale factor, else the pipeline's own default
    (``default_sample_size`` latent pixels, 1024 px). `model` names the model in the error.
    """
    multiple = 2 * int(pipe.vae_scale_factor)
    if resolution is not None:
        if resolution < multiple or resolution % multiple:
            raise ValueError(
                f"resolution must be a positive multiple of {multiple} for {model} (the VAE's scale factor "
                f"{pipe.vae_scale_factor} times the 2x2 patches), got {resolution}."
            )
        return (resolution, resolution)
    side = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return (side, side)


@dataclass
class Conditioning:
    """
    Per-row conditioning of the denoiser: its keyword tensors for the prompt, and for the unconditional half of
    classifier-free guidance when guidance is used (`uncond` is `None` otherwise).

    Every tensor has one row per sample, so a conditioning is indexed, repeated and concatenated like the
    latents it goes with. [`Conditioning.to_rows`] flattens it into a sample dict (keys ``cond.<name>`` and
    ``uncond.<name>``) that is shuffled and sliced with the rest of a stage's transitions.
    """

    cond: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    def _map(self, fn) -> "Conditioning":
        uncond = None if self.uncond is None else {k: fn(v) for k, v in self.uncond.items()}
        return Conditioning({k: fn(v) for k, v in self.cond.items()}, uncond)

    def index(self, rows) -> "Conditioning":
        """The rows `rows` (a slice, an index tensor or a mask)."""
        return self._map(lambda v: v[rows])

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        """Each row `repeats` times in a row (the rows of a branch group, or of stacked interval steps)."""
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def to_rows(self) -> dict[str, torch.Tensor]:
        rows = {f"cond.{k}": v for k, v in self.cond.items()}
        if self.uncond is not None:
            rows.update({f"uncond.{k}": v for k, v in self.uncond.items()})
        return rows

    @classmethod
    def from_rows(cls, rows: dict[str, torch.Tensor], negative: Optional[dict[str, torch.Tensor]] = None
                  ) -> "Conditioning":
        """
        The conditioning stored in a sample dict by [`Conditioning.to_rows`] (other keys are ignored). `negative`,
        the unconditional half as one row held once per stage, is expanded to every row (a view, not a copy).
        """
        cond = {k[len("cond.") :]: v for k, v in rows.items() if k.startswith("cond.")}
        uncond = {k[len("uncond.") :]: v for k, v in rows.items() if k.startswith("uncond.")}
        if negative is not None and not uncond:
            n = next(iter(cond.values())).shape[0]
            uncond = {k: v.expand(n, *v.shape[1:]) for k, v in negative.items()}
        return cls(cond, uncond or None)


class ModelFamily:
    """
    One kind of text-to-image pipeline (SD1.x, SDXL, SD3, ...), as the trainer sees it.

    Class attributes:
        name: short name used in messages and model cards.
        pipeline_class_name: the diffusers pipeline class (``model_index.json``'s ``_class_name``).
        denoiser_name: the denoiser's attribute on the pipeline (``"unet"`` or ``"transformer"``).
        text_encoder_names: the pipeline's text encoders (frozen, moved to the inference dtype).
        lora_target_modules: the denoiser's modules that receive LoRA layers.
        hub_tags: the model card's tags for this kind of model.
    """

    name: str = ""
    pipeline_class_name: str = ""
    denoiser_name: str = "unet"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    lora_target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    hub_tags: tuple[str, ...] = ("stable-diffusion",)

    # ------------------------------------------------------------------ recognising a pipeline

    def matches(self, class_name: str) -> bool:
        """Whether a pipeline of diffusers class `class_name` belongs to this family."""
        return class_name == self.pipeline_class_name

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def prepare(self, pipe, *, use_lora: bool) -> None:
        """Set a freshly loaded diffusers pipeline up for training: sampler scheduler, frozen parts."""
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        for name in self.text_encoder_names + ("vae",):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        getattr(pipe, self.denoiser_name).requires_grad_(not use_lora)

    @hiding_known_warnings  # casting modules that keep nothing in float32: diffusers warns for nothing
    def place(self, pipe, device, dtype: torch.dtype, use_lora: bool) -> None:
        """
        Move the pipeline's modules to `device`: the frozen ones in the inference `dtype`; the denoiser in
        `dtype` when it trains LoRA (the base is frozen), in float32 for full fine-tuning (master weights).
        """
        for name in ("vae",) + self.text_encoder_names:
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(device, dtype=dtype)
        getattr(pipe, self.denoiser_name).to(device, dtype=dtype if use_lora else torch.float32)

    def pipeline_call_kwargs(self, pipe, *, eta: float = 1.0) -> dict:
        """
        What the diffusers pipeline's ``__call__`` needs, beyond prompt, steps and guidance, to sample as training
        does: DDIM's `eta` here; a flow family passes its T5 length instead.
        """
        return {"eta": eta}

    def make_sampler(self, config):
        """The sampler this family trains with, built from the config."""
        raise NotImplementedError

    def uses_guidance(self, config) -> bool:
        """
        Whether sampling and training run classifier-free guidance (an unconditional half per row, combined with
        `sample_guidance_scale`). TRL's `train_cfg` by default; a guidance-distilled model (FLUX.1-dev, whose
        guidance is an input of the transformer) runs one row per sample instead.
        """
        return bool(config.train_cfg)

    def sampling_inputs(self, pipe, config, batch_size: int, device) -> dict[str, torch.Tensor]:
        """
        Per-row denoiser inputs that the run's configuration sets rather than the prompt (FLUX.1-dev's embedded
        guidance: `sample_guidance_scale` in every row). The trainer adds them to each batch's conditioning, so
        they are stored with the samples and training uses exactly what sampling used. None by default.
        """
        return {}

    def guidance_call_kwargs(self, config) -> dict:
        """
        The guidance arguments of the diffusers pipeline's ``__call__`` that sample as the run samples (model-card
        images, the card's usage snippet): classifier-free guidance at `sample_guidance_scale` with the run's
        negative prompt when the family runs it ([`ModelFamily.uses_guidance`]), else a scale of 1 (off).
        """
        if self.uses_guidance(config):
            return {"guidance_scale": config.sample_guidance_scale, "negative_prompt": config.negative_prompts or None}
        return {"guidance_scale": 1.0}

    def schedule_kwargs(self, pipe, num_inference_steps: int, image_size: tuple[int, int]) -> dict:
        """
        What the family's own pipeline passes to ``scheduler.set_timesteps`` besides the number of steps and the
        device, for images of `image_size` ``(height, width)`` pixels: e.g. a flow model's explicit ``sigmas`` and
        its resolution-dependent shift ``mu``. The sampler builds its schedule with them, so sampling and
        training use exactly the schedule the pipeline would use at that resolution.
        """
        return {}

    # ------------------------------------------------------------------ conditioning and prediction

    def encode_prompts(self, pipe, prompts: list[str], device, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning tensors for `prompts`, one row each, for images of `image_size` (h, w)."""
        raise NotImplementedError

    def encode_negative(self, pipe, negative_prompt: str, device, image_size: tuple[int, int]) -> dict:
        """The unconditional half's tensors for one row (the trainer expands them to a batch)."""
        return self.encode_prompts(pipe, [negative_prompt], device, image_size)

    def forward(self, denoiser, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """One call of the denoiser on a batch of rows; returns its prediction."""
        raise NotImplementedError

    def trl_sample_keys(self, pipe, prompts, sample: dict, num_branches: int) -> dict[str, torch.Tensor]:
        """
        The keys TRL's `DDPOTrainer._generate_samples` puts in a sample dict (``prompt_ids``, ``prompt_embeds``,
        ``negative_prompt_embeds``), for a family whose conditioning TRL knows. `sample` is b2trl's sample dict of
        `prompts`, each sampled `num_branches` times; the returned tensors share its storage where they hold the
        same values. None by default: TRL's DDPO trains SD1.x only.
        """
        return {}

    def conditioning_from_embeds(self, embeds: torch.Tensor, rows: int, negative: Optional[dict]) -> Conditioning:
        """
        The conditioning that TRL's `embeds` tensor stands for in `calculate_loss`, for `rows` latents (`negative`:
        the trainer's unconditional half, or `None` without guidance). Refused by default: only a family whose
        denoiser takes nothing but the prompt's embeddings (SD1.x) can be conditioned by one tensor.
        """
        raise ValueError(
            f"calculate_loss: embeds is a tensor of prompt embeddings (TRL's layout), which conditions an SD1.x UNet "
            f"only; the {self.name} family's {self.denoiser_name} takes more than encoder_hidden_states. Pass a "
            "Conditioning instead: Conditioning.from_rows(sample) for a sample dict of _generate_samples, or "
            "trainer.encode(prompts)."
        )

    def predict(self, denoiser, latents, timesteps, conditioning: Conditioning, guidance_scale: float):
        """
        The denoiser's prediction, with classifier-free guidance when `conditioning` has an unconditional half.
        Both halves run as one batch, the unconditional rows first.
        """
        if conditioning.uncond is None:
            return self.forward(denoiser, latents, timesteps, conditioning.cond)
        both = {k: torch.cat([conditioning.uncond[k], conditioning.cond[k]]) for k in conditioning.cond}
        pred = self.forward(denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        uncond, cond = pred.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    # ------------------------------------------------------------------ latents and images

    def image_size(self, pipe, resolution: Optional[int] = None) -> tuple[int, int]:
        """
        ``(height, width)`` in pixels: `resolution` square if given (checked against the VAE's scale factor),
        else the size the denoiser was configured for.
        """
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        if resolution is not None:
            if resolution < factor or resolution % factor:
                raise ValueError(
                    f"resolution must be a positive multiple of the VAE's scale factor {factor}, got {resolution}."
                )
            return (resolution, resolution)
        size = getattr(pipe, self.denoiser_name).config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (height * factor, width * factor)

    def latent_shape(self, pipe, batch_size: int, image_size: tuple[int, int]) -> tuple[int, ...]:
        """Shape of the initial noise for `batch_size` images of `image_size` pixels."""
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        channels = getattr(pipe, self.denoiser_name).config.in_channels
        return (batch_size, channels, image_size[0] // factor, image_size[1] // factor)

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents to images in ``[0, 1]`` (float32)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights

    def lora_targets(self, denoiser) -> list[str]:
        """The modules of `denoiser` that receive LoRA layers, as PEFT's ``target_modules``: `lora_target_modules`,
        unless a family leaves out some of the model's modules by name."""
        return list(self.lora_target_modules)

    def add_lora(self, denoiser, *, rank: int = 4, alpha: int = 4) -> None:
        """Add a trainable LoRA adapter (float32 weights, so mixed precision does not unscale fp16 ones)."""
        from peft import LoraConfig

        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=self.lora_targets(denoiser)
        )
        denoiser.add_adapter(config)
        for param in denoiser.parameters():
            if param.requires_grad:
                param.data = param.to(torch.float32)

    def lora_layers(self, denoiser) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' key layout (what ``save_lora_weights`` expects)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    def save_lora(self, denoiser, folder: str) -> None:
        """Write ``pytorch_lora_weights.safetensors`` that ``<Pipeline>.load_lora_weights(folder)`` loads."""
        os.makedirs(folder, exist_ok=True)
        layers = {f"{self.denoiser_name}_lora_layers": self.lora_layers(denoiser)}
        self.pipeline_class.save_lora_weights(folder, safe_serialization=True, **layers)

    def load_lora(self, denoiser, folder: str, adapter_name: str = "default") -> None:
        """
        Load LoRA weights saved in diffusers' layout into the denoiser's *existing* adapter, so an optimizer that
        already holds the adapter's parameters keeps training them (diffusers' own loader adds and activates a
        second adapter instead).
        """
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        path = os.path.join(folder, LORA_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No LoRA weights at {path}: expected a folder written by save_pretrained.")
        state = self.pipeline_class.lora_state_dict(folder, weight_name=LORA_FILE)
        state = state[0] if isinstance(state, tuple) else state
        prefix = f"{self.denoiser_name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"{path} holds no {self.denoiser_name} LoRA weights.")
        result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(own), adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(
                f"{path} does not match this model's LoRA adapter (unexpected keys such as {unexpected[:3]}); "
                "was it trained on another base model or LoRA configuration?"
            )

    def save_denoiser(self, denoiser, folder: str) -> None:
        """Write the fully fine-tuned denoiser to ``folder/<denoiser_name>`` (checkpoints)."""
        denoiser.save_pretrained(os.path.join(folder, self.denoiser_name))

    def load_denoiser(self, denoiser, folder: str) -> None:
        """Load a denoiser written by [`ModelFamily.save_denoiser`] into `denoiser`, in place."""
        loaded = type(denoiser).from_pretrained(folder, subfolder=self.denoiser_name)
        denoiser.load_state_dict(loaded.state_dict())
