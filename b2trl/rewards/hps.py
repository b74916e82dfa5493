"""HPSv2 / HPSv2.1 (Human Preference Score v2, Wu et al., 2023): an open_clip ViT-H-14 fine-tuned on human
preferences, run as a transformers `CLIPModel`.

The checkpoints (`xswu/HPSv2`: `HPS_v2.1_compressed.pt`, `HPS_v2_compressed.pt`) are open_clip state dicts. Rather
than depending on open_clip (which needs torchvision and timm, and a torchvision that does not match torch exactly
breaks `import trl`), the state dict is converted key by key into transformers' CLIP layout
([`convert_open_clip_state_dict`]). The architecture (layer counts, heads, GELU) comes from the `config.json` of the
CLIP that HPSv2 was fine-tuned from, `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, which also provides the tokenizer
and the image settings.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping

import torch

from .base import RewardModelNotFoundError, hub_loading, resolve_weights_file
from .clip import ClipRewardBase

HPS_REPO = "xswu/HPSv2"
HPS_FILENAME = "HPS_v2.1_compressed.pt"
HPS_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# open_clip residual block -> transformers CLIPEncoderLayer (the fused attention input projection is split apart)
_BLOCK_KEYS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOWER_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# open_clip stores the projections as (width, embed_dim) matrices applied as `x @ proj`; transformers uses
# bias-free nn.Linear layers whose weight is the transpose
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def unwrap_open_clip_checkpoint(checkpoint) -> dict[str, torch.Tensor]:
    """The model state dict inside an open_clip training checkpoint.

    Accepts a bare state dict or open_clip's `{"state_dict": ..., "epoch": ..., ...}` (the HPSv2 files), and
    removes the `module.` prefix that a checkpoint saved from a DistributedDataParallel model carries.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected an open_clip state dict (a dict of tensors), got a {type(checkpoint).__name__}.")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's 'state_dict' is a {type(state).__name__}, not a dict of tensors.")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def convert_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict (the OpenAI layout: `visual.*`, `transformer.*`, `token_embedding`,
    `ln_final`, `text_projection`, `logit_scale`) into transformers' `CLIPModel` layout.

    The fused `attn.in_proj_weight`/`in_proj_bias` of each block are split into the `q_proj`, `k_proj` and `v_proj`
    weights and biases, and the two projection matrices are transposed. The causal mask buffer (`attn_mask`) of
    older open_clip versions is dropped. The tensors are not copied.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): the open_clip state dict (see [`unwrap_open_clip_checkpoint`]).

    Returns:
        `dict[str, torch.Tensor]`: the same weights under transformers' names.

    Raises:
        `ValueError`: keys that a plain open_clip ViT CLIP does not have (layer scale, attentional pooling, a
            Hugging Face text tower, a SigLIP `logit_bias`, ...), listed in the message.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue
        if key in _TOWER_KEYS:
            converted[_TOWER_KEYS[key]] = value
        elif key in _PROJECTIONS:
            converted[_PROJECTIONS[key]] = value.t().contiguous()
        elif match := _BLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}."
            rest = match.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # "weight" or "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            module, _, kind = rest.rpartition(".")
            if module in _BLOCK_KEYS and kind in ("weight", "bias"):
                converted[f"{prefix}{_BLOCK_KEYS[module]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ValueError(
            f"not a plain open_clip ViT CLIP state dict: unexpected keys {shown}. Only the OpenAI-style layout "
            "(no layer scale, attentional pooler or Hugging Face text tower) converts to transformers' CLIPModel."
        )
    return converted


