"""The wheel as a user installs it: built from the sources, installed into a fresh environment, and run from a folder
outside the repository (no examples/, no tests/): `b2trl toy`, `b2trl train --config` and `b2trl eval`.

Offline where it can be: the wheel is built with this environment's setuptools (when it is recent enough; else pip
fetches the build requirements from the package index), and the fresh environment reads its dependencies from this
one's site-packages through a ``.pth`` file, added after the wheel is installed so that pip never sees (or touches)
the b2trl installed here.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd=None, timeout=300, env=None):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _can_build_here() -> bool:
    """Whether this environment's setuptools builds the wheel itself (68+, and bdist_wheel: 70.1+ or `wheel`)."""
    import importlib.util

    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2] if part.isdigit())
    return version >= (70, 1) or (version >= (68, 0) and importlib.util.find_spec("wheel") is not None)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    # build from a copy of what the wheel is made of, so that the build leaves nothing in the repository
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "b2trl", source / "b2trl", ignore=shutil.ignore_patterns("__pycache__"))
    # offline with this environment's setuptools when it can build the wheel; else pip fetches the build
    # requirements from the package index, as `pip install -e .` does
    offline = ["--no-build-isolation", "--no-index"] if _can_build_here() else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", work / "dist", source])
    (wheel,) = (work / "dist").glob("b2trl-*.whl")
    env = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env])
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    Path(site, "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return env


def test_the_installed_wheel_runs_toy_train_and_eval_outside_the_repository(venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    b2trl = venv / "bin" / "b2trl"
    where = _run([venv / "bin" / "python", "-c", "import b2trl; print(b2trl.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(venv))  # the wheel's b2trl, not the repository's

    # the toy job (a short one), with its shipped model and held-out report from the wheel's package data
    _run([b2trl, "toy", "--num_epochs", "1", "--sample_batch_size", "4", "--heldout_seeds", "1",
          "--output_dir", "toy", "--no_branch_images"], cwd=tmp_path, env=env)
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["heldout_alignment_base"] > 0.5 and (tmp_path / "toy" / "before_after_heldout.png").exists()

    (tmp_path / "run.yaml").write_text(
        "pretrained_model: toy\nnum_epochs: 1\nsample_num_steps: 6\nsample_batch_size: 2\n"
        "sample_num_batches_per_epoch: 1\nnum_branches: 2\ntrain_gradient_accumulation_steps: 1\n"
        "interval_schedule: {initial_length: 2, num_stages: 1}\n"
    )
    _run([b2trl, "train", "--config", "run.yaml", "--output_dir", "train", "--no_branch_images"], cwd=tmp_path,
         env=env)
    assert (tmp_path / "train" / "lora" / "pytorch_lora_weights.safetensors").exists()

    done = _run([b2trl, "eval", "--base", "toy", "--lora", "train", "--reward", "toy_alignment",
                 "jpeg_compressibility", "--prompts", "a red circle", "--seeds", "0", "--num_inference_steps", "6",
                 "--output_dir", "eval"], cwd=tmp_path, env=env)
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert list(written["rewards"]["toy_alignment"]) == ["base", "train"]
    assert "toy_alignment" in done.stdout and (tmp_path / "eval" / "eval_grid.png").exists()
    assert "should be kept in float32" not in done.stderr and "No LoRA keys" not in done.stderr
