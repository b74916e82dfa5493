"""Input checks, model-location helpers and the torch CLIP preprocessing shared by every scorer.

Everything here is torch-only (no PIL, no torchvision): the images a sampler produces stay on the
accelerator, and one implementation of the CLIP transform serves the aesthetic, CLIPScore and PickScore
scorers.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Images are allowed to overshoot [0, 1] by this much (VAE decoders and fp16/bf16 rounding produce values
# like 1.0004); anything further out is a caller bug (e.g. [-1, 1] or [0, 255] images) and is rejected.
RANGE_TOLERANCE = 1e-3

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# `resample` codes of transformers' image processors (the PIL enum values) mapped to torch modes.
_RESAMPLE_TO_TORCH = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def check_reward_inputs(images, prompts, prompt_metadata=None) -> torch.Tensor:
    """Validate the arguments of a reward call and return the images clamped to [0, 1].

    Args:
        images (`torch.Tensor`): `(B, 3, H, W)` floating-point images in `[0, 1]`, any device and dtype.
        prompts (`Sequence[str]`): one prompt per image.
        prompt_metadata (`Sequence`, *optional*): one item per image; only its length is checked.

    Returns:
        `torch.Tensor`: `images`, clamped to `[0, 1]` (same device and dtype).

    Raises:
        `TypeError`: `images` is not a floating-point tensor, or `prompts` is a single string.
        `ValueError`: wrong rank/channels, values outside `[0, 1]`, or counts that do not match.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            "`images` must be a torch.Tensor of shape (B, 3, H, W) with values in [0, 1], "
            f"got {type(images).__name__}; "
            "convert arrays with `torch.from_numpy(array).permute(0, 3, 1, 2) / 255`."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"`images` must have shape (B, 3, H, W) (channels first, RGB), got {tuple(images.shape)}; "
            "add a batch dimension with `images[None]` or move channels with `images.permute(0, 3, 1, 2)`."
        )
    if not images.is_floating_point():
        raise TypeError(
            f"`images` must be a floating-point tensor in [0, 1], got dtype {images.dtype}; "
            "for uint8 images pass `images.float() / 255`."
        )
    if isinstance(prompts, (str, bytes)):
        raise TypeError(
            "`prompts` must be a sequence of strings (one per image), not a single string; wrap it in a list."
        )
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"`prompts` has {len(prompts)} entries but `images` has {images.shape[0]}; "
            "pass exactly one prompt per image."
        )
    if prompt_metadata is not None and hasattr(prompt_metadata, "__len__") and len(prompt_metadata) != images.shape[0]:
        raise ValueError(
            f"`prompt_metadata` has {len(prompt_metadata)} entries but `images` has {images.shape[0]}; "
            "pass one item per image (or None)."
        )
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"`images` must be in [0, 1] (tolerance {RANGE_TOLERANCE}), got values in [{lo:.4g}, {hi:.4g}]; "
                "map [-1, 1] images with `(x + 1) / 2` and uint8 images with `x / 255`."
            )
    return images.clamp(0, 1)


def as_reward_tensor(values, batch_size: int, device: torch.device, name: str) -> torch.Tensor:
    """Turn a scorer's output into a float32 tensor of shape `(batch_size,)` on `device`."""
    rewards = torch.as_tensor(values).detach().to(device=device, dtype=torch.float32)
    if rewards.ndim == 2 and rewards.shape[1] == 1:
        rewards = rewards[:, 0]
    if rewards.shape != (batch_size,):
        raise ValueError(
            f"reward {name!r} returned rewards of shape {tuple(rewards.shape)}, expected ({batch_size},): "
            "a reward function must return one scalar per image."
        )
    return rewards


# ---------------------------------------------------------------------------------------------------------
# Locating models: local folder or Hub id, with errors that say how to work offline.
# ---------------------------------------------------------------------------------------------------------


