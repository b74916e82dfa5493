"""Images to whatever trackers a run logs to: TensorBoard, Weights & Biases and Trackio.

accelerate logs scalars to every tracker with one call (`accelerator.log`), but each tracker takes images in its
own way; [`log_image`] is that one call for images. Images are logged at the step the trainer logs its statistics
at: the stage index.
"""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np

# the trackers whose image call is known here; others are skipped (their scalars still arrive)
IMAGE_TRACKERS = ("tensorboard", "wandb", "trackio")


def _log_one(tracker, key: str, image, step: int) -> bool:
    name = getattr(tracker, "name", None)
    if name == "tensorboard":
        tracker.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        tracker.writer.flush()
    elif name == "wandb":
        import wandb

        tracker.log({key: wandb.Image(image)}, step=step)
    elif name == "trackio":
        import trackio

        tracker.log({key: trackio.Image(np.asarray(image.convert("RGB")))}, step=step)
    else:
        return False
    return True


def log_image(trackers: Union[object, Iterable, None], key: str, image, step: int) -> list[str]:
    """
    Log the `PIL.Image` `image` as `key` at `step` to each of `trackers`.

    Args:
        trackers: one accelerate tracker, a list of them (``accelerator.trackers``), or `None`.
        key (`str`): the image's name in the tracker (e.g. ``"branches"``, ``"eval/grid"``).
        image (`PIL.Image.Image`): the image.
        step (`int`): the step to log it at (the trainer logs everything at the stage index).

    Returns:
        `list[str]`: the names of the trackers that received it (a tracker of another kind is skipped).
    """
    if trackers is None:
        return []
    if not isinstance(trackers, (list, tuple)):
        trackers = [trackers]
    return [tracker.name for tracker in trackers if _log_one(tracker, key, image, step)]
