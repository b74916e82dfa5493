"""The two diffusers warnings b2trl's own calls trigger for nothing are hidden there, and only there."""

import logging

import pytest
import torch

from b2trl.quiet import KnownWarningFilter, hide_known_warnings


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_messages():
    """What diffusers logs during the test (its library logger does not propagate to the root's handlers)."""
    from diffusers.utils import logging as diffusers_logging

    handler = Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # whatever an earlier test set: the warnings must be emitted
    try:
        yield handler.messages
    finally:
        diffusers_logging.set_verbosity(verbosity)
        logger.removeHandler(handler)


FP32 = "should be kept in float32: []"


def test_casting_in_a_family_hides_the_empty_float32_warning_and_only_there(tiny_model_dir, diffusers_messages):
    from b2trl import load_pipeline

    pipeline = load_pipeline(tiny_model_dir, use_lora=True)
    pipeline.family.place(pipeline.sd_pipeline, torch.device("cpu"), torch.bfloat16, use_lora=True)
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.vae.dtype == torch.bfloat16
    assert not [m for m in diffusers_messages if FP32 in m]
    pipeline.vae.to(torch.float32)  # the user's own cast, outside b2trl's call: diffusers still says it
    assert [m for m in diffusers_messages if FP32 in m and "AutoencoderKL" in m]


def test_loading_a_b2trl_lora_hides_the_text_encoder_warning(tiny_model_dir, tmp_path, diffusers_messages):
    from diffusers import StableDiffusionPipeline

    from b2trl import load_pipeline
    from b2trl.toy.evaluate import _load

    pipeline = load_pipeline(tiny_model_dir, use_lora=True)
    pipeline.get_trainable_layers()
    pipeline.family.save_lora(pipeline.unet, str(tmp_path / "lora"))
    StableDiffusionPipeline.from_pretrained(tiny_model_dir).load_lora_weights(str(tmp_path / "lora"))
    shown = [m for m in diffusers_messages if m.startswith("No LoRA keys associated to CLIPTextModel")]
    assert shown  # diffusers' own call says it
    diffusers_messages.clear()
    _load(tiny_model_dir, str(tmp_path / "lora"))  # b2trl's call does not
    assert not [m for m in diffusers_messages if m.startswith("No LoRA keys")]


@pytest.mark.parametrize("message, shown", [
    ("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly", False),
    ("There are modules in T5EncoderModel that should be kept in float32: ['wo']. Casting directly", True),
    ("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe", False),
    ("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'. This is safe", True),
    ("Something else entirely", True),
])
def test_the_filter_drops_exactly_the_harmless_messages(message, shown):
    record = logging.LogRecord("diffusers.loaders.peft", logging.WARNING, __file__, 1, message, None, None)
    assert KnownWarningFilter(["CLIPTextModel"]).filter(record) is shown


def test_the_filter_is_removed_after_the_block():
    logger = logging.getLogger("diffusers.models.modeling_utils")
    before = list(logger.filters)
    with hide_known_warnings():
        assert len(logger.filters) == len(before) + 1
    assert logger.filters == before
