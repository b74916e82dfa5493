"""Pretrain the tiny toy-world ``StableDiffusion3Pipeline`` (rectified flow) on CPU.

    python -m b2trl.toy.pretrain_flow --output_dir DIR [--seed 0] [--steps 4000] [--transformer_minutes 40]

The flow model reuses what the SD toy model (``b2trl.toy.model_path()``) learned: its trained VAE, re-centred for
SD3's latent convention (``shift_factor`` and ``scaling_factor`` measured on the training latents), and its CLIP
tokenizer. New are a Unigram T5 tokenizer built by hand over the prompt words, two small CLIP text encoders with
projections, a small T5 encoder and an MMDiT transformer (``b2trl.toy.architecture.build_toy_sd3_components``), all
trained jointly from scratch with the flow-matching loss: x_t = (1 - σ) x_0 + σ ε, target ε - x_0 (the velocity
diffusers' Euler step integrates), σ drawn as a logit-normal shifted by 3, timestep 1000 σ, 10% empty prompts for
classifier-free guidance, EMA weights.

The data are the SD toy's: only training scenes (``world.sample_train_prompts``), rendered and encoded once.
EMA checkpoints are scored every ``--eval_every`` steps on the RL training prompts (never on held-out ones) with
diffusers' own pipeline at 20 steps, guidance 5 and ``max_sequence_length=16``; the first checkpoint whose
single-object prompts score ≥ 0.95 is saved as ``DIR/pipeline`` (``--pick best`` keeps the most aligned one), and
that folder is then scored on held-out and training prompts with seeds 0, 1, 2 (``DIR/evaluation.json``).

The T5 encoder sees prompts padded to 16 tokens, and that length is saved as ``tokenizer_3.model_max_length``.
diffusers pads T5 to ``max_sequence_length`` (256 by default) without an attention mask, so every sampler of this
model must pass ``max_sequence_length=16``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .architecture import build_toy_sd3_components
from .evaluate import evaluate_alignment
from .pretrain import CheckpointPicker, _to_model, add_training_arguments, ema_update, tokenize
from .world import COLOURS, RELATIONS, SHAPES, heldout_prompts, render, sample_train_prompts, train_prompts

T5_MAX_LENGTH = 16
SHIFT = 3.0
# the words of every prompt; each is one Unigram piece, anything else falls back to single characters
WORDS = tuple(
    dict.fromkeys(list(COLOURS) + list(SHAPES) + " ".join(RELATIONS).split() + ["a", "an", "and", "on", "the"])
)


# ----------------------------------------------------------------------------------------------- tokenizers
def build_t5_tokenizer(folder: str, model_max_length: int = T5_MAX_LENGTH):
    """Write a T5-style Unigram tokenizer over the prompt words and load it as a ``T5TokenizerFast``.

    ``<pad>``, ``</s>``, ``<unk>`` are ids 0, 1, 2 as in T5; every prompt word is one piece ``"▁word"`` and any
    other text falls back to single printable characters; input is lower-cased, ``</s>`` is appended, and there
    are no sentinel ids (``extra_ids=0``). Trained Unigram models on this tiny corpus keep single characters only,
    hence the hand-built vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    vocab += [("▁", -3.0)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    return T5TokenizerFast(tokenizer_file=path, extra_ids=0, model_max_length=model_max_length)


def load_sd_toy_parts():
    """The SD toy model's trained VAE (frozen) and its CLIP tokenizer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from . import model_path

    vae = AutoencoderKL.from_pretrained(model_path(), subfolder="vae").eval()
    vae.requires_grad_(False)
    return vae, CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")


# ----------------------------------------------------------------------------------------------- data
@torch.no_grad()
def encode_renders(vae, prompts, rng, batch_size: int = 256):
    """Render `prompts` (fresh layouts from `rng`) and return the VAE posterior means and standard deviations."""
    means, stds = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="encode", mininterval=10):
        dist = vae.encode(_to_model(render(prompts[i : i + batch_size], rng=rng))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_statistics(means, stds, generator) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)`` that make sampled training latents zero-mean and unit-variance, in SD3's
    convention ``latents = (sample - shift_factor) * scaling_factor``."""
    sample = means + stds * torch.randn(means.shape, generator=generator)
    return sample.mean().item(), 1.0 / sample.std().item()


# ----------------------------------------------------------------------------------------------- conditioning
def encode_text(text_encoder, text_encoder_2, text_encoder_3, clip_ids, clip_ids_2, t5_ids):
    """SD3's conditioning from token ids, as ``StableDiffusion3Pipeline.encode_prompt`` computes it.

    Both CLIP encoders' penultimate hidden states are concatenated along the width and zero-padded to T5's width;
    the T5 states follow them along the sequence (no attention mask, as in diffusers). The pooled embedding is
    the two CLIP projections side by side.

    Returns:
        ``(prompt_embeds, pooled_prompt_embeds)``.
    """
    states, pooled = [], []
    for encoder, ids in ((text_encoder, clip_ids), (text_encoder_2, clip_ids_2)):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5 = text_encoder_3(t5_ids)[0]
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def logit_normal_sigmas(n: int, generator, shift: float = SHIFT) -> torch.Tensor:
    """σ = sigmoid(N(0, 1)), then shifted as the scheduler shifts its sigmas: shift σ / (1 + (shift - 1) σ)."""
    sigma = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * sigma / (1 + (shift - 1) * sigma)


# ----------------------------------------------------------------------------------------------- sampling
def evaluate_flow(pipe, prompts, seeds=(0, 1, 2)) -> dict:
    """Alignment statistics of an SD3 pipeline's samples for `prompts` (`b2trl.toy.evaluate_alignment`, which
    samples a flow pipeline with its tokenizer_3's T5 length)."""
    return evaluate_alignment(pipe, prompts=list(prompts), seeds=list(seeds))


def _brief(result: dict) -> dict:
    out = {"overall": result["overall"], **result["per_template"]}
    if "relation" in result["per_attribute"]:
        out["relation_attribute"] = result["per_attribute"]["relation"]
    return out


def assemble_flow_pipeline(vae, clip_tokenizer, t5_tokenizer, transformer, text_encoders, scheduler):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoders[1],
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoders[2],
        tokenizer_3=t5_tokenizer,
    )


