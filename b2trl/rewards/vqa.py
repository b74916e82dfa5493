"""VQAScore-style prompt alignment judged by an instruction-tuned vision-language model.

The reward is the probability that the VLM answers "Yes" to a question about the prompt ("Does this image show
"{prompt}"?"), read from its next-token distribution after the chat-templated question (Lin et al., 2024,
"Evaluating Text-to-Visual Generation with Image-to-Text Generation", arXiv:2404.01291). Any model that transformers
loads as `AutoModelForImageTextToText` with an `AutoProcessor` works (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA,
Gemma 3, Idefics3, ...).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch

from .base import LazyModel, check_model_available, check_reward_inputs, hub_loading

VQA_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
VQA_TEMPLATE = 'Does this image show "{prompt}"? Please answer yes or no.'


def _images_only(processor_class):
    """`processor_class` without its video processor (the only part of a Qwen-VL-style processor that needs
    torchvision); it then processes images and text exactly as the full processor does."""
    if not hasattr(processor_class, "get_attributes"):  # transformers 4.x lists them in a class attribute
        attributes = [a for a in processor_class.attributes if a != "video_processor"]
        return type(processor_class.__name__, (processor_class,), {"attributes": attributes})
    attributes = [a for a in processor_class.get_attributes() if a != "video_processor"]
    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(lambda cls: attributes)})


def load_vlm_processor(name_or_path: str, **kwargs):
    """`AutoProcessor.from_pretrained`, still working without torchvision for processors that declare a video
    processor.

    transformers builds the video processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, SmolVLM, ... only with
    torchvision installed, and b2trl's core install has no torchvision (a torchvision that does not match torch
    exactly breaks `import trl`). Scoring images needs only the image processor and the tokenizer, so without
    torchvision the processor is built from those two.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except ImportError as err:
        if is_torchvision_available() or "torchvision" not in str(err).lower():
            raise
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    class_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if class_name is None or not hasattr(transformers, class_name):
        raise ImportError(
            f"the processor of {name_or_path!r} needs torchvision, and no images-only fallback is known for model "
            f"type {model_type!r}; install the torchvision that matches your torch exactly."
        )
    return _images_only(getattr(transformers, class_name)).from_pretrained(name_or_path, **kwargs)


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    # the processors work on uint8 images (PIL, or arrays they rescale by 1/255), so round once here
    array = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


