"""Predicted memory of a B² stage, per model family: weights, trained state and the activations training keeps.

Nothing is allocated: each family's real-shape pipeline is built on PyTorch's ``meta`` device (shapes without
data), and one training forward of the denoiser at the run's rows and resolution runs there under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the backward pass (each
counted once). With gradient checkpointing, a checkpointed block keeps only its input, and its activations exist
again, one block at a time, during its recomputation. So, for any family, size and precision:

    training peak ≈ frozen weights + trained parameters, gradients and AdamW state + saved activations
                    (+ the process itself: Python, PyTorch and the libraries, ~1 GB, measured)

Sampling needs less than training (no saved activations) and is not modelled. The prediction is checked against
peak resident memory measured on a CPU (`real_shapes.py`).

    python benchmarks/memory_model.py                  # every family at its own size, 4 rows, bf16
    python benchmarks/memory_model.py --grid --out benchmarks/results/memory_model.json   # docs/cost.md's table
    python benchmarks/memory_model.py --shape sd35m_no_t5 --resolution 256 --rows 8 --dtype fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 1024**3
PROCESS_BASELINE_GIB = 1.0  # Python, PyTorch, diffusers and transformers loaded: measured RSS before any model
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# each shape: the b2trl.testing builder, its keyword arguments, and the model's own resolution
SHAPES = {
    "sd15": ("build_sd15_pipeline", {}, 512),
    "sdxl": ("build_sdxl_pipeline", {}, 1024),
    "sd35m": ("build_sd35_medium_pipeline", {"with_t5": True}, 1024),
    "sd35m_no_t5": ("build_sd35_medium_pipeline", {"with_t5": False}, 1024),
    "flux": ("build_flux_pipeline", {}, 1024),
    "qwenimage": ("build_qwenimage_pipeline", {}, 1024),
    "zimage": ("build_zimage_pipeline", {}, 1024),
}


def build(shape: str, resolution: int):
    """The shape's diffusers pipeline on the meta device (parameters with shapes, no data)."""
    import torch

    import b2trl.testing as testing

    builder, kwargs, _ = SHAPES[shape]
    with torch.device("meta"):
        pipe = getattr(testing, builder)(resolution=resolution, **kwargs)
    return pipe


def _flash_attention_stand_in():
    """`scaled_dot_product_attention` as a fused kernel keeps it for the backward pass (CPU's flash kernel, or CUDA's
    flash / memory-efficient ones): the inputs, the output and one float32 log-sum-exp per query row. On the meta
    device PyTorch would pick the unfused path, which keeps the whole attention matrix, and that is not what a real
    run holds."""
    import torch

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
            lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
            ctx.save_for_backward(query, key, value, out, lse)
            return out

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        return FusedAttention.apply(query, key, value)

    return attention


@contextlib.contextmanager
def _language_model_stand_in(pipe):
    """A causal language model as text encoder (Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3) cannot run on the meta
    device: its attention mask and the pipelines' selection of each prompt's tokens read values. Its output only
    sets the conditioning's shapes, so while prompts are encoded it is replaced by zeros of its width on the CPU
    (the device to encode on is yielded: ``"cpu"`` then, ``"meta"`` for every other text encoder)."""
    import torch

    encoder = getattr(pipe, "text_encoder", None)
    config = getattr(encoder, "config", None)
    if config is None or not type(encoder).__name__.endswith(("ForConditionalGeneration", "Model")) \
            or "Qwen" not in type(encoder).__name__:
        yield "meta"
        return
    width = getattr(getattr(config, "text_config", config), "hidden_size")

    class StandIn(torch.nn.Module):
        dtype = torch.float32
        device = torch.device("cpu")

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            hidden = torch.zeros(*input_ids.shape, width)
            return SimpleNamespace(hidden_states=(hidden,) * 3, last_hidden_state=hidden)

    pipe.text_encoder = StandIn()
    try:
        yield "cpu"
    finally:
        pipe.text_encoder = encoder


def parameter_bytes(modules, dtype_bytes: int) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters()) * dtype_bytes


def saved_activation_bytes(shape: str, pipe, rows: int, resolution: int, dtype, lora: bool,
                           gradient_checkpointing: bool, guidance: bool) -> int:
    """Bytes autograd keeps for one training call of `rows` samples (guidance doubles the denoiser's rows)."""
    import torch

    from b2trl.models import Conditioning, family_for_pipeline

    family = family_for_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser_name)
    if lora:
        family.add_lora(denoiser)
    denoiser.to(dtype)
    for p in denoiser.parameters():
        p.requires_grad_(p.requires_grad if lora else True)
    size = (resolution, resolution)
    with torch.no_grad(), _language_model_stand_in(pipe) as device:
        cond = family.encode_prompts(pipe, ["a photograph of an astronaut riding a horse"] * rows, device, size)
        uncond = family.encode_negative(pipe, "", device, size) if guidance else None
    def on_meta(tensors):  # lengths and masks stay where they were encoded: a family may read them (Qwen-Image's)
        return {k: v.to("meta", dtype) if v.is_floating_point() else v for k, v in tensors.items()}

    conditioning = Conditioning(on_meta(cond), None if uncond is None else {
        k: v.expand(rows, *v.shape[1:]) for k, v in on_meta(uncond).items()})
    latents = torch.empty(family.latent_shape(pipe, rows, size), device="meta", dtype=dtype)
    flow = family.name != "sd" and family.name != "sdxl"
    timesteps = torch.full((rows,), 500.0 if flow else 500, device="meta",
                           dtype=torch.float32 if flow else torch.long)
    blocks = _blocks(denoiser)
    seen, per_block, inputs = {}, {}, {}
    current = [None]

    parameters = {id(p) for p in denoiser.parameters()}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        # a layer's weight saved for the backward pass is the weight itself, already counted
        if id(base) not in seen and id(base) not in parameters:
            seen[id(base)] = (base, current[0])  # the reference keeps ids unique
        return tensor

    def enter(module, args):
        current[0] = id(module)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        inputs[id(module)] = 0 if first is None else first.numel() * first.element_size()

    def leave(module, args, output):
        current[0] = None

    handles = [b.register_forward_pre_hook(enter) for b in blocks] + [b.register_forward_hook(leave) for b in blocks]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_attention_stand_in()
    # Qwen-Image compares the negative prompt's rows to broadcast one (values a meta tensor lacks); here they are one
    # row expanded, so one row is what it would find
    one_row = mock.patch("b2trl.models.qwenimage.shared_row", lambda c: {k: v[:1] for k, v in c.items()})
    # Z-Image decides per row whether guidance applies (at this timestep it does, on every row)
    all_guided = mock.patch.object(type(family), "guided_rows", lambda self, t: torch.ones(len(t), dtype=torch.bool),
                                   create=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), one_row, all_guided:
            family.predict(denoiser, latents, timesteps, conditioning, 5.0)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    total = 0
    for base, block in seen.values():
        nbytes = base.numel() * base.element_size()
        total += nbytes
        if block is not None:
            per_block[block] = per_block.get(block, 0) + nbytes
    if not gradient_checkpointing or not per_block:
        return total
    # checkpointed blocks keep their inputs; one block's activations come back during its recomputation
    return total - sum(per_block.values()) + sum(inputs.values()) + max(per_block.values())


