"""Pretrain the tiny toy-world ``StableDiffusionPipeline`` from scratch on CPU.

    python -m b2trl.toy.pretrain --output_dir DIR [--seed 0] [--unet_steps 2400]

Stages: (1) a BPE tokenizer trained on the prompt vocabulary; (2) an AutoencoderKL (32×32 → 8×8×4) trained
with object pixels up-weighted, so that small saturated shapes keep their colour; (3) a fixed set of rendered
training images is encoded once; (4) the UNet and a small CLIP text encoder are trained jointly with
ε-prediction, a high-noise weighting min((1 + SNR) / SNR, 10) (layout is decided at high noise), 10% empty
prompts for classifier-free guidance and EMA weights. EMA checkpoints are scored every ``--eval_every`` steps
on the RL training prompts (never on held-out ones). By default the first checkpoint that draws single-object
prompts correctly is saved as ``DIR/pipeline``: it draws shapes and colours but still errs on two-object binding
and relations, which is what RL is meant to fix (``--pick best`` keeps the most aligned one instead).

Only training scenes are drawn (``world.sample_train_prompts``); held-out scenes never reach the data.
CPU training is not bit-reproducible across machines or thread counts; the seed fixes data and initialisation.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .architecture import assemble_pipeline, build_toy_components
from .reward import alignment_reward, score_attributes
from .world import COLOURS, RELATIONS, SHAPES, render, sample_train_prompts, train_prompts

MAX_LENGTH = 16
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# ----------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(folder: str, seed: int = 0):
    """Train a CLIP-style byte-level BPE on the prompt vocabulary and save it as a ``CLIPTokenizer`` folder.

    Writes ``vocab.json`` and ``merges.txt`` (readable by the slow and fast CLIP tokenizers of transformers 4 and
    5) next to whatever ``save_pretrained`` writes.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = list(COLOURS) + list(SHAPES) + [w for r in RELATIONS for w in r.split()] + ["a", "an", "and", "on", "the"]
    corpus = sample_train_prompts(4000, rng) + [" ".join(words)] * 10
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), "removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    # Make every single byte encodable at the end of a word too (as CLIP's vocabulary does), then the merges.
    vocab = tok.get_vocab()
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges_path = os.path.join(folder, "merges.txt")
    tok.model.save(folder)  # vocab.json + merges.txt of the trained model
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
    vocab_text, merges_text = open(os.path.join(folder, "vocab.json")).read(), open(merges_path).read()
    merges = [tuple(line.split(" ")) for line in merges_text.splitlines()[1:] if line]
    try:  # transformers >= 5 takes the vocabulary and merges themselves
        clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    except TypeError:  # transformers 4 takes files
        clip = CLIPTokenizer(
            vocab_file=os.path.join(folder, "vocab.json"), merges_file=merges_path, model_max_length=MAX_LENGTH
        )
    clip.save_pretrained(folder)
    # save_pretrained of transformers 5 writes tokenizer.json only; keep the files transformers 4 needs.
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        f.write(vocab_text)
    with open(merges_path, "w") as f:
        f.write(merges_text)
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _to_model(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images) * 2 - 1