def load_open_clip_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Read an open_clip checkpoint file (`.pt`/`.bin` with `torch.load(weights_only=True)`, or `.safetensors`) and
    return its model state dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return unwrap_open_clip_checkpoint(load_file(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary Python objects; never unpickle them on the user's behalf
        raise ValueError(
            f"{path!r} holds Python objects besides tensors, which torch.load(weights_only=True) refuses. If you trust "
            "the file, re-save its weights once: `torch.save(torch.load(path, weights_only=False)['state_dict'], "
            f"'weights.pt')` and pass that file. ({err})"
        ) from err
    return unwrap_open_clip_checkpoint(checkpoint)


def clip_model_from_state_dict(config, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, source: str = ""):
    """Build a transformers `CLIPModel` from `config` and a state dict in its layout, without a random initialisation.

    Args:
        config (`CLIPConfig`): the architecture; every tensor's shape is checked against it.
        state_dict (`Mapping[str, torch.Tensor]`): weights in transformers' layout
            (see [`convert_open_clip_state_dict`]).
        dtype (`torch.dtype`): dtype of the returned model's weights.
        source (`str`, *optional*): where the weights come from, for error messages.

    Raises:
        `ValueError`: missing or unexpected keys, or shapes that do not match the config (all listed).
    """
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    # parameters on the meta device, buffers (position ids) real: ViT-H has ~1B parameters not worth initialising
    with init_empty_weights(include_buffers=False):
        model = CLIPModel(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{key}: checkpoint {tuple(value.shape)} vs config {expected[key]}"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != expected[key]
    ]
    if missing or unexpected or wrong:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                problems.append(f"{label}: " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
        raise ValueError(
            f"the weights{f' of {source!r}' if source else ''} do not fit the CLIP config "
            f"({'; '.join(problems)}); pass the processor/config of the CLIP these weights were trained from."
        )
    model.load_state_dict({key: value.to(dtype) for key, value in state_dict.items()}, strict=True, assign=True)
    return model


class HPSv2(ClipRewardBase):
    """HPSv2.1 human preference score: the cosine similarity of the image and prompt embeddings of an open_clip
    ViT-H-14 fine-tuned on human preference pairs (Wu et al., 2023, arXiv:2306.09341), exactly as HPSv2's own scorer
    computes it (`image_features @ text_features.T` of normalised features, no logit scale). Typically 0.20–0.35 for
    Stable Diffusion images; papers report it ×100.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"xswu/HPSv2"`): a Hub repo id, a local folder holding
            `filename`, or the checkpoint file itself.
        filename (`str`, *optional*, defaults to `"HPS_v2.1_compressed.pt"`): the checkpoint inside the repo or
            folder; `"HPS_v2_compressed.pt"` is HPSv2.0.
        processor_name_or_path (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`): Hub id or
            local folder with the `config.json` (architecture), tokenizer and `preprocessor_config.json` of the CLIP
            that HPSv2 was fine-tuned from.
        **kwargs: see [`ClipRewardBase`] (`device`, `dtype`, `max_batch_size`).
    """

    name = "hpsv2"

    def __init__(
        self,
        model_name_or_path: str = HPS_REPO,
        filename: str = HPS_FILENAME,
        processor_name_or_path: str = HPS_PROCESSOR,
        **kwargs,
    ):
        super().__init__(model_name_or_path, processor_name_or_path, **kwargs)
        self.filename = filename
        location = os.path.expanduser(self.model_name_or_path)
        if os.path.isdir(location) and not os.path.isfile(os.path.join(location, filename)):
            raise RewardModelNotFoundError(
                f"`model_name_or_path`={self.model_name_or_path!r} has no {filename!r}; pass the checkpoint file "
                "itself or set `filename=`."
            )

    def checkpoint_file(self) -> str:
        """Local path of the checkpoint (downloaded from the Hub if needed)."""
        return resolve_weights_file(self.model_name_or_path, self.filename, "model_name_or_path", "filename")

    def _load_model(self, dtype):
        from transformers import CLIPConfig

        with hub_loading(self.processor_name_or_path, "processor_name_or_path"):
            config = CLIPConfig.from_pretrained(self.processor_name_or_path)
        path = self.checkpoint_file()
        state = convert_open_clip_state_dict(load_open_clip_checkpoint(path))
        return clip_model_from_state_dict(config, state, dtype, source=path)

    def score(self, images, prompts):
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
