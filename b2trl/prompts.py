"""Prompt lists that ship with b2trl, and reading prompts from a file or a `datasets` dataset."""

import os

# A few prompts in the form of the paper's first prompt set, "a(n) <animal> <activity>": what the example
# script trains a real model on without --prompts, and what the cost benchmark samples.
ANIMAL_ACTIVITY_PROMPTS = (
    "a cat riding a bike",
    "a dog playing chess",
    "a horse washing the dishes",
    "a monkey doing homework",
    "a rabbit playing the piano",
    "an owl reading a book",
)


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; `field` says which setting is wrong: ``"source"``, ``"split"`` or
    ``"column"``. The message is the value given and what is wrong with it."""

    def __init__(self, message: str, field: str = "source"):
        super().__init__(message)
        self.field = field


def read_prompts_file(path: str) -> list[str]:
    """The non-empty lines of a text file. Raises [`PromptSourceError`] if it is missing or has none."""
    if not os.path.isfile(path):
        raise PromptSourceError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise PromptSourceError(f"{path} has no prompts")
    return prompts


def load_prompts_dataset(name_or_path: str, split: str = "train", column: str = "prompt") -> list[str]:
    """
    The `column` of a `datasets` dataset: a Hub id, a local dataset, or a folder written by `save_to_disk` (a
    Dataset or a DatasetDict, which `load_dataset` refuses). Raises [`PromptSourceError`] when it cannot be read
    or has no such split or column.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    folder = os.path.expanduser(name_or_path)
    try:
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json")):
            dataset = load_from_disk(folder)
            if isinstance(dataset, DatasetDict):
                if split not in dataset:
                    raise PromptSourceError(f"{split!r} not in {list(dataset)}", "split")
                dataset = dataset[split]
        else:
            dataset = load_dataset(name_or_path, split=split)
    except PromptSourceError:
        raise
    except (OSError, ValueError) as err:  # datasets' not-found and bad-split errors derive from these
        raise PromptSourceError(f"{name_or_path}: {err}") from None
    if column not in dataset.column_names:
        raise PromptSourceError(f"{column!r} not in {dataset.column_names}", "column")
    return [str(p) for p in dataset[column]]
