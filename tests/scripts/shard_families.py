"""Shard each given tiny pipeline's denoiser with b2trl's FSDP2 sharding in two CPU processes and compare it with an
unsharded copy: the family's prediction under no_grad in eval mode (as sampling calls it) and the gradients of a
training forward; then a bf16-loaded SD pipeline sharded and placed as the trainer does. Run under torchrun; rank 0
appends one JSON line per check to OUT.

    torchrun --nproc_per_node 2 shard_families.py OUT MODEL_DIR [MODEL_DIR ...]
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from accelerate import Accelerator, PartialState  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from b2trl import load_pipeline  # noqa: E402
from b2trl.models import Conditioning, wrap_pipeline  # noqa: E402
from b2trl.sharding import FSDP2Sharding, FSDPOptions  # noqa: E402
from helpers import small_config  # noqa: E402

torch.set_num_threads(1)
state = PartialState(cpu=True)
accelerator = Accelerator(cpu=True)
sharding = FSDP2Sharding(FSDPOptions(), accelerator)
out_file, model_dirs = sys.argv[1], sys.argv[2:]


def inputs(pipeline):
    """Two prompts' conditioning as the trainer encodes it (with the unconditional half when the family guides
    that way), latents and two of the family's own sampling timesteps."""
    family, pipe, config = pipeline.family, pipeline.sd_pipeline, small_config()
    size = family.image_size(pipe)
    cond = family.encode_prompts(pipe, ["a cat", "a dog"], "cpu", size)
    cond.update(family.sampling_inputs(pipe, config, 2, "cpu"))
    uncond = None
    if family.uses_guidance(config):
        negative = family.encode_negative(pipe, "", "cpu", size)
        uncond = {k: v.expand(2, *v.shape[1:]) for k, v in negative.items()}
    latents = torch.randn(family.latent_shape(pipe, 2, size), generator=torch.Generator().manual_seed(0))
    sampler = family.make_sampler(config)
    steps = sampler.timesteps(pipe.scheduler, 6, "cpu", **family.schedule_kwargs(pipe, 6, size))
    return latents, steps[[1, 4]], Conditioning(cond, uncond)


def run(family, denoiser, latents, timesteps, conditioning):
    denoiser.eval()
    with torch.no_grad():
        sampled = family.predict(denoiser, latents, timesteps, conditioning, 3.0)
    denoiser.train()
    family.predict(denoiser, latents, timesteps, conditioning, 3.0).square().mean().backward()
    return sampled


for model_dir in model_dirs:
    pipeline = load_pipeline(model_dir, use_lora=False)
    family, denoiser = pipeline.family, pipeline.denoiser
    plain = copy.deepcopy(denoiser)
    args = inputs(pipeline)
    expected = run(family, plain, *args)
    sharding.shard(denoiser)
    got = run(family, denoiser, *args)
    grads = dict(plain.named_parameters())
    grad_diff = max(
        float((p.grad.full_tensor() - grads[n].grad).abs().max()) for n, p in denoiser.named_parameters()
        if p.grad is not None
    )
    same_grads = all((p.grad is None) == (grads[n].grad is None) for n, p in denoiser.named_parameters())
    local = sum(p.to_local().numel() for p in denoiser.parameters())
    total = sum(p.numel() for p in denoiser.parameters())
    units = sum(isinstance(m, FSDPModule) for m in denoiser.modules()) - 1  # the blocks, not the root
    record = {
        "family": family.name, "guided": args[2].guided, "forward_diff": float((got - expected).abs().max()),
        "grad_diff": grad_diff, "same_parameters_have_gradients": same_grads, "local_fraction": local / total,
        "units": units,
    }
    if state.is_main_process:
        with open(out_file, "a") as f:
            f.write(json.dumps(record) + "\n")
# a pipeline loaded in bf16 (half the host memory) is sharded as loaded; placing it casts the shards to float32
pipe = StableDiffusionPipeline.from_pretrained(model_dirs[0], torch_dtype=torch.bfloat16)
loaded = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
pipeline = wrap_pipeline(pipe, use_lora=False)
sharding.shard(pipeline.denoiser)
pipeline.family.place(pipe, accelerator.device, torch.bfloat16, use_lora=False)
shards = dict(pipeline.denoiser.named_parameters())
upcast = all(p.dtype == p.to_local().dtype == torch.float32 for p in shards.values()) and all(
    torch.equal(shards[n].full_tensor(), value.float()) for n, value in loaded.items()
)
if state.is_main_process:
    with open(out_file, "a") as f:
        f.write(json.dumps({"bf16_loaded_shards_placed_as_float32": upcast}) + "\n")
accelerator.end_training()
sys.stdout.flush()
os._exit(0)  # see train_tiny.leave: a finished gloo run can abort in the interpreter's teardown
