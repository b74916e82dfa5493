"""Checkpoints that survive a crash: written to a hidden folder, completed by a marker, then renamed.

A checkpoint folder ``checkpoint_<stage>`` holds what accelerate saves (optimizer, RNG states of every process),
the trained weights (LoRA in diffusers' layout, or the UNet), and ``b2trl_state.json`` (stage, global step,
per-prompt reward history). The marker file is written last and the folder renamed into place only then, so a
process killed while saving, or a disk that fills, never leaves a half-written ``checkpoint_<stage>`` behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

STATE_FILE = "b2trl_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
_NAME = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_name(stage: int) -> str:
    return f"checkpoint_{stage}"


def partial_name(stage: int) -> str:
    return f".partial_checkpoint_{stage}"


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_FILE))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """``(stage, path)`` of every complete checkpoint under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_path(resume_from: str, default_root: str) -> str:
    """
    Turn `resume_from` into one complete checkpoint folder.

    Accepts ``"latest"`` (newest complete checkpoint under `default_root`), a checkpoint folder, or a folder
    holding checkpoints (a ``checkpoints/`` folder or the project folder above it).
    """
    if resume_from == "latest":
        candidates = [default_root]
    else:
        path = os.path.normpath(os.path.expanduser(resume_from))
        if is_complete(path):
            return path
        if _NAME.match(os.path.basename(path)):
            raise ValueError(
                f"resume_from: {path} is not a complete checkpoint (no {STATE_FILE}); it was probably "
                "interrupted while being written. Resume from an earlier checkpoint or 'latest'."
            )
        candidates = [path, os.path.join(path, "checkpoints")]
    for root in candidates:
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    raise ValueError(f"resume_from={resume_from!r}: no complete checkpoint found in {' or '.join(candidates)}.")


def write_state(folder: str, state: dict) -> None:
    """Write the marker/state file atomically (it is what makes a checkpoint complete)."""
    tmp = os.path.join(folder, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, STATE_FILE))


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)


def finalize(partial: str, final: str) -> None:
    """Move a finished checkpoint from its hidden folder into place."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)


def prune(root: str, keep: Optional[int]) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any leftover partial folders."""
    for name in os.listdir(root):
        if name.startswith(".partial_checkpoint_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep:
        for _, path in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def load_lora_into_unet(unet, folder: str, adapter_name: str = "default") -> None:
    """
    Load LoRA weights saved in diffusers' layout (``pytorch_lora_weights.safetensors``) into the UNet's
    *existing* adapter, so an optimizer that already holds the adapter's parameters keeps training them.
    (Loading through `load_lora_into_unet` adds and activates a second adapter instead.)
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    path = os.path.join(folder, LORA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No LoRA weights at {path}: expected a folder written by save_pretrained.")
    state, _ = StableDiffusionPipeline.lora_state_dict(folder, weight_name=LORA_FILE)
    unet_state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise ValueError(f"{path} holds no UNet LoRA weights.")
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(
            f"{path} does not match this model's LoRA adapter (unexpected keys such as {unexpected[:3]}); "
            "was it trained on another base model or LoRA configuration?"
        )
