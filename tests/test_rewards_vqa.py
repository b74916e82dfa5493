"""VQAScore on tiny random VLMs (Qwen2.5-VL and LLaVA) saved to a folder and loaded as a user would (offline)."""

import pytest
import torch

from b2trl.rewards import RewardModelNotFoundError, VQAScore, get_reward
from b2trl.rewards.testing import build_tiny_vlm

PROMPTS = ["a cat", "a big dog sleeping on a red sofa", "x"]  # very different lengths: exercises the padding
ARCHS = ["qwen2_5_vl", "llava"]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return {arch: build_tiny_vlm(str(tmp_path_factory.mktemp(arch)), arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def scorers(vlm):
    return {arch: VQAScore(folder, normalize="yes_no").to("cpu") for arch, folder in vlm.items()}


@pytest.fixture
def images():
    return torch.rand(3, 3, 48, 64, generator=torch.Generator().manual_seed(0))


def _one_by_one(scorer, images, prompts):
    return torch.cat([scorer(images[i : i + 1], prompts[i : i + 1], None)[0] for i in range(len(prompts))])


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_by_one(arch, scorers, images):
    scorer = scorers[arch]
    rewards, meta = scorer(images, PROMPTS, [{}] * 3)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,) and rewards.device == images.device
    assert torch.allclose(rewards, _one_by_one(scorer, images, PROMPTS), atol=1e-5, rtol=0)
    assert set(meta) == {"p_yes", "p_no"} and all(v.shape == (3,) for v in meta.values())
    scorer.max_batch_size = 2
    try:
        assert torch.allclose(scorer(images, PROMPTS, None)[0], rewards, atol=1e-5, rtol=0)
    finally:
        scorer.max_batch_size = None


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_move_with_the_image_and_with_the_prompt(arch, scorers, images):
    scorer = scorers[arch]
    base = scorer(images, PROMPTS, None)[0]
    other_images = scorer(images.flip(0), PROMPTS, None)[0]  # image 2 with prompt 0 and so on
    other_prompts = scorer(images, PROMPTS[::-1], None)[0]
    assert (base[0] - other_images[0]).abs() > 1e-3 and (base[0] - other_prompts[0]).abs() > 1e-3
    # the middle pair is the same image with the same prompt: same score, whatever the rest of the batch
    assert torch.allclose(base[1], other_images[1], atol=1e-5) and torch.allclose(base[1], other_prompts[1], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_are_the_yes_probability_of_the_next_token(arch, vlm, scorers, images):
    from transformers import AutoModelForImageTextToText

    from b2trl.rewards.vqa import _to_pil

    scorer = scorers[arch]
    model = AutoModelForImageTextToText.from_pretrained(vlm[arch]).eval()
    tokenizer = scorer.processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("Yes"), tokenizer.convert_tokens_to_ids("No")
    text = scorer.questions(PROMPTS[1:2])[0]
    assert text.endswith("assistant\n") and 'Does this image show "a big dog sleeping on a red sofa"?' in text
    inputs = scorer.processor(text=[text], images=_to_pil(images[1:2]), return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0, -1].softmax(-1)
    vocab = VQAScore(vlm[arch])  # normalize="vocab", the default
    rewards, meta = vocab(images[1:2], PROMPTS[1:2], None)
    assert torch.allclose(rewards, probs[yes], rtol=1e-4, atol=0)
    assert torch.allclose(meta["p_yes"], probs[yes], rtol=1e-4) and torch.allclose(meta["p_no"], probs[no], rtol=1e-4)
    renormalised = scorer(images[1:2], PROMPTS[1:2], None)[0]
    assert torch.allclose(renormalised, probs[yes] / (probs[yes] + probs[no]), rtol=1e-4)
    # several answers count together
    both = VQAScore(vlm[arch], yes_tokens=("Yes", "No"))(images[1:2], PROMPTS[1:2], None)[0]
    assert torch.allclose(both, probs[yes] + probs[no], rtol=1e-4)


def test_model_dtype_and_device(vlm, scorers, images):
    scorer = VQAScore(vlm["qwen2_5_vl"], normalize="yes_no", dtype="bfloat16", device="cpu")
    rewards, meta = scorer(images, PROMPTS, None)
    assert scorer.model.dtype == torch.bfloat16 and scorer._model_device == torch.device("cpu")
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}
    assert rewards.dtype == torch.float32 and meta["p_yes"].dtype == torch.float32
    assert torch.allclose(rewards, scorers["qwen2_5_vl"](images, PROMPTS, None)[0], atol=0.01)
    # bf16 images are fine too (rounded to uint8 for the processor either way)
    assert torch.allclose(scorer(images.bfloat16(), PROMPTS, None)[0], rewards, atol=0.01)


def test_qwen_processor_loads_without_torchvision(scorers):
    from transformers.utils import is_torchvision_available

    processor = scorers["qwen2_5_vl"].processor
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    if not is_torchvision_available():  # the images-only fallback: no video processor, images processed as usual
        assert not hasattr(processor, "video_processor")
    assert scorers["qwen2_5_vl"].processor.tokenizer.padding_side == "left"


def test_system_prompt_and_template(vlm, scorers, images):
    plain = scorers["llava"]
    judged = VQAScore(vlm["llava"], normalize="yes_no", system_prompt="You judge images strictly.")
    assert judged.to().questions(["a cat"])[0].startswith("<|im_start|>system\nYou judge images strictly.")
    assert not torch.allclose(judged(images, PROMPTS, None)[0], plain(images, PROMPTS, None)[0])
    custom = VQAScore(vlm["llava"], question_template="Is this {{exactly}} '{prompt}'?").to()
    assert "Is this {exactly} 'a cat'?" in custom.questions(["a cat"])[0]


def test_argument_errors(vlm, images):
    folder = vlm["llava"]
    with pytest.raises(ValueError, match="must contain '{prompt}'"):
        VQAScore(folder, question_template="Is this good?")
    with pytest.raises(ValueError, match="'{prompt}' as its only field"):
        VQAScore(folder, question_template="{prompt} in {style}?")
    with pytest.raises(ValueError, match="`normalize` must be 'vocab' or 'yes_no'"):
        VQAScore(folder, normalize="softmax")
    with pytest.raises(ValueError, match="`yes_tokens` must be a non-empty list"):
        VQAScore(folder, yes_tokens="Yes")
    with pytest.raises(ValueError, match="`max_batch_size`"):
        VQAScore(folder, max_batch_size=0)
    with pytest.raises(ValueError, match=r"`yes_tokens` entry 'Absolutely' is \d+ tokens"):
        VQAScore(folder, yes_tokens=("Absolutely",)).to()


def test_registry_and_fail_fast(vlm, tmp_path, monkeypatch):
    import huggingface_hub.constants

    built = get_reward("vqa_score", model_name_or_path=vlm["llava"], normalize="yes_no")
    assert isinstance(built, VQAScore) and built.model is None  # lazy
    missing = str(tmp_path / "no-such-vlm")
    with pytest.raises(RewardModelNotFoundError, match=f"`model_name_or_path`='{missing}'.*does not exist"):
        get_reward("vqa_score", model_name_or_path=missing)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RewardModelNotFoundError, match="'Qwen/Qwen2.5-VL-7B-Instruct' is not in the Hugging Face"):
        get_reward("vqa_score")
