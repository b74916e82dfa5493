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
