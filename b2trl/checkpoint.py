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
BEST_NAME = "checkpoint_best"  # the best evaluated checkpoint (save_best)
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

    Accepts ``"latest"`` (newest complete checkpoint under `default_root`), ``"best"`` (``checkpoint_best`` under
    it, kept by `save_best`), a checkpoint folder, or a folder holding checkpoints (a ``checkpoints/`` folder or the
    project folder above it).
    """
    if resume_from == "best":
        best = os.path.join(default_root, BEST_NAME)
        if not is_complete(best):
            raise ValueError(f"resume_from='best': no complete best checkpoint at {best} (save_best=True keeps one).")
        return best
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


def save_stage(accelerator, root: str, stage: int, state: dict, name: Optional[str] = None) -> str:
    """
    Write the checkpoint of `stage` under `root` with every process taking part (FSDP and DeepSpeed need it):
    accelerate's state into a hidden folder, then `state` (the marker), then the rename into place. On a failed
    write the partial folder is removed and the error names the last complete checkpoint. `name` replaces the
    folder's name ``checkpoint_<stage>`` (e.g. ``checkpoint_best``, which pruning and ``"latest"`` leave alone).
    """
    main = accelerator.is_main_process
    name = name or checkpoint_name(stage)
    partial, final = os.path.join(root, f".partial_{name}"), os.path.join(root, name)
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(output_dir=partial)
        accelerator.wait_for_everyone()
        if main:
            write_state(partial, state)
            finalize(partial, final)
            prune(root, accelerator.project_configuration.total_limit)
    except OSError as err:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        done = complete_checkpoints(root)
        last = done[-1][1] if done else "none"
        raise OSError(
            f"Could not write the checkpoint of stage {stage} ({err}). The last complete checkpoint is {last}."
        ) from err
    accelerator.wait_for_everyone()
    return final

