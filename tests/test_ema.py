"""The exponential moving average of the trained weights: the closed form, checkpoints, export."""

import pytest
import torch
from safetensors.torch import load_file

from b2trl.ema import ParameterEMA
from helpers import make_trainer


def test_the_average_is_the_closed_form_after_k_updates_of_every_nth_step():
    layer = torch.nn.Linear(3, 2)
    initial = [p.detach().clone() for p in layer.parameters()]
    ema = ParameterEMA(layer.parameters(), decay=0.8, update_every=2)
    seen = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        if ema.step(step):
            seen.append([p.detach().clone() for p in layer.parameters()])
    assert ema.num_updates == len(seen) == 3  # steps 2, 4, 6
    k = len(seen)
    for i, average in enumerate(ema.average):
        expected = 0.8**k * initial[i] + sum(0.2 * 0.8 ** (k - j - 1) * seen[j][i] for j in range(k))
        torch.testing.assert_close(average, expected, rtol=1e-6, atol=1e-6)
    # applied(): the average inside the block, the trained weights again after it
    trained = [p.detach().clone() for p in layer.parameters()]
    with ema.applied():
        for p, average in zip(layer.parameters(), ema.average):
            assert torch.equal(p, average)
    for p, value in zip(layer.parameters(), trained):
        assert torch.equal(p, value)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        ParameterEMA(layer.parameters(), decay=1.0)


def _trainer(model_dir, tmp_path, **overrides):
    values = dict(ema_decay=0.7, train_learning_rate=1e-2, project_kwargs={"project_dir": str(tmp_path)})
    values.update(overrides)
    return make_trainer(model_dir, **values)


def test_the_trainer_averages_the_weights_of_each_optimizer_step(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, ema_update_every=1, ema_on_cpu=True)
    initial = [p.detach().clone() for p in trainer.trainable_params]
    history = []
    trainer.optimizer.optimizer.register_step_post_hook(
        lambda *_: history.append([p.detach().clone() for p in trainer.trainable_params])
    )
    trainer.train()
    k = trainer.ema.num_updates
    assert k == trainer.global_step == len(history) > 1
    for i, average in enumerate(trainer.ema.average):
        expected = 0.7**k * initial[i] + sum(0.3 * 0.7 ** (k - j - 1) * history[j][i] for j in range(k))
        assert average.device.type == "cpu"
        torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(average, trainer.trainable_params[i])


def test_the_average_survives_a_checkpoint_and_is_exported_for_diffusers(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    first = _trainer(tiny_model_dir, tmp_path, save_freq=1, num_epochs=1)
    first.train()
    saved = [a.clone() for a in first.ema.average]
    resumed = _trainer(tiny_model_dir, tmp_path, save_freq=1, num_epochs=2, resume_from="latest")
    assert resumed.ema.num_updates == first.ema.num_updates > 0
    for a, b in zip(resumed.ema.average, saved):
        assert torch.equal(a, b)
    resumed.train()
    assert resumed.ema.num_updates > first.ema.num_updates  # the same average goes on

    live = [p.detach().clone() for p in resumed.trainable_params]
    resumed.save_pretrained(str(tmp_path / "ema"), ema=True)
    resumed.save_pretrained(str(tmp_path / "last"))
    for p, value in zip(resumed.trainable_params, live):
        assert torch.equal(p, value)  # saving the average left the trained weights in place
    ema_file, last_file = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("ema", "last"))
    assert ema_file.keys() == last_file.keys()
    # loaded back into a fresh adapter, the exported file is exactly the average
    fresh = _trainer(tiny_model_dir, tmp_path / "fresh")
    fresh.load_lora_weights(str(tmp_path / "ema"))
    for p, average in zip(fresh.trainable_params, resumed.ema.average):
        torch.testing.assert_close(p.detach(), average)
    assert "moving average" in (tmp_path / "ema" / "README.md").read_text()
    # diffusers loads the exported average like any LoRA, and it changes the images
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base = pipe("a cat", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "ema"))
    tuned = pipe("a cat", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert (tuned - base).abs().max() > 0


def test_exporting_an_average_that_was_not_kept_is_an_error(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, ema_decay=0.0)
    assert trainer.ema is None
    with pytest.raises(ValueError, match="ema_decay > 0"):
        trainer.save_pretrained(str(tmp_path / "out"), ema=True)