def _blocks(denoiser):
    """The denoiser's repeated blocks (the classes diffusers lists as not to be split), which gradient checkpointing
    wraps."""
    names = set(getattr(denoiser, "_no_split_modules", None) or [])
    found = [(path, m) for path, m in denoiser.named_modules() if type(m).__name__ in names]
    paths = {path for path, _ in found}
    # the outermost ones only (a UNet's up block holds resnets and transformer blocks of the listed classes too)
    return [m for path, m in found
            if not any(path.startswith(other + ".") for other in paths if other != path)]


def predict(shape: str, resolution: int, rows: int, dtype: str = "bf16", lora: bool = True,
            gradient_checkpointing: bool = False, guidance: bool = True) -> dict:
    """The predicted training memory of `shape` at `resolution` with `rows` samples per training call."""
    import torch

    from b2trl.models import family_for_pipeline

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    pipe = build(shape, resolution)
    family = family_for_pipeline(pipe)
    guidance = guidance and family.name != "flux"  # FLUX.1's guidance is an input of one row
    denoiser = getattr(pipe, family.denoiser_name)
    frozen = [getattr(pipe, name, None) for name in (*family.text_encoder_names, "vae")]
    denoiser_params = sum(p.numel() for p in denoiser.parameters())
    activations = saved_activation_bytes(shape, pipe, rows, resolution, torch_dtype, lora, gradient_checkpointing,
                                         guidance)
    trained = sum(p.numel() for p in denoiser.parameters() if p.requires_grad) if lora else denoiser_params
    weights = parameter_bytes(frozen, BYTES[dtype]) + (denoiser_params * BYTES[dtype] if lora else 0)
    # trained parameters in float32 with their gradients and AdamW's two moments: 16 bytes each
    state = trained * 16
    total = weights + state + activations + PROCESS_BASELINE_GIB * GiB
    return {"shape": shape, "resolution": resolution, "rows": rows, "dtype": dtype, "lora": lora,
            "gradient_checkpointing": gradient_checkpointing, "guidance": guidance,
            "denoiser_parameters": denoiser_params, "trained_parameters": trained,
            "weights_gib": round(weights / GiB, 2), "trained_state_gib": round(state / GiB, 2),
            "activations_gib": round(activations / GiB, 2), "total_gib": round(total / GiB, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="*", default=None, choices=sorted(SHAPES))
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    parser.add_argument("--rows", type=int, nargs="*", default=[4], help="samples per training call (before CFG)")
    parser.add_argument("--dtype", choices=sorted(BYTES), default="bf16")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--grid", action="store_true",
                        help="docs/cost.md's table: every shape at its own size, bf16, LoRA, 1/2/4 rows, and 1/4 rows "
                        "with gradient checkpointing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.grid:
        settings = [(shape, SHAPES[shape][2], rows, "bf16", True, checkpointing)
                    for shape in args.shape or list(SHAPES)
                    for checkpointing, counts in ((False, (1, 2, 4)), (True, (1, 4))) for rows in counts]
    else:
        settings = [(shape, args.resolution or SHAPES[shape][2], rows, args.dtype, not args.full,
                     args.gradient_checkpointing) for shape in args.shape or list(SHAPES) for rows in args.rows]
    results = []
    for shape, resolution, rows, dtype, lora, checkpointing in settings:
        try:
            result = predict(shape, resolution, rows, dtype, lora, checkpointing)
        except RuntimeError as err:  # a forward that reads tensor values (Z-Image's per-caption lengths)
            print(f"{shape:13} {resolution:>5} px {rows:>3} rows: not modelled on the meta device ({err})", flush=True)
            results.append({"shape": shape, "resolution": resolution, "rows": rows, "dtype": dtype,
                            "gradient_checkpointing": checkpointing, "error": str(err)})
            continue
        results.append(result)
        print(f"{shape:13} {resolution:>5} px {rows:>3} rows {dtype}{' GC' if checkpointing else '   '}: weights "
              f"{result['weights_gib']:6.1f} + trained {result['trained_state_gib']:6.1f} + activations "
              f"{result['activations_gib']:6.1f} = {result['total_gib']:6.1f} GiB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
