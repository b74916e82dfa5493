"""The cost benchmark (benchmarks/cost.py) counts what each method really runs."""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("cost_benchmark", os.path.join(ROOT, "benchmarks", "cost.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# T = 4 steps, interval L = 2 (branch point 2), 2 prompts x 3 branches = 6 images; DDPO: 3 batches of 2 prompts
TINY = ["--in-process", "--num-steps", "4", "--interval", "2", "--prompts", "2", "--branches", "3",
        "--train-batch-size", "2", "--reward", "random"]


def test_counts_follow_each_methods_structure(cost, tmp_path):
    out = tmp_path / "cost.json"
    report = cost.main(TINY + ["--out", str(out)])
    b2, ddpo = report["methods"]["b2"], report["methods"]["ddpo"]
    T, L, B, N, images = 4, 2, 2, 3, 6
    assert b2["images"] == ddpo["images"] == images
    # B²: the prefix once per prompt, then all branches as one batch; CFG doubles every row
    assert b2["unet_rows"]["sampling"] == 2 * (B * (T - L) + B * N * L) == 32
    # ... in one UNet call per denoising step: no loop over branches, no separate unconditional pass
    assert b2["unet_calls"]["sampling"] == T
    # DDPO: every image through every step, batch by batch
    assert ddpo["unet_rows"]["sampling"] == 2 * images * T == 48
    assert ddpo["unet_calls"]["sampling"] == (images // B) * T
    assert b2["vae_decode_rows"] == ddpo["vae_decode_rows"] == images
    # training: B² trains the kept samples' L interval steps (at most best + worst per group), DDPO all T steps
    kept = b2["samples_kept"]
    assert 1 <= kept <= 2 * B
    assert b2["transitions_trained"] == kept * L
    assert b2["unet_rows"]["training"] == 2 * kept * L
    assert ddpo["transitions_trained"] == images * T
    assert ddpo["unet_rows"]["training"] == 2 * images * T
    # no UNet work happens outside the measured phases
    for method in (b2, ddpo):
        assert method["unet_rows"]["outside"] == 0 and method["unet_rows"]["reward"] == 0
        assert method["unet_rows"]["step"] == 0  # all of it is charged to sampling or training
    # the trainer's own compute counter agrees with the hook's count of denoiser rows
    assert b2["compute_counter_rows"] == {"sampling": 32, "reference": 0, "training": 2 * kept * L}
    assert all(check["ok"] for check in report["checks"].values()) and len(report["checks"]) == 6

    # rates and ratios are derived from those counts and the measured times
    for method in (b2, ddpo):
        seconds = method["seconds"]
        assert seconds["sampling"] > 0 and seconds["training"] > 0
        assert seconds["total"] >= seconds["sampling"] + seconds["training"] - 1e-6
        assert method["images_per_s"] == pytest.approx(images / seconds["sampling"])
        assert method["transitions_per_s"] == pytest.approx(method["transitions_trained"] / seconds["training"])
        assert method["peak_memory_bytes"]["step"] >= method["peak_memory_bytes"]["sampling"] > 0
    ratios = report["ratios"]
    assert ratios["unet_rows_sampling"] == pytest.approx(32 / 48)
    assert ratios["unet_rows_training"] == pytest.approx(2 * kept * L / 48)
    assert ratios["seconds_total"] == pytest.approx(b2["seconds"]["total"] / ddpo["seconds"]["total"])
    assert json.loads(out.read_text())["methods"]["b2"]["unet_rows"] == b2["unet_rows"]
    assert "reference_comparison" not in report  # only for the full-size model on a GPU


def test_sd15_shaped_pipeline_has_sd15_sizes_and_its_tiny_variant_runs(cost):
    from b2trl.testing import build_sd15_pipeline

    with torch.device("meta"):  # the architecture without allocating a billion parameters
        pipe = build_sd15_pipeline()

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(pipe.unet) == 859_520_964  # Stable Diffusion 1.5's UNet
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.tokenizer.model_max_length == 77 and pipe.unet.config.sample_size == 64

    args = ["--sd15-random", "--tiny-width", "--resolution", "64", "--methods", "plain", "--plain-batch-size", "4"]
    report = cost.main(TINY + args)
    plain = report["methods"]["plain"]
    assert plain["images"] == 8  # two batches of 4 cover the 6 images
    assert plain["unet_rows"]["sampling"] == 2 * 8 * 4 and plain["vae_decode_rows"] == 8


def test_stacking_interval_steps_keeps_the_gradient(cost):
    report = cost.main(TINY + ["--methods", "--optimisations", "stacking", "--opt-repeats", "1"])
    stacking = report["optimisations"]["stacking"]
    assert set(stacking["speedup_vs_k1"]) == {"k=1", "k=2"}
    assert stacking["speedup_vs_k1"]["k=1"] == 1.0
    # one UNet call over 2 interval steps gives the gradient of two calls, up to float32 rounding
    assert stacking["gradient_max_relative_difference_vs_k1"]["k=2"] < 1e-4


def test_dpo_stage_adds_one_reference_row_per_kept_transition_and_reports_its_cost(cost):
    report = cost.main(TINY + ["--methods", "b2", "b2_dpo"])
    dpo, L = report["methods"]["b2_dpo"], 2
    assert dpo["samples_kept"] == 2 * dpo["groups_kept"] > 0  # whole pairs
    assert dpo["unet_rows"]["sampling"] == report["methods"]["b2"]["unet_rows"]["sampling"]
    # the policy's rows and, once per stage, the reference's: CFG doubles both
    assert dpo["unet_rows"]["training"] == 2 * dpo["samples_kept"] * L + 2 * dpo["samples_kept"] * L
    assert report["checks"]["b2_dpo_training_rows"]["ok"]
    # the counter counts the reference rows on their own
    assert dpo["compute_counter_rows"]["reference"] == 2 * dpo["samples_kept"] * L
    assert report["checks"]["b2_dpo_compute_counter_training"]["ok"]
    assert 0 < dpo["reference_seconds"] < dpo["seconds"]["training"]
    share = report["dpo_vs_ppo"]["reference_share_of_training"]
    assert share == pytest.approx(dpo["reference_seconds"] / dpo["seconds"]["training"])


def test_sdxl_shape_measures_b2_and_plain_and_refuses_trls_sd_only_ddpo(cost, capsys):
    args = cost.parse_args(["--sdxl-random", "--methods", "b2", "plain"])
    assert args.resolution == 1024 and args.reward == "random" and args.random_model
    assert cost.parse_args(["--sd15-random"]).resolution == 512
    with pytest.raises(SystemExit):
        cost.parse_args(["--sdxl-random"])  # the default methods include TRL's DDPO
    assert "TRL's DDPO pipeline loads SD1.x only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cost.parse_args(["--sdxl-random", "--sd15-random", "--methods", "b2"])


def test_the_grid_measures_every_cell_against_ddpo_and_weights_the_schedule(tmp_path):
    spec = importlib.util.spec_from_file_location("cost_grid", os.path.join(ROOT, "benchmarks", "cost_grid.py"))
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    # the reference schedule over T = 4 from L = 3: half of its 100 stages at each length
    assert grid.schedule_weights([3, 4], 4, 3) == {3: 50, 4: 50}
    assert grid.schedule_weights([3], 4, 3) is None  # a length of the schedule was not measured
    out = tmp_path / "grid.json"
    result = grid.main(["--branches", "2", "--intervals", "3", "4", "--num-steps", "4", "--images", "4",
                        "--ddpo-sample-batch-size", "2", "--train-batch-size", "1", "--out", str(out)])
    cells = result["cells"]
    assert [(c["branches"], c["interval"]) for c in cells] == [(2, 3), (2, 4)]
    for c in cells:
        assert c["images"] == 4 and c["cost_per_image_ratio"] > 0
        assert c["cost_per_image_ratio"] == c["b2_seconds"]["total"] / result["ddpo"][2]["seconds"]["total"]
    whole = result["whole_schedule"][2]["cost_per_image_ratio"]
    assert whole == pytest.approx((cells[0]["cost_per_image_ratio"] + cells[1]["cost_per_image_ratio"]) / 2)
    assert json.loads(out.read_text())["schedule_weights"] == {"3": 50, "4": 50}


def test_sd3_shape_runs_b2_and_plain_sd3_sampling_with_the_t5_length(cost, capsys, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    args = cost.parse_args(["--sd3-random", "--methods", "b2", "plain"])
    assert args.resolution == 1024 and args.reward == "random" and args.random_model and not args.no_t5
    with pytest.raises(SystemExit):
        cost.parse_args(["--sd3-random"])  # the default methods include TRL's DDPO
    assert "--sd3-random measures b2, b2_dpo and plain" in capsys.readouterr().err
    for wrong in (["--sd3-random", "--sdxl-random"], ["--sd3-random", "--resolution", "72"], ["--no-t5"]):
        with pytest.raises(SystemExit):
            cost.parse_args(wrong + ["--methods", "b2"])

    calls = []
    call = StableDiffusion3Pipeline.__call__

    def recorded(self, *a, **kwargs):
        calls.append((self.tokenizer_3.model_max_length, kwargs.get("max_sequence_length"), kwargs))
        return call(self, *a, **kwargs)

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", recorded)
    report = cost.main(TINY + ["--sd3-random", "--tiny-width", "--resolution", "64", "--methods", "b2", "plain",
                               "--plain-batch-size", "4"])
    b2, plain = report["methods"]["b2"], report["methods"]["plain"]
    T, L, B, N = 4, 2, 2, 3
    # the transformer's rows, counted like the UNet's: CFG doubles them, the branches share one call per step
    assert b2["unet_rows"]["sampling"] == 2 * (B * (T - L) + B * N * L) == 32
    assert b2["unet_calls"]["sampling"] == T
    assert b2["unet_rows"]["training"] == 2 * b2["samples_kept"] * L > 0
    assert b2["vae_decode_rows"] == 6
    assert all(check["ok"] for check in report["checks"].values()) and len(report["checks"]) == 4
    # plain diffusers SD3 sampling: two batches of 4, T5 padded to the tokenizer's length as the SD3 family pads it
    assert plain["images"] == 8 and plain["unet_rows"]["sampling"] == 2 * 8 * T and plain["vae_decode_rows"] == 8
    assert len(calls) == 2 and all(length == used == 16 and "eta" not in kw for length, used, kw in calls)


def test_sd35_medium_shaped_pipeline_has_its_published_sizes():
    from b2trl.testing import build_sd35_medium_pipeline

    with torch.device("meta"):  # the architecture without allocating 7.9 B parameters
        pipe = build_sd35_medium_pipeline()
        without_t5 = build_sd35_medium_pipeline(with_t5=False)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    transformer = pipe.transformer
    assert count(transformer) == 2_243_171_520
    # with the 384 x 384-patch position-embedding buffer: the 2.5 B quoted for SD3.5 Medium
    assert 2.2e9 < count(transformer) < 2.6e9
    assert 2.4e9 < count(transformer) + sum(b.numel() for b in transformer.buffers()) < 2.5e9
    assert count(pipe.text_encoder_3) == 4_762_310_656  # T5 v1.1 XXL's encoder, ~4.7 B
    assert count(pipe.text_encoder) == 123_650_304 and count(pipe.text_encoder_2) == 694_659_840
    assert count(pipe.vae) == 83_819_683
    config = transformer.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (24, 24, 64)
    assert tuple(config.dual_attention_layers) == tuple(range(13)) and config.qk_norm == "rms_norm"
    assert config.sample_size == 128 and config.pos_embed_max_size == 384
    assert config.pooled_projection_dim == pipe.text_encoder.config.projection_dim + 1280 == 2048
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    # the character tokenizers' ids fall inside the encoders' vocabularies
    assert len(pipe.tokenizer) <= pipe.text_encoder.config.vocab_size
    assert len(pipe.tokenizer_3) <= pipe.text_encoder_3.config.vocab_size == 32128
    assert pipe.tokenizer_3.model_max_length == 256 and pipe.scheduler.config.shift == 3.0
    assert without_t5.text_encoder_3 is None and without_t5.tokenizer_3 is None


def test_flux_shape_runs_b2_and_plain_flux_sampling_one_row_per_image(cost, capsys, monkeypatch):
    from diffusers import FluxPipeline

    args = cost.parse_args(["--flux-random", "--methods", "b2", "plain"])
    assert args.resolution == 1024 and args.reward == "random" and args.random_model
    assert args.cfg_rows == 1 and args.guidance_scale == 3.5  # FLUX.1-dev's embedded guidance, no CFG
    assert cost.parse_args(["--sd3-random", "--methods", "b2"]).cfg_rows == 2
    with pytest.raises(SystemExit):
        cost.parse_args(["--flux-random"])  # the default methods include TRL's DDPO
    assert "--flux-random measures b2, b2_dpo and plain" in capsys.readouterr().err
    for wrong in (["--flux-random", "--sd3-random"], ["--flux-random", "--resolution", "72"]):
        with pytest.raises(SystemExit):
            cost.parse_args(wrong + ["--methods", "b2"])

    calls = []
    call = FluxPipeline.__call__

    def recorded(self, *a, **kwargs):
        calls.append(kwargs)
        return call(self, *a, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", recorded)
    report = cost.main(TINY + ["--flux-random", "--tiny-width", "--resolution", "64", "--methods", "b2", "plain",
                               "--plain-batch-size", "4"])
    b2, plain = report["methods"]["b2"], report["methods"]["plain"]
    T, L, B, N = 4, 2, 2, 3
    # one transformer row per image and step (the guidance is an input, not a second half); one call per step
    assert b2["unet_rows"]["sampling"] == B * (T - L) + B * N * L == 16
    assert b2["unet_calls"]["sampling"] == T
    assert b2["unet_rows"]["training"] == b2["samples_kept"] * L > 0
    assert b2["vae_decode_rows"] == 6
    assert all(check["ok"] for check in report["checks"].values()) and len(report["checks"]) == 4
    # plain diffusers FLUX sampling: two batches of 4 at the built size, T5 padded as the FLUX family pads it
    assert plain["images"] == 8 and plain["unet_rows"]["sampling"] == 8 * T and plain["vae_decode_rows"] == 8
    assert len(calls) == 2
    assert all(kw["max_sequence_length"] == 16 and kw["guidance_scale"] == 3.5 and kw["height"] == kw["width"] == 64
               and "eta" not in kw for kw in calls)


def test_flux_dev_shaped_pipeline_has_its_published_sizes():
    from b2trl.testing import build_flux_pipeline

    with torch.device("meta"):  # the architecture without allocating 17 B parameters
        dev = build_flux_pipeline()
        schnell = build_flux_pipeline(512, schnell=True)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(dev.transformer) == 11_901_408_320  # FLUX.1-dev's "12 B" transformer
    assert count(dev.transformer) - count(schnell.transformer) == 10_229_760  # schnell: no guidance embedding
    assert count(dev.text_encoder_2) == 4_762_310_656  # T5 v1.1 XXL's encoder
    assert count(dev.text_encoder) == 123_060_480 and count(dev.vae) == 83_819_683
    config = dev.transformer.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads, config.attention_head_dim) == (
        19, 38, 24, 128)
    assert config.in_channels == 64 and config.joint_attention_dim == 4096 and config.pooled_projection_dim == 768
    assert config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert tuple(config.axes_dims_rope) == (16, 56, 56)
    assert dev.vae.config.latent_channels == 16 and dev.vae_scale_factor == 8
    assert (dev.vae.config.scaling_factor, dev.vae.config.shift_factor) == (0.3611, 0.1159)
    assert dev.scheduler.config.use_dynamic_shifting and dev.scheduler.config.max_shift == 1.15
    assert not schnell.scheduler.config.use_dynamic_shifting
    assert dev.default_sample_size * dev.vae_scale_factor == 1024
    assert schnell.default_sample_size * schnell.vae_scale_factor == 512
    assert dev.tokenizer_2.model_max_length == 512 and dev.tokenizer.model_max_length == 77
    assert len(dev.tokenizer) <= dev.text_encoder.config.vocab_size
    assert len(dev.tokenizer_2) <= dev.text_encoder_2.config.vocab_size == 32128
