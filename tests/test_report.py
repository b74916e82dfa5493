"""What a run shows people: labelled grids, the reward curve with its held-out marks, the toy run's report."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from b2trl.images import image_grid
from b2trl.toy import heldout_prompts, parse_prompt
from b2trl.toy.evaluate import summarize
from b2trl.toy.report import HeldOutReport


def _dark_columns(picture, rows) -> np.ndarray:
    """Which x positions have a dark (text) pixel within the given rows."""
    pixels = np.asarray(picture.convert("L"))[rows]
    return (pixels < 128).any(axis=0)


def test_grid_column_labels_sit_above_their_columns():
    images = torch.ones(2, 3, 8, 8)  # white tiles: any dark pixel is text
    plain = image_grid(images, nrow=2, scale=4)
    labelled = image_grid(images, nrow=2, scale=4, column_labels=["base · seed 0", "trained · seed 0"])
    band = labelled.height - plain.height
    assert band > 8  # room for a line of text above the images
    dark = _dark_columns(labelled, slice(0, band))
    cell = (labelled.width - 2) // 2
    assert dark[:cell].any() and dark[cell:].any()  # one label over each column
    assert not _dark_columns(labelled, slice(band, None)).any()  # and none over the images
    two_lines = image_grid(images, nrow=2, scale=4, column_labels=["base\nseed 0", "trained\nseed 0"])
    assert two_lines.height > labelled.height


def test_grid_is_wide_enough_for_long_labels():
    images = torch.zeros(2, 3, 4, 4)
    grid = image_grid(images, nrow=2, scale=1, column_labels=["a label far wider than a four-pixel tile", "b"])
    assert grid.width > 100


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_reward_curve_marks_held_out_alignment_before_and_after(tmp_path):
    from b2trl.images import plot_reward_curve, reward_curve_figure

    rows = [{"stage": k, "reward_mean": 0.5 + 0.01 * k, "reward_std": 0.1} for k in range(4)]
    fig = reward_curve_figure(rows, heldout={"label": "held-out alignment", "base": 0.865, "trained": 0.896})
    assert len(fig.axes) == 2  # the evaluation has its own axis
    marks = fig.axes[1].get_lines()
    assert sorted(line.get_ydata()[0] for line in marks) == [0.865, 0.896]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "held-out alignment, base: 0.865" in legend and "held-out alignment, trained: 0.896" in legend
    assert len(reward_curve_figure(rows).axes) == 1  # no evaluation, no second axis
    path = plot_reward_curve(rows, str(tmp_path / "curve.png"), heldout={"base": 0.1, "trained": 0.2})
    assert Image.open(path).size[0] > 0


def _fake_result(seed):
    prompts = heldout_prompts()
    images = torch.rand(2, len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return summarize(images, prompts), images


def test_held_out_report_writes_grid_evaluation_and_card_material(tmp_path):
    (base, base_images), (trained, trained_images) = _fake_result(0), _fake_result(1)
    report = HeldOutReport(base, trained, [0, 1], {"base": base_images, "trained": trained_images})
    report.write(str(tmp_path), shown=3)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["base"]["overall"] == base["overall"] and saved["trained"]["overall"] == trained["overall"]
    grid = Image.open(tmp_path / "before_after_heldout.png")
    tile = 32 * 3 + 2
    assert grid.width > 4 * tile and grid.height > 3 * tile  # 3 prompts × (2 base + 2 trained) plus labels

    summary = report.summary()
    assert summary["heldout_alignment_base"] == base["overall"]
    assert summary["before_after_grid"] == str(tmp_path / "before_after_heldout.png")
    rows = report.card_evaluation()
    overall = rows["held-out alignment (45 prompts × 2 seeds)"]
    assert overall == {"base": base["overall"], "trained": trained["overall"]}
    assert {f"held-out alignment, {t} prompts" for t in ("single", "binding", "relation")} <= rows.keys()
    assert report.curve_marks()["trained"] == trained["overall"]
    assert "base 0." in report.headline() and "-> trained 0." in report.headline()

    prompts, seeds, images = report.card_samples(num_prompts=2, num_seeds=1)
    assert [parse_prompt(p).template for p in prompts] == ["relation", "binding"]  # where the base model errs
    assert seeds == [0] and images["base"].shape == (1, 2, 3, 32, 32)
    index = heldout_prompts().index(prompts[1])
    torch.testing.assert_close(images["trained"][0, 1], trained_images[0, index])