# ----------------------------------------------------------------------------------------------- training
def train_transformer(vae, clip_tokenizer, t5_tokenizer, modules, scheduler, args, rng, log):
    """Flow matching on encoded renders; returns the EMA modules and the checkpoint paths of each pick rule."""
    n = args.num_images
    t0 = time.time()
    prompts = sample_train_prompts(n, rng)
    means, stds = encode_renders(vae, prompts, rng)
    gen = torch.Generator().manual_seed(args.seed)
    shift_factor, scaling = latent_statistics(means, stds, gen)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling)
    log.update(encode_seconds=time.time() - t0, shift_factor=shift_factor, scaling_factor=scaling)
    print(
        f"encoded {n} renders in {time.time() - t0:.0f}s; shift {shift_factor:.4f}, scaling {scaling:.4f}", flush=True
    )

    clip_ids, t5_ids = tokenize(clip_tokenizer, prompts), tokenize(t5_tokenizer, prompts)
    clip_empty, t5_empty = tokenize(clip_tokenizer, [""])[0], tokenize(t5_tokenizer, [""])[0]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    transformer, text_encoders = modules[0], modules[1:]
    pipe = assemble_flow_pipeline(vae, clip_tokenizer, t5_tokenizer, emas[0], emas[1:], copy.deepcopy(scheduler))
    eval_prompts = train_prompts()
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    picker = CheckpointPicker(args.single_solved)
    for m in modules:
        m.train()
    bar = tqdm(range(1, args.steps + 1), desc="transformer", mininterval=10)
    t0 = time.time()
    for step in bar:
        out_of_time = args.transformer_minutes and time.time() - t0 > 60 * args.transformer_minutes
        if out_of_time:
            print(f"transformer: time cap reached after {step - 1} steps", flush=True)
            break
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen) - shift_factor) * scaling
        c_ids, t_ids = clip_ids[idx].clone(), t5_ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.prompt_dropout
        c_ids[drop], t_ids[drop] = clip_empty, t5_empty
        noise = torch.randn(x0.shape, generator=gen)
        sigma = logit_normal_sigmas(args.batch_size, gen, scheduler.config.shift)
        s = sigma[:, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        embeds, pooled = encode_text(*text_encoders, c_ids, c_ids, t_ids)
        pred = transformer(x_t, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma * 1000).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema_update(emas, modules, args.ema_decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = step == args.steps or (args.transformer_minutes and time.time() - t0 > 60 * args.transformer_minutes)
        if step % args.eval_every == 0 or last:
            res = _brief(evaluate_flow(pipe, eval_prompts, seeds=(0,)))
            res.update(step=step, minutes=(time.time() - t0) / 60, loss=loss.item())
            log["evals"].append(res)
            print(json.dumps(res), flush=True)
            path = os.path.join(ckpt_dir, f"step_{step:05d}.pt")
            torch.save([ema.state_dict() for ema in emas], path)
            picker.record(res, path)
            with open(os.path.join(args.output_dir, "log.json"), "w") as f:
                json.dump(log, f, indent=1)
    log["transformer_minutes"] = (time.time() - t0) / 60
    log["steps_done"] = log["evals"][-1]["step"] if log["evals"] else 0
    return emas, picker.picks()


def save_flow_pipeline(pipe, folder: str):
    """``save_pretrained`` plus the SD toy's ``vocab.json`` / ``merges.txt`` in both CLIP tokenizer folders (the
    files transformers 4 needs; transformers 5 writes ``tokenizer.json`` only), without the VAE's source path."""
    from . import model_path

    pipe.save_pretrained(folder, safe_serialization=True)
    vae_config = os.path.join(folder, "vae", "config.json")
    with open(vae_config) as f:
        config = json.load(f)
    config.pop("_name_or_path", None)  # the local folder the VAE was loaded from
    with open(vae_config, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(model_path(), "tokenizer", name), os.path.join(folder, sub, name))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_arguments(
        p,
        "which EMA checkpoint to save: the first whose single-object train alignment reaches --single_solved "
        "(as for the SD toy model), the most aligned one, or the last",
    )
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--transformer_minutes", type=float, default=None, help="optional wall-clock cap on training")
    p.add_argument("--final_seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the final evaluation")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    log = {"args": vars(args), "evals": []}
    start = time.time()

    vae, clip_tokenizer = load_sd_toy_parts()
    t5_tokenizer = build_t5_tokenizer(os.path.join(args.output_dir, "tokenizer_3_build"))
    modules = build_toy_sd3_components(clip_tokenizer, t5_tokenizer, latent_channels=vae.config.latent_channels)
    scheduler = modules[-1]
    modules = list(modules[:-1])
    for name, m in zip(("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"), modules):
        log[f"{name}_params"] = sum(q.numel() for q in m.parameters())
    print({k: v for k, v in log.items() if k.endswith("_params")}, flush=True)

    emas, picks = train_transformer(vae, clip_tokenizer, t5_tokenizer, modules, scheduler, args, rng, log)
    if args.pick != "last" and picks[args.pick] is not None:
        for ema, state in zip(emas, torch.load(picks[args.pick])):
            ema.load_state_dict(state)
        log["picked"] = picks[args.pick]
    folder = os.path.join(args.output_dir, "pipeline")
    save_flow_pipeline(assemble_flow_pipeline(vae, clip_tokenizer, t5_tokenizer, emas[0], emas[1:], scheduler), folder)
    log["folder_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    log["train_minutes"] = (time.time() - start) / 60

    if args.final_seeds:  # the saved folder as a user loads it
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
        evaluation = {}
        for split, prompts in (("heldout", heldout_prompts()), ("train", train_prompts())):
            evaluation[split] = evaluate_flow(pipe, prompts, seeds=tuple(args.final_seeds))
            res = evaluation[split]
            print(
                f"{split}: overall {res['overall']:.3f} per seed {[round(v, 3) for v in res['per_seed']]}", flush=True
            )
        with open(os.path.join(args.output_dir, "evaluation.json"), "w") as f:
            json.dump(evaluation, f, indent=1)
    log["total_minutes"] = (time.time() - start) / 60
    with open(os.path.join(args.output_dir, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"done in {log['total_minutes']:.1f} min; saved {folder} ({log.get('picked', 'last')})", flush=True)


if __name__ == "__main__":
    main()