class RewardModelNotFoundError(OSError, ValueError):
    """A reward model could not be found locally nor fetched from the Hub.

    It is an `OSError` (what transformers/huggingface_hub raise for missing files) and a `ValueError` (the
    argument naming the model is wrong for this machine), so either `except` clause catches it.
    """


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` is meant as a filesystem path rather than a Hub id (`owner/name`)."""
    return (
        os.path.exists(name_or_path)
        or os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or os.sep != "/" and os.sep in name_or_path
    )


def offline_hint(name_or_path: str, argument: str = "model_name_or_path") -> str:
    return (
        f"Could not load {name_or_path!r}. If this machine has no network access, download it elsewhere "
        f"(e.g. `hf download {name_or_path} --local-dir <folder>`) and pass that local folder to "
        f"`{argument}=`, or pre-download it into the Hugging Face cache and set HF_HUB_OFFLINE=1."
    )


def _hub_error_types() -> tuple[type[BaseException], ...]:
    import huggingface_hub.errors as hub_errors

    names = ("HfHubHTTPError", "LocalEntryNotFoundError", "EntryNotFoundError", "HFValidationError")
    return (OSError,) + tuple(getattr(hub_errors, n) for n in names if hasattr(hub_errors, n))


def _missing_local_path(name_or_path: str, argument: str) -> RewardModelNotFoundError:
    return RewardModelNotFoundError(
        f"`{argument}`={name_or_path!r} looks like a local path but does not exist; pass an existing folder "
        "(or file) or a Hugging Face Hub id such as 'openai/clip-vit-large-patch14'."
    )


def check_model_available(name_or_path: str, argument: str = "model_name_or_path") -> None:
    """Fail now, when a reward is built, if its model cannot be found, rather than after a stage of sampling.

    A local path must exist. With ``HF_HUB_OFFLINE=1`` a Hub id must already be in the Hugging Face cache. Online,
    nothing is fetched here: the weights are downloaded on the first call.

    Raises:
        [`RewardModelNotFoundError`]: naming `argument`, the path or id, and how to make it available.
    """
    import huggingface_hub.constants as hub_constants

    if looks_like_local_path(name_or_path):
        if not os.path.exists(os.path.expanduser(name_or_path)):
            raise _missing_local_path(name_or_path, argument)
        return
    if not hub_constants.HF_HUB_OFFLINE:
        return
    from huggingface_hub import snapshot_download

    try:
        # offline this only looks in the cache: it returns the cached snapshot's folder or raises
        snapshot_download(name_or_path, local_files_only=True)
    except _hub_error_types() as err:
        raise RewardModelNotFoundError(
            f"`{argument}`={name_or_path!r} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE=1 forbids downloading it. On a machine with network, run "
            f"`hf download {name_or_path} --local-dir <folder>` and pass that local folder to `{argument}=`, or "
            f"download it into this cache (`hf download {name_or_path}`), or unset HF_HUB_OFFLINE."
        ) from err


@contextmanager
def hub_loading(name_or_path: str, argument: str = "model_name_or_path"):
    """Context manager that turns loading failures into a `RewardModelNotFoundError` naming the fix.

    A path that is clearly local (absolute, relative, several slashes) but does not exist fails at once,
    without asking the Hub.
    """
    if looks_like_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise _missing_local_path(name_or_path, argument)
    try:
        yield
    except RewardModelNotFoundError:
        raise
    except _hub_error_types() as err:
        raise RewardModelNotFoundError(f"{offline_hint(name_or_path, argument)} Original error: {err}") from err


def resolve_weights_file(name_or_path: str, filename: str, argument: str, filename_argument: str) -> str:
    """Path of a single weights file given as the file itself, a local folder holding `filename`, or a Hub repo id
    (downloaded, or taken from the cache).

    Raises:
        [`RewardModelNotFoundError`]: a folder without `filename`, or a Hub repo that cannot be reached.
    """
    location = os.path.expanduser(name_or_path)
    if os.path.isfile(location):
        return location
    if os.path.isdir(location):
        path = os.path.join(location, filename)
        if not os.path.isfile(path):
            raise RewardModelNotFoundError(
                f"`{argument}`={name_or_path!r} has no {filename!r}; pass the file itself or set "
                f"`{filename_argument}=`."
            )
        return path
    from huggingface_hub import hf_hub_download

    with hub_loading(name_or_path, argument):
        return hf_hub_download(name_or_path, filename)


# ---------------------------------------------------------------------------------------------------------
# CLIP image preprocessing in torch.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipImageSpec:
    """Resize/crop/normalise settings of a CLIP image processor, applied in torch by `clip_preprocess`.

    Args:
        shortest_edge (`int`, *optional*, defaults to 224):
            Size of the short side after resizing (aspect ratio kept), as transformers' `size={"shortest_edge"}`.
        crop_size (`tuple[int, int]`, *optional*, defaults to `(224, 224)`): `(height, width)` of the centre crop.
        mean (`tuple[float, ...]`), std (`tuple[float, ...]`): per-channel normalisation (OpenAI CLIP values).
        interpolation (`str`, *optional*, defaults to `"bicubic"`): torch interpolation mode of the resize.
        do_center_crop (`bool`, *optional*, defaults to `True`): whether to centre-crop after resizing.
        resize_to (`tuple[int, int]`, *optional*): resize straight to `(height, width)` instead of the short side.
    """

    shortest_edge: int | None = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    do_center_crop: bool = True
    resize_to: tuple[int, int] | None = None

    @classmethod
    def from_processor_config(cls, config: dict | None, image_size: int = 224) -> ClipImageSpec:
        """Build the spec from a `preprocessor_config.json` dict; `None` gives CLIP defaults at `image_size`."""
        if not config:
            return cls(shortest_edge=image_size, crop_size=(image_size, image_size))
        size = config.get("size", image_size)
        shortest_edge, resize_to = None, None
        if isinstance(size, int):
            shortest_edge = size
        elif size.get("shortest_edge") is not None:
            shortest_edge = int(size["shortest_edge"])
        else:
            resize_to = (int(size["height"]), int(size["width"]))
        crop = config.get("crop_size", shortest_edge or image_size)
        crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        return cls(
            shortest_edge=shortest_edge,
            crop_size=crop,
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
            interpolation=_RESAMPLE_TO_TORCH.get(int(config.get("resample", 3)), "bicubic"),
            do_center_crop=bool(config.get("do_center_crop", True)),
            resize_to=resize_to,
        )


def _resized_shape(height: int, width: int, spec: ClipImageSpec) -> tuple[int, int]:
    if spec.resize_to is not None:
        return spec.resize_to
    # Same rounding as transformers (int() truncation of the long side) so both give identical crops.
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def clip_preprocess(images: torch.Tensor, spec: ClipImageSpec) -> torch.Tensor:
    """Resize (antialiased), centre-crop and normalise `(B, 3, H, W)` images in `[0, 1]`, in float32.

    Follows transformers' `CLIPImageProcessor`: resize the short side, centre crop (zero-padding an image
    smaller than the crop), then `(x - mean) / std`. Runs on the images' device.
    """
    x = images.float()
    height, width = x.shape[-2:]
    new_h, new_w = _resized_shape(height, width, spec)
    if (new_h, new_w) != (height, width):
        antialias = spec.interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(new_h, new_w), mode=spec.interpolation, antialias=antialias,
                          **({} if spec.interpolation == "nearest" else {"align_corners": False}))
        # Bicubic overshoots; the PIL path stores uint8 and so clips. Clip too, to stay a valid image.
        x = x.clamp(0, 1)
    if spec.do_center_crop:
        crop_h, crop_w = spec.crop_size
        pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
        if pad_h or pad_w:
            # transformers puts the extra pixel of an odd padding on the top/left (ceil), so do we.
            top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
            x = F.pad(x, (left, pad_w - left, top, pad_h - top))
            new_h, new_w = x.shape[-2:]
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        x = x[..., top : top + crop_h, left : left + crop_w]
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def read_processor_config(name_or_path: str) -> dict | None:
    """Read `preprocessor_config.json` from a local folder or a Hub repo; `None` when there is none."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        path = os.path.join(expanded, "preprocessor_config.json")
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        with hub_loading(name_or_path, "processor_name_or_path"):
            try:
                path = hf_hub_download(name_or_path, "preprocessor_config.json")
            except EntryNotFoundError:
                # The repo exists but ships no image settings (e.g. PickScore_v1): use CLIP defaults.
                return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class LazyModel:
    """
    A scorer whose model loads on its first call (or on `to`), once, under a lock: processes and server threads
    that share a scorer load it once and move it when asked for another device. A subclass calls
    `_init_lazy(device)` in its constructor and defines `_load(device)` (which sets `self.model` last) and, if
    moving takes more than `model.to`, `_move(device)`.
    """

    def _init_lazy(self, device) -> None:
        self.device = torch.device(device) if device is not None else None
        self.model = None
        self._model_device: torch.device | None = None
        self._lock = threading.RLock()

    def to(self, device: str | torch.device | None = None):
        """Load the model now (instead of on the first call) onto `device`; returns `self`."""
        self._ensure_loaded(torch.device(device) if device is not None else (self.device or torch.device("cpu")))
        return self

    def _ensure_loaded(self, device: torch.device) -> None:
        if self.model is not None and self._model_device == device:
            return
        with self._lock:
            if self.model is None:
                self._load(device)
            elif self._model_device != device:
                self._move(device)
            self._model_device = device

    def _load(self, device: torch.device) -> None:
        raise NotImplementedError

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
