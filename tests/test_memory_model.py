"""benchmarks/memory_model.py: weights from parameter counts, activations that follow the rows, and gradient
checkpointing keeping less — on SD1.5's real shape, built on the meta device (nothing allocated)."""

from pathlib import Path

import pytest

from helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_model.py"


@pytest.fixture(scope="module")
def memory_model():
    return load_script(SCRIPT, "memory_model")


def test_sd15_prediction_counts_weights_and_scales_activations_with_rows(memory_model):
    one, two = (memory_model.predict("sd15", 256, rows, dtype="bf16") for rows in (1, 2))
    assert one["denoiser_parameters"] == 859_520_964 and 0 < one["trained_parameters"] < 10**7  # LoRA only
    # the UNet, the CLIP text encoder and the VAE in bf16: 2 bytes a parameter (~1.99 GiB)
    assert one["weights_gib"] == pytest.approx(2 * (859_520_964 + 123_060_480 + 83_653_863) / 2**30, abs=0.01)
    assert two["weights_gib"] == one["weights_gib"]
    assert two["activations_gib"] == pytest.approx(2 * one["activations_gib"], rel=0.05)  # activations per row
    fp32 = memory_model.predict("sd15", 256, 1, dtype="fp32")
    assert fp32["activations_gib"] == pytest.approx(2 * one["activations_gib"], rel=0.05)
    checkpointed = memory_model.predict("sd15", 256, 2, dtype="bf16", gradient_checkpointing=True)
    assert 0 < checkpointed["activations_gib"] < 0.6 * two["activations_gib"]
    assert checkpointed["total_gib"] < two["total_gib"]