# ----------------------------------------------------------------------------------------------- VAE
def train_vae(vae, args, rng):
    """L1 + L2 reconstruction with object pixels weighted ``object_weight``× and a tiny KL term."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="vae", mininterval=10)
    t0 = time.time()
    for step in bar:
        if args.vae_minutes and time.time() - t0 > 60 * args.vae_minutes:
            print(f"vae: time cap reached after {step} steps", flush=True)
            break
        x = _to_model(render(sample_train_prompts(args.vae_batch_size, rng), rng=rng))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        coloured = ((x.amax(1) - x.amin(1)) > 0.4).float()[:, None]  # chroma > 0.2 in [0, 1] units
        w = 1 + (args.object_weight - 1) * coloured
        err = rec - x
        loss = (w * (err.abs() + err.pow(2))).mean() + args.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return vae


@torch.no_grad()
def vae_check(vae, n=256, seed=12345) -> float:
    """Alignment reward of VAE reconstructions of fresh renders (1.0 = the checker reads them perfectly)."""
    prompts = sample_train_prompts(n, np.random.default_rng(seed))
    x = _to_model(render(prompts, seed=seed))
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return alignment_reward((rec + 1) / 2, prompts)[0].mean().item()


# ----------------------------------------------------------------------------------------------- shared
@torch.no_grad()
def ema_update(emas, models, decay: float) -> None:
    """Move each EMA copy's weights a step of ``1 - decay`` towards its model's."""
    for ema, model in zip(emas, models):
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


class CheckpointPicker:
    """The checkpoints `--pick` can choose: the most aligned one, and the first whose single-object alignment
    reaches `single_solved` (falling back to the most aligned)."""

    def __init__(self, single_solved: float):
        self.single_solved = single_solved
        self.best, self.first_solved = (-1.0, None), None

    def record(self, result: dict, path: str) -> None:
        if result["overall"] > self.best[0]:
            self.best = (result["overall"], path)
        if self.first_solved is None and result.get("single", 0.0) >= self.single_solved:
            self.first_solved = path

    def picks(self) -> dict:
        return {"best": self.best[1], "single_solved": self.first_solved or self.best[1]}


def add_training_arguments(p: argparse.ArgumentParser, pick_help: str) -> None:
    """The options both toy pretraining scripts share: data, optimiser, EMA, evaluation and the checkpoint pick."""
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num_images", type=int, default=16000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--prompt_dropout", type=float, default=0.1)
    p.add_argument("--eval_every", type=int, default=300)
    p.add_argument("--pick", choices=["single_solved", "best", "last"], default="single_solved", help=pick_help)
    p.add_argument("--single_solved", type=float, default=0.95)


# ----------------------------------------------------------------------------------------------- UNet
@torch.no_grad()
def quick_eval(pipe, prompts, seed: int) -> dict:
    """Alignment of sampled images (DDIM 20, eta 1, guidance 5, one seed), overall and per template."""
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(prompts))]
    images = pipe(
        list(prompts), num_inference_steps=20, guidance_scale=5.0, eta=1.0, generator=gens, output_type="pt"
    ).images
    attrs, _, reward, templates = score_attributes(images, prompts)
    out = {"overall": reward.mean().item()}
    for t in ("single", "binding", "relation"):
        idx = [i for i, tt in enumerate(templates) if tt == t]
        if idx:
            out[t] = reward[idx].mean().item()
    return out


def train_unet(vae, unet, text_encoder, tokenizer, scheduler, args, rng, log):
    n = args.num_images
    prompts = sample_train_prompts(n, rng)
    ids = tokenize(tokenizer, prompts)
    empty = tokenize(tokenizer, [""])[0]
    t0 = time.time()
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, n, 256), desc="encode", mininterval=10):
            x = _to_model(render(prompts[i : i + 256], rng=rng))
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    means, stds = torch.cat(means), torch.cat(stds)
    scaling = 1.0 / torch.cat([means + stds * torch.randn_like(stds)]).std().item()
    vae.register_to_config(scaling_factor=scaling)
    print(f"encoded {n} images in {time.time() - t0:.0f}s; latent scaling factor {scaling:.4f}", flush=True)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    acp = scheduler.alphas_cumprod
    snr = acp / (1 - acp)
    weight = torch.clamp((1 + snr) / snr, max=args.snr_weight_max)
    eval_prompts = train_prompts()
    pipe = assemble_pipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=copy.deepcopy(scheduler)
    )
    pipe.set_progress_bar_config(disable=True)
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    picker = CheckpointPicker(args.single_solved)
    gen = torch.Generator().manual_seed(args.seed)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(1, args.unet_steps + 1), desc="unet", mininterval=10)
    t0 = time.time()
    for step in bar:
        if args.unet_minutes and time.time() - t0 > 60 * args.unet_minutes:
            print(f"unet: time cap reached after {step - 1} steps", flush=True)
            break
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        tok = ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.prompt_dropout
        tok[drop] = empty
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noisy = scheduler.add_noise(lat, noise, t)
        cond = text_encoder(tok)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = (weight[t] * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update((ema_unet, ema_text), (unet, text_encoder), args.ema_decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = step == args.unet_steps or (args.unet_minutes and time.time() - t0 > 60 * args.unet_minutes)
        if step % args.eval_every == 0 or last:
            res = quick_eval(pipe, eval_prompts, seed=0)
            res.update(step=step, minutes=(time.time() - t0) / 60)
            log["unet_evals"].append(res)
            print(json.dumps(res), flush=True)
            path = os.path.join(ckpt_dir, f"step_{step:05d}.pt")
            torch.save({"unet": ema_unet.state_dict(), "text_encoder": ema_text.state_dict()}, path)
            picker.record(res, path)
            with open(os.path.join(args.output_dir, "log.json"), "w") as f:
                json.dump(log, f, indent=1)
    log["unet_minutes"] = (time.time() - t0) / 60
    log["unet_steps_done"] = log["unet_evals"][-1]["step"] if log["unet_evals"] else 0
    return ema_unet, ema_text, picker.picks()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_arguments(
        p,
        "which EMA checkpoint to save: the first whose single-object train alignment reaches --single_solved "
        "(shapes and colours are drawn, two-object prompts are not yet mastered: room for RL), the best, or the last",
    )
    p.add_argument("--vae_steps", type=int, default=800)
    p.add_argument("--vae_batch_size", type=int, default=16)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--object_weight", type=float, default=5.0)
    p.add_argument("--vae_kl", type=float, default=1e-6)
    p.add_argument("--unet_steps", type=int, default=2400)
    p.add_argument("--snr_weight_max", type=float, default=10.0)
    p.add_argument("--vae_minutes", type=float, default=None, help="optional wall-clock cap on the VAE stage")
    p.add_argument("--unet_minutes", type=float, default=None, help="optional wall-clock cap on the UNet stage")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    log = {"args": vars(args), "unet_evals": []}
    start = time.time()

    tokenizer = build_tokenizer(os.path.join(args.output_dir, "tokenizer_build"), seed=args.seed)
    vae, unet, text_encoder, scheduler = build_toy_components(tokenizer)
    for name, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        log[f"{name}_params"] = sum(q.numel() for q in m.parameters())
    print({k: v for k, v in log.items() if k.endswith("_params")}, "vocab", len(tokenizer), flush=True)

    t0 = time.time()
    train_vae(vae, args, rng)
    log["vae_minutes"] = (time.time() - t0) / 60
    log["vae_reconstruction_reward"] = vae_check(vae)
    print(
        f"vae: {log['vae_minutes']:.1f} min, reward of reconstructions {log['vae_reconstruction_reward']:.4f}",
        flush=True,
    )
    vae.requires_grad_(False)

    ema_unet, ema_text, picks = train_unet(vae, unet, text_encoder, tokenizer, scheduler, args, rng, log)
    if args.pick != "last" and picks[args.pick] is not None:
        state = torch.load(picks[args.pick])
        ema_unet.load_state_dict(state["unet"])
        ema_text.load_state_dict(state["text_encoder"])
        log["picked"] = picks[args.pick]
    pipe = assemble_pipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=scheduler)
    pipe.save_pretrained(os.path.join(args.output_dir, "pipeline"), safe_serialization=True)
    # Keep vocab.json / merges.txt for transformers 4 next to what save_pretrained wrote.
    for name in ("vocab.json", "merges.txt"):
        src = os.path.join(args.output_dir, "tokenizer_build", name)
        with open(src) as f, open(os.path.join(args.output_dir, "pipeline", "tokenizer", name), "w") as g:
            g.write(f.read())
    log["total_minutes"] = (time.time() - start) / 60
    with open(os.path.join(args.output_dir, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(
        f"done in {log['total_minutes']:.1f} min; saved {args.output_dir}/pipeline ({log.get('picked', 'last')})",
        flush=True,
    )


if __name__ == "__main__":
    main()
