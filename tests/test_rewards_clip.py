"""CLIP-based rewards on tiny, randomly initialised CLIP models saved to a temporary folder (offline)."""

import threading

import pytest
import torch

from b2trl.rewards import AestheticScorer, CLIPScore, CompositeReward, PickScore, RewardModelNotFoundError, get_reward
from b2trl.rewards.base import clip_preprocess

try:
    import reward_helpers
except ImportError:  # tests collected as a package
    from tests import reward_helpers


PROMPTS = ["a photo of a cat", "a red car", "an oil painting of a lighthouse at dusk"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(reward_helpers.build_tiny_clip(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aesthetic-head")
    state = reward_helpers.save_aesthetic_head(folder / "aesthetic-model.pth", input_dim=16)
    return str(folder), state


@pytest.fixture
def images():
    # Not the model's resolution, and not square: exercises resize + centre crop.
    return torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(0))


def make(kind, tiny_clip, aesthetic_head, **kwargs):
    if kind == "aesthetic":
        return AestheticScorer(tiny_clip, head_name_or_path=aesthetic_head[0], **kwargs)
    return {"clip_score": CLIPScore, "pickscore": PickScore}[kind](tiny_clip, **kwargs)


KINDS = ["aesthetic", "clip_score", "pickscore"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_dtype_and_batch_invariance(kind, tiny_clip, aesthetic_head, images):
    scorer = make(kind, tiny_clip, aesthetic_head)
    rewards, meta = scorer(images, PROMPTS, [{}] * 3)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32 and rewards.device == images.device
    assert isinstance(meta, dict)
    singles = torch.cat([scorer(images[i : i + 1], PROMPTS[i : i + 1], [{}])[0] for i in range(3)])
    assert torch.allclose(rewards, singles, atol=1e-5, rtol=0)
    chunked = make(kind, tiny_clip, aesthetic_head, max_batch_size=2)(images, PROMPTS, None)[0]
    assert torch.allclose(rewards, chunked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_images_give_float32_rewards(kind, tiny_clip, aesthetic_head, images):
    scorer = make(kind, tiny_clip, aesthetic_head)
    rewards, _ = scorer(images.to(torch.bfloat16), PROMPTS, None)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    # The only difference from fp32 images is bf16 rounding of the pixels (~3 significant digits).
    reference, _ = scorer(images.to(torch.bfloat16).float(), PROMPTS, None)
    assert torch.allclose(rewards, reference, atol=1e-5)


def test_bf16_model_weights(tiny_clip, images):
    rewards, _ = CLIPScore(tiny_clip, dtype=torch.bfloat16)(images, PROMPTS, None)
    reference, _ = CLIPScore(tiny_clip)(images, PROMPTS, None)
    assert rewards.dtype == torch.float32
    assert torch.allclose(rewards, reference, atol=0.05)


def test_clip_score_and_pickscore_formulas(tiny_clip, images):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    scorer = CLIPScore(tiny_clip)
    pixels = clip_preprocess(images, scorer.to().image_spec)
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(scorer(images, PROMPTS, None)[0], cosine, atol=1e-5)
    assert torch.allclose(PickScore(tiny_clip)(images, PROMPTS, None)[0], model.logit_scale.exp() * cosine, atol=1e-4)
    assert ((cosine >= -1) & (cosine <= 1)).all()


def test_text_matters_for_clip_score(tiny_clip, images):
    scorer = CLIPScore(tiny_clip)
    a, _ = scorer(images, PROMPTS, None)
    b, _ = scorer(images, PROMPTS[::-1], None)
    assert not torch.allclose(a, b)


def test_aesthetic_head_matches_independent_mlp(tiny_clip, aesthetic_head, images):
    from transformers import CLIPModel

    folder, state = aesthetic_head
    scorer = AestheticScorer(tiny_clip, head_name_or_path=folder)
    rewards, _ = scorer(images, PROMPTS, None)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        x = model.get_image_features(pixel_values=clip_preprocess(images, scorer.image_spec)).pooler_output
    x = x / x.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):  # LAION head: linear layers only, dropout inactive at eval
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    assert torch.allclose(rewards, x[:, 0], atol=1e-5)
    # A file path works as well as the folder.
    by_file, _ = AestheticScorer(tiny_clip, head_name_or_path=f"{folder}/aesthetic-model.pth")(images, PROMPTS, None)
    assert torch.allclose(rewards, by_file)


def test_aesthetic_head_wrong_layout_or_size(tiny_clip, tmp_path, images):
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "aesthetic-model.pth")
    with pytest.raises(ValueError, match="LAION layout"):
        AestheticScorer(tiny_clip, head_name_or_path=str(tmp_path))(images, PROMPTS, None)
    reward_helpers.save_aesthetic_head(tmp_path / "big.pth", input_dim=768)
    with pytest.raises(ValueError, match="expects 768-d embeddings"):
        AestheticScorer(tiny_clip, head_name_or_path=str(tmp_path / "big.pth"))(images, PROMPTS, None)
    with pytest.raises(RewardModelNotFoundError, match="has no 'other.pth'"):
        AestheticScorer(tiny_clip, head_name_or_path=str(tmp_path), head_filename="other.pth").to()


def test_loads_once_and_caches(tiny_clip, images, monkeypatch):
    from transformers import CLIPModel

    calls = []
    original = CLIPModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(counting))
    scorer = CLIPScore(tiny_clip)
    assert scorer.model is None  # lazy
    results = []
    threads = [threading.Thread(target=lambda: results.append(scorer(images, PROMPTS, None)[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(torch.allclose(r, results[0]) for r in results)
    model = scorer.model
    scorer(images, PROMPTS, None)
    assert scorer.model is model and len(calls) == 1


def test_eager_to_and_registry_kwargs(tiny_clip, images):
    scorer = get_reward("clip_score", model_name_or_path=tiny_clip, device="cpu")
    assert scorer.to("cpu").model is not None
    assert scorer(images, PROMPTS, None)[0].shape == (3,)


def test_processor_defaults_without_preprocessor_config(tmp_path, images):
    folder = reward_helpers.build_tiny_clip(tmp_path / "bare", image_size=48, with_processor=False)
    scorer = CLIPScore(str(folder)).to()
    assert scorer.image_spec.shortest_edge == 48 and scorer.image_spec.crop_size == (48, 48)
    assert scorer(images, PROMPTS, None)[0].shape == (3,)


def test_composite_of_clip_scorers(tiny_clip, aesthetic_head, images):
    clip, aesthetic = CLIPScore(tiny_clip), make("aesthetic", tiny_clip, aesthetic_head)
    comp = CompositeReward({clip: 10.0, aesthetic: 1.0, "jpeg_compressibility": 0.1})
    rewards, meta = comp(images, PROMPTS, None)
    parts = meta["components"]
    assert set(parts) == {"clip_score", "aesthetic", "jpeg_compressibility"}
    expected = 10.0 * parts["clip_score"] + parts["aesthetic"] + 0.1 * parts["jpeg_compressibility"]
    assert torch.allclose(rewards, expected, atol=1e-5)


def test_missing_local_path_error(images):
    with pytest.raises(RewardModelNotFoundError, match="'./no/such/clip' looks like a local path but does not exist"):
        CLIPScore("./no/such/clip")(images, PROMPTS, None)
    with pytest.raises(ValueError, match="does not exist"):  # it is a ValueError too
        AestheticScorer("./no/such/clip").to()


def test_unreachable_hub_id_error_says_how_to_go_offline(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the Hub client fail at once instead of retrying a network it cannot reach.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = r"(?s)'nobody-xyz/no-such-clip'.*pass that local folder to `model_name_or_path=`.*HF_HUB_OFFLINE"
    with pytest.raises(OSError, match=expected):
        CLIPScore("nobody-xyz/no-such-clip")


def test_unreachable_head_error(tiny_clip, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RewardModelNotFoundError, match="`head_name_or_path`='nobody-xyz/no-such-head'"):
        AestheticScorer(tiny_clip, head_name_or_path="nobody-xyz/no-such-head")


def test_a_model_that_cannot_be_found_fails_when_the_reward_is_built(tiny_clip, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    missing = str(tmp_path / "no-such-clip")
    with pytest.raises(RewardModelNotFoundError, match=f"`model_name_or_path`='{missing}'.*does not exist"):
        get_reward("clip_score", model_name_or_path=missing)
    # the built-in defaults are Hub ids, none of them in this (empty) cache
    for name, missing_id in [("clip_score", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
                             ("aesthetic", "openai/clip-vit-large-patch14"),
                             ("pickscore", "yuvalkirstain/PickScore_v1")]:
        with pytest.raises(RewardModelNotFoundError, match=f"(?s)'{missing_id}' is not in the Hugging Face cache"):
            get_reward(name)
    with pytest.raises(RewardModelNotFoundError, match="`processor_name_or_path`='someone/processor'"):
        get_reward("pickscore", model_name_or_path=tiny_clip, processor_name_or_path="someone/processor")

    # a Hub id whose snapshot is in the cache passes; its weights still load only on the first call
    repo = tmp_path / "cache" / "models--me--cached-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    scorer = get_reward("clip_score", model_name_or_path="me/cached-clip")
    assert isinstance(scorer, CLIPScore) and scorer.model is None
    assert get_reward("clip_score", model_name_or_path=tiny_clip).model is None


def test_bad_constructor_arguments(tiny_clip):
    with pytest.raises(ValueError, match="`dtype` must be a torch dtype"):
        CLIPScore(tiny_clip, dtype="float99")
    with pytest.raises(ValueError, match="`max_batch_size`"):
        CLIPScore(tiny_clip, max_batch_size=0)
    with pytest.raises(TypeError, match="`model_name_or_path` must be a Hub id or a local path"):
        CLIPScore(42)
    assert CLIPScore(tiny_clip, dtype="bfloat16").dtype == torch.bfloat16


def test_prompt_count_checked_before_loading(tiny_clip, images):
    scorer = CLIPScore(tiny_clip)
    with pytest.raises(ValueError, match="`prompts` has 2 entries but `images` has 3"):
        scorer(images, PROMPTS[:2], None)
    assert scorer.model is None
