import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run far faster single-threaded, and two threads oversubscribe a busy 2-core machine badly.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline (random weights) saved to disk, built once per test session."""
    from b2trl.testing import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline (random weights, Euler scheduler, VAE with force_upcast) saved to disk, built once."""
    from b2trl.testing import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny SD3 pipeline (random weights, flow-matching Euler scheduler with shift 3, T5 length 16) saved to
    disk, built once."""
    from b2trl.testing import build_tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3_pipeline(str(folder), t5_max_length=16)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny FLUX.1-dev-shaped pipeline (guidance embedding, resolution-dependent shift, T5 length 16), built once."""
    from b2trl.testing import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux_pipeline(str(folder), t5_max_length=16)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_qwenimage_dir(tmp_path_factory):
    """A tiny Qwen-Image pipeline (random weights, Qwen-Image's scheduler) saved to disk, built once."""
    from b2trl.testing import build_tiny_qwenimage_pipeline

    folder = tmp_path_factory.mktemp("tiny-qwenimage")
    build_tiny_qwenimage_pipeline(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    """A tiny Z-Image pipeline (random weights, flow-matching Euler scheduler, shift 3) saved to disk, built once."""
    from b2trl.testing import build_tiny_zimage_pipeline

    folder = tmp_path_factory.mktemp("tiny-zimage")
    build_tiny_zimage_pipeline(str(folder))
    return str(folder)
