"""CLIP-based rewards: LAION aesthetic score, CLIPScore and PickScore.

The three share one loader (`CLIPModel` + tokenizer + image settings, from a Hub id or a local folder,
loaded lazily on first call and cached) and one torch preprocessing (`base.clip_preprocess`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import (
    ClipImageSpec,
    LazyModel,
    check_model_available,
    check_reward_inputs,
    clip_preprocess,
    hub_loading,
    read_processor_config,
    resolve_weights_file,
)

AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILENAME = "aesthetic-model.pth"
CLIP_SCORE_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(output) -> torch.Tensor:
    # transformers < 5 returns the projected embeddings; 5.x returns a ModelOutput holding them as pooler_output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


class ClipRewardBase(LazyModel):
    """Lazy, thread-safe holder of a CLIP model, its tokenizer and its image settings.

    Subclasses implement `score(pixel_values, prompts)`. The model is loaded on the first call (or by
    `.to(device)`), on `device` if given else on the images' device, and reused afterwards. TRL's
    `async_reward_computation=True` calls rewards from a thread pool, so loading happens under a lock.

    Args:
        model_name_or_path (`str`): Hub id or local folder of a transformers `CLIPModel`.
        processor_name_or_path (`str`, *optional*): Hub id or local folder holding the tokenizer and
            `preprocessor_config.json`; defaults to `model_name_or_path`. Without a `preprocessor_config.json`
            the OpenAI CLIP settings at the model's `image_size` are used (224 px bicubic, CLIP mean/std).
        device (`str` or `torch.device`, *optional*): where the model runs; defaults to the images' device.
            Rewards are always returned on the images' device.
        dtype (`torch.dtype`, *optional*): model weights dtype; defaults to float16 on CUDA, float32
            elsewhere. Embeddings are compared in float32 whatever the model dtype.
        max_batch_size (`int`, *optional*): split larger batches into chunks of this size to bound memory.
    """

    name = "clip"
    needs_text = True

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_size: int | None = None,
    ):
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                f"`model_name_or_path` must be a Hub id or a local path, got {type(model_name_or_path).__name__}."
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be a positive integer or None, got {max_batch_size}.")
        self.model_name_or_path = os.fspath(model_name_or_path)
        self.processor_name_or_path = os.fspath(processor_name_or_path or model_name_or_path)
        # the weights load lazily (on the first call), but a model that cannot be found fails here, before a
        # stage of sampling is spent
        check_model_available(self.model_name_or_path, "model_name_or_path")
        if self.processor_name_or_path != self.model_name_or_path:
            check_model_available(self.processor_name_or_path, "processor_name_or_path")
        self._init_lazy(device)
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"`dtype` must be a torch dtype or its name (e.g. 'float16'), got {dtype!r}.")
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.tokenizer = None
        self.image_spec: ClipImageSpec | None = None

    # -- loading ------------------------------------------------------------------------------------------

    def _load(self, device: torch.device) -> None:
        dtype = self.dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        model = self._load_model(dtype)
        model.requires_grad_(False).eval().to(device)
        config = read_processor_config(self.processor_name_or_path)
        self.image_spec = ClipImageSpec.from_processor_config(config, model.config.vision_config.image_size)
        if self.needs_text:
            from transformers import AutoTokenizer

            with hub_loading(self.processor_name_or_path, "processor_name_or_path"):
                self.tokenizer = AutoTokenizer.from_pretrained(self.processor_name_or_path)
        self._load_extra(model, device)
        self.model = model  # set last: other threads test it without the lock

    def _load_model(self, dtype: torch.dtype):
        """The transformers `CLIPModel` in `dtype`, on the CPU; subclasses with other weight formats override it."""
        from transformers import CLIPModel

        with hub_loading(self.model_name_or_path, "model_name_or_path"):
            return CLIPModel.from_pretrained(self.model_name_or_path, dtype=dtype)

    def _load_extra(self, model, device: torch.device) -> None:
        """Hook for subclasses that need more than the CLIP model."""

    # -- embeddings ---------------------------------------------------------------------------------------

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings of `(B, 3, H, W)` images in `[0, 1]`."""
        pixels = clip_preprocess(images.to(self._model_device), self.image_spec)
        return _normalize(_features(self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))))

    def text_embeddings(self, prompts) -> torch.Tensor:
        """L2-normalised float32 text embeddings of `prompts` (truncated to the model's context length)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self._model_device)
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _normalize(_features(features))

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        raise NotImplementedError

    # -- TRL reward protocol ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, images, prompts, prompt_metadata=None):
        images = check_reward_inputs(images, prompts, prompt_metadata)
        out_device = images.device
        self._ensure_loaded(self.device or images.device)
        step = self.max_batch_size or max(len(images), 1)
        rewards = [
            self.score(images[i : i + step], list(prompts[i : i + step])).float()
            for i in range(0, len(images), step)
        ]
        rewards = torch.cat(rewards) if rewards else torch.zeros(0)
        return rewards.to(out_device, torch.float32), {}

    def __repr__(self):
        return f"{type(self).__name__}(model_name_or_path={self.model_name_or_path!r})"


class CLIPScore(ClipRewardBase):
    """CLIPScore: cosine similarity of the image and prompt CLIP embeddings (Hessel et al., 2021, without
    their 2.5 rescaling), in `[-1, 1]`; typically 0.15–0.40 for ViT-H-14.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`):
            any transformers CLIP model, Hub id or local folder.
        **kwargs: see [`ClipRewardBase`] (`processor_name_or_path`, `device`, `dtype`, `max_batch_size`).
    """

    name = "clip_score"

    def __init__(self, model_name_or_path: str = CLIP_SCORE_MODEL, **kwargs):
        super().__init__(model_name_or_path, **kwargs)

    def score(self, images, prompts):
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


class PickScore(ClipRewardBase):
    """PickScore (Kirstain et al., 2023): `logit_scale.exp() * cosine(image, prompt)` with the PickScore_v1
    CLIP-H model; about 18–24 for typical Stable Diffusion images (scale 100 times a cosine).

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`): Hub id or local
            folder of the PickScore CLIP model.
        processor_name_or_path (`str`, *optional*): tokenizer/image settings; defaults to
            `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"` (what PickScore was trained with) when the model is the
            default one, and to `model_name_or_path` otherwise.
        **kwargs: see [`ClipRewardBase`] (`device`, `dtype`, `max_batch_size`).
    """

    name = "pickscore"

    def __init__(self, model_name_or_path: str = PICKSCORE_MODEL, processor_name_or_path: str | None = None, **kwargs):
        if processor_name_or_path is None and model_name_or_path == PICKSCORE_MODEL:
            processor_name_or_path = PICKSCORE_PROCESSOR
        super().__init__(model_name_or_path, processor_name_or_path, **kwargs)

    def score(self, images, prompts):
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return self.model.logit_scale.float().exp() * cosine


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (no activations, dropout between the first linears).

    The module names match the released state dicts: `layers.0`, `layers.2`, `layers.4`, `layers.6` and
    `layers.7` are the linears 768→1024→128→64→16→1 (the input follows the CLIP projection size).

    Args:
        input_dim (`int`, *optional*, defaults to 768): size of the CLIP image embedding.
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticScorer(ClipRewardBase):
    """LAION aesthetic score: the improved-aesthetic-predictor MLP on L2-normalised CLIP ViT-L/14 image
    embeddings, as in DDPO / TRL's DDPO example. Roughly 1–10 (a 1–10 rating scale); Stable Diffusion 1.x
    samples mostly score 4.5–6.5. Prompts are checked but not used.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`): the CLIP model.
        head_name_or_path (`str`, *optional*, defaults to `"trl-lib/ddpo-aesthetic-predictor"`): a Hub repo
            id, a local folder holding `head_filename`, or a local `.pth`/`.safetensors` file. The state dict
            uses the LAION layout (`layers.0.weight`, ..., `layers.7.bias`).
        head_filename (`str`, *optional*, defaults to `"aesthetic-model.pth"`): file inside the repo/folder.
        **kwargs: see [`ClipRewardBase`] (`processor_name_or_path`, `device`, `dtype`, `max_batch_size`).
    """

    name = "aesthetic"
    needs_text = False

    def __init__(
        self,
        model_name_or_path: str = AESTHETIC_CLIP_MODEL,
        head_name_or_path: str = AESTHETIC_HEAD_REPO,
        head_filename: str = AESTHETIC_HEAD_FILENAME,
        **kwargs,
    ):
        super().__init__(model_name_or_path, **kwargs)
        self.head_name_or_path = os.fspath(head_name_or_path)
        self.head_filename = head_filename
        self.head = None
        check_model_available(self.head_name_or_path, "head_name_or_path")

    def _head_file(self) -> str:
        return resolve_weights_file(self.head_name_or_path, self.head_filename, "head_name_or_path", "head_filename")

    def _load_extra(self, model, device):
        input_dim = model.config.projection_dim
        state = _load_state_dict(self._head_file())
        head = AestheticHead(input_dim)
        expected = set(head.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"aesthetic head {self.head_name_or_path!r} has keys {sorted(state)}, expected the LAION layout "
                f"{sorted(expected)}."
            )
        if state["layers.0.weight"].shape[1] != input_dim:
            raise ValueError(
                f"aesthetic head expects {state['layers.0.weight'].shape[1]}-d embeddings but the CLIP model "
                f"{self.model_name_or_path!r} projects to {input_dim}; use the matching CLIP model."
            )
        head.load_state_dict({k: v.float() for k, v in state.items()})
        # The head is tiny: keep it in float32 whatever the CLIP dtype.
        self.head = head.requires_grad_(False).eval().to(device)

    def _move(self, device):
        super()._move(device)
        self.head.to(device)

    def score(self, images, prompts):
        return self.head(self.image_embeddings(images)).squeeze(-1)
