"""Throughput of the reward functions on this machine's CPU: images per second per scorer.

The CLIP scorers run on a tiny, randomly initialised CLIP (built from a config, no download), so their
numbers measure the preprocessing/tokenisation/batching overhead, not the real models. JPEG runs at the
real cost (it has no model).

Estimate for the full-size models on one modern GPU (H100 class, fp16, batch 32+, 224 px inputs), from
FLOP counts rather than measurement: a CLIP ViT-L/14 image forward is ~80 GFLOPs and ViT-H/14 ~170
GFLOPs, so at a realistic 30-50 % of fp16 peak expect very roughly 1500-3000 images/s for the aesthetic
scorer (ViT-L/14) and 700-1500 images/s for CLIPScore / PickScore (ViT-H/14, plus a cheaper text forward).
Next to sampling 50 denoising steps of a 512 px Stable Diffusion image (well under 50 images/s on such a
GPU), reward time is negligible. JPEG encoding stays on the CPU (about the per-image time below, per core).

Usage: `python benchmarks/bench_rewards.py [--batch-size 8] [--repeats 5] [--size 512]`
"""

import argparse
import tempfile
import time

import torch

from b2trl.rewards import AestheticScorer, CLIPScore, JpegCompressibility, PickScore
from b2trl.rewards.testing import build_tiny_clip, save_aesthetic_head

GPU_ESTIMATE = {
    "aesthetic": "~1500-3000 (ViT-L/14, estimate)",
    "clip_score": "~700-1500 (ViT-H/14, estimate)",
    "pickscore": "~700-1500 (ViT-H/14, estimate)",
    "jpeg_compressibility": "CPU-bound, as measured",
}


def images_per_second(scorer, images, prompts, repeats):
    scorer(images, prompts, None)  # load the model / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        scorer(images, prompts, None)
    return repeats * len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512, help="side of the square input images")
    args = parser.parse_args()

    images = torch.rand(args.batch_size, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    prompts = ["a photograph of an astronaut riding a horse"] * args.batch_size
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_clip(f"{folder}/clip", image_size=224, patch_size=14)  # 256 patches, like ViT-L/14
        save_aesthetic_head(f"{folder}/aesthetic-model.pth", input_dim=16)
        scorers = {
            "jpeg_compressibility": JpegCompressibility(),
            "aesthetic": AestheticScorer(model, head_name_or_path=f"{folder}/aesthetic-model.pth"),
            "clip_score": CLIPScore(model),
            "pickscore": PickScore(model),
        }
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}, "
              f"{args.size}x{args.size} images; CLIP scorers use a tiny random CLIP at 224 px")
        print(f"{'scorer':<22} {'CPU images/s':>13}   full-size model on one GPU (images/s)")
        for name, scorer in scorers.items():
            rate = images_per_second(scorer, images, prompts, args.repeats)
            print(f"{name:<22} {rate:>13.1f}   {GPU_ESTIMATE[name]}")


if __name__ == "__main__":
    main()