class VQAScore(LazyModel):
    """Probability that a vision-language model answers "Yes" to "Does this image show "{prompt}"?".

    The question (`question_template` with the prompt inserted) and the image go through the model's chat template
    with the assistant turn opened; one forward pass gives the distribution of the answer's first token. Prompts
    are batched with left padding, so the last position is the next token of every row, and a row's score does not
    depend on what else is in the batch. The model runs in its own dtype on its own device (`device=` may be
    another GPU than the sampler's); the probabilities are computed in float32.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"Qwen/Qwen2.5-VL-7B-Instruct"`): Hub id or local folder
            of an instruction-tuned VLM loadable with `AutoModelForImageTextToText` and `AutoProcessor`.
        question_template (`str`, *optional*): the question, with `{prompt}` where the prompt goes; defaults to
            `'Does this image show "{prompt}"? Please answer yes or no.'` (VQAScore's question).
        yes_tokens (`Sequence[str]`, *optional*, defaults to `("Yes",)`): answers counted as yes; each must be one
            token of the model's tokenizer (checked at load time). Their probabilities are summed.
        no_tokens (`Sequence[str]`, *optional*, defaults to `("No",)`): answers counted as no (used by
            `normalize="yes_no"` and in the metadata).
        normalize (`str`, *optional*, defaults to `"vocab"`):
            `"vocab"`: P(yes) under the softmax over the whole vocabulary, VQAScore's definition; a model that
            answers neither yes nor no scores low. `"yes_no"`: P(yes) / (P(yes) + P(no)), the probability
            renormalised over the two answers, which ignores how much mass went elsewhere (e.g. to "yes" in lower
            case or to a preamble).
        system_prompt (`str`, *optional*): a system message put before the question.
        device (`str` or `torch.device`, *optional*): where the model runs; defaults to the images' device. Rewards
            are always returned on the images' device.
        dtype (`torch.dtype` or `str`, *optional*): weights dtype; defaults to bfloat16 on CUDA (VLMs are trained in
            bf16; fp16 can overflow) and float32 elsewhere.
        max_batch_size (`int`, *optional*): split larger batches into chunks of this size to bound memory.
        processor_kwargs (`dict`, *optional*): passed to `AutoProcessor.from_pretrained`, e.g.
            `{"max_pixels": 448 * 448}` to bound the number of image tokens of a Qwen-VL model.

    Returns (when called):
        `(rewards, metadata)`: float32 `(B,)` rewards in `[0, 1]` on the images' device, and
        `{"p_yes": (B,), "p_no": (B,)}`: the vocabulary-softmax probabilities of the yes and no answers (float32,
        same device), whatever `normalize` is; their sum shows whether the model answers the question at all.
    """

    name = "vqa_score"

    def __init__(
        self,
        model_name_or_path: str = VQA_MODEL,
        question_template: str = VQA_TEMPLATE,
        yes_tokens: Sequence[str] = ("Yes",),
        no_tokens: Sequence[str] = ("No",),
        normalize: str = "vocab",
        system_prompt: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_batch_size: int | None = None,
        processor_kwargs: dict | None = None,
    ):
        if not isinstance(model_name_or_path, (str, os.PathLike)):
            raise TypeError(
                f"`model_name_or_path` must be a Hub id or a local path, got {type(model_name_or_path).__name__}."
            )
        if normalize not in ("vocab", "yes_no"):
            raise ValueError(f"`normalize` must be 'vocab' or 'yes_no', got {normalize!r}.")
        if not isinstance(question_template, str) or "{prompt}" not in question_template:
            raise ValueError(
                f"`question_template` must contain '{{prompt}}' where the prompt goes, got {question_template!r}."
            )
        try:
            question_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"`question_template` {question_template!r} must have '{{prompt}}' as its only field (write literal "
                f"braces as '{{{{' and '}}}}'): {err!r}"
            ) from None
        for argument, tokens in (("yes_tokens", yes_tokens), ("no_tokens", no_tokens)):
            if isinstance(tokens, str) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                raise ValueError(f"`{argument}` must be a non-empty list of answer strings, got {tokens!r}.")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be a positive integer or None, got {max_batch_size}.")
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"`dtype` must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}.")
            dtype = getattr(torch, dtype)
        self.model_name_or_path = os.fspath(model_name_or_path)
        # the weights load on the first call, but a model that cannot be found fails now
        check_model_available(self.model_name_or_path, "model_name_or_path")
        self.question_template = question_template
        self.yes_tokens, self.no_tokens = tuple(yes_tokens), tuple(no_tokens)
        self.normalize = normalize
        self.system_prompt = system_prompt
        self._init_lazy(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.processor_kwargs = dict(processor_kwargs or {})
        self.processor = None
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []

    # -- loading ------------------------------------------------------------------------------------------

    def _answer_ids(self, tokenizer, answers, argument) -> list[int]:
        ids = []
        for answer in answers:
            encoded = tokenizer.encode(answer, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"`{argument}` entry {answer!r} is {len(encoded)} tokens for the tokenizer of "
                    f"{self.model_name_or_path!r} ({encoded}); each answer must be a single token (try 'Yes'/'No' "
                    "or with a leading space)."
                )
            ids.append(encoded[0])
        return ids

    def _load(self, device: torch.device) -> None:
        from transformers import AutoModelForImageTextToText

        dtype = self.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        with hub_loading(self.model_name_or_path, "model_name_or_path"):
            processor = load_vlm_processor(self.model_name_or_path, **self.processor_kwargs)
            model = AutoModelForImageTextToText.from_pretrained(self.model_name_or_path, dtype=dtype)
        tokenizer = processor.tokenizer
        # next-token logits are read at the last position, which must be the prompt's last token in every row
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_ids = self._answer_ids(tokenizer, self.yes_tokens, "yes_tokens")
        self.no_ids = self._answer_ids(tokenizer, self.no_tokens, "no_tokens")
        model.requires_grad_(False).eval().to(device)
        self._keep_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.processor = processor
        self.model = model  # set last: other threads test it without the lock

    # -- scoring ------------------------------------------------------------------------------------------

    def questions(self, prompts) -> list[str]:
        """The chat-templated texts (question with the image placeholder, assistant turn opened) for `prompts`."""
        texts = []
        for prompt in prompts:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            question = self.question_template.format(prompt=prompt)
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return texts

    def answer_log_probs(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """Float32 `(B, vocab)` log-probabilities of the answer's first token, for images in `[0, 1]`."""
        inputs = self.processor(text=self.questions(prompts), images=_to_pil(images), padding=True,
                                return_tensors="pt")
        inputs = {
            key: value.to(self._model_device, self.model.dtype if value.is_floating_point() else None)
            if isinstance(value, torch.Tensor) else value
            for key, value in inputs.items()
        }
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        logits = self.model(**inputs, use_cache=False, **extra).logits[:, -1]
        return logits.float().log_softmax(-1)

    def score(self, images: torch.Tensor, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(reward, p_yes, p_no)` for one chunk of images."""
        log_probs = self.answer_log_probs(images, prompts)
        log_yes = log_probs[:, self.yes_ids].logsumexp(-1)
        log_no = log_probs[:, self.no_ids].logsumexp(-1)
        reward = log_yes.exp() if self.normalize == "vocab" else torch.sigmoid(log_yes - log_no)
        return reward, log_yes.exp(), log_no.exp()

    @torch.no_grad()
    def __call__(self, images, prompts, prompt_metadata=None):
        images = check_reward_inputs(images, prompts, prompt_metadata)
        out_device = images.device
        self._ensure_loaded(self.device or images.device)
        step = self.max_batch_size or max(len(images), 1)
        parts = [self.score(images[i : i + step], list(prompts[i : i + step])) for i in range(0, len(images), step)]
        if not parts:
            empty = torch.zeros(0, device=out_device)
            return empty, {"p_yes": empty, "p_no": empty}
        reward, p_yes, p_no = (torch.cat(column).to(out_device, torch.float32) for column in zip(*parts))
        return reward, {"p_yes": p_yes, "p_no": p_no}

    def __repr__(self):
        return f"VQAScore(model_name_or_path={self.model_name_or_path!r}, normalize={self.normalize!r})"
