"""FSDP2 sharding of full fine-tuning: two CPU processes (torchrun, gloo) against DDP, resuming a sharded checkpoint,
the export diffusers loads, every family's denoiser through the sharded module; and the settings and refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import free_port, small_config, torchrun_tiny

SHARD_FAMILIES = Path(__file__).parent / "scripts" / "shard_families.py"
# full fine-tuning with a KL term, so that the frozen reference copy is sharded and used too
RUN = ("--full", "--epochs", "2", "--kl-coef", "0.1", "--save-freq", "1")
SHARDED = ("--fsdp", "--ema-decay", "0.5")
# AdamW divides by sqrt(v) + 1e-8, so rounding in a gradient near 1e-8 moves a weight by a fraction of the learning
# rate (1e-2, about what one step moves every weight): weights agree to this, not to float32 rounding
WEIGHT_ATOL = 1e-4


def unet_weights(folder) -> dict:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same two-stage run with DDP, with FSDP2 (EMA kept), and with FSDP2 resumed from the second run's first
    checkpoint; each checkpoints every stage and exports what it trained."""
    root = tmp_path_factory.mktemp("sharding")
    out = {}
    resume = ("--resume-from", str(root / "fsdp" / "project" / "checkpoints" / "checkpoint_0"),
              # gathered blocks kept until the backward pass: the same arithmetic, other memory, so the same run
              "--fsdp-kwargs", '{"reshard_after_forward": false}')
    for name, extra in (("ddp", ()), ("fsdp", SHARDED), ("resumed", SHARDED + resume)):
        folder = root / name
        folder.mkdir()
        stats = torchrun_tiny(tiny_model_dir, folder, *RUN, *extra, "--export", str(folder / "export"),
                              "--dump-weights", str(folder / "weights.pt"))
        out[name] = SimpleNamespace(stats=stats, folder=folder, export=folder / "export",
                                    weights=torch.load(folder / "weights.pt"))
    return out


