"""The object the trainer trains: a diffusers pipeline, its model family, and whether it trains LoRA."""

from __future__ import annotations

from trl import DefaultDDPOStableDiffusionPipeline


class TrainingPipeline(DefaultDDPOStableDiffusionPipeline):
    """
    A diffusers pipeline set up for RL fine-tuning, as [`B2DiffuRLTrainer`] takes it as `sd_pipeline`.

    A subclass of TRL's `DefaultDDPOStableDiffusionPipeline`, so code written for TRL's pipeline keeps working;
    what differs between model families goes through `family` (a [`~b2trl.models.ModelFamily`]). The
    diffusers components are reachable under their diffusers names (``pipeline.unet`` or
    ``pipeline.transformer``, ``pipeline.vae``, ...) and the diffusers pipeline itself as ``sd_pipeline``.
    Build one with [`~b2trl.load_pipeline`] or [`~b2trl.models.wrap_pipeline`].
    """

    def __init__(self, pipe, family, *, use_lora: bool = True, pretrained_model=None, revision: str = "main"):
        # TRL's constructor only loads SD1.x from a path; this object wraps a pipeline that is already loaded
        self.sd_pipeline = pipe
        self.family = family
        self.use_lora = use_lora
        self.pretrained_model = pretrained_model
        self.pretrained_revision = revision

    def __getattr__(self, name):
        # components that TRL's class has no property for (transformer, text_encoder_2, tokenizer_3, ...)
        if name.startswith("__") or name in ("sd_pipeline", "family"):
            raise AttributeError(name)
        return getattr(self.sd_pipeline, name)

    @property
    def denoiser(self):
        """The trained network: the UNet or the transformer."""
        return getattr(self.sd_pipeline, self.family.denoiser_name)

    @property
    def unet(self):
        return self.denoiser if self.family.denoiser_name == "unet" else getattr(self.sd_pipeline, "unet")

    def get_trainable_layers(self):
        if self.use_lora:
            self.family.add_lora(self.denoiser)
        return self.denoiser

    def save_checkpoint(self, models, weights, output_dir):
        if self.use_lora:
            self.family.save_lora(models[0], output_dir)
        else:
            self.family.save_denoiser(models[0], output_dir)

    def load_checkpoint(self, models, input_dir):
        if self.use_lora:
            self.family.load_lora(models[0], input_dir)
        else:
            self.family.load_denoiser(models[0], input_dir)

    def save_pretrained(self, output_dir):
        if self.use_lora:
            self.family.save_lora(self.denoiser, output_dir)
        else:
            self.sd_pipeline.save_pretrained(output_dir, safe_serialization=True)
