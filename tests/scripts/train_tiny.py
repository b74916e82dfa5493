"""Train the tiny test pipeline in its own process (used by the kill-and-resume and multi-process tests).

    python train_tiny.py MODEL_DIR PROJECT_DIR [--epochs N] [--sleep S] [--stats FILE] [--distributed]
        [--resolution PIXELS] [--full] [--fsdp] [--fsdp-kwargs JSON] [--save-freq N] [--resume-from WHERE]
        [--dump-weights FILE] [--export DIR]
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from b2trl import B2DiffuRLTrainer, load_pipeline  # noqa: E402
from helpers import brightness_reward, cycling_prompts, small_config  # noqa: E402

torch.set_num_threads(1)


def leave():
    """Exit once everything is written, without the interpreter's teardown: there, a background thread of a
    finished gloo run occasionally aborts ("terminate called without an active exception", SIGABRT) although
    the process group was destroyed, which would fail a test whose results are already on disk."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("project_dir")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds each reward call waits (a slow reward)")
parser.add_argument("--stats", default=None, help="append each stage's stats here as JSON lines")
parser.add_argument("--distributed", action="store_true", help="per-rank prompts and a weight check per stage")
parser.add_argument("--loss-type", default="ppo", help="B2DiffuRLConfig.loss_type")
parser.add_argument("--selection-rule", default="best_worst", help="B2DiffuRLConfig.selection_rule")
parser.add_argument("--advantage-std", default="group", help="B2DiffuRLConfig.advantage_std")
parser.add_argument("--ema-decay", type=float, default=0.0, help="B2DiffuRLConfig.ema_decay")
parser.add_argument("--kl-coef", type=float, default=0.0, help="B2DiffuRLConfig.kl_coef")
parser.add_argument("--resolution", type=int, default=None,
                    help="B2DiffuRLConfig.resolution (a FLUX pipeline's own default size is too large for a CPU)")
parser.add_argument("--plain-ddpo", action="store_true", help="run TRL's DDPOTrainer instead (a control)")
parser.add_argument("--full", action="store_true", help="full fine-tuning (use_lora=False)")
parser.add_argument("--fsdp", action="store_true", help="B2DiffuRLConfig.fsdp: the denoiser sharded with FSDP2")
parser.add_argument("--fsdp-kwargs", type=json.loads, default={}, help="B2DiffuRLConfig.fsdp_kwargs, as JSON")
parser.add_argument("--save-freq", type=int, default=None, help="B2DiffuRLConfig.save_freq (default: 1, or 0 with "
                    "--distributed)")
parser.add_argument("--resume-from", default=None, help="B2DiffuRLConfig.resume_from")
parser.add_argument("--dump-weights", default=None, help="torch.save the denoiser's trained parameters (whole) here")
parser.add_argument("--export", default=None, help="save_pretrained into this folder after training (and, with "
                    "--ema-decay, the EMA weights into FOLDER_ema)")
args = parser.parse_args()


def reward(images, prompts, metadata):
    time.sleep(args.sleep)
    bright, _ = brightness_reward(images, prompts, metadata)
    # prompts starting with "flat" get a constant reward: their groups never pass the thresholds
    flat = torch.tensor([p.startswith("flat") for p in prompts])
    return torch.where(flat, torch.full_like(bright, 0.5), bright), {}


accelerator_kwargs = {"cpu": True} if args.distributed else {}
if args.distributed:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    # rank 0 trains on varying rewards, rank 1 on flat ones: their kept-sample counts differ
    prompts = ("a cat", "a dog") if state.process_index == 0 else ("flat one", "flat two")
else:
    prompts = ("a cat", "a dog", "a red circle", "a blue square")
config = small_config(
    num_epochs=args.epochs,
    save_freq=args.save_freq if args.save_freq is not None else 0 if args.distributed else 1,
    resume_from=args.resume_from,
    fsdp=args.fsdp,
    fsdp_kwargs=args.fsdp_kwargs,
    project_kwargs={"project_dir": args.project_dir},
    accelerator_kwargs=accelerator_kwargs,
    train_learning_rate=1e-2,
    loss_type=args.loss_type,
    selection_rule=args.selection_rule,
    advantage_std=args.advantage_std,
    ema_decay=args.ema_decay,
    kl_coef=args.kl_coef,
    resolution=args.resolution,
)
if args.plain_ddpo:
    from trl import DDPOConfig, DDPOTrainer

    plain = DDPOConfig(
        num_epochs=args.epochs, sample_num_steps=4, sample_batch_size=2, sample_num_batches_per_epoch=1,
        train_batch_size=2, mixed_precision="no", save_freq=1000, accelerator_kwargs=accelerator_kwargs,
        train_learning_rate=1e-2,
    )
    trainer = DDPOTrainer(plain, reward, cycling_prompts(prompts), load_pipeline(args.model_dir))
    trainer.train()
    params = [p for p in trainer.sd_pipeline.unet.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    everyone = trainer.accelerator.gather(flat.unsqueeze(0))
    if args.stats and trainer.accelerator.is_main_process:
        with open(args.stats, "a") as f:
            f.write(json.dumps({"max_weight_diff_across_ranks": float((everyone - everyone[0]).abs().max())}) + "\n")
    # without this, a gloo process could abort at interpreter exit ("terminate called without an active exception")
    trainer.accelerator.end_training()
    leave()


trainer = B2DiffuRLTrainer(config, reward, cycling_prompts(prompts), load_pipeline(args.model_dir,
                                                                                  use_lora=not args.full))


def whole(tensor):
    """A parameter's whole values on every process (a sharded one gathered)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def log_stage(trainer, stats):
    record = dict(stats, rank=trainer.accelerator.process_index)
    if args.distributed:
        flat = torch.cat([whole(p.detach()).reshape(-1) for p in trainer.trainable_params])
        everyone = trainer.accelerator.gather(flat.unsqueeze(0))
        record["max_weight_diff_across_ranks"] = float((everyone - everyone[0]).abs().max())
        stage = trainer.last_stage
        # each rank's own rows of the advantages every rank computed from the gathered rewards
        local = torch.tensor(stage.local(stage.advantages), dtype=torch.float64)
        record["advantages_by_rank"] = trainer.accelerator.gather(local.unsqueeze(0)).tolist()
        kept = trainer.accelerator.gather(torch.tensor([int(stage.local(stage.keep).sum())]))
        record["kept_per_rank"] = kept.tolist()
        record["weight_norm"] = float(flat.norm())
        record["rewards"] = stage.rewards.tolist()
        record["prompts"] = list(stage.all_prompts)
        if trainer.ema is not None and trainer.sharding is None:  # a sharded EMA differs by design (its shards)
            average = torch.cat([a.reshape(-1) for a in trainer.ema.average])
            everyone = trainer.accelerator.gather(average.unsqueeze(0))
            record["max_ema_diff_across_ranks"] = float((everyone - everyone[0]).abs().max())
    if args.stats and trainer.accelerator.is_main_process:
        with open(args.stats, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


trainer.stage_end_callbacks.append(log_stage)
trainer.train()
if args.dump_weights:
    weights = {n: whole(p.detach()).cpu() for n, p in trainer.denoiser.named_parameters()}
    if trainer.accelerator.is_main_process:
        torch.save(weights, args.dump_weights)
if args.export:
    trainer.save_pretrained(args.export)
    if trainer.ema is not None:
        trainer.save_pretrained(args.export + "_ema", ema=True)
trainer.accelerator.end_training()
leave()