def sharded_checkpoint(folder) -> dict:
    """A sharded checkpoint's model, optimizer and EMA as one whole state dict (read without processes)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = folder.parent.parent / f"{folder.name}.pt"
    dcp_to_torch_save(folder / "sharded_state", whole)
    return torch.load(whole)


def test_one_stage_with_fsdp_trains_as_ddp_does(runs, tiny_model_dir):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    first, second = zip(ddp.stats, fsdp.stats)
    assert [s["stage"] for s in fsdp.stats] == [0, 1]
    assert first[0]["optimizer_steps"] == first[1]["optimizer_steps"] > 0
    for key in ("loss", "grad_norm", "kl_ref", "approx_kl", "weight_norm"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-5), key
    # the weights after the first stage: DDP's checkpoint (the whole UNet) and FSDP's (its shards, gathered here)
    stage0 = ddp.folder / "project" / "checkpoints" / "checkpoint_0"
    expected = unet_weights(stage0)
    got = sharded_checkpoint(fsdp.folder / "project" / "checkpoints" / "checkpoint_0")["model"]
    base = unet_weights(tiny_model_dir)
    assert max(float((expected[n] - base[n]).abs().max()) for n in base) > 5e-3  # it trained
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=WEIGHT_ATOL)
    # the second stage samples with weights that differ by that much, and its statistics by a little more
    for key in ("loss", "grad_norm", "kl_ref", "weight_norm"):
        assert second[1][key] == pytest.approx(second[0][key], rel=1e-3), key
    for name, value in ddp.weights.items():
        torch.testing.assert_close(fsdp.weights[name], value, rtol=0, atol=WEIGHT_ATOL)


def test_export_holds_the_whole_trained_weights_and_loads_in_diffusers(runs):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    fsdp = runs["fsdp"]
    pipe = StableDiffusionPipeline.from_pretrained(fsdp.export)
    assert type(pipe.unet) is UNet2DConditionModel
    exported = pipe.unet.state_dict()
    assert exported.keys() == fsdp.weights.keys()
    for name, value in fsdp.weights.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
    index = json.loads((fsdp.export / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    # the EMA export (decay 0.5 after 4 steps) lies between the base and the last weights, not at either
    ema = unet_weights(str(fsdp.export) + "_ema")
    assert any(not torch.equal(ema[n], exported[n]) for n in exported)
    # and the unsharded DDP run's export is the same model
    ddp = StableDiffusionPipeline.from_pretrained(runs["ddp"].export).unet.state_dict()
    assert max(float((ddp[n] - exported[n]).abs().max()) for n in exported) < WEIGHT_ATOL


def test_resuming_a_sharded_checkpoint_continues_the_run(runs):
    fsdp, resumed = runs["fsdp"], runs["resumed"]
    checkpoint = fsdp.folder / "project" / "checkpoints" / "checkpoint_0"
    sharded = checkpoint / "sharded_state"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per process
    assert not (checkpoint / "unet").exists()  # no whole copy of the weights in a sharded checkpoint
    saved = sharded_checkpoint(checkpoint)
    assert set(saved) == {"model", "optimizer", "ema"} and saved["optimizer"]["state"]
    assert [s["stage"] for s in resumed.stats] == [1]
    for key in ("loss", "grad_norm", "kl_ref", "weight_norm"):
        assert resumed.stats[0][key] == pytest.approx(fsdp.stats[1][key], rel=1e-6), key
    for name, value in fsdp.weights.items():
        torch.testing.assert_close(resumed.weights[name], value, rtol=0, atol=1e-7)
    ema, resumed_ema = unet_weights(str(fsdp.export) + "_ema"), unet_weights(str(resumed.export) + "_ema")
    for name, value in ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=0, atol=1e-7)


def test_every_family_samples_and_trains_through_its_sharded_denoiser(
    tiny_model_dir, tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir, tiny_qwenimage_dir, tiny_zimage_dir, tmp_path
):
    out = tmp_path / "families.jsonl"
    dirs = [tiny_model_dir, tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir, tiny_qwenimage_dir, tiny_zimage_dir]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(SHARD_FAMILIES), str(out), *dirs]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    *records, upcast = [json.loads(line) for line in out.read_text().splitlines()]
    assert upcast == {"bf16_loaded_shards_placed_as_float32": True}
    assert [r["family"] for r in records] == ["sd", "sdxl", "sd3", "flux", "qwenimage", "zimage"]
    for r in records:
        assert r["forward_diff"] <= 1e-6, r  # sampling: no_grad, eval mode, blocks gathered one at a time
        assert r["grad_diff"] <= 1e-6 and r["same_parameters_have_gradients"], r
        assert 0.45 < r["local_fraction"] < 0.55 and r["units"] >= 2, r  # each process holds about half
    assert sum(r["guided"] for r in records) == 5  # FLUX.1 guides through its input instead


# ---------------------------------------------------------------------------------------------- settings


def test_config_rejects_bad_fsdp_settings():
    from b2trl import B2DiffuRLConfig

    with pytest.raises(ValueError, match="fsdp_kwargs has unknown options \\['shard_size'\\]"):
        small_config(fsdp=True, fsdp_kwargs={"shard_size": 2})
    with pytest.raises(ValueError, match="fsdp_kwargs is set but fsdp is False"):
        small_config(fsdp_kwargs={"cpu_offload": True})
    with pytest.raises(ValueError, match="param_dtype.*'float64'"):
        small_config(fsdp=True, fsdp_kwargs={"param_dtype": "float64"})
    with pytest.raises(ValueError, match="'bfloat16' needs mixed_precision='bf16'"):
        small_config(fsdp=True, fsdp_kwargs={"param_dtype": "bfloat16"})  # small_config trains in fp32
    with pytest.raises(ValueError, match="mixed_precision='fp16' is not supported"):
        small_config(fsdp=True, mixed_precision="fp16")
    with pytest.raises(ValueError, match="train_use_8bit_adam"):
        small_config(fsdp=True, train_use_8bit_adam=True)
    assert B2DiffuRLConfig(fsdp=True, mixed_precision="bf16", fsdp_kwargs={"reshard_after_forward": False}).fsdp


def test_sharding_is_refused_for_lora_and_without_processes():
    from accelerate import Accelerator

    from b2trl.sharding import build_sharding

    accelerator = Accelerator(cpu=True)
    assert build_sharding(small_config(), accelerator, use_lora=False) is None
    with pytest.raises(ValueError, match="fsdp shards full fine-tuning; this pipeline trains LoRA"):
        build_sharding(small_config(fsdp=True), accelerator, use_lora=True)
    with pytest.raises(ValueError, match="no process group: launch it with `accelerate launch` or `torchrun`"):
        build_sharding(small_config(fsdp=True), accelerator, use_lora=False)


def test_accelerate_launch_settings_are_read_and_fsdp1_refused(monkeypatch):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from b2trl.sharding import FSDPOptions, _accelerate_plugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=False, cpu_offload=True, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        transformer_cls_names_to_wrap=["FluxTransformerBlock"], activation_checkpointing=True,
    )
    assert FSDPOptions.from_plugin(plugin) == FSDPOptions(
        reshard_after_forward=False, cpu_offload=True, transformer_cls_names_to_wrap=["FluxTransformerBlock"],
        activation_checkpointing=True,
    )
    sized = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=1000)
    assert FSDPOptions.from_plugin(sized).min_num_params == 1000
    not_fsdp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert _accelerate_plugin(not_fsdp) is None
    # what `accelerate launch --use_fsdp` exports: FSDP_VERSION defaults to 1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        _accelerate_plugin(not_fsdp)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert _accelerate_plugin(not_fsdp).fsdp_version == 2


def test_units_are_the_models_blocks_or_the_named_classes(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    from b2trl.sharding import FSDPOptions, fsdp_units

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    units = fsdp_units(unet, FSDPOptions())
    assert {type(m).__name__ for m in units} <= set(unet._no_split_modules)
    position = {id(m): i for i, m in enumerate(units)}
    for unit in units:  # children are sharded before the blocks that hold them
        inner = [m for m in unit.modules() if m is not unit and id(m) in position]
        assert all(position[id(m)] < position[id(unit)] for m in inner)
    named = fsdp_units(unet, FSDPOptions(transformer_cls_names_to_wrap=["ResnetBlock2D"]))
    assert named and all(type(m).__name__ == "ResnetBlock2D" for m in named)
    sized = fsdp_units(unet, FSDPOptions(min_num_params=10_000))
    assert sized and all(sum(p.numel() for p in m.parameters()) > 10_000 for m in sized)
    with pytest.raises(ValueError, match=r"\['FluxTransformerBlock'\] are not classes of UNet2DConditionModel"):
        fsdp_units(unet, FSDPOptions(transformer_cls_names_to_wrap=["FluxTransformerBlock"]))


def test_a_checkpoint_resumes_only_with_the_sharding_it_was_written_with(tiny_model_dir, tmp_path):
    import shutil

    from b2trl.sharding import SHARDED_STATE, FSDP2Sharding
    from helpers import make_trainer

    trainer = make_trainer(tiny_model_dir, num_epochs=1, save_freq=1, project_kwargs={"project_dir": str(tmp_path)})
    trainer.train()
    checkpoint = tmp_path / "checkpoints" / "checkpoint_0"
    # an unsharded checkpoint: a sharded run refuses it before touching its model
    with pytest.raises(ValueError, match="written by a run without fsdp"):
        object.__new__(FSDP2Sharding).load_state(str(checkpoint), None, None)
    # a sharded one (its marker folder): an unsharded run refuses it
    sharded = tmp_path / "sharded" / "checkpoint_0"
    shutil.copytree(checkpoint, sharded)
    (sharded / SHARDED_STATE).mkdir()
    with pytest.raises(ValueError, match="written by a run with fsdp"):
        trainer.resume(str(sharded))
