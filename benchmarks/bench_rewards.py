"""Throughput of the reward functions on this machine's CPU: images per second per scorer.

The model-based scorers run on tiny, randomly initialised models built from configs (no download): CLIP for the
aesthetic/CLIPScore/PickScore scorers, an open_clip-layout checkpoint for HPSv2, a 2-layer Qwen2.5-VL and LLaVA
for VQAScore. Their numbers measure the preprocessing, tokenisation, batching and (for VQAScore) the processor's
PIL path, not the real models. JPEG runs at the real cost (it has no model). `remote` sends the batch to a scoring
server on the loopback address that computes the mean brightness, so it measures the protocol's own cost (PNG
encoding and decoding, base64, JSON, HTTP).

Estimates for the full-size models on one modern GPU (H100 class, batch 32+), from FLOP counts rather than
measurement: a CLIP ViT-L/14 image forward is ~80 GFLOPs and ViT-H/14 ~170 GFLOPs, so at a realistic 30-50 % of
fp16 peak expect very roughly 1500-3000 images/s for the aesthetic scorer (ViT-L/14) and 700-1500 images/s for
CLIPScore / PickScore / HPSv2 (ViT-H/14, plus a cheaper text forward). VQAScore with Qwen2.5-VL-7B reads a 512 px
image as ~330 tokens plus ~40 of question: a prefill of ~5 TFLOPs per image with the vision tower, so roughly
50-100 images/s in bf16 (about twice that with the 3B model). Next to sampling 50 denoising steps of a 512 px
Stable Diffusion image (well under 50 images/s on such a GPU), only VQAScore costs a noticeable share. JPEG
encoding stays on the CPU (about the per-image time below, per core), and so does the remote client's PNG
encoding.

Usage: `python benchmarks/bench_rewards.py [--batch-size 8] [--repeats 5] [--size 512]`
"""

import argparse
import tempfile
import threading
import time

import torch

from b2trl.rewards import (
    AestheticScorer,
    CLIPScore,
    HPSv2,
    JpegCompressibility,
    PickScore,
    RemoteReward,
    VQAScore,
)
from b2trl.rewards.serve import make_server
from b2trl.rewards.testing import build_tiny_clip, build_tiny_open_clip, build_tiny_vlm, save_aesthetic_head

GPU_ESTIMATE = {
    "jpeg_compressibility": "CPU-bound, as measured",
    "aesthetic": "~1500-3000 (ViT-L/14, estimate)",
    "clip_score": "~700-1500 (ViT-H/14, estimate)",
    "pickscore": "~700-1500 (ViT-H/14, estimate)",
    "hpsv2": "~700-1500 (ViT-H/14, estimate)",
    "vqa_score (Qwen2.5-VL)": "~50-100 (7B, bf16, estimate)",
    "vqa_score (LLaVA)": "depends on the model",
    "remote (transport only)": "CPU-bound client, as measured",
}


def brightness(images, prompts, prompt_metadata):
    return images.float().mean(dim=(1, 2, 3)), {}


def images_per_second(scorer, images, prompts, repeats):
    """Images/s of the fastest of `repeats` calls: on a shared machine the others measure the neighbours."""
    scorer(images, prompts, None)  # load the model / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        scorer(images, prompts, None)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512, help="side of the square input images")
    args = parser.parse_args()

    images = torch.rand(args.batch_size, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    prompts = ["a photograph of an astronaut riding a horse"] * args.batch_size
    server = make_server(brightness, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            model = build_tiny_clip(f"{folder}/clip", image_size=224, patch_size=14)  # 256 patches, like ViT-L/14
            save_aesthetic_head(f"{folder}/aesthetic-model.pth", input_dim=16)
            hps, hps_processor, _ = build_tiny_open_clip(f"{folder}/hps", image_size=224, patch_size=14,
                                                          context_length=77)
            scorers = {
                "jpeg_compressibility": JpegCompressibility(),
                "aesthetic": AestheticScorer(model, head_name_or_path=f"{folder}/aesthetic-model.pth"),
                "clip_score": CLIPScore(model),
                "pickscore": PickScore(model),
                "hpsv2": HPSv2(hps, processor_name_or_path=hps_processor),
                "vqa_score (Qwen2.5-VL)": VQAScore(build_tiny_vlm(f"{folder}/qwen", arch="qwen2_5_vl")),
                "vqa_score (LLaVA)": VQAScore(build_tiny_vlm(f"{folder}/llava", arch="llava")),
                "remote (transport only)": RemoteReward(f"http://127.0.0.1:{server.server_address[1]}/"),
            }
            print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}, "
                  f"{args.size}x{args.size} images; tiny random models (CLIP/HPSv2 at 224 px)")
            print(f"{'scorer':<25} {'CPU images/s':>13}   full-size model on one GPU (images/s)")
            print("(CPU: best of --repeats calls of one batch)")
            for name, scorer in scorers.items():
                rate = images_per_second(scorer, images, prompts, args.repeats)
                print(f"{name:<25} {rate:>13.1f}   {GPU_ESTIMATE[name]}")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
