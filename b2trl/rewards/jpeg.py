"""JPEG (in)compressibility, the weight-free rewards of DDPO (Black et al., 2023).

The reward is the size of the image encoded as JPEG at quality 95, in kilobytes (1 kB = 1000 bytes).
Encoding is done with PIL on uint8 copies of the images: the encoder *is* the measure, so there is no
torch equivalent to prefer.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .base import check_reward_inputs


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each `(3, H, W)` image of `images` (in `[0, 1]`) encoded as JPEG at `quality`.

    Returns:
        `torch.Tensor`: float32 sizes, shape `(B,)`, on the CPU.
    """
    from PIL import Image

    # Round to the nearest uint8 level, as an image saved by the sampler would be.
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibility:
    """Reward = JPEG size of the image in kB (bigger files, i.e. more detail/noise, score higher).

    Args:
        quality (`int`, *optional*, defaults to 95): JPEG quality used for the encoding.

    Call it as a TRL DDPO reward: `rewards, metadata = scorer(images, prompts, prompt_metadata)`, with
    `rewards` a float32 tensor `(B,)` on the images' device and `metadata` a dict holding `"jpeg_kb"`.
    """

    name = "jpeg_incompressibility"
    _sign = 1.0

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"`quality` must be in [1, 100], got {quality}.")
        self.quality = int(quality)

    def to(self, device=None):
        """No model to move; present so every scorer can be prepared the same way."""
        return self

    @torch.no_grad()
    def __call__(self, images, prompts, prompt_metadata=None):
        images = check_reward_inputs(images, prompts, prompt_metadata)
        sizes = jpeg_sizes_kb(images, self.quality).to(images.device)
        return self._sign * sizes, {"jpeg_kb": sizes}

    def __repr__(self):
        return f"{type(self).__name__}(quality={self.quality})"


class JpegCompressibility(JpegIncompressibility):
    """Reward = minus the JPEG size of the image in kB (smaller files, i.e. flatter images, score higher).

    Args:
        quality (`int`, *optional*, defaults to 95): JPEG quality used for the encoding.
    """

    name = "jpeg_compressibility"
    _sign = -1.0
