"""The DPO-style pair loss (loss_type='dpo') and the KL term against the base model."""

import math

import pytest
import torch

from b2trl import batching
from b2trl.losses import DPOPairLoss
from helpers import make_trainer, small_config

STEPS = 3  # interval steps of the sampled pairs (6 sampling steps, branch point 3)


def _pairs(trainer, rows=(0, 1, 3, 4), seed=0):
    """Two (winner, loser) pairs of branches of the same prompt, with the reference's log-probabilities."""
    torch.manual_seed(seed)
    samples, _ = trainer._generate_samples(iterations=1, batch_size=2, branch_point=3)
    index = torch.tensor(rows)
    batch = {k: v[index] for k, v in samples[0].items()}
    batch["row_weight"] = torch.ones(len(rows))
    batch["advantages"] = torch.tensor([1.0, -1.0] * (len(rows) // 2))
    batch.update(trainer.reference_pass(batch))
    return batch


def _loss_and_grad(trainer, batch, group_size=2):
    trainer.optimizer.zero_grad()
    trainer.training_denoiser.train()
    out = trainer.micro_batch_loss(batching.stack_steps(batch, slice(0, STEPS), group_size=group_size))
    out.loss.backward()
    grad = torch.cat([p.grad.reshape(-1).clone() for p in trainer.trainable_params])
    trainer.optimizer.zero_grad()
    return out, grad


def test_at_the_reference_every_pair_loss_is_log_2(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, loss_type="dpo")
    batch = _pairs(trainer)
    torch.testing.assert_close(batch["ref_log_probs"], batch["log_probs"], rtol=0, atol=1e-5)
    out, grad = _loss_and_grad(trainer, batch)
    assert abs(float(out.loss.detach()) - math.log(2)) < 1e-6
    assert abs(float(out.stats["dpo_margin"])) < 1e-6
    assert grad.abs().max() > 0  # log 2 is not a stationary point: the pair still has a direction


def test_a_pair_of_identical_transitions_gives_zero_gradient(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, loss_type="dpo")
    _, grad = _loss_and_grad(trainer, _pairs(trainer, rows=(0, 0, 4, 4)))
    assert float(grad.abs().max()) < 1e-9


def test_swapping_winner_and_loser_flips_the_gradient(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, loss_type="dpo")
    batch = _pairs(trainer, rows=(0, 1, 3, 4))
    _, grad = _loss_and_grad(trainer, batch)
    _, swapped = _loss_and_grad(trainer, {k: v[torch.tensor([1, 0, 3, 2])] for k, v in batch.items()})
    assert grad.abs().max() > 1e-6
    torch.testing.assert_close(swapped, -grad, rtol=1e-4, atol=1e-8)


def test_the_ratio_clamp_holds():
    loss = DPOPairLoss(beta=1.0, clip_range=0.1)
    log_prob = torch.tensor([0.5, -0.02], requires_grad=True)  # winner far above the reference, loser close to it
    out = loss(log_prob, {"ref_log_probs": torch.zeros(2), "row_weight": torch.ones(2)})
    margin = math.log(1.1) - (-0.02)
    assert abs(float(out.loss.detach()) - math.log1p(math.exp(-margin))) < 1e-6
    out.loss.backward()
    assert float(log_prob.grad[0]) == 0.0  # clamped: the winner's ratio no longer moves the loss
    assert float(log_prob.grad[1]) > 0  # pushing the loser further down still lowers it
    padded = loss(log_prob.detach(), {"ref_log_probs": torch.zeros(2), "row_weight": torch.zeros(2)})
    assert float(padded.loss) == 0.0 and float(padded.weights["dpo_margin"]) == 0.0


def test_after_an_update_the_reference_is_still_the_base_model(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, loss_type="dpo", train_learning_rate=3e-2, num_epochs=1)
    base = make_trainer(tiny_model_dir, loss_type="dpo")  # the same seed: the same (zero-effect) LoRA init
    base.sampler.timesteps(base.sd_pipeline.scheduler, 6, "cpu")
    trainer.step(0, 0)
    assert trainer.last_stage_stats["optimizer_steps"] > 0
    batch = _pairs(trainer, seed=1)
    flat = batching.stack_steps(batch, slice(0, STEPS))
    with torch.no_grad():
        from b2trl.models import Conditioning

        base_log_probs = base.transition_log_prob(
            flat["latents"], flat["timesteps"], flat["next_latents"], Conditioning.from_rows(flat)
        )
    torch.testing.assert_close(batch["ref_log_probs"].reshape(-1), base_log_probs, rtol=0, atol=1e-5)
    out, _ = _loss_and_grad(trainer, batch)
    assert abs(float(out.loss.detach()) - math.log(2)) > 1e-4  # the policy moved away from the reference


def test_full_fine_tuning_keeps_a_frozen_copy_as_the_reference(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, loss_type="dpo", use_lora=False, train_learning_rate=1e-2, num_epochs=1)
    reference = trainer.reference.copy
    assert reference is not None and reference is not trainer.denoiser
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trained_before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters()}
    trainer.step(0, 0)
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    assert not all(torch.equal(p, trained_before[n]) for n, p in trainer.denoiser.named_parameters())


def test_kl_term_at_the_reference_is_zero_and_leaves_the_ppo_gradient_unchanged(tiny_model_dir):
    plain = make_trainer(tiny_model_dir)
    with_kl = make_trainer(tiny_model_dir, kl_coef=0.5)
    assert plain.reference is None and with_kl.reference is not None
    plain.sampler.timesteps(plain.sd_pipeline.scheduler, 6, "cpu")
    batch = _pairs(with_kl)
    out_kl, grad_kl = _loss_and_grad(with_kl, batch, group_size=1)
    out, grad = _loss_and_grad(plain, {k: v for k, v in batch.items() if not k.startswith("ref_")}, group_size=1)
    assert float(out_kl.stats["kl_ref"]) < 1e-10
    torch.testing.assert_close(out_kl.loss, out.loss, rtol=0, atol=1e-7)
    assert grad.abs().max() > 0
    # the same gradient up to float noise: the two means differ by rounding only (batches of other sizes)
    assert float((grad_kl - grad).abs().max()) <= 1e-4 * float(grad.abs().max())


def test_kl_term_pulls_a_trained_policy_back_and_is_logged(tiny_model_dir):
    # best/worst keeps single branches on the tiny model's small reward gaps, so every stage trains
    trainer = make_trainer(tiny_model_dir, kl_coef=1.0, train_learning_rate=3e-2, num_epochs=3,
                           selection_rule="best_worst")
    trainer.train()
    assert trainer.last_stage_stats["kl_ref"] > 0


def test_dpo_trains_end_to_end_and_logs_its_statistics(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, loss_type="dpo", num_epochs=3, kl_coef=0.01)
    seen = []
    trainer.stage_end_callbacks.append(lambda t, stats: seen.append(dict(stats)))
    trainer.train()
    trained = [s for s in seen if s["skipped_update"] == 0]
    assert trained
    for stats in trained:
        assert stats["pairs_kept"] == stats["groups_kept"] and stats["samples_kept"] == 2 * stats["pairs_kept"]
        assert 0.0 <= stats["dpo_accuracy"] <= 1.0 and "dpo_margin" in stats and "kl_ref" in stats
        assert stats["loss"] == pytest.approx(math.log(2), abs=0.05)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_type="kto"), "loss_type must be one of"),
        (dict(loss_type="dpo", dpo_beta=0.0), "dpo_beta must be > 0"),
        (dict(kl_coef=-0.1), "kl_coef must be >= 0"),
        (dict(loss_type="dpo", num_branches=1, selection_rule="all"), "needs num_branches >= 2"),
        (dict(loss_type="dpo", selection_rule="all"), "loss_type='dpo' needs selection_rule='pairs' \\(got 'all'\\)"),
    ],
)
def test_invalid_loss_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)
